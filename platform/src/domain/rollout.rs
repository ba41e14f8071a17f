//! A staged rollout as a pure state machine: which machines each wave holds, when a wave is
//! done, when the rollout stops by itself, and what pause, resume and cancel do. It decides;
//! the caller persists the `RolloutInfo` and carries out the [`Effect`]s (publishing notices,
//! sending cancel commands). No I/O, no clock: time is passed in.
//!
//! Counting: every share is taken over the machines notified so far (waves `0..=wave`).
//! *Succeeded* is `installed` (and `deferred` for download-only releases, which wait for an
//! operator's activate); *failed* is `download_failed`, `install_failed`, `rolled_back` or
//! `rejected` (not `cancelled` or `superseded`: an operator's doing).
//!
//! Scope: the caller says which machines the release still reaches (not revoked, and named by
//! it or in one of its groups now). A wave that starts skips the others: they are not notified,
//! are kept in `skipped`, and never count. A machine notified before it left the scope keeps
//! its notice and its record, but no longer counts either: a revoked machine cannot answer, and
//! one moved out of the release's groups is no longer the operator's sample of this rollout.

use fleetcast_proto::rollout::{
    share_text, AcceptedFailure, RolloutInfo, RolloutState, RolloutTransition, WavePlan, ALL_BP,
};
use std::fmt::Write;

use fleetcast_proto::{MachineId, Phase, ReleaseId};

use super::release::failed;

/// What the caller must do after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A wave started: publish the release's notice to these machines.
    Notify(Vec<MachineId>),
    /// Cancelled: tell these machines (notified, not yet installing) to drop the release.
    Cancel(Vec<MachineId>),
}

/// The machines notified so far, by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub notified: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Of `failed`, the machines whose failure an operator accepted at a resume (and that were
    /// not retried since).
    pub accepted: usize,
    /// Every failed machine's failure as its record shows it (what a resume accepts).
    pub failures: Vec<AcceptedFailure>,
    /// Machines of waves `0..=wave` counted nowhere else: skipped when their wave started, or
    /// out of the release's scope since they were notified.
    pub skipped: usize,
}

/// What a target record says of a machine, for the tally: its phase, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub phase: Phase,
    pub at_ms: u64,
}

/// Why an operator's command does nothing, and (`hint`, may be empty) what would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rollout of {release} is {state}: cannot {command}{hint}")]
pub struct Refused {
    pub release: ReleaseId,
    pub state: &'static str,
    pub command: &'static str,
    pub hint: String,
}

/// Every target in wave order: ascending blake3(release id, 0x00, machine id). Stable across
/// restarts and independent of how the targets were listed; a different sample per release.
pub fn order(release: &ReleaseId, machines: impl IntoIterator<Item = MachineId>) -> Vec<MachineId> {
    let mut keyed: Vec<([u8; 32], MachineId)> = machines
        .into_iter()
        .map(|m| {
            let mut h = blake3::Hasher::new();
            h.update(release.as_str().as_bytes());
            h.update(&[0]);
            h.update(m.as_str().as_bytes());
            (*h.finalize().as_bytes(), m)
        })
        .collect();
    keyed.sort();
    keyed.dedup_by(|a, b| a.1 == b.1);
    keyed.into_iter().map(|(_, m)| m).collect()
}

/// Whether `phase` counts as succeeded for a rollout (`download_only`: `deferred` too).
pub fn succeeded(phase: Phase, download_only: bool) -> bool {
    phase == Phase::Installed || (download_only && phase == Phase::Deferred)
}

/// Counts the machines of waves `0..=r.wave` by the record `record_of` gives (unknown:
/// pending). Those the rollout skipped, and those `in_scope` no longer holds for, count only as
/// `skipped`: a wave never waits on them.
pub fn tally(
    r: &RolloutInfo,
    download_only: bool,
    record_of: impl Fn(&MachineId) -> Option<Record>,
    in_scope: impl Fn(&MachineId) -> bool,
) -> Tally {
    let mut t = Tally::default();
    let skipped: std::collections::HashSet<&MachineId> = r.skipped.iter().collect();
    // A set: this runs at every evaluation, and a large rollout may have accepted thousands.
    // By machine: a failure an operator resumed past stays accepted, whatever the machine
    // reports after, until a retry starts a new round for it ([`retried`]). Why: matched by
    // phase and time, one machine's credentials re-reporting its failure with a higher attempt
    // (a final record may change that way, protocol §6.1) made a new failure each time and
    // paused the rollout again after every resume (red-team test, 2026-11-28). And forgotten
    // once the machine was seen succeeding, the same credentials reported `installed`, then a
    // failure again, and so paused the rollout about fifty times per release (a review with
    // one machine's config, 2026-11-29). An honest agent reports no failure of a release after
    // installing it unless a retry starts it again, so what keeping the acceptance hides is
    // only that machine's own report, which its own credentials could hide as well.
    let accepted: std::collections::HashSet<&MachineId> =
        r.accepted.iter().map(|a| &a.machine).collect();
    for m in notified(r) {
        if skipped.contains(m) || !in_scope(m) {
            t.skipped += 1;
            continue;
        }
        t.notified += 1;
        match record_of(m) {
            Some(rec) if succeeded(rec.phase, download_only) => t.succeeded += 1,
            Some(rec) if failed(rec.phase) => {
                t.failed += 1;
                let failure = AcceptedFailure {
                    machine: m.clone(),
                    phase: rec.phase,
                    at_ms: rec.at_ms,
                };
                if accepted.contains(&failure.machine) {
                    t.accepted += 1;
                }
                t.failures.push(failure);
            }
            _ => {}
        }
    }
    // A rollout resumed before failures were kept one by one: the count alone.
    if r.accepted.is_empty() {
        t.accepted = r.failures_accepted.min(t.failed);
    }
    t
}

