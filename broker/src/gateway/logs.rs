//! How much the gateway logs about what clients do wrong: refused CONNECTs, violations, failed
//! TLS handshakes and failed accepts. Each is a line a client can cause at will, so none may
//! fill the log.
//!
//! - Per key (a user name, or a peer address: an IPv4 address, or an IPv6 address's /64,
//!   which one host usually holds whole, so that one host cannot pass the limit by cycling
//!   through its addresses): a few lines a minute ([`LogGate::per_minute`]).
//! - All keys together: at most [`CLIENT_LINES_PER_MINUTE`] lines a minute, so that many source
//!   addresses (or user names) together cannot fill it either; what is left out is counted and
//!   reported in one line when the next minute's first line is logged.
//! - Failed accepts ([`AcceptErrors`]): out of file descriptors, every accept fails until one is
//!   free, and a line per failure was ~10 lines a second. The first is logged, then at most one
//!   line a minute with how many were left out; and the accept loop waits longer and longer
//!   (up to [`ACCEPT_BACKOFF_MAX`]) while descriptors stay exhausted.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fleetcast_proto::text::{Admit, LogGate};
use tokio::time::Instant;

/// Lines about clients (refusals, violations) logged a minute at most, all keys together.
pub const CLIENT_LINES_PER_MINUTE: u32 = 200;

/// The gateway's per-key and global limits on lines about clients.
pub(crate) struct LogLimit {
    per_key: LogGate,
    global: LogGate,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self {
            per_key: LogGate::per_minute(),
            global: LogGate::new(CLIENT_LINES_PER_MINUTE, Duration::from_secs(60)),
        }
    }
}

impl LogLimit {
    /// Whether a line about `key` is logged now: `Some(n)`, n being how many lines about `key`
    /// were left out before it; `None`: leave it out (counted).
    pub(crate) fn admit(&self, key: &str) -> Option<u64> {
        let Admit::Log { quiet_before } = self.per_key.admit(key) else {
            return None;
        };
        match self.global.admit("") {
            Admit::Quiet => None,
            Admit::Log { quiet_before: all } => {
                if all > 0 {
                    tracing::warn!(
                        left_out = all,
                        limit = CLIENT_LINES_PER_MINUTE,
                        "gateway left out lines about clients over its limit a minute"
                    );
                }
                Some(quiet_before)
            }
        }
    }
}

