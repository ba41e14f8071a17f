//! Inbound rate limits per principal: token buckets on messages, reports and bytes, and on
//! connects. A packet over the limit is not refused: the gateway waits before forwarding it
//! and stops reading meanwhile, so the sender is slowed by TCP backpressure and stays
//! connected. The buckets belong to the principal, not to one connection (the gateway's
//! registry keeps them while the principal connects again): with a bucket per connection, a
//! machine that reconnected after each burst sent 36,000 states a second. A CONNECT over the
//! connect rate is refused (CONNACK 3, server unavailable, which makes agents back off).

use std::time::Duration;

use tokio::time::Instant;

/// A sustained rate and the burst allowed on top of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u64,
    pub burst: u64,
}

/// How fast one connection may send. `None` leaves that dimension unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub messages: Option<Rate>,
    pub bytes: Option<Rate>,
    /// Reports (a machine's status, state and online publishes), on top of `messages`: each
    /// costs the platform a store transaction, where a chunk request costs it a lookup.
    pub reports: Option<Rate>,
    /// Connections accepted for the principal (after authentication).
    pub connects: Option<Rate>,
}

/// What a packet costs its sender (see [`Limiter::take`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Acks and pings: bytes only.
    Bytes,
    /// Publishes and (un)subscribes: a message token and bytes.
    Message,
    /// Reports: this many report tokens (a batch of status events costs one per event), a
    /// message token and bytes.
    Reports(u64),
}

impl RateLimit {
    /// For machines: a status now and then, and while downloading one small chunk request per
    /// chunk received. 2,000 messages/s (burst 16,000) and 4 MiB/s (burst 8 MiB) never slow an
    /// honest one but keep a stolen credential from flooding the broker.
    ///
    /// Reports: 50 a second, burst 200. An honest agent has one status in flight at a time
    /// (each waits for the platform's ack) and sends a state when something changes;
    /// one that sends 2,000 valid states a second made the platform's ack latency for every
    /// other machine double.
    pub const MACHINE: RateLimit = RateLimit {
        // A downloading machine sends at most one chunk request per 64 KiB chunk it receives:
        // 2,000/s leaves room for 125 MiB/s asked for one chunk at a time. The burst lets a
        // download of 1 GiB go at the speed of the network: with a burst of 4,000, 600 MB on
        // loopback took 1.4-2.0 s (0.44-0.53x raw; 0.71-0.84 s with the rate lifted). Over the
        // rate the gateway reads more slowly; nothing is dropped. What a stolen credential
        // gains: 16,000 messages at once after it has been quiet, each a chunk request the
        // platform checks and, past its own budgets, drops.
        messages: Some(Rate {
            per_sec: 2000,
            burst: 16_000,
        }),
        bytes: Some(Rate {
            per_sec: 4 * 1024 * 1024,
            burst: 8 * 1024 * 1024,
        }),
        reports: Some(Rate {
            per_sec: 50,
            burst: 200,
        }),
        // An agent waits at least 100 ms before connecting again, doubling to 5 s.
        connects: Some(Rate {
            per_sec: 1,
            burst: 10,
        }),
    };

    /// For integrators: as machines, without a downloading machine's burst (an integrator asks
    /// for events a few times a second; the platform answers 5 a second).
    pub const INTEGRATOR: RateLimit = RateLimit {
        messages: Some(Rate {
            per_sec: 2000,
            burst: 4000,
        }),
        ..Self::MACHINE
    };
}

impl RateLimit {
    /// For operators (all sessions of one operator together): generous enough that no upload
    /// over a real network is slowed (a 200 MB upload fits the burst), bounded so that one
    /// operator's credentials, a viewer's included, cannot make `serve` read gigabytes a
    /// second: a viewer pushing upload frames, which the platform drops, held `serve` at
    /// 93-119 % CPU at 2.7 GB/s (black-box attack, 2026-11-28). No connect rate: scripts run
    /// the CLI in loops, and the number of sessions is bounded already (64 per operator).
    pub const OPERATOR: RateLimit = RateLimit {
        messages: Some(Rate {
            per_sec: 10_000,
            burst: 20_000,
        }),
        bytes: Some(Rate {
            per_sec: 256 * 1024 * 1024,
            burst: 512 * 1024 * 1024,
        }),
        reports: None,
        connects: None,
    };

