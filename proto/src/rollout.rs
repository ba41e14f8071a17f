//! Staged rollouts as the operator and the CLI see them: the wave plan given at publish, and
//! the rollout's state, waves and recorded transitions (`fleetcast rollout status`).
//!
//! Shares are in basis points (1 % = 100 bp) so that `0.5%` is exact and plans compare equal.

use serde::{Deserialize, Serialize};

use crate::ids::{MachineId, ReleaseId};
use crate::status::Phase;

/// 100 %.
pub const ALL_BP: u32 = 10_000;

/// How a release widens: cumulative waves, and when it advances or stops by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WavePlan {
    /// Cumulative share of the targets notified by the end of each wave, rising, the last
    /// always 100 % (`[100, 1000, 5000, 10000]` is 1 %, 10 %, 50 %, 100 %).
    pub waves_bp: Vec<u32>,
    /// A wave is done, and the next one starts, once this share of the machines notified so far
    /// installed the release.
    pub success_bp: u32,
    /// The rollout pauses once more than this share of the machines notified so far failed
    /// (download_failed, install_failed, rolled_back, rejected).
    pub failure_bp: u32,
    /// A wave that has not succeeded after this long pauses the rollout (0: never).
    #[serde(default)]
    pub wave_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "invalid share {0:?}: expected a percentage such as 10% or 0.5% (at most two decimals)"
    )]
    Share(String),
    #[error("waves must rise and stay within 0% < wave <= 100%; got {0}")]
    Waves(String),
    #[error("{what} must be between 0% and 100%; got {value}")]
    Threshold { what: &'static str, value: String },
}

/// Parses `12%`, `12.5%`, `0.25%` (the `%` is optional) into basis points.
pub fn parse_share(text: &str) -> Result<u32, PlanError> {
    let bad = || PlanError::Share(text.to_owned());
    let t = text.trim();
    let t = t.strip_suffix('%').unwrap_or(t).trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty()
        || frac.len() > 2
        || !(whole.chars().chain(frac.chars())).all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u32 = whole.parse().map_err(|_| bad())?;
    let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(100)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

/// `1234` -> `12.34%`, `1000` -> `10%`.
pub fn share_text(bp: u32) -> String {
    if bp.is_multiple_of(100) {
        format!("{}%", bp / 100)
    } else if bp.is_multiple_of(10) {
        format!("{}.{}%", bp / 100, (bp % 100) / 10)
    } else {
        format!("{}.{:02}%", bp / 100, bp % 100)
    }
}

impl WavePlan {
    /// A checked plan. Waves must rise within (0, 100 %]; 100 % is appended when the last wave
    /// stops short of it (the last wave always takes everyone left).
    pub fn new(
        mut waves_bp: Vec<u32>,
        success_bp: u32,
        failure_bp: u32,
        wave_timeout_ms: u64,
    ) -> Result<Self, PlanError> {
        let text = || {
            waves_bp
                .iter()
                .map(|w| share_text(*w))
                .collect::<Vec<_>>()
                .join(",")
        };
        if waves_bp.is_empty()
            || waves_bp.windows(2).any(|w| w[0] >= w[1])
            || waves_bp.first().is_some_and(|w| *w == 0)
            || waves_bp.last().is_some_and(|w| *w > ALL_BP)
        {
            return Err(PlanError::Waves(text()));
        }
        if waves_bp.last() != Some(&ALL_BP) {
            waves_bp.push(ALL_BP);
        }
        for (what, v) in [
            ("success threshold", success_bp),
            ("failure threshold", failure_bp),
        ] {
            if v > ALL_BP {
                return Err(PlanError::Threshold {
                    what,
                    value: share_text(v),
                });
            }
        }
        Ok(Self {
            waves_bp,
            success_bp,
            failure_bp,
            wave_timeout_ms,
        })
    }

    /// How many of `n` targets waves `0..=wave` hold together: the share rounded up, at least
    /// one more than the wave before while any are left, all of them for the last wave.
    pub fn cumulative(&self, wave: usize, n: usize) -> usize {
        let mut end = 0usize;
        for (i, bp) in self.waves_bp.iter().enumerate().take(wave + 1) {
            let share = (n as u64 * *bp as u64).div_ceil(ALL_BP as u64) as usize;
            end = share.max((end + 1).min(n));
            if i + 1 == self.waves_bp.len() {
                end = n;
            }
        }
        end.min(n)
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// Notices are out to every machine of waves `0..=wave`; waiting for the wave to succeed.
    Running,
    /// Stopped by the operator or by itself (a threshold or a timeout); nothing more is sent
    /// until `resume`.
    Paused { reason: String },
    /// Every wave succeeded or the last one was reached: the release is out to every target.
    Completed,
    /// Stopped for good: no further notices; machines not yet installing were told to drop it.
    Cancelled { reason: String },
}

impl RolloutState {
    /// Completed or cancelled: it sends no more notices.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            RolloutState::Completed | RolloutState::Cancelled { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused { .. } => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Cancelled { .. } => "cancelled",
        }
    }
}

