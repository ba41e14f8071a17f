//! Per-machine limits, so one machine (or one stolen machine config) cannot take more than its
//! share: chunk requests per second, chunk bytes per second, and events stored per release.
//! Token buckets are plain data over explicit instants, tested without a clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fleetcast_proto::chunk::ChunkRequest;
use fleetcast_proto::{ArtifactId, MachineId};

/// Limits the platform applies to each machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineLimits {
    /// Chunk requests per second. The agent tops its window up with one request per chunk
    /// received, so this must allow the byte rate below in 64 KiB requests (1,024/s).
    pub requests_per_sec: f64,
    pub request_burst: f64,
    /// Chunk bytes per second served on request, beyond each machine's first copy of each
    /// chunk (see [`Self::first_copies_free`]).
    pub bytes_per_sec: f64,
    pub byte_burst: f64,
    /// Whether a machine's first copy of each chunk of an artifact (within
    /// [`FIRST_COPY_MEMORY`]) goes at once, outside the byte budget. Why: the budget is there
    /// to bound what a machine asking again and again can take, and charging the one copy an
    /// honest machine needs capped a lone download at the budget (200 MB took 2.5 s at 64
    /// MiB/s, against 0.3 s of raw pub/sub). A stolen config gains one copy of each artifact
    /// released to it per hour, which it could have fetched anyway. `false` charges every
    /// chunk (`serve --pace-first-copies`: a platform on a metered uplink).
    pub first_copies_free: bool,
    /// Status events stored per (machine, release); later ones still update the record but are
    /// not kept in the event log.
    pub events_per_release: u64,
    /// Events the platform's event log keeps, by id: the newest this many; older ones are
    /// deleted in the background (`retention`). Target records keep each machine's outcome.
    pub events_kept: u64,
    /// A desired notice that machines report being behind on is sent again at most this often
    /// per topic (`ingest::REPUBLISH_INTERVAL`).
    pub republish_every: Duration,
}

impl Default for MachineLimits {
    fn default() -> Self {
        Self {
            requests_per_sec: 2000.0,
            request_burst: 4000.0,
            bytes_per_sec: 64.0 * 1024.0 * 1024.0,
            byte_burst: 32.0 * 1024.0 * 1024.0,
            first_copies_free: true,
            events_per_release: 1000,
            events_kept: crate::retention::DEFAULT_EVENTS_KEPT,
            republish_every: crate::ingest::REPUBLISH_INTERVAL,
        }
    }
}

impl MachineLimits {
    /// The defaults with a chunk byte rate of `mib_per_sec` MiB/s: a burst of half a second of
    /// it, and requests in proportion (the agent sends one per 64 KiB chunk it receives).
    pub fn with_rate(mib_per_sec: f64) -> Self {
        let defaults = Self::default();
        let scale = mib_per_sec * 1024.0 * 1024.0 / defaults.bytes_per_sec;
        Self {
            requests_per_sec: defaults.requests_per_sec * scale.max(1.0),
            request_burst: defaults.request_burst * scale.max(1.0),
            bytes_per_sec: defaults.bytes_per_sec * scale,
            byte_burst: defaults.byte_burst * scale,
            ..defaults
        }
    }
}

/// Chunk requests a second (and the burst) one machine may put into the chunk server's queue
/// when they come through an external broker, which has no per-machine limits of its own: the
/// embedded broker's gateway holds each machine to 2,000 messages a second with a burst of
/// 16,000 (`fleetcast_broker`'s `RateLimit::MACHINE`), and this is the same. An honest agent
/// sends one request per 64 KiB chunk it receives, 125 MiB/s at this rate.
pub const EXTERNAL_CHUNK_REQUESTS: (f64, f64) = (2000.0, 16_000.0);

