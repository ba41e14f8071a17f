//! Bounds on how many connections one key may hold at once: a peer address's connections that
//! have not sent their CONNECT yet, and an operator's or integrator's sessions. Each connection
//! holds a file descriptor and buffers, and `serve` has a few tens of thousands of descriptors
//! for the whole fleet: a black-box test on 2026-11-28 took every one of them, once with
//! sockets that never sent a CONNECT (20,000 from one host, 374 MB) and once with a viewer's
//! credentials (20,600 sessions under as many client ids, 928 MB), and machines could not
//! connect until they were closed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Connections from one peer address (`logs::peer_key`) that may be opening at once:
/// accepted, and their CONNECT not read yet (TLS handshake included). Past it, room is made
/// (`Places::enter_evicting`) by closing the oldest connection that has sent nothing yet,
/// else the oldest that began more than `BEGUN_KEPT` ago; if there is none, the newest is
/// refused. Refusing the newest always (as first done) let a host that kept 256 silent
/// sockets open lock out every machine behind its address (a NAT, an IPv6 /64); closing the
/// oldest always (until 2026-11-29) let a host opening silent sockets in a loop (20,000 a
/// second) close every TLS handshake from its address before it ended (a red-team run: 0 of
/// 12 CLI calls over TLS at a 200 ms round trip, 2 of 8 at 50 ms). An honest client sends
/// its first bytes (a CONNECT, a TLS ClientHello) with its connect, so it is heard at once.
pub const OPENING_PER_ADDRESS: usize = 256;

/// How long a connection that has sent its first bytes keeps its place against newer ones
/// from its address: long enough for a TLS handshake and a CONNECT over a slow link, short
/// enough that sockets which send a byte and stall do not hold the address for long.
pub const BEGUN_KEPT: Duration = Duration::from_secs(2);

/// Sessions one operator or integrator may hold at once (each CLI command is one; a script
/// running commands in parallel, or an integrator with a few consumers, stays well below).
/// Past it a CONNECT is answered CONNACK 3 (server unavailable). A machine has one session
/// anyway: its client id is its name.
pub const SESSIONS_PER_USER: usize = 64;

/// Who holds a place under each key, oldest first.
#[derive(Default)]
pub(crate) struct Places {
    held: Mutex<HashMap<String, VecDeque<Holder>>>,
    next: std::sync::atomic::AtomicU64,
}

struct Holder {
    id: u64,
    closed: CancellationToken,
    begun: Arc<AtomicBool>,
    since: Instant,
}

/// One connection's place under its key, until it is dropped; `closed` is cancelled if a
/// newer connection took the place ([`Places::enter_evicting`]).
pub(crate) struct Place {
    places: Arc<Places>,
    key: String,
    id: u64,
    begun: Arc<AtomicBool>,
    pub(crate) closed: CancellationToken,
}

impl Place {
    /// The connection has sent its first bytes: it is closed for a newer one only once it has
    /// had [`BEGUN_KEPT`].
    pub(crate) fn begun(&self) {
        self.begun.store(true, Ordering::Relaxed);
    }
}

impl Places {
    /// A place under `key`, or `None` if `limit` connections hold one already.
    pub(crate) fn enter(self: &Arc<Self>, key: &str, limit: usize) -> Option<Place> {
        self.take(key, limit, None)
    }

    /// A place under `key`; if `limit` connections hold one already, one of them is told to
    /// close (its [`Place::closed`]) and loses it: the oldest that has not begun, else the
    /// oldest that began [`BEGUN_KEPT`] or more before `now`. `None` if every holder began
    /// within that time: the newest is refused.
    pub(crate) fn enter_evicting(
        self: &Arc<Self>,
        key: &str,
        limit: usize,
        now: Instant,
    ) -> Option<Place> {
        self.take(key, limit, Some(now))
    }

    fn take(self: &Arc<Self>, key: &str, limit: usize, evict_at: Option<Instant>) -> Option<Place> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let holders = held.entry(key.to_owned()).or_default();
        while holders.len() >= limit.max(1) {
            let now = evict_at?;
            let victim = holders
                .iter()
                .position(|h| !h.begun.load(Ordering::Relaxed))
                .or_else(|| {
                    holders
                        .iter()
                        .position(|h| now.saturating_duration_since(h.since) >= BEGUN_KEPT)
                })?;
            if let Some(h) = holders.remove(victim) {
                h.closed.cancel();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (closed, begun) = (CancellationToken::new(), Arc::new(AtomicBool::new(false)));
        holders.push_back(Holder {
            id,
            closed: closed.clone(),
            begun: begun.clone(),
            since: evict_at.unwrap_or_else(Instant::now),
        });
        Some(Place {
            places: self.clone(),
            key: key.to_owned(),
            id,
            begun,
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
            holders.retain(|h| h.id != self.id);
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
        let now = Instant::now();
        let first = places.enter_evicting("a", 2, now).unwrap();
        let second = places.enter_evicting("a", 2, now).unwrap();
        let third = places.enter_evicting("a", 2, now).unwrap();
        assert!(first.closed.is_cancelled(), "the oldest made room");
        assert!(!second.closed.is_cancelled() && !third.closed.is_cancelled());
        assert_eq!(places.held("a"), 2);
        drop(first);
        assert_eq!(places.held("a"), 2, "an evicted place is no longer held");
    }

    /// Newer silent connections close silent ones, never one that has begun, until it has had
    /// `BEGUN_KEPT`; with every place held by connections that began lately, the newest is
    /// refused. (Until 2026-11-29 the oldest was closed whatever it was doing: a host opening
    /// silent sockets in a loop closed every TLS handshake from its address.)
    #[test]
    fn a_connection_that_has_begun_keeps_its_place_against_newer_ones_for_a_while() {
        let places = Arc::new(Places::default());
        let t0 = Instant::now();
        let begun = places.enter_evicting("a", 3, t0).unwrap();
        begun.begun();
        let silent: Vec<Place> = (0..2)
            .map(|_| places.enter_evicting("a", 3, t0).unwrap())
            .collect();
        // A flood of silent ones: they close each other, oldest first.
        let flood: Vec<Place> = (0..50)
            .map(|_| places.enter_evicting("a", 3, t0).unwrap())
            .collect();
        assert!(silent.iter().all(|p| p.closed.is_cancelled()));
        assert!(flood[..48].iter().all(|p| p.closed.is_cancelled()));
        assert!(
            !begun.closed.is_cancelled(),
            "the one that began was closed"
        );
        // Every place held by connections that began: the newest is refused...
        flood[48].begun();
        flood[49].begun();
        assert!(places.enter_evicting("a", 3, t0 + BEGUN_KEPT / 2).is_none());
        assert!(!begun.closed.is_cancelled());
        // ...until the oldest of them has had its time.
        let later = places.enter_evicting("a", 3, t0 + BEGUN_KEPT).unwrap();
        assert!(
            begun.closed.is_cancelled(),
            "then the oldest that began goes"
        );
        assert!(!flood[48].closed.is_cancelled() && !later.closed.is_cancelled());
    }
}