/// One recorded change: what happened, why, when, and who asked (absent: the platform).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutTransition {
    pub at_ms: u64,
    /// The wave the rollout was at afterwards (0-based).
    pub wave: usize,
    /// `started`, `advanced`, `paused`, `resumed`, `completed`, `cancelled`.
    pub what: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A staged rollout of one release, as stored and as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutInfo {
    pub release: ReleaseId,
    pub plan: WavePlan,
    /// Every target in the order waves take them: ascending blake3(release id, 0x00, machine
    /// id), so the first wave is a stable, unbiased sample that does not change on a restart.
    pub order: Vec<MachineId>,
    /// The current wave (0-based).
    pub wave: usize,
    pub wave_started_ms: u64,
    #[serde(flatten)]
    pub state: RolloutState,
    /// How many failures the operator's last resume accepted (shown; [`Self::accepted`] says
    /// which).
    #[serde(default)]
    pub failures_accepted: usize,
    /// The failures an operator saw and resumed past, each as it stood: they count for neither
    /// threshold while the machine's record still shows that failure. One that changes (the
    /// machine installs after all, a retry starts a new round, it fails again) is no longer
    /// accepted, so an accepted failure never stands in for another machine's new one. Empty
    /// in rollouts resumed before this field: there `failures_accepted` alone is subtracted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepted: Vec<AcceptedFailure>,
    /// The machines of the waves so far that were not notified when their wave started: they
    /// were revoked, or the release no longer reached them (not named by it, and in none of its
    /// groups any more). They count for neither threshold and stay skipped for this rollout.
    /// In a reply, the first [`ROLLOUT_ORDER_SHOWN`], with `skipped_total` beside them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<MachineId>,
    #[serde(default)]
    pub log: Vec<RolloutTransition>,
}

/// One failure an operator resumed past: the machine, and its record's phase and the time of
/// that phase when the operator resumed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AcceptedFailure {
    pub machine: MachineId,
    pub phase: Phase,
    pub at_ms: u64,
}

/// Most machines of a rollout's `order` a reply lists (the first, so the first waves are
/// shown whole); [`RolloutReport::order_total`] counts them all.
pub const ROLLOUT_ORDER_SHOWN: usize = 1000;

/// A rollout as a reply carries it (reply `rollout`): `order` cut to its first
/// [`ROLLOUT_ORDER_SHOWN`] machines, so the reply stays small however many machines the
/// rollout has. On the wire, `order_total` sits beside the rollout's own fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutReport {
    #[serde(flatten)]
    pub rollout: RolloutInfo,
    /// How many machines the whole `order` holds. Absent from a platform before this field:
    /// `order` is whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_total: Option<u32>,
    /// How many machines the whole `skipped` holds. Absent from a platform before this field
    /// (it skipped no one), and when none was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_total: Option<u32>,
    /// How the machines notified so far stand, as the thresholds count them (why a running
    /// wave has not advanced yet). Absent from a platform before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tally: Option<WaveTally>,
}