/// The machines of waves `0..=wave`: notified so far, or skipped when their wave started.
pub fn notified(r: &RolloutInfo) -> &[MachineId] {
    &r.order[..r.plan.cumulative(r.wave, r.order.len())]
}

fn log(r: &mut RolloutInfo, now_ms: u64, what: &str, reason: String, by: Option<&str>) {
    r.log.push(RolloutTransition {
        at_ms: now_ms,
        wave: r.wave,
        what: what.to_owned(),
        reason,
        by: by.map(str::to_owned),
    });
}

fn pct(part: usize, whole: usize) -> String {
    if whole == 0 {
        return "0%".into();
    }
    share_text(((part as u64 * ALL_BP as u64) / whole as u64) as u32)
}

/// A new rollout of `release` over `targets`, with its first wave to notify.
pub fn start(
    release: &ReleaseId,
    plan: WavePlan,
    targets: impl IntoIterator<Item = MachineId>,
    now_ms: u64,
) -> (RolloutInfo, Vec<Effect>) {
    let mut r = RolloutInfo {
        release: release.clone(),
        plan,
        order: order(release, targets),
        wave: 0,
        wave_started_ms: now_ms,
        state: RolloutState::Running,
        failures_accepted: 0,
        accepted: Vec::new(),
        skipped: Vec::new(),
        log: Vec::new(),
    };
    let first = notified(&r).to_vec();
    let reason = format!(
        "wave 1 of {}: {} of {} machines",
        r.plan.waves_bp.len(),
        first.len(),
        r.order.len()
    );
    log(&mut r, now_ms, "started", reason, None);
    let effects = if first.is_empty() {
        vec![]
    } else {
        vec![Effect::Notify(first)]
    };
    (r, effects)
}

/// Re-evaluates a running rollout against what its machines reported: pauses it past the
/// failure threshold or the wave timeout, starts the next wave once this one succeeded, and
/// completes it when the last wave did. Anything but a running rollout is left alone. Failures
/// accepted at a resume count for neither threshold. A wave that starts skips the machines
/// `in_scope` does not hold for.
///
/// A wave with no machine counted (all skipped) has succeeded: `0 ≥ share × 0`, and nothing
/// failed; the shares divide by nothing.
pub fn observe(
    r: &mut RolloutInfo,
    t: Tally,
    now_ms: u64,
    in_scope: impl Fn(&MachineId) -> bool,
) -> Vec<Effect> {
    if r.state != RolloutState::Running {
        return vec![];
    }
    let wave_no = r.wave + 1;
    // Failures an operator resumed past count for neither threshold: neither as failures nor
    // among the machines the shares are taken over.
    let failures = t.failed - t.accepted;
    let counted = t.notified - t.accepted;
    if failures as u64 * ALL_BP as u64 > r.plan.failure_bp as u64 * counted as u64 {
        let reason = format!(
            "wave {wave_no}: {failures} of {counted} machines failed ({}), above the failure threshold {}",
            pct(failures, counted),
            share_text(r.plan.failure_bp)
        );
        r.state = RolloutState::Paused {
            reason: reason.clone(),
        };
        log(r, now_ms, "paused", reason, None);
        return vec![];
    }
    if t.succeeded as u64 * ALL_BP as u64 >= r.plan.success_bp as u64 * counted as u64 {
        let reason = format!(
            "wave {wave_no}: {} of {counted} machines succeeded ({}), threshold {}",
            t.succeeded,
            pct(t.succeeded, counted),
            share_text(r.plan.success_bp)
        );
        if r.wave + 1 >= r.plan.waves_bp.len() {
            r.state = RolloutState::Completed;
            log(r, now_ms, "completed", reason, None);
            return vec![];
        }
        return advance(r, reason, None, now_ms, in_scope);
    }
    let ran = now_ms.saturating_sub(r.wave_started_ms);
    if r.plan.wave_timeout_ms > 0 && ran >= r.plan.wave_timeout_ms {
        let reason = format!(
            "wave {wave_no} timed out after {} s: {} of {counted} machines succeeded ({}), below {}",
            ran / 1000,
            t.succeeded,
            pct(t.succeeded, counted),
            share_text(r.plan.success_bp)
        );
        r.state = RolloutState::Paused {
            reason: reason.clone(),
        };
        log(r, now_ms, "paused", reason, None);
    }
    vec![]
}

