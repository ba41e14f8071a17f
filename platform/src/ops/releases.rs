//! `release_create`, `release_plan`, `release_publish`, `release_retry`, `release_list`,
//! `release_query`, `release_status`, `rollback`, `activate`.
//!
//! Every reply stays bounded however many machines a release reaches: plans answer counts and
//! one page of targets ([`plan_report`]), releases name at most
//! [`RELEASE_MACHINES_SHOWN`] machines ([`shown`]), and lists come in pages.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;

use fleetcast_proto::admin::{
    ArtifactInfo, GroupCount, PlanReport, PublishPlan, ReleaseInfo, ReleaseStatus, TargetRecord,
    MAX_PLAN_PAGE, MAX_RELEASE_PAGE, MAX_STATUS_PAGE, PLAN_TOPICS_SHOWN, RELEASE_MACHINES_SHOWN,
};
use fleetcast_proto::calls::{self, Page};
use fleetcast_proto::rollout::{StagedProgress, ROLLOUT_ORDER_SHOWN};
use fleetcast_proto::{GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId, Target};

use crate::context::Ctx;
use crate::domain::release;
use crate::inventory::{self, off_thread, PAGE_BYTES};
use crate::now_ms;
use crate::ops::{known_release, refused, OpError};
use crate::publish;
use crate::staged;

pub async fn create(ctx: &Ctx, c: calls::ReleaseCreate) -> Result<ReleaseInfo, OpError> {
    create_release(ctx, c.kind, c.version, c.policy, c.notes, false)
        .await
        .map(shown)
}

/// What publishing would send, without sending: one page of it, or (asked without `after`
/// and `limit`, as before paging) all of it.
pub async fn plan(ctx: &Ctx, c: calls::ReleasePlan) -> Result<PlanReport, OpError> {
    let info = publishable(ctx, &c.release)?;
    let mut plan = publish::plan(ctx, &info, &c.machines, &c.groups, c.allow_empty)?;
    // In the first page only (the counts come with it; `--list` asks for the rest page by
    // page). A record read per target: off the async threads (10,000 of them for a large
    // group).
    let newer = match c.after {
        Some(_) => None,
        None => {
            let targets: Vec<MachineId> = plan.targets.iter().map(|(m, _)| m.clone()).collect();
            let release = info.clone();
            off_thread(&ctx.store, move |store| {
                newer_installed(store, &release, &targets)
            })
            .await?
        }
    };
    let mut report = if c.after.is_none() && c.limit.is_none() {
        plan.release = shown(plan.release);
        PlanReport::from(plan)
    } else {
        plan_report(plan, c.after.as_ref(), c.limit)
    };
    report.newer_installed = newer;
    Ok(report)
}

/// How many of `targets` last reported a version of `release`'s kind above its version: they
/// will reject it as a downgrade. `None` for a rollback (it may go down).
fn newer_installed(
    store: &dyn crate::store::Store,
    release: &ReleaseInfo,
    targets: &[MachineId],
) -> Result<Option<u32>, OpError> {
    if release.rollback {
        return Ok(None);
    }
    let mut newer = 0;
    for m in targets {
        let installed = store.machine(m)?.and_then(|info| {
            info.kinds
                .get(&release.kind)
                .and_then(|k| k.version.clone())
        });
        if installed.is_some_and(|v| {
            fleetcast_proto::release::compare_versions(&v, &release.version).is_gt()
        }) {
            newer += 1;
        }
    }
    Ok(Some(newer))
}

/// The release `id`, if its artifact's bytes are still stored (not `artifact_remove`d).
fn publishable(ctx: &Ctx, id: &ReleaseId) -> Result<ReleaseInfo, OpError> {
    let info = known_release(&*ctx.store, id)?;
    match ctx.store.artifact(&info.artifact.id)? {
        Some(artifact) => stored(&artifact)
            .map_err(|e| OpError::Refused(format!("cannot send release {id}: {e}")))?,
        None => {
            return refused(format!(
                "cannot send release {id}: its artifact {} is not stored",
                info.artifact.id.short()
            ))
        }
    }
    Ok(info)
}

/// Refuses an artifact whose bytes were removed, saying how to bring them back.
fn stored(artifact: &ArtifactInfo) -> Result<(), OpError> {
    match artifact.removed_at_ms {
        None => Ok(()),
        Some(_) => refused(format!(
            "{} {} was removed (`fleetcast artifact remove`); upload the same file again to use it",
            artifact.kind, artifact.version
        )),
    }
}

