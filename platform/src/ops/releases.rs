//! `release_create`, `release_plan`, `release_publish`, `release_retry`, `release_list`,
//! `release_status`, `rollback`, `activate`.

use fleetcast_proto::admin::{PublishPlan, ReleaseInfo, ReleaseStatus};
use fleetcast_proto::calls;
use fleetcast_proto::{InstallPolicy, Kind, Target};

use crate::context::Ctx;
use crate::domain::release;
use crate::now_ms;
use crate::ops::{known_release, refused, OpError};
use crate::publish;
use crate::staged;

pub async fn create(ctx: &Ctx, c: calls::ReleaseCreate) -> Result<ReleaseInfo, OpError> {
    create_release(ctx, c.kind, c.version, c.policy, c.notes, false).await
}

/// What publishing would send, without sending.
pub fn plan(ctx: &Ctx, c: calls::ReleasePlan) -> Result<PublishPlan, OpError> {
    let info = known_release(&*ctx.store, &c.release)?;
    publish::plan(ctx, &info, &c.machines, &c.groups, c.allow_empty)
}

/// Publishes at once, or (with waves) starts a staged rollout.
pub async fn publish(ctx: &Ctx, c: calls::ReleasePublish) -> Result<PublishPlan, OpError> {
    let info = known_release(&*ctx.store, &c.release)?;
    let (machines, groups, allow_empty) = (&c.machines, &c.groups, c.allow_empty);
    let plan = match c.waves {
        Some(waves) => staged::publish(ctx, &info, machines, groups, allow_empty, waves).await?,
        None => publish::publish(ctx, &info, machines, groups, allow_empty).await?,
    };
    tracing::info!(release = %c.release, targets = plan.targets.len(), "release published");
    Ok(plan)
}

/// Sends the release again to the named machines, or with `failed` to every failed target
/// (each starts a new round: a higher seq, attempt 1 again).
pub async fn retry(ctx: &Ctx, c: calls::ReleaseRetry) -> Result<PublishPlan, OpError> {
    let info = known_release(&*ctx.store, &c.release)?;
    let targets = ctx.store.targets_of(&c.release)?;
    let chosen = release::retry_targets(&c.release, &targets, &c.machines, c.failed)?;
    publish::publish(ctx, &info, &chosen, &[], false).await
}

pub fn list(ctx: &Ctx, _: calls::ReleaseList) -> Result<Vec<ReleaseInfo>, OpError> {
    let mut releases = ctx.store.releases()?;
    releases.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(releases)
}

pub fn status(ctx: &Ctx, c: calls::ReleaseStatus) -> Result<ReleaseStatus, OpError> {
    let store = &*ctx.store;
    let info = known_release(store, &c.release)?;
    let targets = store.targets_of(&c.release)?;
    let progress = release::progress(&info, &targets, now_ms());
    Ok(ReleaseStatus {
        release: info,
        targets,
        progress,
    })
}

/// Installs a downloaded `download_only` release now.
pub async fn activate(ctx: &Ctx, c: calls::Activate) -> Result<String, OpError> {
    known_release(&*ctx.store, &c.release)?;
    let targets = ctx.store.targets_of(&c.release)?;
    let sent = release::activate_targets(&c.release, &targets, &c.machines)?;
    publish::send_activate(ctx, &c.release, &sent).await?;
    let names: Vec<String> = sent.iter().map(|m| m.to_string()).collect();
    Ok(format!(
        "activate {} sent to {} machine(s): {}",
        c.release,
        sent.len(),
        names.join(", ")
    ))
}

pub(crate) async fn create_release(
    ctx: &Ctx,
    kind: Kind,
    version: String,
    policy: InstallPolicy,
    notes: Option<String>,
    rollback: bool,
) -> Result<ReleaseInfo, OpError> {
    policy
        .validate()
        .map_err(|e| OpError::Refused(e.to_string()))?;
    let store = &ctx.store;
    let Some(artifact) = store.artifact_for_version(&kind, &version)? else {
        return refused(format!(
            "no artifact uploaded for {kind} {version} (run `fleetcast artifact upload` first)"
        ));
    };
    let release = release::new(
        store.next_release_id()?,
        artifact,
        policy,
        notes,
        rollback,
        now_ms(),
    );
    store.transaction(|tx| tx.put_release(&release))?;
    store.flush_async().await?;
    Ok(release)
}

pub async fn rollback(ctx: &Ctx, c: calls::Rollback) -> Result<PublishPlan, OpError> {
    let calls::Rollback {
        target,
        kind,
        to,
        allow_empty,
    } = c;
    let store = &ctx.store;
    let to = match (&target, to) {
        (_, Some(v)) => v,
        (Target::Machine(m), None) => {
            let Some(info) = store.machine(m)? else {
                return refused(format!("unknown machine {m}"));
            };
            let installed = info.kinds.get(&kind).and_then(|k| k.version.as_deref());
            release::machine_rollback_version(m, &kind, installed, &store.history(m, &kind)?)?
        }
        (Target::Group(g), None) => release::group_rollback_version(g, &kind, &store.releases()?)?,
    };
    if let Target::Machine(m) = &target {
        if store.machine(m)?.is_none() {
            return refused(format!("unknown machine {m}"));
        }
    }
    if store.artifact_for_version(&kind, &to)?.is_none() {
        return refused(format!(
            "cannot roll back to {kind} {to}: no such uploaded artifact"
        ));
    }
    let (machines, groups) = match &target {
        Target::Machine(m) => (vec![m.clone()], vec![]),
        Target::Group(g) => (vec![], vec![g.clone()]),
    };
    // Refused targets (a group nobody is in) are refused before the rollback release exists.
    publish::resolve(ctx, &kind, &machines, &groups, allow_empty)?;
    let release = create_release(
        ctx,
        kind,
        to.clone(),
        InstallPolicy::Immediate,
        Some(format!("rollback of {target} to {to}")),
        true,
    )
    .await?;
    let plan = publish::publish(ctx, &release, &machines, &groups, allow_empty).await?;
    tracing::info!(release = %release.id, version = %to, "rollback published");
    Ok(plan)
}
