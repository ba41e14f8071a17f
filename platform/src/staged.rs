//! Staged rollouts, the I/O side. The pure core ([`crate::domain::rollout`]) decides; this
//! module loads and stores the `RolloutInfo`, carries out its effects (signed per-machine
//! notices for a new wave, cancel commands) and runs the operator's pause, resume and cancel.
//!
//! A wave's notices go to each of its machines on `machines/{m}/release/{kind}` (a group topic
//! would reach every member at once), retained and kept as desired notices, so the reconciler
//! and a broker restart treat them like any other. Decisions are recorded before anything is
//! sent: records, rollout and desired notices are flushed first, then published. After a
//! platform restart the rollout is where sled says it is; ingest re-evaluates running rollouts
//! when their results change and every [`SWEEP`] (wave timeouts).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use fleetcast_proto::admin::{PublishPlan, ReleaseInfo};
use fleetcast_proto::command::CommandAction;
use fleetcast_proto::rollout::{RolloutInfo, RolloutState, WavePlan, WaveTally};
use fleetcast_proto::{GroupId, InstallPolicy, MachineId, Phase, ReleaseId, Target};
use rumqttc::QoS;

use crate::context::Ctx;
use crate::domain::{self, rollout as core, rollout::Effect, rollout::Tally};
use crate::now_ms;
use crate::ops::{known_release, refused, OpError};
use crate::publish;
use crate::store::{DesiredNotice, Reads, Records, StoreError};

/// Running rollouts are re-evaluated at least this often (a wave's timeout is checked then).
pub const SWEEP: Duration = Duration::from_secs(5);

/// What was decided under the records lock, to send once it is durable.
#[derive(Default)]
struct Outbox {
    notices: Vec<DesiredNotice>,
    commands: Vec<(String, Vec<u8>)>,
    /// Release topics to clear (retained empty payload).
    cleared: Vec<String>,
    touched: BTreeSet<ReleaseId>,
}

impl Outbox {
    async fn send(self, ctx: &Ctx) -> Result<(), OpError> {
        ctx.store.flush_async().await?;
        for n in &self.notices {
            publish::send_desired(ctx, n).await?;
        }
        for topic in self.cleared {
            ctx.mqtt
                .publish(topic, QoS::AtLeastOnce, true, Vec::new())
                .await?;
        }
        for (topic, payload) in self.commands {
            ctx.mqtt
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await?;
        }
        for r in &self.touched {
            publish::publish_progress(ctx, r)?;
        }
        Ok(())
    }
}

/// Carries out `effects` for `release` in a transaction (`rec`). `via` names the group a
/// machine was reached through, for its target record.
fn apply(
    ctx: &Ctx,
    rec: &dyn Records,
    release: &ReleaseInfo,
    effects: Vec<Effect>,
    via: &HashMap<MachineId, GroupId>,
    out: &mut Outbox,
) -> Result<(), OpError> {
    let now = now_ms();
    for effect in effects {
        match effect {
            Effect::Notify(machines) => {
                let seq = ctx.store.next_seq()?;
                for m in machines {
                    // A newer release of this kind reached the machine since: leave it be.
                    if let Some(current) = rec.current(&m, &release.kind)? {
                        let newer = current != release.id
                            && rec.release(&current)?.is_some_and(|c| c.seq > release.seq);
                        if newer {
                            continue;
                        }
                    }
                    let n = publish::sign_notice(ctx, release, seq, Target::Machine(m.clone()));
                    rec.put_desired(&n)?;
                    out.notices.push(n);
                    out.touched.extend(publish::assign_target(
                        rec,
                        release,
                        &m,
                        via.get(&m).cloned(),
                        now,
                    )?);
                }
            }
            Effect::Cancel(machines) => {
                for m in machines {
                    let cancel = CommandAction::Cancel {
                        release: release.id.clone(),
                    };
                    out.commands.push(publish::signed_command(
                        ctx,
                        &m,
                        ctx.store.next_seq()?,
                        cancel,
                    ));
                    let target = Target::Machine(m.clone());
                    if let Some(n) = rec.desired(&target, &release.kind)? {
                        if n.release == release.id {
                            rec.remove_desired(&target, &release.kind)?;
                            out.cleared.push(n.topic);
                        }
                    }
                }
                out.touched.insert(release.id.clone());
            }
        }
    }
    Ok(())
}

