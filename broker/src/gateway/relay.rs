//! The relay: one session of the gateway's own on rumqttd that takes everything the platform
//! publishes for one reader (release notices per machine and per group, commands, the key
//! chain, replies to operators) or for the gateway's subscribers of an artifact's chunks, and
//! hands it to the subscribed sessions by exact filter (`fanout`).
//!
//! Why: each machine subscribes to its own release filter and command topic. On rumqttd (0.20)
//! those are two filters of its own per machine, and rumqttd keeps no index: every new filter is
//! matched against every topic it has seen, every new topic against every filter, and every
//! SUBSCRIBE against every retained message (each machine's `online` and `state`). A fleet
//! coming online cost it about 24 x N matches per machine, and 10,000 machines took minutes
//! with the router thread in `rumqttd::protocol::matches`. With the relay, rumqttd holds four
//! filters for all machines together, and a machine's subscriptions to these topics never
//! reach it.
//!
//! Operators' replies (and integrators' event batches, the same way): each CLI connection has a
//! client id of its own and subscribes to its own reply topic. rumqttd never frees a filter's log
//! (an empty one allocates about 124 KiB, most of it never written, and it keeps the last replies
//! it carried), so every CLI call used to leave its reply log behind for the life of the broker.
//! Measured on an idle `serve`, 1,500 `fleetcast stats` calls: RSS grew 8.6 KiB per call before,
//! 4.5 KiB after (then left: rumqttd remembering each ended session and each request topic it
//! routed, and the allocator); 0.9-1.1 KiB since requests reach the platform in process
//! (`GatewayHandle::take_admin`) and rumqttd routes no request topic.
//!
//! What the relay keeps: the latest message on each release topic and on the key chain (the
//! platform publishes those retained, and re-publishes them all when it (re)connects), which a
//! new subscriber gets first with the retain flag. Commands are delivered and not kept. Which
//! filters are served here, and why a machine sees them at QoS 0: docs/protocol.md §2.

use std::sync::Arc;
use std::time::Duration;

use fleetcast_proto::{Route, Topics};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;

use super::fanout::Keep;
use super::frames;
use super::registry::Registry;
use crate::embedded::Links;

/// The relay's session on rumqttd. ':' is in no machine, operator or integrator id, so no
/// client can take it over.
const ID: &str = "fleetcast:gateway-relay";

/// The filters the relay holds on rumqttd: seven, whatever the size of the fleet and however
/// many operators' and integrators' connections come and go.
pub(crate) fn router_filters(topics: &Topics) -> Vec<String> {
    let p = topics.prefix();
    vec![
        format!("{p}/machines/+/release/+"),
        format!("{p}/machines/+/command"),
        format!("{p}/groups/+/release/+"),
        topics.platform_keys(),
        format!("{p}/admin/+/response"),
        format!("{p}/integrators/+/events"),
        format!("{p}/artifacts/+/chunks"),
    ]
}

/// Whether the gateway serves a subscription to `filter` itself: a machine's or a group's
/// release filter exactly as the protocol builds it, a machine's command topic, the key chain,
/// or an operator's reply topic. Any other filter (say one release topic named in full) goes to
/// rumqttd as before.
pub(crate) fn is_served(topics: &Topics, filter: &str) -> bool {
    topics.parse_release_filter(filter).is_some()
        || matches!(
            topics.parse(filter),
            Some(
                Route::Command(_)
                    | Route::PlatformKeys
                    | Route::AdminResponse(_)
                    | Route::IntegratorEvents(_)
            )
        )
}

/// For a message published on `topic`: the served filter it goes to, and whether its latest
/// is kept for new subscribers.
fn served_by(topics: &Topics, topic: &str) -> Option<(String, bool)> {
    Some(match topics.parse(topic)? {
        Route::MachineRelease(m, _) => (topics.machine_release_filter(&m), true),
        Route::GroupRelease(g, _) => (topics.group_release_filter(&g), true),
        Route::Command(_) | Route::AdminResponse(_) | Route::IntegratorEvents(_) => {
            (topic.to_owned(), false)
        }
        Route::PlatformKeys => (topic.to_owned(), true),
        // The platform's chunk server hands its frames to the gateway in process; what a
        // platform client publishes on an artifact topic through rumqttd (the benches' raw
        // fan-out baseline, a platform on another broker connection) reaches the same
        // subscribers, never kept.
        Route::ArtifactChunks(_) => (topic.to_owned(), false),
        _ => return None,
    })
}