    /// For viewers: they send admin requests and upload nothing, so an integrator's message
    /// and byte rates; like other operators, no connect rate.
    pub const VIEWER: RateLimit = RateLimit {
        connects: None,
        ..Self::INTEGRATOR
    };
}

/// One token bucket. Tokens may go negative: a packet larger than the burst still passes, after
/// a proportionally longer wait.
#[derive(Debug)]
struct Bucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst as f64,
            last: now,
        }
    }

    /// Takes one token if there is one.
    fn try_take(&mut self, now: Instant) -> bool {
        if self.take(1, now).is_zero() {
            return true;
        }
        self.tokens += 1.0;
        false
    }

    /// Takes `n` tokens; how long to wait before the packet may go.
    fn take(&mut self, n: u64, now: Instant) -> Duration {
        let per_sec = self.rate.per_sec.max(1) as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * per_sec).min(self.rate.burst as f64);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / per_sec)
        }
    }
}

/// The buckets of one principal.
#[derive(Debug)]
pub struct Limiter {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    reports: Option<Bucket>,
    connects: Option<Bucket>,
}

impl Limiter {
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            messages: limit.messages.map(|r| Bucket::new(r, now)),
            bytes: limit.bytes.map(|r| Bucket::new(r, now)),
            reports: limit.reports.map(|r| Bucket::new(r, now)),
            connects: limit.connects.map(|r| Bucket::new(r, now)),
        }
    }

    /// Accounts one accepted connection; `false` if it is over the connect rate (refuse it).
    pub fn connect(&mut self, now: Instant) -> bool {
        self.connects.as_mut().is_none_or(|b| b.try_take(now))
    }

    /// Accounts one packet of `len` bytes; how long to wait before forwarding it. Only
    /// publishes, (un)subscribes and pings (the packets that make the broker work or answer)
    /// take a message token. Acks do not: a machine acking a fast QoS 1 download sends one
    /// PUBACK per chunk, and the broker's inflight limit already bounds those.
    pub fn take(&mut self, len: usize, cost: Cost, now: Instant) -> Duration {
        let take = |bucket: &mut Option<Bucket>, n: u64, applies: bool| match bucket {
            Some(b) if applies => b.take(n, now),
            _ => Duration::ZERO,
        };
        let n = match cost {
            Cost::Reports(n) => n,
            _ => 0,
        };
        let r = take(&mut self.reports, n, n > 0);
        let m = take(&mut self.messages, 1, cost != Cost::Bytes);
        let b = take(&mut self.bytes, len as u64, true);
        r.max(m).max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal to the nanosecond (float rounding aside).
    fn same(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_micros(1)
    }

    fn limit(msgs: u64, burst: u64) -> RateLimit {
        RateLimit {
            messages: Some(Rate {
                per_sec: msgs,
                burst,
            }),
            bytes: None,
            reports: None,
            connects: None,
        }
    }

    #[test]
    fn a_burst_passes_at_once_and_the_next_packet_waits_one_interval() {
        let t0 = Instant::now();
        let mut l = Limiter::new(limit(10, 3), t0);
        for _ in 0..3 {
            assert_eq!(l.take(100, Cost::Message, t0), Duration::ZERO);
        }
        assert!(same(
            l.take(100, Cost::Message, t0),
            Duration::from_millis(100)
        ));
        // Each further packet waits one more interval: the debt accumulates.
        assert!(same(
            l.take(100, Cost::Message, t0),
            Duration::from_millis(200)
        ));
    }

    #[test]
    fn tokens_refill_at_the_rate_and_never_above_the_burst() {
        let t0 = Instant::now();
        let mut l = Limiter::new(limit(10, 2), t0);
        assert_eq!(l.take(1, Cost::Message, t0), Duration::ZERO);
        assert_eq!(l.take(1, Cost::Message, t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(l.take(1, Cost::Message, later), Duration::ZERO);
        assert_eq!(l.take(1, Cost::Message, later), Duration::ZERO);
        assert!(
            l.take(1, Cost::Message, later) > Duration::ZERO,
            "a long pause refills only the burst"
        );
    }

    #[test]
    fn a_packet_larger_than_the_byte_burst_passes_after_a_longer_wait() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            RateLimit {
                messages: None,
                bytes: Some(Rate {
                    per_sec: 1000,
                    burst: 1000,
                }),
                reports: None,
                connects: None,
            },
            t0,
        );
        assert!(same(
            l.take(3000, Cost::Message, t0),
            Duration::from_secs(2)
        ));
    }

    #[test]
    fn the_machine_default_never_slows_an_honest_machine() {
        // 20 chunk requests and a status a second for a minute, 200 bytes each.
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimit::MACHINE, t0);
        for i in 0..60 * 21 {
            let now = t0 + Duration::from_millis(i * 1000 / 21);
            let cost = if i % 21 == 0 {
                Cost::Reports(1)
            } else {
                Cost::Message
            };
            assert_eq!(l.take(200, cost, now), Duration::ZERO, "packet {i}");
        }
        // An outbox of 200 events sent back to back after a long time offline, each after the
        // ack of the one before: not slowed either.
        let t1 = t0 + Duration::from_secs(3600);
        for i in 0..200 {
            let now = t1 + Duration::from_millis(i * 2);
            assert_eq!(
                l.take(300, Cost::Reports(1), now),
                Duration::ZERO,
                "report {i}"
            );
        }
    }

    #[test]
    fn a_gib_asked_for_one_chunk_per_request_at_once_is_not_slowed_and_a_flood_past_it_is() {
        // 16,384 chunk requests of 200 bytes (1 GiB in 64 KiB chunks) as fast as a LAN brings
        // the chunks: the burst; the next waits for the rate (2,000 a second).
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimit::MACHINE, t0);
        let mut slowed = 0;
        for i in 0..16_384u64 {
            let now = t0 + Duration::from_micros(i * 100);
            if l.take(200, Cost::Message, now) > Duration::ZERO {
                slowed += 1;
            }
        }
        assert_eq!(slowed, 0);
        let mut flood = Limiter::new(RateLimit::MACHINE, t0);
        let mut waited = Duration::ZERO;
        for _ in 0..20_000 {
            waited = flood.take(200, Cost::Message, t0);
        }
        // 4,000 over the burst of 16,000, at 2,000 a second.
        assert!(same(waited, Duration::from_secs(2)), "{waited:?}");
    }

    #[test]
    fn connects_over_the_rate_are_refused_and_cost_nothing() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimit::MACHINE, t0);
        for i in 0..10 {
            assert!(l.connect(t0), "connect {i} of the burst");
        }
        for _ in 0..100 {
            assert!(!l.connect(t0));
        }
        // Refused ones took no token: one second later, one more is accepted.
        assert!(l.connect(t0 + Duration::from_secs(1)));
        assert!(!l.connect(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn reports_are_held_to_their_own_lower_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimit::MACHINE, t0);
        let mut waited = Duration::ZERO;
        for _ in 0..1200 {
            waited = l.take(300, Cost::Reports(1), t0);
        }
        // 1,000 over the burst of 200, at 50 a second.
        assert!(same(waited, Duration::from_secs(20)), "{waited:?}");
        // Chunk requests are not held back by the reports' debt beyond their own bucket.
        let mut m = Limiter::new(RateLimit::MACHINE, t0);
        for _ in 0..1200 {
            assert_eq!(m.take(100, Cost::Message, t0), Duration::ZERO);
        }
    }

    #[test]
    fn acks_and_pings_take_no_message_token_but_do_take_bytes() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            RateLimit {
                messages: Some(Rate {
                    per_sec: 1,
                    burst: 1,
                }),
                bytes: Some(Rate {
                    per_sec: 100,
                    burst: 100,
                }),
                reports: None,
                connects: None,
            },
            t0,
        );
        for _ in 0..25 {
            assert_eq!(l.take(4, Cost::Bytes, t0), Duration::ZERO);
        }
        assert!(
            l.take(4, Cost::Bytes, t0) > Duration::ZERO,
            "the byte bucket still counts"
        );
    }

    #[test]
    fn unlimited_dimensions_never_wait() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            RateLimit {
                messages: None,
                bytes: None,
                reports: None,
                connects: None,
            },
            t0,
        );
        for _ in 0..10_000 {
            assert_eq!(l.take(1 << 20, Cost::Message, t0), Duration::ZERO);
        }
    }
}