/// Publishes `release` in waves: resolves the targets like [`publish::publish`] (and refuses
/// the same typos), records the release as published and the rollout, and notifies the first
/// wave. What the first wave was sent is in the plan's `topics`.
pub async fn publish(
    ctx: &Ctx,
    release: &ReleaseInfo,
    machines: &[MachineId],
    groups: &[GroupId],
    allow_empty: bool,
    plan: WavePlan,
) -> Result<PublishPlan, OpError> {
    let resolved = publish::resolve(ctx, &release.kind, machines, groups, allow_empty)?;
    let via: HashMap<MachineId, GroupId> = resolved
        .targets
        .iter()
        .filter_map(|(m, g)| g.clone().map(|g| (m.clone(), g)))
        .collect();
    let mut out = Outbox::default();
    let (release, rollout) = ctx.store.transaction(|rec| -> Result<_, OpError> {
        // Read again here, like `publish::publish`: a release removed since it was read is
        // refused, not written back.
        let mut release = known_release(rec, &release.id)?;
        let previous = rec.rollout(&release.id)?;
        let sent = sent_to_group(rec, &release, &resolved.targets)?;
        domain::release::may_stage(&release.id, previous.as_ref().map(|r| &r.state), &sent)?;
        let now = now_ms();
        let seq = ctx.store.next_seq()?;
        domain::release::record_publish(
            &mut release,
            seq,
            now,
            &resolved.machines,
            &resolved.groups,
        );
        rec.put_release(&release)?;
        let (rollout, effects) = core::start(
            &release.id,
            plan,
            resolved.targets.iter().map(|(m, _)| m.clone()),
            now,
        );
        rec.put_rollout(&rollout)?;
        apply(ctx, rec, &release, effects, &via, &mut out)?;
        Ok((release, rollout))
    })?;
    let topics = out.notices.iter().map(|n| n.topic.clone()).collect();
    out.send(ctx).await?;
    tracing::info!(release = %release.id, targets = rollout.order.len(), waves = rollout.plan.waves_bp.len(), "staged rollout started");
    Ok(PublishPlan {
        release,
        topics,
        targets: resolved.targets,
        rollout: Some(rollout),
    })
}

/// The groups whose live notice is `release` (published to them without waves) that one of
/// `targets` belongs to: those targets were sent it already.
fn sent_to_group(
    rec: &dyn Records,
    release: &ReleaseInfo,
    targets: &[(MachineId, Option<GroupId>)],
) -> Result<Vec<GroupId>, StoreError> {
    let mut live = Vec::new();
    for g in &release.groups {
        let notice = rec.desired(&Target::Group(g.clone()), &release.kind)?;
        if notice.is_some_and(|n| n.release == release.id) {
            live.push(g.clone());
        }
    }
    if live.is_empty() {
        return Ok(live);
    }
    let mut reached = BTreeSet::new();
    for (m, _) in targets {
        if let Some(info) = rec.machine(m)? {
            reached.extend(info.groups.into_iter().filter(|g| live.contains(g)));
        }
    }
    Ok(reached.into_iter().collect())
}

fn download_only(release: &ReleaseInfo) -> bool {
    matches!(release.policy, InstallPolicy::DownloadOnly)
}

/// The machines of `r`'s waves so far and of its next wave that `release` still reaches: not
/// revoked, named by it or a member of one of its groups now, by the platform's record (as
/// `machines --group` lists them; a publish of it would resolve them today), and not since
/// reached by a newer release of its kind (their record of it is `superseded`, or, not yet
/// notified, they are not sent it: counted, they held a wave that needs every machine for
/// good). Unlike `activate --groups`, the group a target record was reached through does not
/// count: the machine left it. Read one machine at a time, only for those waves: the first
/// waves of a large rollout read a few records, not the fleet.
struct Scope(HashSet<MachineId>);