/// Reports (status, state and `online` messages) a second, and the burst, one machine may put
/// into the ingest's queue when they come through an external broker: the gateway's report
/// rate for machines (`RateLimit::MACHINE`'s reports), which the embedded broker applies before
/// it hands reports over in process. A status message costs one report per event it carries
/// (at most 64), as at the gateway, so batches carry no more events than single messages would
/// (until 2026-11-29 a batch cost one: a red-team run had 6,400 events a second of one machine
/// stored on Mosquitto where the gateway lets 50 through); an honest agent has one message in
/// flight and sends a state when something changes.
pub const EXTERNAL_REPORTS: (f64, f64) = (50.0, 200.0);

/// A token bucket per machine that sent lately: what an external broker's messages are held to
/// before the platform's shared queues, where the embedded broker's gateway would have held
/// them. Only machines can be keys (an external broker lets a machine publish on its own topics
/// only), and a machine idle for [`BUDGET_SWEEP`] is forgotten: its bucket would be full again.
pub struct MachineRates {
    rate: f64,
    burst: f64,
    buckets: HashMap<MachineId, (TokenBucket, Instant)>,
    swept_at: Instant,
}

impl MachineRates {
    pub fn new((rate, burst): (f64, f64), now: Instant) -> Self {
        Self {
            rate,
            burst,
            buckets: HashMap::new(),
            swept_at: now,
        }
    }

    /// Whether one more message of `m` that costs `cost` tokens may go on now (it takes them).
    pub fn admit(&mut self, m: &MachineId, cost: usize, now: Instant) -> bool {
        if now.saturating_duration_since(self.swept_at) >= BUDGET_SWEEP {
            self.buckets
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < BUDGET_SWEEP);
            self.swept_at = now;
        }
        let (rate, burst) = (self.rate, self.burst);
        let (bucket, at) = self
            .buckets
            .entry(m.clone())
            .or_insert_with(|| (TokenBucket::new(rate, burst, now), now));
        *at = now;
        bucket.take(cost as f64, now)
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes `n` tokens, going into debt for what is not there (at most `n` below zero): the
    /// next [`TokenBucket::take`] waits until the debt is earned back.
    pub fn drain(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - n).max(-n);
    }

    /// Takes `n` tokens if there are that many.
    pub fn take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Schedules `items` items of `each` tokens: when each may go. Tokens not saved up yet are
    /// lent against what the bucket earns within `horizon` (the bucket goes below zero and
    /// earns its way back); an item beyond that is refused (`None`), and so is every one after
    /// it.
    pub fn schedule(
        &mut self,
        items: u32,
        each: f64,
        now: Instant,
        horizon: Duration,
    ) -> Vec<Option<Instant>> {
        self.refill(now);
        let floor = -self.rate * horizon.as_secs_f64();
        (0..items)
            .map(|_| {
                if self.tokens - each < floor {
                    return None;
                }
                self.tokens -= each;
                Some(if self.tokens >= 0.0 {
                    now
                } else {
                    now + Duration::from_secs_f64(-self.tokens / self.rate)
                })
            })
            .collect()
    }

    /// Whether the bucket is full again (nothing to remember about this machine).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Request tokens a request for an artifact the machine may not fetch takes in all
/// ([`ChunkBudget::charge_refusal`]): at the default rate, 40 such requests a second.
pub const REFUSAL_COST: f64 = 50.0;

/// The chunk-serving budget of one machine.
#[derive(Debug, Clone)]
pub struct ChunkBudget {
    requests: TokenBucket,
    bytes: TokenBucket,
    first_copies_free: bool,
    /// Per artifact: which chunks this machine has had its first copy of, and since when.
    had: HashMap<ArtifactId, FirstCopies>,
}

/// The chunks of one artifact (of `chunks` chunks) a machine has had once (a bit each), since
/// `since`.
#[derive(Debug, Clone)]
struct FirstCopies {
    since: Instant,
    chunks: u32,
    bits: Vec<u64>,
}

impl FirstCopies {
    fn new(since: Instant, chunks: u32) -> Self {
        Self {
            since,
            chunks,
            bits: Vec::new(),
        }
    }

    /// The word and the bit of chunk `index`.
    fn slot(index: u32) -> (usize, u64) {
        ((index / 64) as usize, 1u64 << (index % 64))
    }

