//! `release_remove`: deletes releases nothing needs any more, with their target records (one
//! per machine a release reached: 10,000 machines and a release a week are half a million a
//! year), staged rollouts and every key that names them, so that a platform running for years
//! does not keep them all. What still needs a release is [`crate::domain::removal`]'s to say;
//! this module reads it from the store and deletes.
//!
//! The events stay: they are the record of what each machine did (pruned by `serve
//! --keep-events` only), and the removal itself is in the audit log, like every change.

use std::collections::HashSet;

use fleetcast_proto::admin::{ReleaseInfo, ReleaseRemoval, MAX_RELEASE_REMOVE};
use fleetcast_proto::calls::{self, Removal};
use fleetcast_proto::{MachineId, ReleaseId, Target};
use rumqttc::QoS;

use crate::context::Ctx;
use crate::domain::release::group_rollback_releases;
use crate::domain::removal::{why_kept, RollbackRead, Uses};
use crate::inventory::off_thread;
use crate::ops::{refused, OpError};
use crate::publish;
use crate::store::{DesiredNotice, Store, StoreError};

/// Target records deleted per transaction: the records lock is let go between them, so the
/// ingest waits for one batch at most, however many machines a release reached.
pub const TARGETS_PER_TRANSACTION: usize = 1000;

/// One release, what keeps it, and what goes with it.
struct Assessed {
    info: ReleaseInfo,
    kept: Option<String>,
    /// Machines with a record of it.
    targets: Vec<MachineId>,
    /// Its notices no machine or group acts on any more (a machine's own, replaced by a newer
    /// one to a group of the machine, or a revoked machine's): deleted with it, their retained
    /// messages cleared.
    stale_notices: Vec<DesiredNotice>,
    /// Revoked machines whose current release of its kind it is.
    revoked_current: Vec<MachineId>,
}

/// Removes the named releases, all or none; with `check`, only says which could go.
pub async fn remove(ctx: &Ctx, c: calls::ReleaseRemove) -> Result<Removal, OpError> {
    let mut seen = HashSet::new();
    let ids: Vec<ReleaseId> = (c.releases.into_iter())
        .filter(|r| seen.insert(r.clone()))
        .collect();
    if ids.is_empty() {
        return refused("name at least one release to remove");
    }
    if ids.len() > MAX_RELEASE_REMOVE {
        return refused(format!(
            "{} releases named: at most {MAX_RELEASE_REMOVE} per request (the CLI sends more in batches)",
            ids.len()
        ));
    }
    let check = c.check;
    // Reads and deletes of a release's every record: off the async threads. What `assess`
    // finds still holds at the last delete, though the records lock is let go between the
    // deletes (and the reads do not take it): nothing can make a release needed again
    // meanwhile. Admin ops run one at a time (`admin::run` takes the next request once this
    // one is answered), so no publish, retry, rollback, activate, rollout resume or regroup
    // runs beside it. The ingest writes a release's records only through what keeps it: a
    // group member's record comes from a group notice in force, a wave's notices and records
    // from a running rollout; a status only moves a record that is there (in one
    // transaction, so it moves one that is then deleted, or finds none), and a record written
    // since it was read goes in the last delete.
    let (releases, cleared) = off_thread(&ctx.store, move |store| {
        let assessed = assess(store, &ids)?;
        let releases: Vec<ReleaseRemoval> = assessed.iter().map(removal).collect();
        if check {
            return Ok((releases, Vec::new()));
        }
        let kept: Vec<String> = (releases.iter())
            .filter_map(|r| {
                let why = r.kept.as_ref()?;
                Some(format!(
                    "release {} ({} {}) is still needed: {why}",
                    r.release, r.kind, r.version
                ))
            })
            .collect();
        if !kept.is_empty() {
            return refused(format!("nothing was removed: {}", kept.join(". ")));
        }
        let mut cleared = Vec::new();
        for a in &assessed {
            cleared.extend(delete(store, a)?);
        }
        Ok((releases, cleared))
    })
    .await?;
    if !check {
        ctx.store.flush_async().await?;
        // The retained notices no one acts on, and each release's retained progress: a broker
        // keeps them until told otherwise (or restarted: `republish_all` sends neither again).
        let progress = (releases.iter()).map(|r| ctx.topics.rollout_progress(r.release.as_str()));
        for topic in cleared.into_iter().chain(progress) {
            ctx.mqtt
                .publish(topic, QoS::AtLeastOnce, true, Vec::new())
                .await?;
        }
        for r in &releases {
            tracing::info!(release = %r.release, kind = %r.kind, version = %r.version, targets = r.targets, "release removed");
        }
    }
    Ok(Removal {
        releases,
        removed: !check,
    })
}