impl Scope {
    fn of<S: Reads + ?Sized>(
        store: &S,
        release: &ReleaseInfo,
        r: &RolloutInfo,
    ) -> Result<Self, StoreError> {
        let named: HashSet<&MachineId> = release.machines.iter().collect();
        let skipped: HashSet<&MachineId> = r.skipped.iter().collect();
        let end = r.plan.cumulative(r.wave + 1, r.order.len());
        let mut reached = HashSet::new();
        let mut seqs: HashMap<ReleaseId, u64> = HashMap::new();
        for m in r.order[..end].iter().filter(|m| !skipped.contains(m)) {
            let Some(info) = store.machine(m)? else {
                continue;
            };
            let targeted =
                named.contains(m) || info.groups.iter().any(|g| release.groups.contains(g));
            if info.revoked_at_ms.is_some() || !targeted {
                continue;
            }
            if let Some(current) = store.current(m, &release.kind)? {
                if current != release.id {
                    let seq = match seqs.get(&current) {
                        Some(seq) => *seq,
                        None => {
                            let seq = store.release(&current)?.map_or(0, |c| c.seq);
                            *seqs.entry(current).or_insert(seq)
                        }
                    };
                    if seq > release.seq {
                        continue;
                    }
                }
            }
            reached.insert(info.id);
        }
        Ok(Self(reached))
    }

    fn reaches(&self, m: &MachineId) -> bool {
        self.0.contains(m)
    }
}

/// The tally of `r`'s notified machines from their target records, less those out of `scope`.
fn tally_of<S: Reads + ?Sized>(
    store: &S,
    release: &ReleaseInfo,
    r: &RolloutInfo,
    scope: &Scope,
) -> Result<Tally, StoreError> {
    let records: HashMap<MachineId, core::Record> = store
        .targets_of(&release.id)?
        .into_iter()
        .map(|t| {
            let rec = core::Record {
                phase: t.phase,
                at_ms: t.phase_at_ms,
            };
            (t.machine, rec)
        })
        .collect();
    Ok(core::tally(
        r,
        download_only(release),
        |m| records.get(m).copied(),
        |m| scope.reaches(m),
    ))
}

/// Which group each target of `r` was reached through (for new target records).
fn via_of(
    store: &dyn Records,
    release: &ReleaseInfo,
) -> Result<HashMap<MachineId, GroupId>, StoreError> {
    let mut via = HashMap::new();
    for info in store.machines()? {
        if let Some(g) = info.groups.iter().find(|g| release.groups.contains(g)) {
            via.insert(info.id, g.clone());
        }
    }
    Ok(via)
}

/// The rollout of `release`, or the operator's error.
pub fn status(ctx: &Ctx, release: &ReleaseId) -> Result<RolloutInfo, OpError> {
    known_release(&*ctx.store, release)?;
    ctx.store.rollout(release)?.ok_or_else(|| {
        OpError::Refused(format!(
            "release {release} was not published in waves (release publish --waves)"
        ))
    })
}

/// How `r`'s notified machines stand, as its thresholds count them (shown by `rollout
/// status`: why a running wave has not advanced).
pub fn wave_tally(ctx: &Ctx, r: &RolloutInfo) -> Result<WaveTally, OpError> {
    let info = known_release(&*ctx.store, &r.release)?;
    let scope = Scope::of(&*ctx.store, &info, r)?;
    let t = tally_of(&*ctx.store, &info, r, &scope)?;
    Ok(WaveTally {
        notified: t.notified as u32,
        succeeded: t.succeeded as u32,
        failed: t.failed as u32,
        accepted: t.accepted as u32,
        skipped: t.skipped as u32,
    })
}