/// Starts the next wave: notifies its machines `in_scope` holds for, and records the others
/// as skipped in the same step (persisted with the rollout, before any notice is sent).
fn advance(
    r: &mut RolloutInfo,
    reason: String,
    by: Option<&str>,
    now_ms: u64,
    in_scope: impl Fn(&MachineId) -> bool,
) -> Vec<Effect> {
    let before = notified(r).len();
    r.wave += 1;
    r.wave_started_ms = now_ms;
    let (next, skipped): (Vec<MachineId>, Vec<MachineId>) = r.order
        [before..r.plan.cumulative(r.wave, r.order.len())]
        .iter()
        .cloned()
        .partition(|m| in_scope(m));
    let mut reason = format!(
        "{reason}; wave {} of {}: {} more machines",
        r.wave + 1,
        r.plan.waves_bp.len(),
        next.len()
    );
    if !skipped.is_empty() {
        let _ = write!(
            reason,
            ", {} skipped (revoked or no longer targeted)",
            skipped.len()
        );
        r.skipped.extend(skipped);
    }
    log(r, now_ms, "advanced", reason, by);
    if next.is_empty() {
        vec![]
    } else {
        vec![Effect::Notify(next)]
    }
}

fn refused(r: &RolloutInfo, command: &'static str) -> Refused {
    Refused {
        release: r.release.clone(),
        state: r.state.name(),
        command,
        hint: String::new(),
    }
}

/// A retry started a new round for `machines`: their accepted failures are forgotten, so a
/// failure in the new round counts again.
pub fn retried(r: &mut RolloutInfo, machines: &[MachineId]) -> bool {
    let before = r.accepted.len();
    r.accepted.retain(|a| !machines.contains(&a.machine));
    let forgotten = before - r.accepted.len();
    // The count is what rollouts resumed before failures were kept one by one go by.
    r.failures_accepted = r.failures_accepted.saturating_sub(forgotten);
    forgotten > 0
}

/// An operator pauses a running rollout: no further wave starts until `resume`.
pub fn pause(r: &mut RolloutInfo, by: &str, now_ms: u64) -> Result<(), Refused> {
    if r.state != RolloutState::Running {
        return Err(refused(r, "pause"));
    }
    let reason = format!("paused by {by}");
    r.state = RolloutState::Paused {
        reason: reason.clone(),
    };
    log(r, now_ms, "paused", reason, Some(by));
    Ok(())
}

/// An operator resumes a paused rollout. The failures seen so far are accepted (only new ones
/// count against the threshold) and the wave's timer starts again; with `advance`, the next
/// wave starts at once instead of waiting for this one to succeed.
///
/// A running rollout takes `advance` too: the next wave starts now, and nothing else changes.
/// The wave's machines that have not finished stay notified and count with the next wave's;
/// no failure is accepted (a running wave is below the failure threshold, and accepting them
/// is a paused rollout's resume). Why: `--advance` refused a running rollout, so a wave held
/// below its success threshold by machines that were offline could be moved on only by a
/// pause and a resume, which also accepted its failures (a review from an operator's side,
/// 2026-11-29). After the last wave, `advance` completes the rollout.
pub fn resume(
    r: &mut RolloutInfo,
    by: &str,
    advance_now: bool,
    mut t: Tally,
    now_ms: u64,
    in_scope: impl Fn(&MachineId) -> bool,
) -> Result<Vec<Effect>, Refused> {
    match (&r.state, advance_now) {
        (RolloutState::Paused { .. }, _) => {
            r.state = RolloutState::Running;
            r.failures_accepted = t.failed;
            r.accepted = std::mem::take(&mut t.failures);
            t.accepted = t.failed;
            r.wave_started_ms = now_ms;
            log(
                r,
                now_ms,
                "resumed",
                format!("resumed by {by}; {} failures accepted", t.failed),
                Some(by),
            );
            if advance_now {
                return Ok(advance_or_complete(
                    r,
                    by,
                    format!("advanced by {by}"),
                    now_ms,
                    in_scope,
                ));
            }
            Ok(observe(r, t, now_ms, in_scope))
        }
        (RolloutState::Running, true) => {
            let counted = t.notified - t.accepted;
            let reason = format!(
                "advanced by {by} in wave {}: {} of {counted} machines succeeded ({}), \
                 threshold {}",
                r.wave + 1,
                t.succeeded,
                pct(t.succeeded, counted),
                share_text(r.plan.success_bp)
            );
            Ok(advance_or_complete(r, by, reason, now_ms, in_scope))
        }
        (RolloutState::Running, false) => Err(Refused {
            hint: format!(
                " (it is not paused); `fleetcast rollout resume {} --advance` starts the next \
                 wave now",
                r.release
            ),
            ..refused(r, "resume")
        }),
        (RolloutState::Completed | RolloutState::Cancelled { .. }, _) => Err(refused(r, "resume")),
    }
}