fn removal(a: &Assessed) -> ReleaseRemoval {
    ReleaseRemoval {
        release: a.info.id.clone(),
        kind: a.info.kind.clone(),
        version: a.info.version.clone(),
        targets: a.targets.len() as u32,
        kept: a.kept.clone(),
    }
}

/// What keeps each of `ids`, and what would go with it. An unknown release refuses them all.
fn assess(store: &dyn Store, ids: &[ReleaseId]) -> Result<Vec<Assessed>, OpError> {
    let releases = store.releases()?;
    let desired = store.all_desired()?;
    let revoked: HashSet<MachineId> = (store.machines()?.into_iter())
        .filter(|m| m.revoked_at_ms.is_some())
        .map(|m| m.id)
        .collect();
    let mut out = Vec::new();
    for id in ids {
        let Some(info) = releases.iter().find(|r| &r.id == id).cloned() else {
            return refused(format!("unknown release {id}; nothing was removed"));
        };
        let mut uses = Uses::default();
        let mut stale_notices = Vec::new();
        for n in desired.iter().filter(|n| &n.release == id) {
            if in_force(store, n, &revoked)? {
                uses.desired_on.push(n.target.clone());
            } else {
                stale_notices.push(n.clone());
            }
        }
        uses.rollout = store.rollout(id)?.map(|r| r.state);
        let mut targets = Vec::new();
        let mut revoked_current = Vec::new();
        for t in store.targets_of(id)? {
            let current = store.current(&t.machine, &info.kind)?.as_ref() == Some(id);
            if revoked.contains(&t.machine) {
                if current {
                    revoked_current.push(t.machine.clone());
                }
            } else {
                if !t.phase.is_final() {
                    uses.working.push((t.machine.clone(), t.phase));
                }
                if current {
                    uses.current_of.push(t.machine.clone());
                }
            }
            targets.push(t.machine);
        }
        for g in &info.groups {
            match group_rollback_releases(g, &info.kind, &releases) {
                Some((from, _)) if &from.id == id => {
                    uses.rollback_of.push((g.clone(), RollbackRead::From))
                }
                Some((_, Some(to))) if &to.id == id => {
                    uses.rollback_of.push((g.clone(), RollbackRead::To))
                }
                _ => {}
            }
        }
        out.push(Assessed {
            kept: why_kept(&info, &uses),
            info,
            targets,
            stale_notices,
            revoked_current,
        });
    }
    Ok(out)
}

/// Whether a machine or group acts on `n`: a group's notice always (its members, and machines
/// joining it later), a machine's while it is the one the machine follows for its kind, as
/// the chunk server decides (`publish::desired_for_machine`), and the machine is not revoked.
fn in_force(
    store: &dyn Store,
    n: &DesiredNotice,
    revoked: &HashSet<MachineId>,
) -> Result<bool, StoreError> {
    let Target::Machine(m) = &n.target else {
        return Ok(true);
    };
    if revoked.contains(m) {
        return Ok(false);
    }
    let groups = store.machine(m)?.map(|i| i.groups).unwrap_or_default();
    Ok(publish::desired_for_machine(store, m, &groups)?
        .get(&n.kind)
        .is_some_and(|d| d.seq == n.seq))
}

/// Deletes `a`'s release and everything naming it; returns the topics of the notices deleted.
/// The release record goes last: a removal cut short (a crash) leaves it, and removing it
/// again finishes the job.
fn delete(store: &dyn Store, a: &Assessed) -> Result<Vec<String>, StoreError> {
    let (id, kind) = (&a.info.id, &a.info.kind);
    let cleared = store.transaction(|tx| -> Result<_, StoreError> {
        let mut cleared = Vec::new();
        for n in &a.stale_notices {
            if tx
                .desired(&n.target, &n.kind)?
                .is_some_and(|d| &d.release == id)
            {
                tx.remove_desired(&n.target, &n.kind)?;
                cleared.push(n.topic.clone());
            }
        }
        for m in &a.revoked_current {
            if tx.current(m, kind)?.as_ref() == Some(id) {
                tx.remove_current(m, kind)?;
            }
        }
        tx.remove_rollout(id)?;
        Ok(cleared)
    })?;
    for batch in a.targets.chunks(TARGETS_PER_TRANSACTION) {
        store.transaction(|tx| {
            batch
                .iter()
                .try_for_each(|m| tx.remove_target(id, m).map(drop))
        })?;
    }
    store.transaction(|tx| -> Result<(), StoreError> {
        // None are left, unless one was written since they were read.
        for t in tx.targets_of(id)? {
            tx.remove_target(id, &t.machine)?;
        }
        tx.remove_release(id).map(drop)
    })?;
    Ok(cleared)
}