/// The machines a rollout notified so far (waves `0..=wave`), by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveTally {
    pub notified: u32,
    /// `installed` (and `deferred` for a `download_only` release).
    pub succeeded: u32,
    /// `download_failed`, `install_failed`, `rolled_back`, `rejected`.
    pub failed: u32,
    /// Of `failed`: accepted at a resume, so counted for neither threshold (nor among the
    /// machines the shares are taken over).
    pub accepted: u32,
    /// Machines of waves `0..=wave` not counted at all (nor in `notified`): skipped when their
    /// wave started, or revoked or no longer reached by the release since they were notified.
    /// Absent from a platform before this field: none.
    #[serde(default)]
    pub skipped: u32,
}

/// Where a release's staged rollout stands, as `release status` carries it: `release status`
/// and `release watch` see only the machines notified so far, and this says how many more
/// there are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedProgress {
    #[serde(flatten)]
    pub state: RolloutState,
    /// The current wave (0-based).
    pub wave: usize,
    pub waves: usize,
    /// Machines of waves `0..=wave` that were sent the notice.
    pub notified: u32,
    /// Machines of waves `0..=wave` that were not: revoked or no longer reached by the release
    /// when their wave started ([`RolloutInfo::skipped`]). Absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: u32,
    /// Machines in the rollout.
    pub machines: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl StagedProgress {
    pub fn of(r: &RolloutInfo) -> Self {
        let machines = r.order.len();
        let skipped = r.skipped.len();
        Self {
            state: r.state.clone(),
            wave: r.wave,
            waves: r.plan.waves_bp.len(),
            notified: r.plan.cumulative(r.wave, machines).saturating_sub(skipped) as u32,
            skipped: skipped as u32,
            machines: machines as u32,
        }
    }
}

impl RolloutReport {
    /// The reply for `rollout`: its order and skipped machines cut, their lengths kept.
    pub fn new(mut rollout: RolloutInfo) -> Self {
        let total = rollout.order.len() as u32;
        rollout.order.truncate(ROLLOUT_ORDER_SHOWN);
        let skipped = rollout.skipped.len() as u32;
        rollout.skipped.truncate(ROLLOUT_ORDER_SHOWN);
        // Which failures were accepted is the platform's to keep; a reply counts them.
        rollout.accepted.clear();
        Self {
            rollout,
            order_total: Some(total),
            skipped_total: (skipped > 0).then_some(skipped),
            tally: None,
        }
    }

    /// The same, with the tally of the machines notified so far.
    pub fn with_tally(mut self, tally: WaveTally) -> Self {
        self.tally = Some(tally);
        self
    }

    /// How many machines the rollout has.
    pub fn targets(&self) -> usize {
        self.order_total
            .map_or(self.rollout.order.len(), |n| n as usize)
    }