/// The log key of a peer address: an IPv4 address as it is (also when it comes IPv4-mapped on
/// an IPv6 listener), an IPv6 address by its /64.
pub(crate) fn peer_key(peer: SocketAddr) -> String {
    match peer.ip() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// The longest wait between accepts while descriptors (or kernel memory) are exhausted.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The first wait after an accept failed for want of descriptors; doubles with each failure.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// At most one line a minute about failed accepts after the first.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(60);

/// One listener's failed accepts: what to log and how long to wait.
#[derive(Debug, Default)]
pub(crate) struct AcceptErrors {
    /// When the last line about them was logged.
    logged_at: Option<Instant>,
    /// Failures since that line that it did not report.
    left_out: u64,
    /// Failures for want of resources in a row.
    streak: u32,
}

impl AcceptErrors {
    /// An accept failed with `error` at `now`: logs it if it is the first or the last line was
    /// a minute ago, and returns how long to wait before accepting again.
    pub(crate) fn failed(&mut self, error: &std::io::Error, now: Instant) -> Duration {
        match self.logged_at {
            Some(at) if now.saturating_duration_since(at) < ACCEPT_LOG_EVERY => {
                self.left_out += 1;
            }
            _ => {
                tracing::warn!(%error, left_out = self.left_out, "gateway accept failed");
                self.logged_at = Some(now);
                self.left_out = 0;
            }
        }
        if is_exhaustion(error) {
            let wait = ACCEPT_BACKOFF_MIN
                .saturating_mul(1 << self.streak.min(10))
                .min(ACCEPT_BACKOFF_MAX);
            self.streak += 1;
            wait
        } else {
            // A connection that failed on its way in (reset, aborted): the next may be fine.
            self.streak = 0;
            Duration::from_millis(10)
        }
    }

    /// An accept succeeded at `now`: failures left out of the log are reported (at most once
    /// a minute, like the failures themselves).
    pub(crate) fn accepted(&mut self, now: Instant) {
        self.streak = 0;
        if self.left_out == 0 {
            return;
        }
        if let Some(at) = self.logged_at {
            if now.saturating_duration_since(at) >= ACCEPT_LOG_EVERY {
                tracing::warn!(
                    left_out = self.left_out,
                    "gateway accepting again after failed accepts"
                );
                self.logged_at = Some(now);
                self.left_out = 0;
            }
        }
    }

    #[cfg(test)]
    fn left_out(&self) -> u64 {
        self.left_out
    }
}

/// Whether an accept failed for want of descriptors or kernel memory (which lasts: waiting
/// helps), not because of the one connection.
fn is_exhaustion(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_share_a_key_per_64_and_ipv4_ones_have_their_own() {
        let key = |s: &str| peer_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7:1883"), "192.0.2.7");
        assert_ne!(key("192.0.2.7:1883"), key("192.0.2.8:1883"));
        assert_eq!(
            key("[2001:db8:1:2:aaaa::1]:1883"),
            key("[2001:db8:1:2:ffff:1:2:3]:5000")
        );
        assert_eq!(key("[2001:db8:1:2:aaaa::1]:1883"), "2001:db8:1:2::/64");
        assert_ne!(key("[2001:db8:1:2::1]:1883"), key("[2001:db8:1:3::1]:1883"));
        // IPv4 on a dual-stack listener: still one key per address, not one for all of IPv4.
        assert_eq!(key("[::ffff:192.0.2.7]:1883"), "192.0.2.7");
        assert_ne!(key("[::ffff:192.0.2.7]:1"), key("[::ffff:192.0.2.8]:1"));
    }

    #[test]
    fn lines_are_limited_per_key_and_for_all_keys_together() {
        let limit = LogLimit::default();
        let one = (0..100).filter(|_| limit.admit("a").is_some()).count();
        assert_eq!(one, 5, "five a minute per key");
        let many = (0..1000)
            .filter(|i| limit.admit(&format!("k{i}")).is_some())
            .count();
        assert_eq!(
            many + one,
            CLIENT_LINES_PER_MINUTE as usize,
            "all keys together"
        );
    }

    #[test]
    fn failed_accepts_log_once_a_minute_and_back_off_while_descriptors_are_exhausted() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let mut errors = AcceptErrors::default();
        let start = Instant::now();
        let mut waits = Vec::new();
        for i in 0..20 {
            waits.push(errors.failed(&emfile, start + Duration::from_millis(100 * i)));
        }
        assert_eq!(errors.left_out(), 19, "only the first was logged");
        assert_eq!(waits[0], ACCEPT_BACKOFF_MIN);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), ACCEPT_BACKOFF_MAX);
        // A success resets the wait but reports the count only once the minute is over.
        errors.accepted(start + Duration::from_secs(3));
        assert_eq!(errors.left_out(), 19);
        assert_eq!(
            errors.failed(&emfile, start + Duration::from_secs(4)),
            ACCEPT_BACKOFF_MIN
        );
        assert_eq!(errors.left_out(), 20);
        errors.failed(&emfile, start + Duration::from_secs(61));
        assert_eq!(errors.left_out(), 0, "a minute later the count was logged");
        errors.failed(&emfile, start + Duration::from_secs(62));
        errors.accepted(start + Duration::from_secs(200));
        assert_eq!(errors.left_out(), 0, "reported when accepting again");
        // Other failures do not back off.
        let reset = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert!(errors.failed(&reset, start + Duration::from_secs(201)) < ACCEPT_BACKOFF_MIN);
    }
}
