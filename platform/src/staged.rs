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

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use fleetcast_proto::admin::{PublishPlan, ReleaseInfo};
use fleetcast_proto::auth::Purpose;
use fleetcast_proto::command::{Command, CommandAction};
use fleetcast_proto::rollout::{RolloutInfo, RolloutState, WavePlan};
use fleetcast_proto::{GroupId, InstallPolicy, MachineId, Phase, ReleaseId, Target};
use rumqttc::QoS;

use crate::domain::rollout::{self as core, Effect, Tally};
use crate::now_ms;
use crate::publish::{self, known_release, refused, Ctx, OpError};
use crate::store::{DesiredNotice, StoreError};

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

/// Carries out `effects` for `release` (records lock held). `via` names the group a machine
/// was reached through, for its target record.
fn apply(
    ctx: &Ctx,
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
                    if let Some(current) = ctx.store.current(&m, &release.kind)? {
                        let newer = current != release.id
                            && ctx
                                .store
                                .release(&current)?
                                .is_some_and(|c| c.seq > release.seq);
                        if newer {
                            continue;
                        }
                    }
                    let n = publish::sign_notice(ctx, release, seq, Target::Machine(m.clone()));
                    ctx.store.put_desired(&n)?;
                    out.notices.push(n);
                    out.touched.extend(publish::assign_target(
                        &ctx.store,
                        release,
                        &m,
                        via.get(&m).cloned(),
                        now,
                    )?);
                }
            }
            Effect::Cancel(machines) => {
                for m in machines {
                    let cmd = Command {
                        machine: m.clone(),
                        seq: ctx.store.next_seq()?,
                        issued_at_ms: now,
                        action: CommandAction::Cancel {
                            release: release.id.clone(),
                        },
                    };
                    out.commands.push((
                        ctx.topics.command(&m),
                        ctx.keys().platform.sign(Purpose::Command, &cmd),
                    ));
                    let target = Target::Machine(m.clone());
                    if let Some(n) = ctx.store.desired(&target, &release.kind)? {
                        if n.release == release.id {
                            ctx.store.remove_desired(&target, &release.kind)?;
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
    if let Some(r) = ctx.store.rollout(&release.id)? {
        if matches!(r.state, RolloutState::Running | RolloutState::Paused { .. }) {
            return refused(format!(
                "release {} already has a {} staged rollout; cancel it first",
                release.id,
                r.state.name()
            ));
        }
    }
    let via: HashMap<MachineId, GroupId> = resolved
        .targets
        .iter()
        .filter_map(|(m, g)| g.clone().map(|g| (m.clone(), g)))
        .collect();
    let mut out = Outbox::default();
    let (release, rollout) = {
        let _records = ctx.store.lock_records();
        let now = now_ms();
        let mut release = ctx
            .store
            .release(&release.id)?
            .unwrap_or_else(|| release.clone());
        release.seq = ctx.store.next_seq()?;
        release.published_at_ms.get_or_insert(now);
        for m in &resolved.machines {
            if !release.machines.contains(m) {
                release.machines.push(m.clone());
            }
        }
        for g in &resolved.groups {
            if !release.groups.contains(g) {
                release.groups.push(g.clone());
            }
        }
        ctx.store.put_release(&release)?;
        let (rollout, effects) = core::start(
            &release.id,
            plan,
            resolved.targets.iter().map(|(m, _)| m.clone()),
            now,
        );
        ctx.store.put_rollout(&rollout)?;
        apply(ctx, &release, effects, &via, &mut out)?;
        (release, rollout)
    };
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

fn download_only(release: &ReleaseInfo) -> bool {
    matches!(release.policy, InstallPolicy::DownloadOnly)
}

/// The tally of `r`'s notified machines from their target records.
fn tally_of(ctx: &Ctx, release: &ReleaseInfo, r: &RolloutInfo) -> Result<Tally, StoreError> {
    let phases: HashMap<MachineId, Phase> = ctx
        .store
        .targets_of(&release.id)?
        .into_iter()
        .map(|t| (t.machine, t.phase))
        .collect();
    Ok(core::tally(r, download_only(release), |m| {
        phases.get(m).copied()
    }))
}

/// Which group each target of `r` was reached through (for new target records).
fn via_of(ctx: &Ctx, release: &ReleaseInfo) -> Result<HashMap<MachineId, GroupId>, StoreError> {
    let mut via = HashMap::new();
    for info in ctx.store.machines()? {
        if let Some(g) = info.groups.iter().find(|g| release.groups.contains(g)) {
            via.insert(info.id, g.clone());
        }
    }
    Ok(via)
}

/// The rollout of `release`, or the operator's error.
pub fn status(ctx: &Ctx, release: &ReleaseId) -> Result<RolloutInfo, OpError> {
    known_release(&ctx.store, release)?;
    ctx.store.rollout(release)?.ok_or_else(|| {
        OpError::Refused(format!(
            "release {release} was not published in waves (release publish --waves)"
        ))
    })
}

/// Re-evaluates the running rollout of `release` (if any) and carries out what it decides.
pub async fn evaluate(ctx: &Ctx, release: &ReleaseId) -> Result<(), OpError> {
    let mut out = Outbox::default();
    {
        let _records = ctx.store.lock_records();
        let Some(mut r) = ctx.store.rollout(release)? else {
            return Ok(());
        };
        if r.state != RolloutState::Running {
            return Ok(());
        }
        let info = known_release(&ctx.store, release)?;
        let t = tally_of(ctx, &info, &r)?;
        let before = (r.wave, r.state.clone());
        let effects = core::observe(&mut r, t, now_ms());
        if (r.wave, r.state.clone()) == before {
            return Ok(());
        }
        for t in &r.log[r.log.len().saturating_sub(1)..] {
            tracing::info!(release = %release, wave = t.wave + 1, what = %t.what, reason = %t.reason, "rollout");
        }
        ctx.store.put_rollout(&r)?;
        let via = via_of(ctx, &info)?;
        apply(ctx, &info, effects, &via, &mut out)?;
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
    let r = {
        let _records = ctx.store.lock_records();
        let info = known_release(&ctx.store, release)?;
        let Some(mut r) = ctx.store.rollout(release)? else {
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
                let t = tally_of(ctx, &info, &r)?;
                core::resume(&mut r, by, advance, t, now)
            }
            Control::Cancel => {
                let phases: HashMap<MachineId, Phase> = ctx
                    .store
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
        ctx.store.put_rollout(&r)?;
        let via = via_of(ctx, &info)?;
        apply(ctx, &info, effects, &via, &mut out)?;
        r
    };
    out.send(ctx).await?;
    Ok(r)
}
