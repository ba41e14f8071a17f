//! Shared rumqttc plumbing: broker addresses, client options with the limits fleetcast needs,
//! and the one task that owns an event loop.
//!
//! Facts this encodes (see docs/architecture.md): rumqttc leaves TCP_NODELAY off, which costs
//! ~40 ms per request/response round trip (Nagle + delayed ACK); its default max packet size is
//! 10 KiB; `poll()` reconnects immediately, so the driver backs off; publishes must never be
//! awaited from the task that polls.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest MQTT packet fleetcast clients send or accept: a 1 MiB chunk plus headers.
pub const MAX_PACKET: usize = 2 * 1024 * 1024;
/// Default broker address of the embedded broker.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";

/// `mqtt://host:port` (port defaults to 1883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad broker address {input:?}: {why} (expected mqtt://host:port)")]
pub struct BrokerUrlError {
    pub input: String,
    pub why: &'static str,
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;
    fn from_str(input: &str) -> Result<Self, BrokerUrlError> {
        let err = |why| BrokerUrlError {
            input: input.to_owned(),
            why,
        };
        let rest = match input.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some(_) => return Err(err("only mqtt:// is supported")),
            None => input,
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| err("port is not a number"))?),
            None => (rest, 1883),
        };
        if host.is_empty() || host.contains('/') {
            return Err(err("missing host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

/// Options for one fleetcast client: raised packet limits, keep-alive, credentials
/// (`username == client_id`, as the embedded broker requires).
pub fn options(broker: &BrokerUrl, client_id: &str, password: Option<&str>) -> MqttOptions {
    options_as(broker, client_id, client_id, password)
}

/// Like [`options`], for principals whose client id extends their username (operators and
/// integrators: `<username>.<session>`).
pub fn options_as(
    broker: &BrokerUrl,
    client_id: &str,
    username: &str,
    password: Option<&str>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_keep_alive(Duration::from_secs(10));
    if let Some(p) = password {
        o.set_credentials(username, p);
    }
    o
}

/// Creates the client and its event loop with TCP_NODELAY on. `capacity` bounds the request
/// queue between `AsyncClient` handles and the event loop.
pub fn connect(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// What the event-loop task reports to its owner.
#[derive(Debug)]
pub enum MqttEvent {
    /// (Re)connected: subscribe now (a broker restart forgets subscriptions). The flag is the
    /// CONNACK's session-present bit.
    Connected {
        session_present: bool,
    },
    Publish(Publish),
    /// The broker acknowledged our QoS 1 publish with this packet id.
    PubAck(u16),
    /// The broker confirmed a subscription: messages on it are delivered from now on.
    SubAck(u16),
    /// A QoS 1 publish of ours was handed to the socket with this packet id.
    Sent(u16),
    /// The connection dropped; the driver reconnects after a backoff.
    Disconnected(String),
}

/// Polls `eventloop` until `shutdown`, forwarding events to `events`. Reconnects with
/// exponential backoff (100 ms doubling to 5 s). When `events` is full the driver waits, which
/// stops reading from the socket: backpressure reaches the broker instead of memory.
pub async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<MqttEvent>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let polled = tokio::select! {
            _ = shutdown.cancelled() => return,
            polled = eventloop.poll() => polled,
        };
        let event = match polled {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                MqttEvent::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => MqttEvent::Publish(p),
            Ok(Event::Incoming(Incoming::PubAck(a))) => MqttEvent::PubAck(a.pkid),
            Ok(Event::Incoming(Incoming::SubAck(a))) => MqttEvent::SubAck(a.pkid),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => MqttEvent::Sent(pkid),
            Ok(_) => continue,
            Err(e) => {
                let text = e.to_string();
                if events.send(MqttEvent::Disconnected(text)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            sent = events.send(event) => if sent.is_err() { return },
        }
    }
}

/// Reads `events` until one matches `want`. Fails on a disconnect (a broker refusing the
/// client shows up as one), when the event loop ends, or after `timeout`.
pub async fn wait_for(
    events: &mut mpsc::Receiver<MqttEvent>,
    timeout: Duration,
    want: impl Fn(&MqttEvent) -> bool,
) -> Result<(), String> {
    let wait = async {
        loop {
            match events.recv().await {
                Some(e) if want(&e) => return Ok(()),
                Some(MqttEvent::Disconnected(e)) => return Err(e),
                Some(_) => {}
                None => return Err("event loop ended".to_owned()),
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| Err(format!("nothing within {} s", timeout.as_secs())))
}

/// A loopback port that was free a moment ago. rumqttd cannot report the port it bound, so
/// tests pick one first and retry on the rare clash.
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_and_without_scheme_and_port() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1884));
        let u: BrokerUrl = "broker.local".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("broker.local", 1883));
        assert_eq!(u.to_string(), "mqtt://broker.local:1883");
        for bad in [
            "http://x:1",
            "mqtt://:1883",
            "mqtt://x:port",
            "mqtt://x:99999",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }
}
