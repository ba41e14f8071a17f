//! `release_create`, `release_plan`, `release_publish`, `release_retry`, `release_list`,
//! `release_status`, `rollback`, `activate`.

use std::convert::Infallible;

use fleetcast_proto::admin::{
    PublishPlan, ReleaseInfo, ReleaseStatus, TargetRecord, MAX_STATUS_PAGE,
};
use fleetcast_proto::calls;
use fleetcast_proto::{InstallPolicy, Kind, MachineId, Phase, Target};

use crate::context::Ctx;
use crate::domain::release;
use crate::inventory::{self, off_thread, PAGE_BYTES};
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

/// One page of the release's target records, with the aggregates over all of them. Read off
/// the async threads: a 10,000-machine release is read whole for the aggregates, once per page.
pub async fn status(ctx: &Ctx, c: calls::ReleaseStatus) -> Result<ReleaseStatus, OpError> {
    off_thread(&ctx.store, move |store| {
        let info = known_release(store, &c.release)?;
        let targets = store.targets_of(&c.release)?;
        Ok(status_page(
            info,
            targets,
            c.after.as_ref(),
            c.limit,
            now_ms(),
        ))
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
        release,
        targets: page,
        progress,
        next,
        more,
        bytes_done,
        bytes_total,
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

#[cfg(test)]
mod tests {
    use fleetcast_proto::admin::StepResult;
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
}