/// Starts the next wave for operator `by` (`reason`: why), or completes a rollout in its last.
fn advance_or_complete(
    r: &mut RolloutInfo,
    by: &str,
    reason: String,
    now_ms: u64,
    in_scope: impl Fn(&MachineId) -> bool,
) -> Vec<Effect> {
    if r.wave + 1 >= r.plan.waves_bp.len() {
        r.state = RolloutState::Completed;
        log(
            r,
            now_ms,
            "completed",
            format!("completed by {by}"),
            Some(by),
        );
        return vec![];
    }
    advance(r, reason, Some(by), now_ms, in_scope)
}

/// An operator cancels a running or paused rollout: no further notices, and the notified
/// machines for which `drop` holds (they have not begun installing) are told to drop it. The
/// skipped ones were never notified: they are told nothing.
pub fn cancel(
    r: &mut RolloutInfo,
    by: &str,
    now_ms: u64,
    drop: impl Fn(&MachineId) -> bool,
) -> Result<Vec<Effect>, Refused> {
    if !matches!(r.state, RolloutState::Running | RolloutState::Paused { .. }) {
        return Err(refused(r, "cancel"));
    }
    let skipped: std::collections::HashSet<&MachineId> = r.skipped.iter().collect();
    let told: Vec<MachineId> = notified(r)
        .iter()
        .filter(|m| !skipped.contains(m) && drop(m))
        .cloned()
        .collect();
    let reason = format!(
        "cancelled by {by} in wave {}; {} machines told to drop the release",
        r.wave + 1,
        told.len()
    );
    r.state = RolloutState::Cancelled {
        reason: reason.clone(),
    };
    log(r, now_ms, "cancelled", reason, Some(by));
    Ok(if told.is_empty() {
        vec![]
    } else {
        vec![Effect::Cancel(told)]
    })
}