/// A retry of `release` started a new round for `machines`: the failures an operator accepted
/// for them at a resume of its rollout (if any) count again ([`core::retried`]).
pub fn retried(ctx: &Ctx, release: &ReleaseId, machines: &[MachineId]) -> Result<(), OpError> {
    ctx.store.transaction(|rec| -> Result<(), OpError> {
        if let Some(mut r) = rec.rollout(release)? {
            if core::retried(&mut r, machines) {
                rec.put_rollout(&r)?;
            }
        }
        Ok(())
    })
}

/// Re-evaluates the running rollout of `release` (if any) and carries out what it decides.
pub async fn evaluate(ctx: &Ctx, release: &ReleaseId) -> Result<(), OpError> {
    let mut out = Outbox::default();
    let changed = ctx.store.transaction(|rec| -> Result<bool, OpError> {
        let Some(mut r) = rec.rollout(release)? else {
            return Ok(false);
        };
        if r.state != RolloutState::Running {
            return Ok(false);
        }
        let info = known_release(rec, release)?;
        let scope = Scope::of(rec, &info, &r)?;
        let t = tally_of(rec, &info, &r, &scope)?;
        let before = (r.wave, r.state.clone(), r.log.len());
        let accepted = r.accepted.len();
        let effects = core::observe(&mut r, t, now_ms(), |m| scope.reaches(m));
        if (r.wave, r.state.clone(), r.log.len()) == before {
            if r.accepted.len() != accepted {
                rec.put_rollout(&r)?;
            }
            return Ok(false);
        }
        for t in &r.log[before.2..] {
            tracing::info!(release = %release, wave = t.wave + 1, what = %t.what, reason = %t.reason, "rollout");
        }
        rec.put_rollout(&r)?;
        let via = via_of(rec, &info)?;
        apply(ctx, rec, &info, effects, &via, &mut out)?;
        Ok(true)
    })?;
    if !changed {
        return Ok(());
    }
    out.send(ctx).await
}

/// Re-evaluates every running rollout.
pub async fn evaluate_all(ctx: &Ctx) -> Result<(), OpError> {
    for r in ctx.store.rollouts()? {
        if r.state == RolloutState::Running {
            evaluate(ctx, &r.release).await?;
        }
    }
    Ok(())
}

/// An operator's command on a staged rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume { advance: bool },
    Cancel,
}

