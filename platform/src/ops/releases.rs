//! `release_create`, `release_plan`, `release_publish`, `release_retry`, `release_list`,
//! `release_status`, `rollback`, `activate`.

use fleetcast_proto::admin::{PublishPlan, ReleaseInfo, ReleaseStatus};
use fleetcast_proto::calls;
use fleetcast_proto::release::ArtifactRef;
use fleetcast_proto::{InstallPolicy, Kind, Target};

use crate::context::Ctx;
use crate::domain::target;
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

pub async fn retry(ctx: &Ctx, c: calls::ReleaseRetry) -> Result<PublishPlan, OpError> {
    publish::retry(ctx, &c.release, &c.machines, c.failed).await
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
    let progress = target::progress(&info, &targets, now_ms());
    Ok(ReleaseStatus {
        release: info,
        targets,
        progress,
    })
}

/// Installs a downloaded `download_only` release now.
pub async fn activate(ctx: &Ctx, c: calls::Activate) -> Result<String, OpError> {
    let sent = publish::activate(ctx, &c.release, &c.machines).await?;
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
    let release = ReleaseInfo {
        id: store.next_release_id()?,
        kind,
        version,
        artifact: ArtifactRef {
            id: artifact.id,
            size: artifact.size,
            chunk_size: artifact.chunk_size,
            name: artifact.name,
        },
        policy,
        rollback,
        notes,
        created_at_ms: now_ms(),
        published_at_ms: None,
        seq: 0,
        machines: vec![],
        groups: vec![],
    };
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
            let history = store.history(m, &kind)?;
            let current = info
                .kinds
                .get(&kind)
                .and_then(|k| k.version.clone())
                .or_else(|| history.last().cloned());
            match previous_version(&history, current.as_deref()) {
                Some(v) => v,
                None => {
                    return refused(format!(
                        "no earlier {kind} version known for machine {m}; pass --to VERSION"
                    ))
                }
            }
        }
        (Target::Group(g), None) => {
            let mut releases: Vec<ReleaseInfo> = store
                .releases()?
                .into_iter()
                .filter(|r| r.kind == kind && r.seq > 0 && r.groups.contains(g))
                .collect();
            releases.sort_by_key(|r| r.seq);
            let Some(current) = releases.pop() else {
                return refused(format!(
                    "group {g} has no {kind} release yet; pass --to VERSION"
                ));
            };
            match releases.iter().rev().find(|r| r.version != current.version) {
                Some(r) => r.version.clone(),
                None => {
                    return refused(format!(
                        "group {g} had no {kind} release before {}; pass --to VERSION",
                        current.version
                    ))
                }
            }
        }
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

/// The version a machine ran before `current`: the latest history entry that differs from it.
pub fn previous_version(history: &[String], current: Option<&str>) -> Option<String> {
    let current = current?;
    let pos = history
        .iter()
        .rposition(|v| v == current)
        .unwrap_or(history.len());
    history[..pos].iter().rev().find(|v| *v != current).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_version_is_the_one_before_the_current_one() {
        let h: Vec<String> = ["1.0", "2.0", "3.0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(previous_version(&h, Some("3.0")).as_deref(), Some("2.0"));
        assert_eq!(previous_version(&h, Some("2.0")).as_deref(), Some("1.0"));
        assert_eq!(previous_version(&h, Some("1.0")), None);
        assert_eq!(previous_version(&h, None), None);
        let back: Vec<String> = ["1.0", "2.0", "1.0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(previous_version(&back, Some("1.0")).as_deref(), Some("2.0"));
    }
}