/// Whether a machine in `phase` has not begun installing, so a cancel still stops it.
pub fn droppable(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Pending | Phase::Notified | Phase::Downloading | Phase::Downloaded | Phase::Deferred
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn ids(n: usize) -> Vec<MachineId> {
        (0..n)
            .map(|i| MachineId::new(format!("vm-{i:03}")).unwrap())
            .collect()
    }

    fn rel() -> ReleaseId {
        ReleaseId::new("r-000001").unwrap()
    }

    fn plan(timeout_ms: u64) -> WavePlan {
        WavePlan::new(vec![100, 1000, 5000], 9500, 500, timeout_ms).unwrap()
    }

    /// Records by machine, as the store would give them; each `set` enters its phase at a
    /// later time than the one before. The third field: machines the release no longer reaches.
    #[derive(Default)]
    struct Fleet(HashMap<MachineId, Record>, u64, HashSet<MachineId>);

    impl Fleet {
        fn set(&mut self, ms: &[MachineId], phase: Phase) {
            self.1 += 1;
            for m in ms {
                let at_ms = self.1;
                self.0.insert(m.clone(), Record { phase, at_ms });
            }
        }
        fn tally(&self, r: &RolloutInfo) -> Tally {
            tally(r, false, |m| self.0.get(m).copied(), |m| self.in_scope(m))
        }
        fn in_scope(&self, m: &MachineId) -> bool {
            !self.2.contains(m)
        }
        /// Revoked, or moved out of the release's groups.
        fn leave(&mut self, ms: &[MachineId]) {
            self.2.extend(ms.iter().cloned());
        }
    }

    fn step(r: &mut RolloutInfo, fleet: &Fleet, now_ms: u64) -> Vec<Effect> {
        let t = fleet.tally(r);
        observe(r, t, now_ms, |m| fleet.in_scope(m))
    }

    fn notify_of(effects: &[Effect]) -> Vec<MachineId> {
        match effects {
            [Effect::Notify(ms)] => ms.clone(),
            other => panic!("expected one Notify, got {other:?}"),
        }
    }

    #[test]
    fn order_is_stable_a_permutation_and_differs_per_release() {
        let a = order(&rel(), ids(50));
        let mut shuffled = ids(50);
        shuffled.reverse();
        assert_eq!(
            order(&rel(), shuffled),
            a,
            "independent of the listing order"
        );
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, ids(50));
        assert_ne!(order(&ReleaseId::new("r-000002").unwrap(), ids(50)), a);
    }

    #[test]
    fn waves_advance_on_success_and_complete_after_the_last() {
        let mut fleet = Fleet::default();
        let (mut r, fx) = start(&rel(), plan(0), ids(200), 0);
        let w1 = notify_of(&fx);
        assert_eq!(w1.len(), 2);
        assert_eq!(w1, r.order[..2]);
        // Nothing reported: nothing happens.
        assert!(step(&mut r, &fleet, 10).is_empty());
        fleet.set(&w1, Phase::Installed);
        let w2 = notify_of(&step(&mut r, &fleet, 20));
        assert_eq!((r.wave, w2.len()), (1, 18));
        assert_eq!(w2, r.order[2..20]);
        // 18 of 20 installed is 90 %: below 95 %, no advance.
        fleet.set(&w2[..16], Phase::Installed);
        assert!(step(&mut r, &fleet, 30).is_empty());
        fleet.set(&w2[16..], Phase::Installed);
        let w3 = notify_of(&step(&mut r, &fleet, 40));
        assert_eq!(w3.len(), 80);
        fleet.set(&w3, Phase::Installed);
        let w4 = notify_of(&step(&mut r, &fleet, 50));
        assert_eq!(w4.len(), 100);
        fleet.set(&w4, Phase::Installed);
        assert!(step(&mut r, &fleet, 60).is_empty());
        assert_eq!(r.state, RolloutState::Completed);
        let whats: Vec<&str> = r.log.iter().map(|t| t.what.as_str()).collect();
        assert_eq!(
            whats,
            ["started", "advanced", "advanced", "advanced", "completed"]
        );
        // A completed rollout ignores further reports.
        assert!(step(&mut r, &fleet, 70).is_empty());
    }

    #[test]
    fn failures_past_the_threshold_pause_with_the_reason_and_resume_accepts_them() {
        let mut fleet = Fleet::default();
        let (mut r, _) = start(&rel(), plan(0), ids(200), 0);
        fleet.set(&r.order[..2], Phase::Installed);
        step(&mut r, &fleet, 1);
        assert_eq!(r.wave, 1);
        // Wave 2 (20 machines notified): one failure is 5 %, not above 5 %; two are.
        fleet.set(&r.order[2..3], Phase::InstallFailed);
        assert!(step(&mut r, &fleet, 2).is_empty());
        assert_eq!(r.state, RolloutState::Running);
        fleet.set(&r.order[3..4], Phase::RolledBack);
        assert!(step(&mut r, &fleet, 3).is_empty());
        let RolloutState::Paused { reason } = &r.state else {
            panic!("{:?}", r.state)
        };
        assert_eq!(
            reason,
            "wave 2: 2 of 20 machines failed (10%), above the failure threshold 5%"
        );
        // Paused: successes do not advance it.
        fleet.set(&r.order[4..20], Phase::Installed);
        assert!(step(&mut r, &fleet, 4).is_empty());
        assert_eq!(r.wave, 1);
        // Resume accepts the two failures: they count for neither threshold, so the 18 others
        // (all installed) are the whole wave and the next one starts.
        let t = fleet.tally(&r);
        let w3 = notify_of(&resume(&mut r, "ops", false, t, 5, |_| true).unwrap());
        assert_eq!(
            (r.state.clone(), r.failures_accepted),
            (RolloutState::Running, 2)
        );
        assert_eq!((r.wave, w3.len()), (2, 80));
        assert_eq!(
            r.log.last().unwrap().reason,
            "wave 2: 18 of 18 machines succeeded (100%), threshold 95%; wave 3 of 4: 80 more machines"
        );
        // Four new failures among the 98 counted (100 notified, 2 accepted) are 4.08%: fine;
        // six are 6.12%: paused again, counting only the new ones.
        fleet.set(&w3[..74], Phase::Installed);
        fleet.set(&w3[74..78], Phase::InstallFailed);
        assert!(step(&mut r, &fleet, 6).is_empty());
        assert_eq!(r.state, RolloutState::Running);
        fleet.set(&w3[78..80], Phase::Rejected);
        step(&mut r, &fleet, 7);
        assert_eq!(
            r.state,
            RolloutState::Paused {
                reason: "wave 3: 6 of 98 machines failed (6.12%), above the failure threshold 5%"
                    .into()
            }
        );
        // Cancelled and superseded machines are not failures.
        fleet.set(&w3[..40], Phase::Cancelled);
        fleet.set(&w3[40..], Phase::Superseded);
        assert_eq!(fleet.tally(&r).failed, 2);
    }

    /// A resume accepts those failures, not a number of failures: once an accepted one changes
    /// (the machine installs after all, or a retry's new round fails anew), another machine's
    /// new failure is not absorbed by it. Before, an accepted count of one let a machine that
    /// failed, was resumed past and then reported `installed` (its own credentials suffice, or
    /// an ordinary retry) hide a second machine's genuine failure behind a 0 % threshold.
    #[test]
    fn an_accepted_failure_that_changes_does_not_hide_a_new_one() {
        let zero_failures = WavePlan::new(vec![5000], 10_000, 0, 0).unwrap();
        // Wave 1 of two machines: the first fails, the rollout pauses, an operator resumes.
        let paused_and_resumed = || {
            let mut fleet = Fleet::default();
            let (mut r, _) = start(&rel(), zero_failures.clone(), ids(4), 0);
            let w1 = notified(&r).to_vec();
            assert_eq!(w1.len(), 2);
            fleet.set(&w1[..1], Phase::DownloadFailed);
            step(&mut r, &fleet, 1);
            assert!(matches!(r.state, RolloutState::Paused { .. }));
            let t = fleet.tally(&r);
            resume(&mut r, "ops", false, t, 2, |_| true).unwrap();
            assert_eq!(r.state, RolloutState::Running);
            (fleet, r, w1)
        };
        let reason = |r: &RolloutInfo| match &r.state {
            RolloutState::Paused { reason } => reason.clone(),
            other => panic!("{other:?}"),
        };

        // The accepted machine installs after all, and so does the other: the last wave
        // starts; one of its machines fails, which at 0 % pauses the rollout.
        let (mut fleet, mut r, w1) = paused_and_resumed();
        fleet.set(&w1, Phase::Installed);
        let w2 = notify_of(&step(&mut r, &fleet, 3));
        fleet.set(&w2[..1], Phase::InstallFailed);
        fleet.set(&w2[1..], Phase::Installed);
        step(&mut r, &fleet, 4);
        assert_eq!(
            reason(&r),
            "wave 2: 1 of 4 machines failed (25%), above the failure threshold 0%"
        );

        // The accepted machine reports its failure again by itself (a higher attempt, as its
        // own credentials may): still the accepted failure, no pause.
        let (mut fleet, mut r, w1) = paused_and_resumed();
        fleet.set(&w1[..1], Phase::Downloading);
        step(&mut r, &fleet, 3);
        fleet.set(&w1[..1], Phase::DownloadFailed);
        step(&mut r, &fleet, 4);
        fleet.set(&w1[..1], Phase::InstallFailed);
        step(&mut r, &fleet, 5);
        assert_eq!(
            r.state,
            RolloutState::Running,
            "the same machine's failure again"
        );

        // The accepted machine is seen installed, then fails, again and again (its own
        // credentials, raising the attempt each time): still accepted, no pause. Forgotten at
        // the success, it paused the rollout after each resume (a review, 2026-11-29).
        let (mut fleet, mut r, w1) = paused_and_resumed();
        for at in (3..13).step_by(2) {
            fleet.set(&w1[..1], Phase::Installed);
            step(&mut r, &fleet, at);
            fleet.set(&w1[..1], Phase::DownloadFailed);
            step(&mut r, &fleet, at + 1);
            assert_eq!(r.state, RolloutState::Running, "at {at}");
        }
        assert_eq!(r.accepted.len(), 1, "{:?}", r.accepted);

        // The accepted machine fails anew after a retry's new round: a new failure.
        let (mut fleet, mut r, w1) = paused_and_resumed();
        assert!(retried(&mut r, &w1[..1]));
        assert!(!retried(&mut r, &w1[1..]), "not an accepted failure");
        fleet.set(&w1[..1], Phase::Downloading);
        step(&mut r, &fleet, 3);
        fleet.set(&w1[..1], Phase::DownloadFailed);
        step(&mut r, &fleet, 4);
        assert_eq!(
            reason(&r),
            "wave 1: 1 of 2 machines failed (50%), above the failure threshold 0%"
        );
    }

    #[test]
    fn a_wave_that_runs_past_its_timeout_pauses_and_resume_restarts_the_timer() {
        let mut fleet = Fleet::default();
        let (mut r, _) = start(&rel(), plan(60_000), ids(200), 1_000);
        fleet.set(&r.order[..1], Phase::Installed);
        assert!(step(&mut r, &fleet, 60_999).is_empty());
        assert_eq!(r.state, RolloutState::Running);
        step(&mut r, &fleet, 61_000);
        let RolloutState::Paused { reason } = &r.state else {
            panic!("{:?}", r.state)
        };
        assert_eq!(
            reason,
            "wave 1 timed out after 60 s: 1 of 2 machines succeeded (50%), below 95%"
        );
        let t = fleet.tally(&r);
        resume(&mut r, "ops", false, t, 70_000, |_| true).unwrap();
        assert!(step(&mut r, &fleet, 129_999).is_empty());
        assert_eq!(r.state, RolloutState::Running);
        // Or the operator moves on without waiting.
        step(&mut r, &fleet, 130_000);
        let t = fleet.tally(&r);
        let next = notify_of(&resume(&mut r, "ops", true, t, 131_000, |_| true).unwrap());
        assert_eq!((r.wave, next.len()), (1, 18));
        assert_eq!(r.log.last().unwrap().by.as_deref(), Some("ops"));
    }

    #[test]
    fn pause_and_cancel_stop_new_waves_and_cancel_names_those_not_installing() {
        let mut fleet = Fleet::default();
        let (mut r, _) = start(&rel(), plan(0), ids(200), 0);
        pause(&mut r, "ops", 1).unwrap();
        assert!(pause(&mut r, "ops", 2).is_err(), "already paused");
        fleet.set(&r.order[..2], Phase::Installed);
        assert!(step(&mut r, &fleet, 3).is_empty());
        let t = fleet.tally(&r);
        let w2 = notify_of(&resume(&mut r, "ops", false, t, 4, |_| true).unwrap());
        fleet.set(&w2[..5], Phase::Installing);
        fleet.set(&w2[5..10], Phase::Installed);
        fleet.set(&w2[10..], Phase::Downloading);
        let fx = cancel(&mut r, "ops", 5, |m| {
            fleet.0.get(m).is_none_or(|p| droppable(p.phase))
        })
        .unwrap();
        assert_eq!(fx, [Effect::Cancel(w2[10..].to_vec())]);
        assert!(matches!(r.state, RolloutState::Cancelled { .. }));
        // Nothing moves a cancelled rollout.
        fleet.set(&w2, Phase::Installed);
        assert!(step(&mut r, &fleet, 6).is_empty());
        let t = fleet.tally(&r);
        assert!(resume(&mut r, "ops", true, t, 7, |_| true).is_err());
        assert!(cancel(&mut r, "ops", 8, |_| true).is_err());
        assert_eq!(r.wave, 1);
    }

    #[test]
    fn advance_starts_the_next_wave_of_a_running_rollout_and_accepts_no_failure() {
        let mut fleet = Fleet::default();
        let (mut r, _) = start(&rel(), plan(0), ids(200), 0);
        fleet.set(&r.order[..2], Phase::Installed);
        let w2 = notify_of(&step(&mut r, &fleet, 1));
        // Wave 2 (20 notified): 17 installed, one failed (5%: not above the threshold), two
        // not answering: 85%, below 95%, so it waits.
        fleet.set(&w2[..15], Phase::Installed);
        fleet.set(&w2[15..16], Phase::InstallFailed);
        assert!(step(&mut r, &fleet, 2).is_empty());
        assert_eq!((r.wave, r.state.clone()), (1, RolloutState::Running));
        // A plain resume says what would work.
        let t = fleet.tally(&r);
        let err = resume(&mut r, "ops", false, t, 3, |_| true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rollout of r-000001 is running: cannot resume (it is not paused); \
             `fleetcast rollout resume r-000001 --advance` starts the next wave now"
        );
        // --advance: the next wave's 80 are notified; the two silent ones stay notified and
        // the failure is not accepted.
        let t = fleet.tally(&r);
        let w3 = notify_of(&resume(&mut r, "ops", true, t, 4, |_| true).unwrap());
        assert_eq!(w3, r.order[20..100]);
        assert_eq!((r.wave, r.state.clone()), (2, RolloutState::Running));
        assert_eq!((r.failures_accepted, r.accepted.len()), (0, 0));
        let last = r.log.last().unwrap();
        assert_eq!(
            (last.what.as_str(), last.by.as_deref()),
            ("advanced", Some("ops"))
        );
        assert_eq!(
            last.reason,
            "advanced by ops in wave 2: 17 of 20 machines succeeded (85%), threshold 95%; \
             wave 3 of 4: 80 more machines"
        );
        assert_eq!(fleet.tally(&r).notified, 100);
        // In the last wave, --advance completes it.
        let t = fleet.tally(&r);
        resume(&mut r, "ops", true, t, 5, |_| true).unwrap();
        assert_eq!(r.wave, 3);
        let t = fleet.tally(&r);
        assert!(resume(&mut r, "ops", true, t, 6, |_| true)
            .unwrap()
            .is_empty());
        assert_eq!(r.state, RolloutState::Completed);
    }

    #[test]
    fn an_empty_rollout_notifies_nobody_and_completes() {
        let (mut r, fx) = start(&rel(), plan(0), ids(0), 0);
        assert!(fx.is_empty());
        // Each observation of an empty wave moves one wave on: four waves, four observations.
        for now in 1..=4 {
            assert!(observe(&mut r, Tally::default(), now, |_| true).is_empty());
        }
        assert_eq!((r.wave, r.state.clone()), (3, RolloutState::Completed));
    }

    /// During wave 1, two machines of wave 2 are revoked or moved out of the release's groups,
    /// and one machine of wave 1 too (notified, not finished). Wave 1 does not wait for that
    /// one; wave 2 notifies only the machines still reached, records the others as skipped, and
    /// completes on its own machines at a 100 % success threshold.
    #[test]
    fn a_wave_skips_machines_that_left_the_release_and_completes_on_the_others() {
        let all = WavePlan::new(vec![5000], ALL_BP, 0, 0).unwrap();
        let mut fleet = Fleet::default();
        let (mut r, fx) = start(&rel(), all, ids(10), 0);
        let w1 = notify_of(&fx);
        assert_eq!(w1, r.order[..5]);
        let gone_later = r.order[5..7].to_vec();
        fleet.leave(&gone_later);
        fleet.leave(&w1[4..]);
        fleet.set(&w1[..4], Phase::Installed);
        let w2 = notify_of(&step(&mut r, &fleet, 1));
        assert_eq!(w2, r.order[7..]);
        assert_eq!(r.skipped, gone_later);
        assert_eq!(
            r.log.last().unwrap().reason,
            "wave 1: 4 of 4 machines succeeded (100%), threshold 100%; wave 2 of 2: 3 more \
             machines, 2 skipped (revoked or no longer targeted)"
        );
        let t = fleet.tally(&r);
        assert_eq!((t.notified, t.succeeded, t.skipped), (7, 4, 3));
        // Back in the group later: still skipped for this rollout (it was never notified).
        fleet.2.remove(&gone_later[0]);
        assert_eq!(fleet.tally(&r).skipped, 3);
        fleet.set(&w2, Phase::Installed);
        assert!(step(&mut r, &fleet, 2).is_empty());
        assert_eq!(r.state, RolloutState::Completed);
        assert_eq!(
            r.log.last().unwrap().reason,
            "wave 2: 7 of 7 machines succeeded (100%), threshold 100%"
        );
    }

    /// Every machine of every wave left the release: each wave moves on (nothing counted has
    /// succeeded, nothing failed) and the rollout completes, without a division by zero.
    #[test]
    fn a_wave_with_every_machine_skipped_does_not_hang() {
        let plan = WavePlan::new(vec![5000], ALL_BP, 0, 60_000).unwrap();
        let mut fleet = Fleet::default();
        let (mut r, fx) = start(&rel(), plan, ids(4), 0);
        assert_eq!(notify_of(&fx).len(), 2);
        fleet.leave(&r.order);
        assert!(step(&mut r, &fleet, 1).is_empty(), "nobody left to notify");
        assert_eq!((r.wave, r.skipped.len()), (1, 2));
        assert_eq!(
            r.log.last().unwrap().reason,
            "wave 1: 0 of 0 machines succeeded (0%), threshold 100%; wave 2 of 2: 0 more \
             machines, 2 skipped (revoked or no longer targeted)"
        );
        assert!(step(&mut r, &fleet, 2).is_empty());
        assert_eq!(r.state, RolloutState::Completed);
    }

    #[test]
    fn a_cancel_tells_nothing_to_the_machines_a_wave_skipped() {
        let mut fleet = Fleet::default();
        let plan = WavePlan::new(vec![5000], ALL_BP, 0, 0).unwrap();
        let (mut r, fx) = start(&rel(), plan, ids(4), 0);
        let w1 = notify_of(&fx);
        fleet.leave(&r.order[2..]);
        fleet.set(&w1, Phase::Downloading);
        // Wave 1 waits for its two; advanced by hand, wave 2 skips both of its machines.
        let t = fleet.tally(&r);
        let fx = resume(&mut r, "ops", true, t, 1, |m| fleet.in_scope(m)).unwrap();
        assert!(fx.is_empty(), "{fx:?}");
        assert_eq!(r.skipped, r.order[2..]);
        let fx = cancel(&mut r, "ops", 2, |_| true).unwrap();
        assert_eq!(fx, [Effect::Cancel(w1)]);
    }

    #[test]
    fn download_only_counts_deferred_as_succeeded() {
        assert!(succeeded(Phase::Deferred, true));
        assert!(!succeeded(Phase::Deferred, false));
    }
}
