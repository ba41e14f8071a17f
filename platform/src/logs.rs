//! Log output of the `fleetcast` binary: on stderr, coloured only when stderr is a terminal (a
//! log file or pipe gets no escape codes), filtered by `RUST_LOG` or else [`DEFAULT_FILTER`].
//!
//! rumqttd 0.20 logs at ERROR on every ordinary disconnect ("router-drop" with
//! `Recv(Disconnected)`: the router ended the link after the client's DISCONNECT) and for a
//! connection closed before its CONNECT (the gateway's readiness probe), and its router logs
//! "no-connection id N is already gone" when a client's DISCONNECT and its closed socket both
//! reach it. Those share their target and level with rumqttd's real errors (a failed accept, a
//! refused link), so no `EnvFilter` directive can tell them apart; [`RoutineDisconnects`] drops
//! exactly those three and lets every other rumqttd error through. It applies only to the default filter: with
//! `RUST_LOG` set, the operator sees everything they asked for.

use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Without `RUST_LOG`: fleetcast at info, sled's chatter off, rumqttd's errors only.
pub const DEFAULT_FILTER: &str = "info,sled=warn,rumqttd=error";

/// Installs the global subscriber (once, at the start of `main`).
pub fn init() {
    let from_env = EnvFilter::try_from_default_env().ok();
    let quiet_routine = from_env.is_none().then_some(RoutineDisconnects);
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    tracing_subscriber::registry()
        .with(filter)
        .with(quiet_routine)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
}

/// Drops rumqttd's ERROR lines for ordinary disconnects (see the module docs).
pub struct RoutineDisconnects;

impl<S: Subscriber> Layer<S> for RoutineDisconnects {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() != Level::ERROR || !meta.target().starts_with("rumqttd") {
            return true;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        !is_routine_disconnect(meta.target(), &fields.message, &fields.error)
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    error: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }
}

/// Whether a rumqttd ERROR event (its target, message and `error` field, Debug-formatted) is
/// one of those that ordinary disconnects produce.
pub fn is_routine_disconnect(target: &str, message: &str, error: &str) -> bool {
    match target {
        "rumqttd::server::broker" => match message {
            "router-drop" => error == "Recv(Disconnected)",
            "Error while handling MQTT connect packet" => error.contains("ConnectionAborted"),
            _ => false,
        },
        // A client that sends DISCONNECT and then closes makes the router see two disconnects
        // (rumqttd's own comment says so); the second finds the connection gone.
        "rumqttd::router::routing" => {
            message.starts_with("no-connection id ") && message.ends_with(" is already gone")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_disconnect_lines_of_rumqttd_are_dropped() {
        let broker = "rumqttd::server::broker";
        assert!(is_routine_disconnect(
            broker,
            "router-drop",
            "Recv(Disconnected)"
        ));
        assert!(is_routine_disconnect(
            broker,
            "Error while handling MQTT connect packet",
            r#"Network(Io(Custom { kind: ConnectionAborted, error: "connection closed by peer" }))"#
        ));
        // Real errors stay visible.
        assert!(!is_routine_disconnect(
            broker,
            "Error while handling MQTT connect packet",
            "Network(Io(Kind(TimedOut)))"
        ));
        assert!(!is_routine_disconnect(broker, "router-drop", "Send(..)"));
        let routing = "rumqttd::router::routing";
        assert!(is_routine_disconnect(
            routing,
            "no-connection id 2 is already gone",
            ""
        ));
        assert!(!is_routine_disconnect(
            routing,
            "no-connection id 2 is closing",
            ""
        ));
        assert!(!is_routine_disconnect(
            broker,
            "no-connection id 2 is already gone",
            ""
        ));
        assert!(!is_routine_disconnect(
            broker,
            "Unable to accept socket.",
            "Os { code: 24, kind: Uncategorized, message: \"Too many open files\" }"
        ));
        assert!(!is_routine_disconnect(
            "rumqttd::router::routing",
            "router-drop",
            "Recv(Disconnected)"
        ));
    }

    #[test]
    fn the_layer_reads_message_and_error_from_a_real_event() {
        use std::sync::{Arc, Mutex};
        /// Collects the messages that reach it.
        #[derive(Clone, Default)]
        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: Subscriber> Layer<S> for Seen {
            fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
                let mut f = Fields::default();
                event.record(&mut f);
                self.0.lock().unwrap().push(f.message);
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(RoutineDisconnects)
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            #[derive(Debug)]
            enum LinkError {
                Recv(Disconnected),
            }
            #[derive(Debug)]
            struct Disconnected;
            let e = LinkError::Recv(Disconnected);
            tracing::error!(target: "rumqttd::server::broker", error = ?e, "router-drop");
            tracing::error!(target: "rumqttd::server::broker", error = ?e, "Remote link error");
            tracing::error!(target: "fleetcast_platform", error = ?e, "router-drop");
        });
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec!["Remote link error".to_owned(), "router-drop".to_owned()]
        );
    }
}