/// Publishes at once, or (with waves) starts a staged rollout.
pub async fn publish(ctx: &Ctx, c: calls::ReleasePublish) -> Result<PlanReport, OpError> {
    let info = publishable(ctx, &c.release)?;
    let (machines, groups, allow_empty) = (&c.machines, &c.groups, c.allow_empty);
    let plan = match c.waves {
        Some(waves) => staged::publish(ctx, &info, machines, groups, allow_empty, waves).await?,
        None => publish::publish_at_once(ctx, &info, machines, groups, allow_empty).await?,
    };
    tracing::info!(release = %c.release, targets = plan.targets.len(), "release published");
    Ok(plan_report(plan, None, None))
}

/// Sends the release again to the named machines, or with `failed` to every failed target
/// (each starts a new round: a higher seq, attempt 1 again).
pub async fn retry(ctx: &Ctx, c: calls::ReleaseRetry) -> Result<PlanReport, OpError> {
    let info = publishable(ctx, &c.release)?;
    let targets = ctx.store.targets_of(&c.release)?;
    let in_group = group_members(ctx, &c.groups)?;
    let chosen = release::retry_targets(
        &c.release,
        &targets,
        &c.machines,
        &c.groups,
        c.failed,
        in_group,
    )?;
    let plan = publish::publish(ctx, &info, &chosen, &[], false).await?;
    staged::retried(ctx, &c.release, &chosen)?;
    Ok(plan_report(plan, None, None))
}

/// Whether a target is in a group, for `activate` and `release retry --groups`: reached
/// through it, or a member of it now (what `machines --group` lists). Machines are read only
/// when groups are named.
fn group_members(
    ctx: &Ctx,
    groups: &[GroupId],
) -> Result<impl Fn(&TargetRecord, &GroupId) -> bool, OpError> {
    let mut members: HashMap<MachineId, Vec<GroupId>> = HashMap::new();
    if !groups.is_empty() {
        for info in ctx.store.machines()? {
            let of_these: Vec<GroupId> = info
                .groups
                .into_iter()
                .filter(|g| groups.contains(g))
                .collect();
            if !of_these.is_empty() {
                members.insert(info.id, of_these);
            }
        }
    }
    Ok(move |t: &TargetRecord, g: &GroupId| {
        t.via.as_ref() == Some(g) || members.get(&t.machine).is_some_and(|gs| gs.contains(g))
    })
}

/// Every release at once, in the order they were made.
pub fn list(ctx: &Ctx, _: calls::ReleaseList) -> Result<Vec<ReleaseInfo>, OpError> {
    Ok(release_page(ctx.store.releases()?, None, None).items)
}

/// One page of the releases, in the order they were made.
pub fn query(
    ctx: &Ctx,
    c: calls::ReleaseQuery,
) -> Result<Page<ReleaseInfo, Option<ReleaseId>>, OpError> {
    let limit = c.limit.unwrap_or(MAX_RELEASE_PAGE);
    Ok(release_page(
        ctx.store.releases()?,
        c.after.as_ref(),
        Some(limit),
    ))
}

/// The releases made after `after` (in [`inventory::release_order`]), each [`shown`]: at most
/// `page` of them (capped at [`MAX_RELEASE_PAGE`]) and [`PAGE_BYTES`] of JSON (at least one),
/// or all of them without `page`.
pub fn release_page(
    mut releases: Vec<ReleaseInfo>,
    after: Option<&ReleaseId>,
    page: Option<u32>,
) -> Page<ReleaseInfo, Option<ReleaseId>> {
    releases.sort_by(|a, b| inventory::release_order(&a.id, &b.id));
    let start = after.map_or(0, |a| {
        releases.partition_point(|r| inventory::release_order(&r.id, a).is_le())
    });
    let (limit, budget) = match page {
        Some(limit) => (limit.min(MAX_RELEASE_PAGE) as usize, PAGE_BYTES),
        None => (usize::MAX, usize::MAX),
    };
    let rest = releases
        .into_iter()
        .skip(start)
        .map(shown)
        .map(Ok::<_, Infallible>);
    let (items, more) = match inventory::page(rest, limit, budget) {
        Ok(p) => p,
        Err(never) => match never {},
    };
    let next = items.last().map(|r| r.id.clone()).or(after.cloned());
    Page { items, next, more }
}