/// Starts the relay's thread (it lives as long as the process, like rumqttd's router). Its
/// session is open and subscribed when this returns, so nothing published after is missed.
pub(crate) fn start(links: Links, topics: Topics, registry: Arc<Registry>) -> std::io::Result<()> {
    let first = subscribe(&links, &topics).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("gateway-relay".into())
        .spawn(move || {
            let mut link = Some(first);
            loop {
                if let Some((_tx, rx)) = link.take() {
                    let why = relay(rx, &topics, &registry);
                    tracing::error!(error = %why, "the gateway's relay lost its broker session: reopening");
                }
                std::thread::sleep(Duration::from_secs(1));
                // A new session gets every retained message again, so nothing kept is lost.
                link = subscribe(&links, &topics)
                    .map_err(|e| tracing::warn!(error = %e, "cannot reopen the gateway's relay"))
                    .ok();
            }
        })?;
    Ok(())
}

/// Opens the relay's session and subscribes it (the sending half is kept only to hold the
/// session).
fn subscribe(links: &Links, topics: &Topics) -> Result<(LinkTx, LinkRx), String> {
    let (mut tx, rx) = links.open(ID).map_err(|e| e.to_string())?;
    for filter in router_filters(topics) {
        tx.subscribe(filter).map_err(|e| e.to_string())?;
    }
    Ok((tx, rx))
}

/// Hands on what the router forwards until the session ends; why it ended.
fn relay(mut rx: LinkRx, topics: &Topics, registry: &Registry) -> String {
    loop {
        match rx.recv() {
            Err(e) => return e.to_string(),
            Ok(Some(Notification::Forward(forward))) => {
                let publish = &forward.publish;
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    continue;
                };
                let Some((filter, keep)) = served_by(topics, topic) else {
                    continue;
                };
                let encode = |retain| frames::publish_packet(topic, &publish.payload, retain);
                let encoded = encode(false).and_then(|live| {
                    let kept = if !keep {
                        Keep::Nothing
                    } else if publish.payload.is_empty() {
                        Keep::Forget
                    } else {
                        Keep::Latest(encode(true)?)
                    };
                    Ok((live, kept))
                });
                match encoded {
                    Ok((live, kept)) => {
                        registry.fanout.serve(&filter, topic, kept, &live);
                    }
                    Err(e) => tracing::warn!(topic, error = %e, "cannot encode a served message"),
                }
            }
            // The router paused the session until it has taken what it was given: it has.
            Ok(Some(Notification::Unschedule)) => {
                if let Err(e) = rx.ready() {
                    return e.to_string();
                }
            }
            Ok(Some(Notification::Disconnect(..))) => return "the broker ended it".to_owned(),
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::{GroupId, Kind, MachineId};

    #[test]
    fn served_filters_are_exactly_the_ones_machines_subscribe_with() {
        let t = Topics::default();
        let m = MachineId::new("vm-1").unwrap();
        let g = GroupId::new("g").unwrap();
        let app = Kind::new("app").unwrap();
        for served in [
            t.machine_release_filter(&m),
            t.group_release_filter(&g),
            t.command(&m),
            t.platform_keys(),
            t.admin_response("ops.0a1b2c3d"),
        ] {
            assert!(is_served(&t, &served), "{served}");
        }
        for not in [
            t.machine_release(&m, &app),
            t.status_ack(&m),
            "fleet/machines/+/release/+".to_owned(),
            "fleet/#".to_owned(),
        ] {
            assert!(!is_served(&t, &not), "{not}");
        }
        // Every message on a served topic reaches the filter a machine subscribes with, and
        // that filter is one rumqttd routes to the relay.
        assert_eq!(
            served_by(&t, &t.machine_release(&m, &app)),
            Some((t.machine_release_filter(&m), true))
        );
        assert_eq!(
            served_by(&t, &t.group_release(&g, &app)),
            Some((t.group_release_filter(&g), true))
        );
        assert_eq!(served_by(&t, &t.command(&m)), Some((t.command(&m), false)));
        let reply = t.admin_response("ops.0a1b2c3d");
        assert_eq!(served_by(&t, &reply), Some((reply.clone(), false)));
        let batches = t.integrator_events("fleetcast-int-erp.0a1b2c3d");
        assert_eq!(served_by(&t, &batches), Some((batches.clone(), false)));
        assert!(is_served(&t, &batches));
        assert_eq!(served_by(&t, &t.admin_request("ops.0a1b2c3d")), None);
        assert_eq!(served_by(&t, &t.status(&m)), None);
        let chunks = t.artifact_chunks(&fleetcast_proto::ArtifactId::of(b"x"));
        assert_eq!(served_by(&t, &chunks), Some((chunks.clone(), false)));
        for topic in [
            t.machine_release(&m, &app),
            t.group_release(&g, &app),
            t.command(&m),
            t.platform_keys(),
            reply,
            batches,
            chunks,
        ] {
            assert!(
                router_filters(&t)
                    .iter()
                    .any(|f| rumqttd::protocol::matches(&topic, f)),
                "{topic}"
            );
        }
    }
}
