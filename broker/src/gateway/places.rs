//! Bounds on how many connections one key may hold at once: a peer address's connections that
//! have not sent their CONNECT yet, and an operator's or integrator's sessions. Each connection
//! holds a file descriptor and buffers, and `serve` has a few tens of thousands of descriptors
//! for the whole fleet: a black-box test on 2026-11-28 took every one of them, once with
//! sockets that never sent a CONNECT (20,000 from one host, 374 MB) and once with a viewer's
//! credentials (20,600 sessions under as many client ids, 928 MB), and machines could not
//! connect until they were closed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Connections from one peer address (`logs::peer_key`) that may be opening at once:
/// accepted, and their CONNECT not read yet (TLS handshake included). Past it, the oldest is
/// closed to make room (`Places::enter_evicting`): refusing the newest instead let a host
/// that kept 256 silent sockets open lock out every machine behind its address (a NAT, an
/// IPv6 /64), while an honest CONNECT comes within milliseconds of its connect and is read
/// before 256 newer ones push it out.
pub const OPENING_PER_ADDRESS: usize = 256;

/// Sessions one operator or integrator may hold at once (each CLI command is one; a script
/// running commands in parallel, or an integrator with a few consumers, stays well below).
/// Past it a CONNECT is answered CONNACK 3 (server unavailable). A machine has one session
/// anyway: its client id is its name.
pub const SESSIONS_PER_USER: usize = 64;

/// Who holds a place under each key, oldest first.
#[derive(Default)]
pub(crate) struct Places {
    held: Mutex<HashMap<String, VecDeque<(u64, CancellationToken)>>>,
    next: std::sync::atomic::AtomicU64,
}

/// One connection's place under its key, until it is dropped; `closed` is cancelled if a
/// newer connection took the place ([`Places::enter_evicting`]).
pub(crate) struct Place {
    places: Arc<Places>,
    key: String,
    id: u64,
    pub(crate) closed: CancellationToken,
}

impl Places {
    /// A place under `key`, or `None` if `limit` connections hold one already.
    pub(crate) fn enter(self: &Arc<Self>, key: &str, limit: usize) -> Option<Place> {
        self.take(key, limit, false)
    }

    /// A place under `key`; if `limit` connections hold one already, the oldest of them is
    /// told to close (its [`Place::closed`]) and loses it.
    pub(crate) fn enter_evicting(self: &Arc<Self>, key: &str, limit: usize) -> Place {
        self.take(key, limit, true)
            .expect("an evicting entry always finds a place")
    }

    fn take(self: &Arc<Self>, key: &str, limit: usize, evict: bool) -> Option<Place> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let holders = held.entry(key.to_owned()).or_default();
        while holders.len() >= limit.max(1) {
            if !evict {
                return None;
            }
            if let Some((_, oldest)) = holders.pop_front() {
                oldest.cancel();
            }
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let closed = CancellationToken::new();
        holders.push_back((id, closed.clone()));
        Some(Place {
            places: self.clone(),
            key: key.to_owned(),
            id,
            closed,
        })
    }

    /// How many places `key` holds.
    #[cfg(test)]
    fn held(&self, key: &str) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(key).map_or(0, VecDeque::len)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self.places.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holders) = held.get_mut(&self.key) {
            holders.retain(|(id, _)| *id != self.id);
            if holders.is_empty() {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_limit_and_frees_places_when_they_drop() {
        let places = Arc::new(Places::default());
        let a: Vec<Place> = (0..3).map(|_| places.enter("a", 3).unwrap()).collect();
        assert!(places.enter("a", 3).is_none(), "full");
        let b = places.enter("b", 3).expect("another key");
        drop(a);
        assert_eq!(places.held("a"), 0);
        assert!(places.enter("a", 3).is_some());
        drop(b);
        assert_eq!(places.held("b"), 0);
    }

    #[test]
    fn an_evicting_entry_closes_the_oldest_holder() {
        let places = Arc::new(Places::default());
        let first = places.enter_evicting("a", 2);
        let second = places.enter_evicting("a", 2);
        let third = places.enter_evicting("a", 2);
        assert!(first.closed.is_cancelled(), "the oldest made room");
        assert!(!second.closed.is_cancelled() && !third.closed.is_cancelled());
        assert_eq!(places.held("a"), 2);
        drop(first);
        assert_eq!(places.held("a"), 2, "an evicted place is no longer held");
    }
}