    /// How many machines the rollout skipped ([`RolloutInfo::skipped`]).
    pub fn skipped(&self) -> usize {
        self.skipped_total
            .map_or(self.rollout.skipped.len(), |n| n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_in_basis_points_and_print_back() {
        assert_eq!(parse_share("1%"), Ok(100));
        assert_eq!(parse_share("12.5%"), Ok(1250));
        assert_eq!(parse_share("0.25"), Ok(25));
        assert_eq!(parse_share(" 100 % "), Ok(10_000));
        for bad in ["", "%", "1.234%", "-1%", "1e2%", "ten%", ".5%"] {
            assert!(parse_share(bad).is_err(), "{bad:?}");
        }
        for bp in [1, 25, 100, 1250, 9999, 10_000] {
            assert_eq!(parse_share(&share_text(bp)), Ok(bp));
        }
    }

    #[test]
    fn plans_rise_end_at_everyone_and_refuse_nonsense() {
        let p = WavePlan::new(vec![100, 1000, 5000], 9500, 500, 0).unwrap();
        assert_eq!(p.waves_bp, [100, 1000, 5000, 10_000]);
        assert!(WavePlan::new(vec![], 9500, 500, 0).is_err());
        assert!(WavePlan::new(vec![1000, 1000], 9500, 500, 0).is_err());
        assert!(WavePlan::new(vec![5000, 1000], 9500, 500, 0).is_err());
        assert!(WavePlan::new(vec![0, 1000], 9500, 500, 0).is_err());
        assert!(WavePlan::new(vec![1000, 20_000], 9500, 500, 0).is_err());
        assert!(WavePlan::new(vec![1000], 10_001, 500, 0).is_err());
    }

    #[test]
    fn waves_round_up_take_at_least_one_more_each_and_end_with_all() {
        let p = WavePlan::new(vec![100, 1000, 5000], 9500, 500, 0).unwrap();
        let ends: Vec<usize> = (0..4).map(|w| p.cumulative(w, 200)).collect();
        assert_eq!(ends, [2, 20, 100, 200]);
        // Small fleets: every wave still adds a machine while any are left.
        let ends: Vec<usize> = (0..4).map(|w| p.cumulative(w, 3)).collect();
        assert_eq!(ends, [1, 2, 3, 3]);
        assert_eq!(p.cumulative(0, 0), 0);
        assert_eq!(p.cumulative(3, 0), 0);
    }
    fn rollout(n: usize) -> RolloutInfo {
        RolloutInfo {
            release: crate::ids::ReleaseId::new("r-000007").unwrap(),
            plan: WavePlan::new(vec![100, 1000], 9500, 500, 0).unwrap(),
            order: (0..n)
                .map(|i| MachineId::new(format!("vm-{i:05}")).unwrap())
                .collect(),
            wave: 1,
            wave_started_ms: 5,
            state: RolloutState::Cancelled {
                reason: "by hand".into(),
            },
            failures_accepted: 0,
            accepted: vec![],
            skipped: vec![],
            log: vec![],
        }
    }

    #[test]
    fn a_rollout_reply_cuts_its_order_and_counts_it_beside_the_rollout_fields() {
        let whole = rollout(ROLLOUT_ORDER_SHOWN + 7);
        let report = RolloutReport::new(whole.clone());
        assert_eq!(report.rollout.order, whole.order[..ROLLOUT_ORDER_SHOWN]);
        assert_eq!(report.targets(), ROLLOUT_ORDER_SHOWN + 7);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["order_total"], ROLLOUT_ORDER_SHOWN as u64 + 7);
        assert_eq!(json["state"], "cancelled");
        assert_eq!(json["reason"], "by hand");
        assert_eq!(json["order"].as_array().unwrap().len(), ROLLOUT_ORDER_SHOWN);
        assert!(json.get("skipped").is_none() && json.get("skipped_total").is_none());
        assert_eq!(
            serde_json::from_value::<RolloutReport>(json).unwrap(),
            report
        );
        assert_eq!((report.skipped_total, report.skipped()), (None, 0));
        // Skipped machines are cut the same way, and counted.
        let skipped = RolloutReport::new(RolloutInfo {
            skipped: whole.order.clone(),
            ..whole.clone()
        });
        assert_eq!(skipped.rollout.skipped.len(), ROLLOUT_ORDER_SHOWN);
        assert_eq!(skipped.skipped(), ROLLOUT_ORDER_SHOWN + 7);
        // From a platform before `order_total`: the order is whole.
        let old = serde_json::to_value(rollout(3)).unwrap();
        let read: RolloutReport = serde_json::from_value(old).unwrap();
        assert_eq!((read.order_total, read.targets()), (None, 3));
        assert_eq!(read.rollout, rollout(3));
    }
}