/// `release` as a reply names it: at most its first [`RELEASE_MACHINES_SHOWN`] named machines.
pub fn shown(mut release: ReleaseInfo) -> ReleaseInfo {
    release.machines.truncate(RELEASE_MACHINES_SHOWN);
    release
}

/// Bytes of `value` as JSON.
fn json_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

/// `plan` as the operator is told it: the counts of every target, topic and group, and the
/// page of targets (by machine id) after `after`, at most `limit` (capped at
/// [`MAX_PLAN_PAGE`]; `0`: the counts alone) and what is left of [`PAGE_BYTES`] of JSON after
/// the rest of the reply (at least one target). Topics, the rollout's order and the release's
/// named machines are cut to their first few.
pub fn plan_report(plan: PublishPlan, after: Option<&MachineId>, limit: Option<u32>) -> PlanReport {
    let PublishPlan {
        release,
        mut topics,
        mut targets,
        mut rollout,
    } = plan;
    targets.sort_by(|a, b| a.0.cmp(&b.0));
    let mut per_group: BTreeMap<Option<&GroupId>, u32> = BTreeMap::new();
    for (_, via) in &targets {
        *per_group.entry(via.as_ref()).or_default() += 1;
    }
    let via: Vec<GroupCount> = per_group
        .into_iter()
        .map(|(group, machines)| GroupCount {
            group: group.cloned(),
            machines,
        })
        .collect();
    let targets_total = targets.len() as u32;
    let topics_total = topics.len() as u32;
    topics.truncate(PLAN_TOPICS_SHOWN);
    if let Some(r) = &mut rollout {
        r.order.truncate(ROLLOUT_ORDER_SHOWN);
    }
    let release = shown(release);
    let rest = json_len(&release) + json_len(&topics) + json_len(&rollout) + json_len(&via);
    let start = after.map_or(0, |a| targets.partition_point(|(m, _)| m <= a));
    let limit = limit.unwrap_or(MAX_PLAN_PAGE).min(MAX_PLAN_PAGE) as usize;
    let page = targets.into_iter().skip(start).map(Ok::<_, Infallible>);
    let (page, more) = match inventory::page(page, limit, PAGE_BYTES.saturating_sub(rest)) {
        Ok(p) => p,
        Err(never) => match never {},
    };
    let next = page.last().map(|(m, _)| m.clone()).or(after.cloned());
    PlanReport {
        plan: PublishPlan {
            release,
            topics,
            targets: page,
            rollout,
        },
        targets_total: Some(targets_total),
        topics_total: Some(topics_total),
        via: Some(via),
        next,
        more,
        newer_installed: None,
    }
}

/// One page of the release's target records, with the aggregates over all of them. Read off
/// the async threads: a 10,000-machine release is read whole for the aggregates, once per page.
pub async fn status(ctx: &Ctx, c: calls::ReleaseStatus) -> Result<ReleaseStatus, OpError> {
    off_thread(&ctx.store, move |store| {
        let info = known_release(store, &c.release)?;
        let targets = store.targets_of(&c.release)?;
        let staged = store.rollout(&c.release)?.map(|r| StagedProgress::of(&r));
        Ok(ReleaseStatus {
            staged,
            ..status_page(info, targets, c.after.as_ref(), c.limit, now_ms())
        })
    })
    .await
}

/// The page of `targets` after `after` (at most `limit`, capped at [`MAX_STATUS_PAGE`], and
/// at most [`PAGE_BYTES`] of JSON unless one record alone is larger), with the progress and
/// download bytes of all of them.
pub fn status_page(
    release: ReleaseInfo,
    mut targets: Vec<TargetRecord>,
    after: Option<&MachineId>,
    limit: Option<u32>,
    now_ms: u64,
) -> ReleaseStatus {
    targets.sort_by(|a, b| a.machine.cmp(&b.machine));
    let progress = release::progress(&release, &targets, now_ms);
    let (bytes_done, bytes_total) = download_bytes(release.artifact.size, &targets);
    let start = after.map_or(0, |a| targets.partition_point(|t| &t.machine <= a));
    let limit = limit.unwrap_or(MAX_STATUS_PAGE).min(MAX_STATUS_PAGE) as usize;
    let rest = targets.into_iter().skip(start).map(Ok::<_, Infallible>);
    let (page, more) = match inventory::page(rest, limit, PAGE_BYTES) {
        Ok(p) => p,
        Err(never) => match never {},
    };
    // An empty page (limit 0) continues where it was asked to start.
    let next = page.last().map(|t| t.machine.clone()).or(after.cloned());
    ReleaseStatus {
        release: shown(release),
        targets: page,
        progress,
        next,
        more,
        bytes_done,
        bytes_total,
        staged: None,
    }
}