    fn had(&self, index: u32) -> bool {
        let (word, bit) = Self::slot(index);
        self.bits.get(word).is_some_and(|w| w & bit != 0)
    }

    /// Marks chunk `index` had; whether it was not before.
    fn first(&mut self, index: u32) -> bool {
        let new = !self.had(index);
        let (word, bit) = Self::slot(index);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= bit;
        new
    }
}

impl ChunkBudget {
    pub fn new(limits: &MachineLimits, now: Instant) -> Self {
        Self {
            requests: TokenBucket::new(limits.requests_per_sec, limits.request_burst, now),
            bytes: TokenBucket::new(limits.bytes_per_sec, limits.byte_burst, now),
            first_copies_free: limits.first_copies_free,
            had: HashMap::new(),
        }
    }

    /// Whether one more request may be served now. A valid request that asks for a chunk of
    /// an artifact this machine is fetching (it was served some of it within
    /// [`FIRST_COPY_MEMORY`]) and has not had yet is always admitted: the agent sends a request
    /// per chunk it receives, so a download going faster than the request rate (2,000 a second,
    /// 131 MB/s in 64 KiB chunks) was cut off by it once first copies were not paced any more.
    /// Such requests are bounded by the artifact's chunks. Any other takes a token, and so does
    /// any request that asks for manifest parts too. Why: a manifest window is checked against
    /// the manifest only when the request is answered, and one out of range was answered with
    /// an error frame before its chunk was marked had; so the same request, with a new counter,
    /// was admitted free again and again, each a store write and an error frame past the rate
    /// (a review with one machine's config, 2026-11-29). An agent asks for the manifest with its
    /// first window, before it has had anything, when there is no free path anyway.
    pub fn admit_request(&mut self, req: &ChunkRequest, now: Instant) -> bool {
        let fetching = self.had.get(&req.artifact).filter(|h| {
            self.first_copies_free && now.saturating_duration_since(h.since) < FIRST_COPY_MEMORY
        });
        if let Some(h) = fetching {
            if !req.manifest
                && req.validate(h.chunks, 0).is_ok()
                && req.indices().any(|i| !h.had(i))
            {
                return true;
            }
        }
        self.requests.take(1.0, now)
    }

    /// Forgets which chunks of `artifact` the machine has had (it may not fetch it any more):
    /// its requests for it take a token again.
    pub fn forget(&mut self, artifact: &ArtifactId) {
        self.had.remove(artifact);
    }

    /// Charges a request refused as one for an artifact the machine may not fetch: it takes
    /// [`REFUSAL_COST`] tokens in all. An honest agent asks for an artifact only after a notice
    /// naming it and stops at the refusal's error frame, so it is hardly ever charged; one
    /// machine's credentials asking for artifacts at random had each request answered (each a
    /// look at everything the machine may fetch, a counter write and an error frame): 2,000 a
    /// second, half a core of `serve` (red-team run, 2026-11-30). What the bucket does not hold
    /// is owed (the first version of this stopped at zero, so a flood paid only what the
    /// bucket earned between two requests: 600-800 answers a second, the re-test found).
    pub fn charge_refusal(&mut self, now: Instant) {
        self.requests.drain(REFUSAL_COST - 1.0, now);
    }

    /// Forgets the first copies of every artifact not in `fetchable` (what the machine may
    /// fetch now): a machine that moved on to a new release does not keep a record per
    /// artifact it fetched within the hour. Without it, ten releases in an hour kept ten per
    /// machine, the chunk server's part of `serve` growing with each rollout (heaptrack,
    /// docs/capacity-notes.md, "Memory over many rollouts").
    pub fn keep_only(&mut self, fetchable: &[ArtifactId]) {
        self.had.retain(|a, _| fetchable.contains(a));
    }

