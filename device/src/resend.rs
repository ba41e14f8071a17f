//! When to send the outbox head again without an ack: the round trip to the platform's
//! `StatusAck`, estimated as TCP estimates its own (RFC 6298), never below [`MIN`].
//!
//! A fixed 10 s is right for a platform that answers in milliseconds and wrong for one that
//! is busy: at 10,000 machines on one host, acks took more than 10 s to come back and the
//! fleet sent 13,000-30,000 events a second time per rollout, each verified, acknowledged and
//! delivered again by the platform that was already behind. Here a machine that sees its acks
//! come back slowly waits longer before it sends again, and each resend that finds no ack
//! doubles the wait, up to [`MAX`]. A new connection sends the head at once whatever the
//! timer says (the agent does that); the estimate is kept across connections.

use std::time::Duration;

/// The shortest wait before a resend: the fixed wait before this estimate (protocol.md §6.1).
pub const MIN: Duration = Duration::from_secs(10);
/// The longest: a machine whose acks are lost for good still sends once in this time.
pub const MAX: Duration = Duration::from_secs(120);

/// The resend timer of one outbox head at a time.
#[derive(Debug, Clone)]
pub struct ResendTimer {
    /// Smoothed round trip and its variation, from heads acknowledged without a resend.
    estimate: Option<(Duration, Duration)>,
    /// The current wait: from the estimate, doubled by each resend since the last clean sample.
    wait: Duration,
    /// Whether the head in flight was sent more than once (its ack is then no sample: it
    /// cannot say which send it answers).
    resent: bool,
}

impl Default for ResendTimer {
    fn default() -> Self {
        Self {
            estimate: None,
            wait: MIN,
            resent: false,
        }
    }
}

impl ResendTimer {
    /// How long to wait for the ack of the head in flight before sending it again.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// A head was sent for the first time (after the last one was acknowledged).
    pub fn sent_first(&mut self) {
        self.resent = false;
    }

    /// The head in flight is being sent again: on a new connection (`backoff` false: the
    /// wait was not what failed) or after [`wait`](Self::wait) ran out (doubled).
    pub fn sending_again(&mut self, backoff: bool) {
        self.resent = true;
        if backoff {
            self.wait = (self.wait * 2).min(MAX);
        }
    }

    /// The head was acknowledged `round_trip` after it was last sent.
    pub fn acknowledged(&mut self, round_trip: Duration) {
        if std::mem::take(&mut self.resent) {
            return;
        }
        let (srtt, rttvar) = match self.estimate {
            None => (round_trip, round_trip / 2),
            Some((srtt, rttvar)) => {
                let diff = srtt.abs_diff(round_trip);
                (srtt * 7 / 8 + round_trip / 8, rttvar * 3 / 4 + diff / 4)
            }
        };
        self.estimate = Some((srtt, rttvar));
        self.wait = (srtt + rttvar * 4).clamp(MIN, MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_platform_that_answers_quickly_keeps_the_shortest_wait() {
        let mut t = ResendTimer::default();
        assert_eq!(t.wait(), MIN);
        for _ in 0..50 {
            t.sent_first();
            t.acknowledged(20 * MS);
        }
        assert_eq!(t.wait(), MIN);
    }

    #[test]
    fn slow_acks_lengthen_the_wait_and_quick_ones_bring_it_back() {
        let mut t = ResendTimer::default();
        t.sent_first();
        t.acknowledged(Duration::from_secs(15));
        assert!(
            t.wait() > Duration::from_secs(30),
            "one slow ack: {:?}",
            t.wait()
        );
        for _ in 0..30 {
            t.sent_first();
            t.acknowledged(Duration::from_secs(15));
        }
        let slow = t.wait();
        assert!(
            slow > Duration::from_secs(15) && slow < Duration::from_secs(16),
            "acks that take 15 s are waited for a little longer: {slow:?}"
        );
        for _ in 0..100 {
            t.sent_first();
            t.acknowledged(20 * MS);
        }
        assert_eq!(t.wait(), MIN);
    }

    #[test]
    fn each_resend_without_an_ack_doubles_the_wait_up_to_the_longest() {
        let mut t = ResendTimer::default();
        t.sent_first();
        let waits: Vec<_> = (0..6)
            .map(|_| {
                t.sending_again(true);
                t.wait().as_secs()
            })
            .collect();
        assert_eq!(waits, [20, 40, 80, 120, 120, 120]);
    }

    #[test]
    fn the_ack_of_a_resent_head_is_no_sample_and_a_reconnect_does_not_back_off() {
        let mut t = ResendTimer::default();
        t.sent_first();
        t.sending_again(false);
        assert_eq!(t.wait(), MIN, "a new connection is not a timeout");
        // Which send this ack answers is unknown: a huge round trip would be wrong.
        t.acknowledged(Duration::from_secs(100));
        assert_eq!(t.wait(), MIN);
        t.sent_first();
        t.sending_again(true);
        t.acknowledged(Duration::from_secs(100));
        assert_eq!(
            t.wait(),
            2 * MIN,
            "the backed-off wait stays until a clean sample"
        );
        t.sent_first();
        t.acknowledged(30 * MS);
        assert_eq!(t.wait(), MIN);
    }
}