/// Artifact bytes the targets have verified, and the bytes they need in all: a finished
/// download counts `size`, a running or failed one its last reported progress, one not begun
/// (or refused, cancelled, superseded before downloading) nothing.
pub fn download_bytes(size: u64, targets: &[TargetRecord]) -> (u64, u64) {
    let done = targets
        .iter()
        .map(|t| match t.phase {
            Phase::Downloading | Phase::DownloadFailed => {
                t.progress.map_or(0, |p| p.bytes.min(size))
            }
            Phase::Pending
            | Phase::Notified
            | Phase::Rejected
            | Phase::Cancelled
            | Phase::Superseded => 0,
            _ => size,
        })
        .sum();
    (done, size * targets.len() as u64)
}

/// Installs a downloaded `download_only` release now.
pub async fn activate(ctx: &Ctx, c: calls::Activate) -> Result<String, OpError> {
    known_release(&*ctx.store, &c.release)?;
    let targets = ctx.store.targets_of(&c.release)?;
    let in_group = group_members(ctx, &c.groups)?;
    let sent = release::activate_targets(&c.release, &targets, &c.machines, &c.groups, in_group)?;
    publish::send_activate(ctx, &c.release, &sent).await?;
    Ok(activated(&c.release, &sent))
}

/// Machines an `activate` answer names; the others are counted.
pub const ACTIVATED_SHOWN: usize = 20;

