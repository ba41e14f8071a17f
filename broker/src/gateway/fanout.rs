//! Direct delivery of chunk frames to the sessions that subscribed to their artifact topic.
//!
//! Why: rumqttd hands each subscriber up to 200 queued publishes at a time and encodes them
//! into a write buffer that keeps its largest size for the life of the connection, and one
//! thread writes for every connection of a listener. A 1 MiB rollout to 1,000 machines left
//! 1.3 GB of such buffers in the platform process (heaptrack: `rumqttd::link::network::
//! Network::writev`). The gateway already holds every client's socket, so for the artifact
//! topics it delivers itself: the PUBLISH packet is encoded once, shared by reference, and
//! written to each subscriber's socket between whole packets of the broker's stream.
//!
//! A session's SUBSCRIBE to an artifact topic is still checked exactly like any other (static
//! policy, then the platform's dynamic check) and still forwarded to rumqttd (which answers
//! the SUBACK and never sees a publish there). Only sessions whose SUBSCRIBE passed are
//! registered; UNSUBSCRIBE and the end of the session remove them. Delivery is QoS 0: a
//! session whose queue is full misses the frame and its agent asks again, as after any loss.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Frames queued per session before further ones are dropped for it (64 KiB frames: 4 MiB,
/// shared with every other receiver of the same frame).
pub const SESSION_QUEUE: usize = 64;

/// One subscribed session: who it is (the principal's username) and its queue.
struct Receiver {
    username: String,
    tx: mpsc::Sender<Bytes>,
}

type Topics = HashMap<String, HashMap<u64, Receiver>>;

#[derive(Default)]
pub(crate) struct Fanout {
    topics: Mutex<Topics>,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl Fanout {
    fn topics(&self) -> std::sync::MutexGuard<'_, Topics> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn subscribe(
        &self,
        topic: &str,
        session: u64,
        username: &str,
        tx: &mpsc::Sender<Bytes>,
    ) {
        self.topics().entry(topic.to_owned()).or_default().insert(
            session,
            Receiver {
                username: username.to_owned(),
                tx: tx.clone(),
            },
        );
    }

    pub(crate) fn unsubscribe(&self, topic: &str, session: u64) {
        let mut topics = self.topics();
        if let Some(sessions) = topics.get_mut(topic) {
            sessions.remove(&session);
            if sessions.is_empty() {
                topics.remove(topic);
            }
        }
    }

    /// Forgets a session everywhere (it ended).
    pub(crate) fn remove_session(&self, session: u64) {
        self.topics().retain(|_, sessions| {
            sessions.remove(&session);
            !sessions.is_empty()
        });
    }

    /// Queues `packet` (a whole PUBLISH) for every session subscribed to `topic`, or only for
    /// the sessions of `only` (usernames); how many took it.
    pub(crate) fn deliver(&self, topic: &str, packet: &Bytes, only: Option<&[&str]>) -> usize {
        let topics = self.topics();
        let Some(sessions) = topics.get(topic) else {
            return 0;
        };
        let (mut took, mut missed) = (0, 0);
        for r in sessions.values() {
            if only.is_some_and(|names| !names.contains(&r.username.as_str())) {
                continue;
            }
            if r.tx.try_send(packet.clone()).is_ok() {
                took += 1;
            } else {
                missed += 1;
            }
        }
        drop(topics);
        self.delivered.fetch_add(took as u64, Ordering::Relaxed);
        self.dropped.fetch_add(missed as u64, Ordering::Relaxed);
        took
    }

    /// (delivered, dropped for a full queue) since the start.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_subscribed_sessions_get_a_frame_and_a_full_queue_drops_it() {
        let fanout = Fanout::default();
        let (tx1, mut rx1) = mpsc::channel(1);
        let (tx2, mut rx2) = mpsc::channel(1);
        fanout.subscribe("fleet/artifacts/a/chunks", 1, "vm-1", &tx1);
        fanout.subscribe("fleet/artifacts/b/chunks", 2, "vm-2", &tx2);
        let frame = Bytes::from_static(b"frame");
        assert_eq!(fanout.deliver("fleet/artifacts/a/chunks", &frame, None), 1);
        assert_eq!(rx1.try_recv().unwrap(), frame);
        assert!(rx2.try_recv().is_err(), "not subscribed to a");
        // Queue of one: the second frame is dropped for session 1.
        assert_eq!(fanout.deliver("fleet/artifacts/a/chunks", &frame, None), 1);
        assert_eq!(fanout.deliver("fleet/artifacts/a/chunks", &frame, None), 0);
        assert_eq!(fanout.counts(), (2, 1));

        // Delivery to named machines only.
        let _ = rx1.try_recv();
        assert_eq!(
            fanout.deliver("fleet/artifacts/a/chunks", &frame, Some(&["vm-9"])),
            0
        );
        assert_eq!(
            fanout.deliver("fleet/artifacts/a/chunks", &frame, Some(&["vm-1"])),
            1
        );
        fanout.unsubscribe("fleet/artifacts/a/chunks", 1);
        let _ = rx1.try_recv();
        assert_eq!(fanout.deliver("fleet/artifacts/a/chunks", &frame, None), 0);
        fanout.remove_session(2);
        assert_eq!(fanout.deliver("fleet/artifacts/b/chunks", &frame, None), 0);
        assert!(fanout.topics().is_empty());
    }
}