/// Runs `control` on the rollout of `release` for operator `by`; returns the rollout after it.
pub async fn control(
    ctx: &Ctx,
    release: &ReleaseId,
    command: Control,
    by: &str,
) -> Result<RolloutInfo, OpError> {
    let mut out = Outbox::default();
    let r = ctx.store.transaction(|rec| -> Result<_, OpError> {
        let info = known_release(rec, release)?;
        let Some(mut r) = rec.rollout(release)? else {
            return refused(format!(
                "release {release} was not published in waves (publish --waves); nothing to {}",
                match command {
                    Control::Pause => "pause",
                    Control::Resume { .. } => "resume",
                    Control::Cancel => "cancel",
                }
            ));
        };
        let now = now_ms();
        let effects = match command {
            Control::Pause => core::pause(&mut r, by, now).map(|()| vec![]),
            Control::Resume { advance } => {
                let scope = Scope::of(rec, &info, &r)?;
                let t = tally_of(rec, &info, &r, &scope)?;
                core::resume(&mut r, by, advance, t, now, |m| scope.reaches(m))
            }
            Control::Cancel => {
                let phases: HashMap<MachineId, Phase> = rec
                    .targets_of(release)?
                    .into_iter()
                    .map(|t| (t.machine, t.phase))
                    .collect();
                core::cancel(&mut r, by, now, |m| {
                    phases.get(m).is_none_or(|p| core::droppable(*p))
                })
            }
        }
        .map_err(|e| OpError::Refused(e.to_string()))?;
        rec.put_rollout(&r)?;
        let via = via_of(rec, &info)?;
        apply(ctx, rec, &info, effects, &via, &mut out)?;
        Ok(r)
    })?;
    out.send(ctx).await?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::admin::MachineInfo;
    use fleetcast_proto::rollout::ALL_BP;

    struct Fixture {
        _dir: tempfile::TempDir,
        /// Keeps the client's request queue open; never polled.
        _eventloop: rumqttc::EventLoop,
        ctx: std::sync::Arc<Ctx>,
        release: ReleaseInfo,
        machines: Vec<MachineId>,
    }

    /// Four provisioned machines and an unpublished release, over an in-memory store.
    fn fixture() -> Fixture {
        let (dir, eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let release = crate::fixtures::release("r-000001", "1.0");
        let machines: Vec<MachineId> = (1..=4)
            .map(|i| MachineId::new(format!("vm-{i}")).unwrap())
            .collect();
        ctx.store
            .transaction(|tx| {
                for m in &machines {
                    tx.put_machine(&MachineInfo::new(m.clone(), 0))?;
                }
                tx.put_release(&release)
            })
            .unwrap();
        Fixture {
            _dir: dir,
            _eventloop: eventloop,
            ctx,
            release,
            machines,
        }
    }

    /// Machines with a desired notice of the release, in id order.
    fn notified(f: &Fixture) -> Vec<String> {
        f.ctx
            .store
            .all_desired()
            .unwrap()
            .into_iter()
            .filter(|n| n.release == f.release.id)
            .map(|n| match n.target {
                Target::Machine(m) => m.to_string(),
                Target::Group(g) => panic!("a wave notice went to group {g}"),
            })
            .collect()
    }

    fn report(f: &Fixture, machine: &str, phase: Phase) {
        let m = MachineId::new(machine).unwrap();
        f.ctx
            .store
            .transaction(|tx| {
                let mut rec = tx.target(&f.release.id, &m)?.expect("a target record");
                rec.phase = phase;
                tx.put_target(&rec)
            })
            .unwrap();
    }

    fn halves() -> WavePlan {
        WavePlan {
            waves_bp: vec![5000, 10000],
            success_bp: 10000,
            failure_bp: 10000,
            wave_timeout_ms: 0,
        }
    }

    #[tokio::test]
    async fn the_next_wave_is_notified_once_the_first_succeeded_and_not_before() {
        let f = fixture();
        let plan = publish(&f.ctx, &f.release, &f.machines, &[], false, halves())
            .await
            .unwrap();
        let first = notified(&f);
        assert_eq!(first.len(), 2, "{first:?}");
        assert_eq!(plan.topics.len(), 2);
        evaluate(&f.ctx, &f.release.id).await.unwrap();
        assert_eq!(notified(&f), first, "nothing installed yet");
        report(&f, &first[0], Phase::Installed);
        evaluate(&f.ctx, &f.release.id).await.unwrap();
        assert_eq!(notified(&f), first, "half of the wave is not enough");
        report(&f, &first[1], Phase::Installed);
        evaluate(&f.ctx, &f.release.id).await.unwrap();
        assert_eq!(notified(&f), ["vm-1", "vm-2", "vm-3", "vm-4"]);
        let r = f.ctx.store.rollout(&f.release.id).unwrap().unwrap();
        assert_eq!((r.wave, r.state), (1, RolloutState::Running));
        assert_eq!(f.ctx.store.targets_of(&f.release.id).unwrap().len(), 4);
    }

    /// A machine a newer release of the kind reached during the rollout (its record of this one
    /// `superseded`, or not notified yet) no longer counts: a wave that needs every machine
    /// completes on the others, and a later wave does not send it the older release. (Counted,
    /// the superseded machine held the wave for good.)
    #[tokio::test]
    async fn machines_a_newer_release_reached_do_not_hold_the_rollout() {
        let f = fixture();
        publish(&f.ctx, &f.release, &f.machines, &[], false, halves())
            .await
            .unwrap();
        let first = notified(&f);
        let later: Vec<MachineId> = f
            .machines
            .iter()
            .filter(|m| !first.contains(&m.to_string()))
            .cloned()
            .collect();
        let mut newer = crate::fixtures::release("r-000002", "2.0");
        newer.seq = 1_000_000;
        let overtaken = [MachineId::new(first[1].clone()).unwrap(), later[0].clone()];
        f.ctx
            .store
            .transaction(|tx| -> Result<(), StoreError> {
                tx.put_release(&newer)?;
                for m in &overtaken {
                    publish::assign_target(tx, &newer, m, None, 1)?;
                }
                Ok(())
            })
            .unwrap();
        let rec = f.ctx.store.target(&f.release.id, &overtaken[0]).unwrap();
        assert_eq!(rec.map(|r| r.phase), Some(Phase::Superseded));
        report(&f, &first[0], Phase::Installed);
        evaluate(&f.ctx, &f.release.id).await.unwrap();
        let r = f.ctx.store.rollout(&f.release.id).unwrap().unwrap();
        assert_eq!(
            r.wave, 1,
            "wave 1 completed on the machine that was not overtaken"
        );
        assert_eq!(r.skipped, [later[0].clone()]);
        let mut want = vec![first[0].clone(), first[1].clone(), later[1].to_string()];
        want.sort();
        assert_eq!(notified(&f), want);
        report(&f, later[1].as_str(), Phase::Installed);
        evaluate(&f.ctx, &f.release.id).await.unwrap();
        let r = f.ctx.store.rollout(&f.release.id).unwrap().unwrap();
        assert_eq!(r.state, RolloutState::Completed, "{r:?}");
    }

    #[tokio::test]
    async fn a_cancelled_rollout_forgets_the_notices_of_machines_that_did_not_start() {
        let f = fixture();
        publish(&f.ctx, &f.release, &f.machines, &[], false, halves())
            .await
            .unwrap();
        let first = notified(&f);
        report(&f, &first[0], Phase::Installing);
        let r = control(&f.ctx, &f.release.id, Control::Cancel, "admin")
            .await
            .unwrap();
        assert!(matches!(r.state, RolloutState::Cancelled { .. }), "{r:?}");
        assert_eq!(
            notified(&f),
            [first[0].clone()],
            "the installing one keeps it"
        );
        // Nothing more goes out once it is cancelled.
        evaluate(&f.ctx, &f.release.id).await.unwrap();
        assert_eq!(notified(&f), [first[0].clone()]);
    }

    #[tokio::test]
    async fn a_release_has_one_live_staged_rollout_at_a_time() {
        let f = fixture();
        let again = || publish(&f.ctx, &f.release, &f.machines, &[], false, halves());
        again().await.unwrap();
        let err = again().await.unwrap_err().to_string();
        assert!(
            err.contains("already has a running staged rollout"),
            "{err}"
        );
        control(&f.ctx, &f.release.id, Control::Cancel, "admin")
            .await
            .unwrap();
        let plan = again().await.unwrap();
        assert_eq!(plan.rollout.unwrap().state, RolloutState::Running);
    }

    #[tokio::test]
    async fn a_plain_publish_waits_for_a_live_rollout_and_after_a_cancel_reaches_those_told_to_drop_it(
    ) {
        let f = fixture();
        publish(&f.ctx, &f.release, &f.machines, &[], false, halves())
            .await
            .unwrap();
        let first = notified(&f);
        let at_once = || publish::publish_at_once(&f.ctx, &f.release, &f.machines, &[], false);
        let err = at_once().await.unwrap_err().to_string();
        assert!(err.contains("has a running staged rollout"), "{err}");
        control(&f.ctx, &f.release.id, Control::Pause, "admin")
            .await
            .unwrap();
        let err = at_once().await.unwrap_err().to_string();
        assert!(err.contains("has a paused staged rollout"), "{err}");
        assert_eq!(notified(&f), first, "nothing sent past the waves");
        // Cancelled: the first wave drops it (and says so); a plain publish is then the
        // operator's choice, and reaches them again in a new round.
        control(&f.ctx, &f.release.id, Control::Cancel, "admin")
            .await
            .unwrap();
        for m in &first {
            report(&f, m, Phase::Cancelled);
        }
        assert!(notified(&f).is_empty());
        at_once().await.unwrap();
        assert_eq!(notified(&f), ["vm-1", "vm-2", "vm-3", "vm-4"]);
        let records = f.ctx.store.targets_of(&f.release.id).unwrap();
        assert_eq!(records.len(), 4);
        assert!(
            records.iter().all(|t| t.phase == Phase::Pending),
            "{records:?}"
        );
    }

    /// A machine moved out of one of the release's groups is still reached through another of
    /// them, or by name; one in none of them any more, or revoked, is skipped. The decision is
    /// stored with the rollout.
    #[tokio::test]
    async fn a_new_wave_skips_machines_no_longer_named_or_in_a_group_of_the_release() {
        let f = fixture();
        let (north, south) = (
            GroupId::new("north").unwrap(),
            GroupId::new("south").unwrap(),
        );
        let put = |m: &MachineId, groups: &[&GroupId], revoked: bool| {
            let mut info = MachineInfo::new(m.clone(), 0);
            info.groups = groups.iter().map(|g| (*g).clone()).collect();
            info.revoked_at_ms = revoked.then_some(1);
            f.ctx.store.transaction(|tx| tx.put_machine(&info)).unwrap();
        };
        let mut machines = f.machines.clone();
        machines.push(MachineId::new("vm-5").unwrap());
        for m in &machines {
            put(m, &[&north, &south], false);
        }
        // Wave 1 is order[0]; wave 2 the other four.
        let order = core::order(&f.release.id, machines.clone());
        let groups = [north.clone(), south.clone()];
        let plan = WavePlan::new(vec![2000], ALL_BP, ALL_BP, 0).unwrap();
        publish(&f.ctx, &f.release, &order[2..3], &groups, false, plan)
            .await
            .unwrap();
        assert_eq!(notified(&f), [order[0].to_string()]);
        put(&order[1], &[&south], false); // still in south
        put(&order[2], &[], false); // named
        put(&order[3], &[], false); // in neither group
        put(&order[4], &[&north], true); // revoked
        report(&f, order[0].as_str(), Phase::Installed);
        evaluate(&f.ctx, &f.release.id).await.unwrap();
        let r = f.ctx.store.rollout(&f.release.id).unwrap().unwrap();
        assert_eq!((r.wave, &r.skipped[..]), (1, &order[3..]));
        let mut want: Vec<String> = order[..3].iter().map(|m| m.to_string()).collect();
        want.sort();
        assert_eq!(notified(&f), want);
        let t = wave_tally(&f.ctx, &r).unwrap();
        assert_eq!((t.notified, t.succeeded, t.skipped), (3, 1, 2));
    }

    #[tokio::test]
    async fn waves_are_refused_over_a_group_the_release_was_published_to_at_once() {
        let f = fixture();
        let group = GroupId::new("north").unwrap();
        f.ctx
            .store
            .transaction(|tx| {
                for m in &f.machines[..2] {
                    let mut info = MachineInfo::new(m.clone(), 0);
                    info.groups = vec![group.clone()];
                    tx.put_machine(&info)?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        publish::publish_at_once(&f.ctx, &f.release, &[], std::slice::from_ref(&group), false)
            .await
            .unwrap();
        // vm-1 is in the group (named directly here); vm-3 and vm-4 alone would be fine.
        let err = publish(&f.ctx, &f.release, &f.machines[..1], &[], false, halves())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("was published to group north without waves"),
            "{err}"
        );
        assert!(f.ctx.store.rollout(&f.release.id).unwrap().is_none());
        publish(&f.ctx, &f.release, &f.machines[2..], &[], false, halves())
            .await
            .unwrap();
    }
}