/// What `activate` answers: how many machines were sent the command, and the first few.
pub fn activated(release: &ReleaseId, sent: &[MachineId]) -> String {
    let names: Vec<&str> = sent
        .iter()
        .take(ACTIVATED_SHOWN)
        .map(|m| m.as_str())
        .collect();
    let more = match sent.len().saturating_sub(ACTIVATED_SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    format!(
        "activate {release} sent to {} machine(s): {}{more}",
        sent.len(),
        names.join(", ")
    )
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
    stored(&artifact)?;
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

pub async fn rollback(ctx: &Ctx, c: calls::Rollback) -> Result<PlanReport, OpError> {
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
    match store.artifact_for_version(&kind, &to)? {
        None => {
            return refused(format!(
                "cannot roll back to {kind} {to}: no such uploaded artifact"
            ))
        }
        Some(artifact) => stored(&artifact)
            .map_err(|e| OpError::Refused(format!("cannot roll back to {kind} {to}: {e}")))?,
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
    Ok(plan_report(plan, None, None))
}

#[cfg(test)]
mod tests {
    use fleetcast_proto::admin::StepResult;
    use fleetcast_proto::rollout::{RolloutInfo, RolloutState, WavePlan};
    use fleetcast_proto::status::Progress;
    use fleetcast_proto::{GroupId, ReleaseId};

    use super::*;
    use crate::domain::target::new_target;
    use crate::fixtures::{m, release};

    fn targets(r: &ReleaseInfo, phases: &[(&str, Phase, Option<u64>)]) -> Vec<TargetRecord> {
        phases
            .iter()
            .map(|&(id, phase, bytes)| TargetRecord {
                phase,
                progress: bytes.map(|bytes| Progress {
                    bytes,
                    total: r.artifact.size,
                }),
                ..new_target(r, m(id), None, 0)
            })
            .collect()
    }

    /// `release publish` reads the release before the transaction that records the publish. A
    /// `release remove` in between (admin ops run one at a time, so only a test can put it
    /// there) must refuse the publish, at once or in waves, not store the removed release again.
    #[tokio::test]
    async fn a_release_removed_after_it_was_read_is_refused_not_stored_again() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let artifact = crate::fixtures::stored_artifact(&ctx, &[7; 3000], "1.0");
        let mut r = release("r-000001", "1.0");
        r.artifact.id = artifact.id;
        let in_one_wave = WavePlan {
            waves_bp: vec![10000],
            success_bp: 10000,
            failure_bp: 10000,
            wave_timeout_ms: 0,
        };
        for waves in [None, Some(in_one_wave)] {
            ctx.store
                .transaction(|tx| {
                    tx.put_machine(&fleetcast_proto::admin::MachineInfo::new(m("vm-1"), 0))?;
                    tx.put_release(&r)
                })
                .unwrap();
            let info = publishable(&ctx, &r.id).unwrap();
            let remove = calls::ReleaseRemove {
                releases: vec![r.id.clone()],
                check: false,
            };
            crate::ops::removal::remove(&ctx, remove).await.unwrap();
            let to = [m("vm-1")];
            let sent = match waves.clone() {
                None => publish::publish_at_once(&ctx, &info, &to, &[], false).await,
                Some(w) => staged::publish(&ctx, &info, &to, &[], false, w).await,
            };
            assert!(
                matches!(&sent, Err(OpError::Refused(why)) if why == "unknown release r-000001"),
                "waves {waves:?}: {:?}",
                sent.map(|p| p.release)
            );
            assert_eq!(ctx.store.release(&r.id).unwrap(), None, "waves {waves:?}");
            assert!(ctx.store.targets_of(&r.id).unwrap().is_empty());
            assert!(ctx.store.all_desired().unwrap().is_empty());
            assert!(ctx.store.rollout(&r.id).unwrap().is_none());
        }
    }

    fn ids(s: &ReleaseStatus) -> Vec<&str> {
        s.targets.iter().map(|t| t.machine.as_str()).collect()
    }

    #[test]
    fn download_bytes_count_finished_downloads_whole_and_running_ones_by_progress() {
        let mut r = release("r-000001", "2.4.1");
        r.artifact.size = 2048;
        let all = targets(
            &r,
            &[
                ("vm-1", Phase::Installed, None),
                ("vm-2", Phase::Downloading, Some(1024)),
                ("vm-3", Phase::Pending, None),
                ("vm-4", Phase::DownloadFailed, Some(512)),
                ("vm-5", Phase::Deferred, None),
                // Progress past the size (a lying machine) counts the size.
                ("vm-6", Phase::Downloading, Some(10_000)),
                ("vm-7", Phase::Rejected, None),
            ],
        );
        assert_eq!(
            download_bytes(2048, &all),
            (2048 + 1024 + 512 + 2048 + 2048, 7 * 2048)
        );
        assert_eq!(download_bytes(2048, &[]), (0, 0));
    }

    #[test]
    fn pages_follow_machine_ids_and_every_page_carries_the_aggregates_of_all_targets() {
        let mut r = release("r-000001", "2.4.1");
        r.artifact.size = 100;
        // Out of order, as a store need not sort them.
        let all = targets(
            &r,
            &[
                ("vm-3", Phase::Pending, None),
                ("vm-1", Phase::Installed, None),
                ("vm-2", Phase::Downloading, Some(40)),
            ],
        );
        let first = status_page(r.clone(), all.clone(), None, Some(2), 7);
        assert_eq!(ids(&first), ["vm-1", "vm-2"]);
        assert_eq!((first.next.as_ref(), first.more), (Some(&m("vm-2")), true));
        assert_eq!(first.progress.total, 3);
        assert_eq!(first.progress.finished, 1);
        assert_eq!((first.bytes_done, first.bytes_total), (140, 300));
        let second = status_page(r.clone(), all.clone(), first.next.as_ref(), Some(2), 7);
        assert_eq!(ids(&second), ["vm-3"]);
        assert_eq!(
            (second.next.as_ref(), second.more),
            (Some(&m("vm-3")), false)
        );
        assert_eq!(
            (&second.progress, second.bytes_done, second.bytes_total),
            (&first.progress, 140, 300)
        );
        // No limit: everything in one page. An `after` past the end: an empty last page.
        let whole = status_page(r.clone(), all.clone(), None, None, 7);
        assert_eq!(ids(&whole), ["vm-1", "vm-2", "vm-3"]);
        assert!(!whole.more);
        let past = status_page(r.clone(), all.clone(), Some(&m("vm-9")), None, 7);
        assert!(past.targets.is_empty() && !past.more);
        // An `after` that is no target starts at the next id.
        let between = status_page(r.clone(), all.clone(), Some(&m("vm-1a")), None, 7);
        assert_eq!(ids(&between), ["vm-2", "vm-3"]);
    }

    #[test]
    fn limit_zero_gives_the_aggregates_alone_and_a_cursor_that_stays_put() {
        let r = release("r-000001", "2.4.1");
        let all = targets(
            &r,
            &[
                ("vm-1", Phase::Installed, None),
                ("vm-2", Phase::Notified, None),
            ],
        );
        let none = status_page(r.clone(), all.clone(), None, Some(0), 7);
        assert!(none.targets.is_empty());
        assert_eq!((none.next.as_ref(), none.more), (None, true));
        assert_eq!(none.progress.total, 2);
        let after = status_page(r.clone(), all.clone(), Some(&m("vm-1")), Some(0), 7);
        assert_eq!((after.next.as_ref(), after.more), (Some(&m("vm-1")), true));
        let empty = status_page(r, vec![], None, Some(0), 7);
        assert_eq!((empty.next.as_ref(), empty.more), (None, false));
        assert_eq!(empty.progress.total, 0);
    }

    #[test]
    fn a_page_is_capped_at_the_most_records_whatever_limit_is_asked() {
        let r = release("r-000001", "2.4.1");
        let n = MAX_STATUS_PAGE as usize + 5;
        let all: Vec<TargetRecord> = (0..n)
            .map(|i| new_target(&r, m(&format!("vm-{i:05}")), None, 0))
            .collect();
        let page = status_page(r.clone(), all.clone(), None, Some(u32::MAX), 7);
        assert_eq!(page.targets.len(), MAX_STATUS_PAGE as usize);
        assert!(page.more);
        let default = status_page(r, all, None, None, 7);
        assert_eq!(default.targets.len(), MAX_STATUS_PAGE as usize);
        assert_eq!(default.progress.total as usize, n);
    }

    /// A record as large as an ordinary one gets: 64-character ids, a group, both steps failed
    /// with a 337-character error text, and progress. Measured: 1,660 bytes of JSON, so 1,000
    /// of them (1.7 MB, 2.2 MB sealed) would not fit a packet: the page's byte budget ends such
    /// a page early, and it fits once sealed.
    #[test]
    fn a_page_of_large_records_fits_the_packet_limit_once_sealed() {
        let mut r = release("r-000001", "2026.11.25-build.1234");
        r.id = ReleaseId::new(format!("r-{}", "9".repeat(62))).unwrap();
        let error = "install script exited with status 1: ".to_owned() + &"x".repeat(300);
        let big = |i: usize| TargetRecord {
            via: Some(GroupId::new("g".repeat(64)).unwrap()),
            phase: Phase::InstallFailed,
            phase_at_ms: 1_795_608_000_000,
            notified_at_ms: Some(1_795_608_000_000),
            download: Some(StepResult {
                phase: Phase::DownloadFailed,
                ok: false,
                at_ms: 1_795_608_000_000,
                error: Some(error.clone()),
            }),
            upgrade: Some(StepResult {
                phase: Phase::InstallFailed,
                ok: false,
                at_ms: 1_795_608_000_000,
                error: Some(error.clone()),
            }),
            error: Some(error.clone()),
            detail: None,
            attempts: 99,
            progress: Some(Progress {
                bytes: u64::MAX,
                total: u64::MAX,
            }),
            ..new_target(&r, m(&format!("{:0>64}", i)), None, 1_795_608_000_000)
        };
        let one = serde_json::to_vec(&big(0)).unwrap().len();
        assert!((1500..1800).contains(&one), "{one} bytes");
        let all: Vec<TargetRecord> = (0..10_000).map(big).collect();
        let page = status_page(r, all, None, None, 7);
        assert!(page.more);
        assert!(page.targets.len() < MAX_STATUS_PAGE as usize);
        let reply = <calls::ReleaseStatus as calls::Call>::wrap(page);
        let json =
            serde_json::to_vec(&fleetcast_proto::admin::AdminResponse::ok(1, 1, reply)).unwrap();
        // Sealed: base64 of a 24-byte nonce, the JSON and a 16-byte tag; plus the envelope.
        let sealed = (json.len() + 40).div_ceil(3) * 4 + 64;
        assert!(sealed < 2 * 1024 * 1024 - 1024, "{sealed} bytes");
    }
    /// Bytes of `reply` once sealed and put in its envelope, as `admin` sends it: base64 of a
    /// 24-byte nonce, the response JSON and a 16-byte tag, plus the envelope.
    fn sealed_len(reply: fleetcast_proto::admin::AdminReply) -> usize {
        let json =
            serde_json::to_vec(&fleetcast_proto::admin::AdminResponse::ok(1, 1, reply)).unwrap();
        (json.len() + 40).div_ceil(3) * 4 + 64
    }

    /// The most a sealed response may be (a 2 MiB packet, less 1 KiB for its header and topic).
    const SEALED_LIMIT: usize = 2 * 1024 * 1024 - 1024 - 64;

    fn g(s: &str) -> GroupId {
        GroupId::new(s).unwrap()
    }

    /// A plan to `n` machines `vm-00000`.. (every third named directly, the others via group a
    /// or b), with a notice topic for each named machine and each group.
    fn plan_to(n: usize) -> PublishPlan {
        let targets: Vec<(MachineId, Option<GroupId>)> = (0..n)
            .map(|i| {
                let via = match i % 3 {
                    0 => None,
                    1 => Some(g("a")),
                    _ => Some(g("b")),
                };
                (m(&format!("vm-{i:05}")), via)
            })
            .collect();
        let mut topics = vec!["fleet/groups/a/release/app".to_owned()];
        topics.extend(
            targets
                .iter()
                .filter(|(_, via)| via.is_none())
                .map(|(m, _)| format!("fleet/machines/{m}/release/app")),
        );
        PublishPlan {
            release: release("r-000001", "2.4.1"),
            topics,
            targets,
            rollout: None,
        }
    }

    #[test]
    fn a_plan_reply_counts_everything_and_its_pages_list_every_target_once() {
        let whole = plan_to(3500);
        let first = plan_report(whole.clone(), None, None);
        assert_eq!(first.targets_total, Some(3500));
        assert_eq!(first.topics_total, Some(1 + 1167));
        assert_eq!(first.plan.topics, whole.topics[..PLAN_TOPICS_SHOWN]);
        let via = first.via.clone().unwrap();
        assert_eq!(
            via.iter()
                .map(|c| (c.group.as_ref().map(|g| g.as_str()), c.machines))
                .collect::<Vec<_>>(),
            [(None, 1167), (Some("a"), 1167), (Some("b"), 1166)]
        );
        assert_eq!(first.plan.targets.len(), MAX_PLAN_PAGE as usize);
        assert_eq!(
            (first.next.as_ref(), first.more),
            (Some(&m("vm-00999")), true)
        );
        let mut listed = first.plan.targets.clone();
        let mut after = first.next.clone();
        while let Some(a) = after.take() {
            let page = plan_report(whole.clone(), Some(&a), Some(700));
            assert_eq!(
                page.targets_total,
                Some(3500),
                "every page counts everything"
            );
            listed.extend(page.plan.targets.iter().cloned());
            if page.more {
                after = page.next;
            }
        }
        assert_eq!(listed, whole.targets);
        // `limit: 0`: the counts alone.
        let counts = plan_report(whole.clone(), None, Some(0));
        assert!(counts.plan.targets.is_empty() && counts.more);
        assert_eq!(counts.via.unwrap(), via);
        // A small plan is one page holding everything.
        let small = plan_report(plan_to(5), None, None);
        assert_eq!((small.plan.targets.len(), small.more), (5, false));
        assert_eq!(small.plan.topics.len(), 3);
    }

    #[test]
    fn a_staged_plan_to_50000_machines_with_the_longest_ids_fits_a_packet_once_sealed() {
        let id = |i: usize| m(&format!("{i:0>64}"));
        let group = g(&"g".repeat(64));
        let mut r = release("r-000001", "2.4.1");
        r.machines = (0..20_000).map(id).collect();
        r.groups = vec![group.clone()];
        let n = 50_000;
        let targets: Vec<(MachineId, Option<GroupId>)> =
            (0..n).map(|i| (id(i), Some(group.clone()))).collect();
        let order: Vec<MachineId> = targets.iter().map(|(m, _)| m.clone()).collect();
        let plan = PublishPlan {
            release: r,
            // Every machine in the first wave, each on its own topic.
            topics: order
                .iter()
                .map(|m| format!("fleet/machines/{m}/release/app"))
                .collect(),
            targets,
            rollout: Some(RolloutInfo {
                release: ReleaseId::new("r-000001").unwrap(),
                plan: WavePlan::new(vec![10_000], 9500, 500, 0).unwrap(),
                order,
                wave: 0,
                wave_started_ms: 0,
                state: RolloutState::Running,
                failures_accepted: 0,
                accepted: vec![],
                skipped: vec![],
                log: vec![],
            }),
        };
        let old = sealed_len(fleetcast_proto::admin::AdminReply::Plan {
            plan: PlanReport {
                plan: plan.clone(),
                ..PlanReport::from(plan_to(0))
            },
        });
        assert!(old > 10 * SEALED_LIMIT, "the whole plan: {old} bytes");
        let report = plan_report(plan, None, None);
        assert_eq!(report.target_count(), n);
        assert_eq!(report.topic_count(), n);
        assert_eq!(report.plan.release.machines.len(), RELEASE_MACHINES_SHOWN);
        assert_eq!(
            report.plan.rollout.as_ref().unwrap().order.len(),
            ROLLOUT_ORDER_SHOWN
        );
        let sent = sealed_len(fleetcast_proto::admin::AdminReply::Plan { plan: report });
        assert!(sent < SEALED_LIMIT / 2, "{sent} bytes");
    }

    #[test]
    fn a_plan_whose_counts_alone_are_large_shrinks_its_page_to_fit() {
        // 12,000 machines, each reached through a group of its own with a 64-character name:
        // the per-group counts alone are over 1 MiB of JSON.
        let targets: Vec<(MachineId, Option<GroupId>)> = (0..12_000)
            .map(|i| (m(&format!("vm-{i:05}")), Some(g(&format!("{i:0>64}")))))
            .collect();
        let plan = PublishPlan {
            release: release("r-000001", "2.4.1"),
            topics: vec![],
            targets,
            rollout: None,
        };
        let report = plan_report(plan, None, None);
        assert_eq!(report.via.as_ref().unwrap().len(), 12_000);
        assert_eq!(
            report.plan.targets.len(),
            1,
            "at least one target, however large"
        );
        assert!(report.more);
        let sent = sealed_len(fleetcast_proto::admin::AdminReply::Plan { plan: report });
        assert!(sent < SEALED_LIMIT, "{sent} bytes");
    }

    #[test]
    fn releases_come_in_pages_in_the_order_they_were_made_each_naming_few_machines() {
        let mut all: Vec<ReleaseInfo> = (1..=12)
            .map(|i| release(&format!("r-{i:06}"), "1.0"))
            .collect();
        // Past r-999999 ids grow longer; they still come last.
        all.push(release("r-1000000", "1.0"));
        all[0].machines = (0..500).map(|i| m(&format!("vm-{i:03}"))).collect();
        all.reverse();
        let first = release_page(all.clone(), None, Some(5));
        let ids = |p: &Page<ReleaseInfo, Option<ReleaseId>>| {
            p.items.iter().map(|r| r.id.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(
            ids(&first),
            ["r-000001", "r-000002", "r-000003", "r-000004", "r-000005"]
        );
        assert_eq!(first.items[0].machines.len(), RELEASE_MACHINES_SHOWN);
        assert_eq!(
            (first.next.clone().unwrap().as_str(), first.more),
            ("r-000005", true)
        );
        let last = release_page(
            all.clone(),
            ReleaseId::new("r-000010").ok().as_ref(),
            Some(MAX_RELEASE_PAGE),
        );
        assert_eq!(ids(&last), ["r-000011", "r-000012", "r-1000000"]);
        assert!(!last.more);
        // No page asked for (a request from before paging): all of them, still naming few.
        let whole = release_page(all, None, None);
        assert_eq!((whole.items.len(), whole.more), (13, false));
        assert_eq!(whole.items[0].machines.len(), RELEASE_MACHINES_SHOWN);
    }

    #[test]
    fn an_activate_answer_names_the_first_machines_and_counts_the_rest() {
        let r = ReleaseId::new("r-000001").unwrap();
        assert_eq!(
            activated(&r, &[m("vm-1"), m("vm-2")]),
            "activate r-000001 sent to 2 machine(s): vm-1, vm-2"
        );
        let many: Vec<MachineId> = (0..50_000).map(|i| m(&format!("{i:0>64}"))).collect();
        let text = activated(&r, &many);
        assert!(
            text.starts_with("activate r-000001 sent to 50000 machine(s): 0000"),
            "{text}"
        );
        assert!(text.ends_with(" and 49980 more"), "{text}");
        assert!(text.len() < 2000, "{} bytes", text.len());
    }
}