    /// When each chunk of `artifact` in `indices` (each `chunk_len` bytes) may be sent. The
    /// machine's first copy of a chunk goes at once and costs its budget nothing (unless
    /// first copies are paced too); others go at once while the byte budget lasts, then paced
    /// at its rate (shaped, not dropped: a dropped chunk cost the machine its 2 s stall before
    /// it asked again). `None` for chunks beyond [`BUDGET_HORIZON`] of pacing: a machine
    /// asking faster than that is refused as before.
    pub fn schedule_chunks(
        &mut self,
        artifact: &ArtifactId,
        (chunks, chunk_len): (u32, u32),
        indices: impl IntoIterator<Item = u32>,
        now: Instant,
    ) -> Vec<Option<Instant>> {
        let mut dues: Vec<Option<Instant>> = Vec::new();
        let mut charged = Vec::new();
        let mut had = self.first_copies_free.then(|| {
            let had = self
                .had
                .entry(*artifact)
                .or_insert_with(|| FirstCopies::new(now, chunks));
            if now.saturating_duration_since(had.since) >= FIRST_COPY_MEMORY {
                *had = FirstCopies::new(now, chunks);
            }
            had
        });
        for index in indices {
            if had.as_mut().is_some_and(|h| h.first(index)) {
                dues.push(Some(now));
            } else {
                charged.push(dues.len());
                dues.push(None);
            }
        }
        let paced =
            self.bytes
                .schedule(charged.len() as u32, chunk_len as f64, now, BUDGET_HORIZON);
        for (at, due) in charged.into_iter().zip(paced) {
            dues[at] = due;
        }
        dues
    }

    /// Both buckets full and no first copy remembered: the machine has been quiet long enough
    /// to forget.
    pub fn is_idle(&mut self, now: Instant) -> bool {
        self.had
            .retain(|_, h| now.saturating_duration_since(h.since) < FIRST_COPY_MEMORY);
        self.requests.is_full(now) && self.bytes.is_full(now) && self.had.is_empty()
    }
}

/// How long the chunk server remembers which chunks of an artifact a machine has had its first
/// copy of: a machine gets at most one copy of an artifact per this long outside its byte
/// budget. It costs a bit per chunk per machine fetching, for this long.
pub const FIRST_COPY_MEMORY: Duration = Duration::from_secs(3600);

/// How far ahead chunks over a machine's byte budget are scheduled; beyond, they are refused.
/// It bounds what the chunk server keeps for a machine that asks too fast: at most this long of
/// its byte rate in owed frames (their keys, not their bytes).
pub const BUDGET_HORIZON: Duration = Duration::from_secs(1);

/// How long after its last request a quiet machine's budget is kept at most.
pub const BUDGET_SWEEP: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        assert_eq!((0..8).filter(|_| b.take(1.0, t0)).count(), 5);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..8).filter(|_| b.take(1.0, t1)).count(), 5);
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!((0..8).filter(|_| b.take(1.0, t2)).count(), 1);
        // Idle for long: never more than the burst.
        let t3 = t2 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| b.take(1.0, t3)).count(), 5);
    }

    #[test]
    fn the_default_request_budget_lets_a_machine_use_its_whole_byte_budget() {
        // The agent sends one request per chunk it receives; at the default 64 KiB chunks the
        // request budget must not be the tighter limit (a 200/s budget capped downloads at
        // 13 MB/s).
        let l = MachineLimits::default();
        assert!(l.requests_per_sec * 65536.0 >= 1.5 * l.bytes_per_sec);
        assert!(l.request_burst * 65536.0 >= l.byte_burst);
    }

    #[test]
    fn a_machine_rate_scales_bytes_and_requests_together() {
        assert_eq!(MachineLimits::with_rate(64.0), MachineLimits::default());
        let fast = MachineLimits::with_rate(512.0);
        assert_eq!(fast.bytes_per_sec, 512.0 * 1024.0 * 1024.0);
        assert_eq!(fast.byte_burst, 256.0 * 1024.0 * 1024.0);
        assert!(fast.requests_per_sec * 65536.0 >= 1.5 * fast.bytes_per_sec);
        // A slow rate keeps the default request budget (manifests, re-requests).
        let slow = MachineLimits::with_rate(1.0);
        assert_eq!(
            slow.requests_per_sec,
            MachineLimits::default().requests_per_sec
        );
        assert_eq!(slow.byte_burst, 512.0 * 1024.0);
    }

    #[test]
    fn a_chunk_budget_sends_what_it_holds_at_once_and_paces_the_rest() {
        let limits = MachineLimits {
            bytes_per_sec: 1000.0,
            byte_burst: 1000.0,
            first_copies_free: false,
            ..MachineLimits::default()
        };
        let a = ArtifactId::of(b"a");
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut b = ChunkBudget::new(&limits, t0);
        // 3 x 300 bytes from the burst; then one each 300 ms, up to 1 s ahead (3 more).
        let first = b.schedule_chunks(&a, (64, 300), 0..8, t0);
        assert_eq!(
            first,
            [
                Some(t0),
                Some(t0),
                Some(t0),
                Some(ms(200)),
                Some(ms(500)),
                Some(ms(800)),
                None,
                None
            ]
        );
        // Asking again at once: the budget is lent out a second ahead; nothing more.
        assert_eq!(b.schedule_chunks(&a, (64, 300), 6..8, t0), [None, None]);
        // 600 ms later the bucket has earned 600 bytes back: two more, paced after the rest.
        assert_eq!(
            b.schedule_chunks(&a, (64, 300), 6..9, ms(600)),
            [Some(ms(1100)), Some(ms(1400)), None]
        );
        assert!(!b.is_idle(ms(1400)));
        assert!(b.is_idle(ms(5000)));
    }

    #[test]
    fn a_first_copy_of_each_chunk_is_free_and_every_copy_after_it_is_charged() {
        let limits = MachineLimits {
            bytes_per_sec: 1000.0,
            byte_burst: 600.0,
            ..MachineLimits::default()
        };
        let (a, other) = (ArtifactId::of(b"a"), ArtifactId::of(b"b"));
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut b = ChunkBudget::new(&limits, t0);
        // Ten first copies of 300 bytes, five times the burst: all at once, none charged.
        assert_eq!(b.schedule_chunks(&a, (64, 300), 0..10, t0), [Some(t0); 10]);
        // Chunk 3 again with chunk 10 new: the new one at once, the copy from the burst.
        assert_eq!(
            b.schedule_chunks(&a, (64, 300), [3, 10], t0),
            [Some(t0), Some(t0)]
        );
        // Asking for what it had, again and again: held to the budget like any repeat (one
        // more from the burst, then paced a second ahead at most, then refused).
        assert_eq!(
            b.schedule_chunks(&a, (64, 300), 0..6, t0),
            [
                Some(t0),
                Some(ms(300)),
                Some(ms(600)),
                Some(ms(900)),
                None,
                None
            ]
        );
        // Another artifact is remembered on its own: its first copies are free too, and a
        // machine switching between two artifacts does not get the first one free again.
        assert_eq!(
            b.schedule_chunks(&other, (64, 300), 0..2, t0),
            [Some(t0); 2]
        );
        assert_eq!(b.schedule_chunks(&a, (64, 300), 0..1, t0), [None]);
        // Not idle while first copies are remembered, though the buckets fill in a second...
        let later = t0 + FIRST_COPY_MEMORY - Duration::from_secs(1);
        assert!(!b.is_idle(later));
        assert_eq!(b.schedule_chunks(&a, (64, 300), [0], later), [Some(later)]);
        assert_eq!(
            b.schedule_chunks(&a, (64, 300), [0, 0, 0], later),
            [
                Some(later),
                Some(later + Duration::from_millis(300)),
                Some(later + Duration::from_millis(600))
            ]
        );
        // ...and an hour after the first one, a copy of each is free again.
        let hour = t0 + FIRST_COPY_MEMORY;
        assert_eq!(
            b.schedule_chunks(&a, (64, 300), 0..4, hour),
            [Some(hour); 4]
        );
        assert!(!b.is_idle(hour + Duration::from_secs(10)));
        assert!(b.is_idle(hour + FIRST_COPY_MEMORY));
    }

    #[test]
    fn first_copies_of_an_artifact_no_longer_fetchable_are_forgotten() {
        let limits = MachineLimits {
            bytes_per_sec: 1000.0,
            byte_burst: 600.0,
            ..MachineLimits::default()
        };
        let (old, new) = (ArtifactId::of(b"old"), ArtifactId::of(b"new"));
        let t0 = Instant::now();
        let mut b = ChunkBudget::new(&limits, t0);
        b.schedule_chunks(&old, (64, 300), 0..4, t0);
        b.schedule_chunks(&new, (64, 300), 0..4, t0);
        let soon = t0 + Duration::from_secs(10);
        // Both remembered: not idle though the buckets are full again.
        b.keep_only(&[old, new]);
        assert!(!b.is_idle(soon));
        // Only the new one fetchable: the new one's first copies are still remembered (a copy
        // of chunk 0 is charged)...
        b.keep_only(&[new]);
        assert!(!b.is_idle(soon));
        assert_eq!(
            b.schedule_chunks(&new, (64, 300), [0, 0, 0], soon),
            [
                Some(soon),
                Some(soon),
                Some(soon + Duration::from_millis(300))
            ]
        );
        // ...and once nothing is fetchable, nothing is kept: the budget is idle as soon as its
        // buckets are full, long before the hour.
        b.keep_only(&[]);
        assert!(b.is_idle(soon + Duration::from_secs(10)));
    }

    fn ask(artifact: ArtifactId, chunks: Vec<(u32, u32)>) -> ChunkRequest {
        ChunkRequest {
            machine: fleetcast_proto::MachineId::new("vm-1").unwrap(),
            ctr: 1,
            artifact,
            manifest: false,
            manifest_parts: None,
            chunks,
        }
    }

    #[test]
    fn a_request_for_a_chunk_not_had_yet_is_admitted_past_the_request_rate() {
        let limits = MachineLimits {
            requests_per_sec: 1.0,
            request_burst: 1.0,
            ..MachineLimits::default()
        };
        let (a, other) = (ArtifactId::of(b"a"), ArtifactId::of(b"b"));
        let t0 = Instant::now();
        let mut b = ChunkBudget::new(&limits, t0);
        // Nothing fetched yet: the request rate decides.
        assert!(b.admit_request(&ask(a, vec![(0, 1)]), t0));
        assert!(!b.admit_request(&ask(a, vec![(0, 1)]), t0));
        b.schedule_chunks(&a, (4, 300), [0], t0);
        // Fetching `a` (4 chunks): a chunk it has not had goes past the rate, one it had does
        // not, nor does a request that is not valid for `a`, nor another artifact.
        assert!(b.admit_request(&ask(a, vec![(1, 2)]), t0));
        assert!(b.admit_request(&ask(a, vec![(0, 4)]), t0));
        assert!(!b.admit_request(&ask(a, vec![(0, 1)]), t0));
        assert!(!b.admit_request(&ask(a, vec![(3, 5)]), t0));
        assert!(!b.admit_request(&ask(a, vec![(1, 2), (2, 2)]), t0));
        assert!(!b.admit_request(&ask(other, vec![(0, 1)]), t0));
        // Taken (a copy each): asking for them again waits for the rate.
        b.schedule_chunks(&a, (4, 300), 1..4, t0);
        assert!(!b.admit_request(&ask(a, vec![(1, 2)]), t0));
        // An artifact it may not fetch any more is forgotten.
        b.schedule_chunks(&other, (4, 300), [0], t0);
        b.forget(&other);
        assert!(!b.admit_request(&ask(other, vec![(1, 2)]), t0));
        // With first copies paced, every request takes a token.
        let mut paced = ChunkBudget::new(
            &MachineLimits {
                first_copies_free: false,
                ..limits
            },
            t0,
        );
        paced.schedule_chunks(&a, (4, 300), [0], t0);
        assert!(paced.admit_request(&ask(a, vec![(1, 2)]), t0));
        assert!(!paced.admit_request(&ask(a, vec![(2, 3)]), t0));
    }
}
