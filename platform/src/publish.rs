//! Signing and bookkeeping of release notices and commands, shared by the admin handler and
//! the ingest reconciler: resolving targets, creating target records, storing desired notices,
//! and (re-)publishing them and rollout progress.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fleetcast_proto::admin::{PublishPlan, ReleaseInfo, RolloutProgress};
use fleetcast_proto::auth::Purpose;
use fleetcast_proto::command::{Command, CommandAction};
use fleetcast_proto::{GroupId, Kind, MachineId, ReleaseId, ReleaseNotice, Target};
use rumqttc::QoS;

use crate::context::Ctx;
use crate::domain::{self, target};
use crate::now_ms;
use crate::ops::{known_release, refused, OpError};
use crate::store::{DesiredNotice, Reads, Records, Store, StoreError};

/// Machines reached by a publish, the topics it uses, and groups without members.
pub struct Resolved {
    pub machines: Vec<MachineId>,
    pub groups: Vec<GroupId>,
    /// One notice per named machine and group, in `topics` order.
    pub notices: Vec<Target>,
    pub targets: Vec<(MachineId, Option<GroupId>)>,
    pub topics: Vec<String>,
}

/// Resolves named machines (all must be provisioned and not revoked) and groups (members =
/// provisioned machines listing the group, revoked ones left out). A group no machine belongs to is most likely a typo, and its
/// retained notice would wait for machines that never come: it is refused unless
/// `allow_empty` (publishing ahead of a group's first machine).
pub fn resolve(
    ctx: &Ctx,
    kind: &Kind,
    machines: &[MachineId],
    groups: &[GroupId],
    allow_empty: bool,
) -> Result<Resolved, OpError> {
    if machines.is_empty() && groups.is_empty() {
        return refused("name at least one machine or group to publish to");
    }
    let machines: Vec<MachineId> = machines
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let groups: Vec<GroupId> = groups
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let known = ctx.store.machines()?;
    let unknown: Vec<String> = machines
        .iter()
        .filter(|m| !known.iter().any(|k| &k.id == *m))
        .map(|m| m.to_string())
        .collect();
    if !unknown.is_empty() {
        return refused(format!(
            "unknown machine(s): {} (provision them first); nothing was sent",
            unknown.join(", ")
        ));
    }
    // A revoked machine can report nothing, so as a target it stayed `pending` for good: a
    // release's watch never ended and a staged wave waited on it (a review from an operator's
    // side, 2026-11-29). Named, it is refused; in a group, it is left out.
    let revoked: Vec<String> = machines
        .iter()
        .filter(|m| {
            known
                .iter()
                .any(|k| &k.id == *m && k.revoked_at_ms.is_some())
        })
        .map(|m| m.to_string())
        .collect();
    if !revoked.is_empty() {
        return refused(format!(
            "machine(s) revoked: {} (`fleetcast machine provision ID --rotate` brings one \
             back); nothing was sent",
            revoked.join(", ")
        ));
    }
    let empty: Vec<String> = groups
        .iter()
        .filter(|g| !known.iter().any(|k| k.groups.contains(g)))
        .map(|g| g.to_string())
        .collect();
    if !empty.is_empty() && !allow_empty {
        return refused(format!(
            "unknown group(s): {} (no provisioned machine belongs to them); nothing was sent. \
             To publish to a group before its first machine joins, pass --allow-empty",
            empty.join(", ")
        ));
    }
    let mut targets: BTreeMap<MachineId, Option<GroupId>> =
        machines.iter().map(|m| (m.clone(), None)).collect();
    for g in &groups {
        for info in known
            .iter()
            .filter(|i| i.groups.contains(g) && i.revoked_at_ms.is_none())
        {
            targets
                .entry(info.id.clone())
                .or_insert_with(|| Some(g.clone()));
        }
    }
    let notices: Vec<Target> = machines
        .iter()
        .cloned()
        .map(Target::Machine)
        .chain(groups.iter().cloned().map(Target::Group))
        .collect();
    let topics = notices
        .iter()
        .map(|t| ctx.topics.release(t, kind))
        .collect();
    Ok(Resolved {
        machines,
        groups,
        notices,
        targets: targets.into_iter().collect(),
        topics,
    })
}

/// What publishing `release` to `machines` and `groups` would send.
pub fn plan(
    ctx: &Ctx,
    release: &ReleaseInfo,
    machines: &[MachineId],
    groups: &[GroupId],
    allow_empty: bool,
) -> Result<PublishPlan, OpError> {
    let r = resolve(ctx, &release.kind, machines, groups, allow_empty)?;
    Ok(PublishPlan {
        release: release.clone(),
        topics: r.topics,
        targets: r.targets,
        rollout: None,
    })
}

pub(crate) fn sign_notice(
    ctx: &Ctx,
    release: &ReleaseInfo,
    seq: u64,
    target: Target,
) -> DesiredNotice {
    let topic = ctx.topics.release(&target, &release.kind);
    let notice = ReleaseNotice {
        release: release.id.clone(),
        seq,
        target: target.clone(),
        kind: release.kind.clone(),
        version: release.version.clone(),
        artifact: release.artifact.clone(),
        policy: release.policy.clone(),
        rollback: release.rollback,
        issued_at_ms: now_ms(),
    };
    let payload = ctx.keys().platform.sign(Purpose::Release, &notice);
    DesiredNotice {
        topic,
        seq,
        release: release.id.clone(),
        kind: release.kind.clone(),
        target,
        payload: String::from_utf8(payload).expect("signed envelopes are JSON"),
    }
}

/// Points `machine`'s `kind` at `release`: creates its target record and marks the previous
/// unfinished release of that kind superseded. A record that already finished (failed,
/// cancelled, superseded, or installed before something else replaced it) starts a new round:
/// the new notice has a higher seq, so the machine starts over at attempt 1. An unfinished
/// record is kept. Returns the releases whose records changed.
pub fn assign_target(
    store: &dyn Records,
    release: &ReleaseInfo,
    machine: &MachineId,
    via: Option<GroupId>,
    now: u64,
) -> Result<Vec<ReleaseId>, StoreError> {
    let mut touched = vec![release.id.clone()];
    match store.target(&release.id, machine)? {
        Some(rec) if !rec.phase.is_final() => {}
        _ => store.put_target(&target::new_target(release, machine.clone(), via, now))?,
    }
    if let Some(prev) = store.current(machine, &release.kind)? {
        if prev != release.id {
            if let Some(mut rec) = store.target(&prev, machine)? {
                if target::supersede(&mut rec, now) {
                    store.put_target(&rec)?;
                    touched.push(prev);
                }
            }
        }
    }
    store.set_current(machine, &release.kind, &release.id)?;
    Ok(touched)
}

/// Signs, records (durably) and publishes `release` to `machines` and `groups` (see
/// [`resolve`] for what is refused before anything is stored; a release no longer stored is
/// refused in the transaction that records the publish). For a retry or a rollback: the
/// operator's own publish goes through [`publish_at_once`].
pub async fn publish(
    ctx: &Ctx,
    release: &ReleaseInfo,
    machines: &[MachineId],
    groups: &[GroupId],
    allow_empty: bool,
) -> Result<PublishPlan, OpError> {
    publish_checked(ctx, release, machines, groups, allow_empty, |_| Ok(())).await
}

/// [`publish`], as `release publish` without waves asks it: refused while the release's staged
/// rollout is running or paused ([`domain::release::may_publish_at_once`]), checked in the
/// transaction that records the publish.
pub async fn publish_at_once(
    ctx: &Ctx,
    release: &ReleaseInfo,
    machines: &[MachineId],
    groups: &[GroupId],
    allow_empty: bool,
) -> Result<PublishPlan, OpError> {
    publish_checked(ctx, release, machines, groups, allow_empty, |rec| {
        let rollout = rec.rollout(&release.id)?;
        domain::release::may_publish_at_once(&release.id, rollout.as_ref().map(|r| &r.state))
            .map_err(|e| OpError::Refused(e.to_string()))
    })
    .await
}

async fn publish_checked(
    ctx: &Ctx,
    release: &ReleaseInfo,
    machines: &[MachineId],
    groups: &[GroupId],
    allow_empty: bool,
    may: impl Fn(&dyn Records) -> Result<(), OpError>,
) -> Result<PublishPlan, OpError> {
    let r = resolve(ctx, &release.kind, machines, groups, allow_empty)?;
    let now = now_ms();
    let (release, notices, touched) = ctx.store.transaction(|rec| -> Result<_, OpError> {
        // Read again here: `release` was read before, and a release removed since must not be
        // written back (refused: nothing is stored or sent).
        let mut release = known_release(rec, &release.id)?;
        may(rec)?;
        let seq = ctx.store.next_seq()?;
        let notices: Vec<DesiredNotice> = r
            .notices
            .iter()
            .map(|t| sign_notice(ctx, &release, seq, t.clone()))
            .collect();
        domain::release::record_publish(&mut release, seq, now, &r.machines, &r.groups);
        rec.put_release(&release)?;
        for n in &notices {
            rec.put_desired(n)?;
        }
        let mut touched = BTreeSet::new();
        for (m, via) in &r.targets {
            touched.extend(assign_target(rec, &release, m, via.clone(), now)?);
        }
        Ok((release, notices, touched))
    })?;
    ctx.store.flush_async().await?;
    for n in &notices {
        send_desired(ctx, n).await?;
    }
    for t in touched {
        publish_progress(ctx, &t)?;
    }
    Ok(PublishPlan {
        release,
        topics: r.topics,
        targets: r.targets,
        rollout: None,
    })
}

/// Sends a signed `activate` for `release` to each of `machines` (chosen by
/// [`domain::release::activate_targets`]).
pub async fn send_activate(
    ctx: &Ctx,
    release: &ReleaseId,
    machines: &[MachineId],
) -> Result<(), OpError> {
    let action = CommandAction::Activate {
        release: release.clone(),
    };
    send_commands(ctx, machines.iter().map(|m| (m, action.clone()))).await
}

/// Signs `action` for `machine` with `seq` (taken from [`Store::next_seq`], and flushed before
/// the command is sent); returns its topic and payload.
pub fn signed_command(
    ctx: &Ctx,
    machine: &MachineId,
    seq: u64,
    action: CommandAction,
) -> (String, Vec<u8>) {
    let cmd = Command {
        machine: machine.clone(),
        seq,
        issued_at_ms: now_ms(),
        action,
    };
    (
        ctx.topics.command(machine),
        ctx.keys().platform.sign(Purpose::Command, &cmd),
    )
}

/// Sends each machine its command, once every seq they take is flushed.
pub async fn send_commands<'a>(
    ctx: &Ctx,
    commands: impl IntoIterator<Item = (&'a MachineId, CommandAction)>,
) -> Result<(), OpError> {
    let mut signed = Vec::new();
    for (m, action) in commands {
        signed.push(signed_command(ctx, m, ctx.store.next_seq()?, action));
    }
    ctx.store.flush_async().await?;
    for (topic, payload) in signed {
        ctx.mqtt
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
    }
    Ok(())
}

/// The current rollout progress of `release`.
pub fn progress_of(
    store: &dyn Store,
    release: &ReleaseId,
) -> Result<Option<RolloutProgress>, StoreError> {
    let Some(info) = store.release(release)? else {
        return Ok(None);
    };
    let targets = store.targets_of(release)?;
    Ok(Some(domain::release::progress(&info, &targets, now_ms())))
}

/// `release`'s progress as the retained message for its progress topic.
fn progress_message(
    ctx: &Ctx,
    release: &ReleaseId,
) -> Result<Option<(String, Vec<u8>)>, StoreError> {
    Ok(progress_of(&*ctx.store, release)?.map(|p| {
        let payload = ctx.keys().platform.sign(Purpose::Progress, &p);
        (ctx.topics.rollout_progress(release.as_str()), payload)
    }))
}

/// Publishes `release`'s progress, retained, without waiting (dropped if the client queue is full).
pub fn publish_progress(ctx: &Ctx, release: &ReleaseId) -> Result<(), StoreError> {
    if let Some((topic, payload)) = progress_message(ctx, release)? {
        if let Err(e) = ctx.mqtt.try_publish(topic, QoS::AtLeastOnce, true, payload) {
            tracing::debug!(release = %release, error = %e, "rollout progress not published");
        }
    }
    Ok(())
}

/// Publishes a desired notice, retained, on its topic.
pub(crate) async fn send_desired(ctx: &Ctx, n: &DesiredNotice) -> Result<(), rumqttc::ClientError> {
    ctx.mqtt
        .publish(
            n.topic.clone(),
            QoS::AtLeastOnce,
            true,
            n.payload.clone().into_bytes(),
        )
        .await
}

/// Re-publishes every desired notice and every published release's progress: after each
/// (re)connect, because brokers forget retained messages on restart.
pub async fn republish_all(ctx: &Ctx) -> Result<(usize, usize), OpError> {
    publish_key_chain(ctx).await?;
    let desired = ctx.store.all_desired()?;
    for n in &desired {
        send_desired(ctx, n).await?;
    }
    let mut progress = 0;
    for r in ctx
        .store
        .releases()?
        .into_iter()
        .filter(domain::release::is_published)
    {
        if let Some((topic, payload)) = progress_message(ctx, &r.id)? {
            ctx.mqtt
                .publish(topic, QoS::AtLeastOnce, true, payload)
                .await?;
            progress += 1;
        }
    }
    Ok((desired.len(), progress))
}

/// Publishes the key chain, retained, when there has been a rotation.
pub async fn publish_key_chain(ctx: &Ctx) -> Result<(), rumqttc::ClientError> {
    let keys = ctx.keys();
    if keys.chain.links.is_empty() {
        return Ok(());
    }
    ctx.mqtt
        .publish(
            ctx.topics.platform_keys(),
            QoS::AtLeastOnce,
            true,
            keys.chain.to_bytes(),
        )
        .await
}

/// Rotates the platform key: announces the new key under the old one, re-signs every desired
/// notice with it, and publishes the chain and the notices. Returns the new generation.
pub async fn rotate_key(ctx: &Ctx) -> Result<u32, OpError> {
    // Lock order everywhere: records, then keys (publishing signs notices, reading the keys,
    // inside a transaction). Holding records also keeps any publish from signing with the old key
    // between the re-signing below and the swap.
    let new_keys = ctx.store.transaction(|rec| -> Result<_, OpError> {
        let old = ctx.keys();
        // Everything that can fail on a stored notice fails before the key files change.
        let mut desired = Vec::new();
        for n in rec.all_desired()? {
            let notice: ReleaseNotice = old
                .public
                .verify(Purpose::Release, n.payload.as_bytes())
                .map_err(|e| {
                OpError::Refused(format!("stored notice on {} does not verify: {e}", n.topic))
            })?;
            desired.push((n, notice));
        }
        let new_keys = Arc::new(
            crate::keys::rotate(&ctx.data_dir, &old, now_ms())
                .map_err(|e| OpError::Refused(format!("key rotation failed: {e}")))?,
        );
        for (mut n, notice) in desired {
            let payload = new_keys.platform.sign(Purpose::Release, &notice);
            n.payload = String::from_utf8(payload).expect("signed envelopes are JSON");
            rec.put_desired(&n)?;
        }
        *ctx.keys.write().unwrap_or_else(|p| p.into_inner()) = new_keys.clone();
        Ok(new_keys)
    })?;
    ctx.store.flush_async().await?;
    republish_all(ctx).await?;
    Ok(new_keys.generation())
}

/// The notice each kind of `machine` should follow: the highest seq over its own and its
/// groups' desired notices.
pub fn desired_for_machine<S: Reads + ?Sized>(
    store: &S,
    machine: &MachineId,
    groups: &[GroupId],
) -> Result<BTreeMap<Kind, DesiredNotice>, StoreError> {
    let mut best: BTreeMap<Kind, DesiredNotice> = BTreeMap::new();
    let mut all = store.desired_for(&Target::Machine(machine.clone()))?;
    for g in groups {
        all.extend(store.desired_for(&Target::Group(g.clone()))?);
    }
    for n in all {
        match best.get(&n.kind) {
            Some(b) if b.seq >= n.seq => {}
            _ => {
                best.insert(n.kind.clone(), n);
            }
        }
    }
    Ok(best)
}

/// The artifacts `machine` may fetch: those of the releases assigned to it (its target
/// records), and those of the notices desired for it and for `groups` (the groups it was
/// provisioned in). The second part covers a machine that joined a group, or was first seen,
/// after the group's publish: it acts on the group's notice before the platform has taken in the
/// state that gives it its record, and was refused the artifact until then.
pub fn fetchable_artifacts<S: Reads + ?Sized>(
    store: &S,
    machine: &MachineId,
    groups: &[GroupId],
) -> Result<Vec<fleetcast_proto::ArtifactId>, StoreError> {
    let mut out = store.machine_artifacts(machine)?;
    for notice in desired_for_machine(store, machine, groups)?.values() {
        if let Some(release) = store.release(&notice.release)? {
            if !out.contains(&release.artifact.id) {
                out.push(release.artifact.id);
            }
        }
    }
    Ok(out)
}

/// Gives `machine` target records for the group releases it should follow but has none for
/// (a machine that joined a group, or was first seen after the publish). `desired` is
/// [`desired_for_machine`] for the machine and its groups (the caller also needs it, and each
/// computation decodes every signed notice desired there). Returns the releases whose records
/// changed.
pub fn ensure_group_targets(
    store: &dyn Records,
    machine: &MachineId,
    desired: &BTreeMap<Kind, DesiredNotice>,
    now: u64,
) -> Result<Vec<ReleaseId>, StoreError> {
    let mut touched = Vec::new();
    for n in desired.values() {
        let Target::Group(g) = &n.target else {
            continue;
        };
        if store.target(&n.release, machine)?.is_some() {
            continue;
        }
        // `n` has the highest seq of every notice this machine gets, so it is newer than the
        // notice that made its current release current. (Not `ReleaseInfo::seq`: that is the
        // release's latest publish, perhaps to other machines, after `n`.)
        if let Some(release) = store.release(&n.release)? {
            touched.extend(assign_target(
                store,
                &release,
                machine,
                Some(g.clone()),
                now,
            )?);
        }
    }
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{g, m};
    use crate::store::MemStore;
    use fleetcast_proto::{Phase, StatusEvent};

    /// A revoked machine is no target: named, the publish is refused; in a group, it is left
    /// out. (As a target it could never report, so it stayed `pending` for good.)
    #[test]
    fn revoked_machines_are_no_targets() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        ctx.store
            .transaction(|tx| {
                for (id, revoked) in [("vm-1", None), ("vm-2", Some(5))] {
                    let mut info = fleetcast_proto::admin::MachineInfo::new(m(id), 0);
                    info.groups = vec![g("g1")];
                    info.revoked_at_ms = revoked;
                    tx.put_machine(&info)?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let app = Kind::new("app").unwrap();
        let r = resolve(&ctx, &app, &[], &[g("g1")], false).unwrap();
        assert_eq!(r.targets, vec![(m("vm-1"), Some(g("g1")))]);
        let named = resolve(&ctx, &app, &[m("vm-2")], &[], false);
        assert!(
            matches!(&named, Err(OpError::Refused(why)) if why.contains("revoked: vm-2")),
            "{:?}",
            named.err()
        );
    }

    fn release(store: &MemStore, id: &str, version: &str) -> ReleaseInfo {
        let mut r = crate::fixtures::release(id, version);
        r.artifact.chunk_size = 1024;
        store.transaction(|rec| rec.put_release(&r)).unwrap();
        r
    }

    fn assign(store: &MemStore, r: &ReleaseInfo, machine: &str, now: u64) {
        store
            .transaction(|rec| assign_target(rec, r, &m(machine), None, now))
            .unwrap();
    }

    /// What `publish` stores for one target, without signing or sending.
    fn desire(store: &MemStore, r: &mut ReleaseInfo, target: Target) -> u64 {
        let seq = store.next_seq().unwrap();
        r.seq = seq;
        store
            .transaction(|rec| {
                rec.put_release(r)?;
                rec.put_desired(&DesiredNotice {
                    topic: format!("{target}"),
                    seq,
                    release: r.id.clone(),
                    kind: r.kind.clone(),
                    target,
                    payload: "{}".into(),
                })
            })
            .unwrap();
        seq
    }

    fn report(store: &MemStore, r: &ReleaseInfo, machine: &str, phase: Phase, attempt: u32) {
        let mut rec = store.target(&r.id, &m(machine)).unwrap().unwrap();
        let ev = StatusEvent {
            machine: m(machine),
            ctr: 1,
            at_ms: 1,
            release: Some(r.id.clone()),
            kind: r.kind.clone(),
            version: r.version.clone(),
            phase,
            progress: None,
            attempt,
            error: None,
            detail: None,
        };
        target::apply(&mut rec, &ev, 1)
            .unwrap_or_else(|why| panic!("{phase} (attempt {attempt}) refused: {why}"));
        store.transaction(|tx| tx.put_target(&rec)).unwrap();
    }

    #[test]
    fn republishing_a_release_starts_a_new_round_for_machines_that_finished_it() {
        let store = MemStore::new();
        let r1 = release(&store, "r-000001", "1.0");
        let r2 = release(&store, "r-000002", "2.0");
        assign(&store, &r1, "vm-1", 1);
        report(&store, &r1, "vm-1", Phase::DownloadFailed, 3);
        // An operator publishes it again: the machine gets a new notice and starts over at
        // attempt 1, which the record must take.
        assign(&store, &r1, "vm-1", 2);
        let rec = store.target(&r1.id, &m("vm-1")).unwrap().unwrap();
        assert_eq!((rec.phase, rec.attempts), (Phase::Pending, 0));
        for p in [Phase::Notified, Phase::Downloading, Phase::Installed] {
            report(&store, &r1, "vm-1", p, 1);
        }
        // Superseded by r2, then r1 is published again (a manual roll back to it).
        assign(&store, &r2, "vm-1", 3);
        report(&store, &r2, "vm-1", Phase::Notified, 1);
        assign(&store, &r1, "vm-1", 4);
        assert_eq!(
            store.target(&r2.id, &m("vm-1")).unwrap().unwrap().phase,
            Phase::Superseded
        );
        for p in [Phase::Notified, Phase::Downloading, Phase::Installing] {
            report(&store, &r1, "vm-1", p, 1);
        }
        assign(&store, &r2, "vm-1", 5);
        assign(&store, &r1, "vm-1", 6);
        report(&store, &r1, "vm-1", Phase::Installed, 1);
    }

    #[test]
    fn a_machine_that_joins_a_group_follows_its_release_even_if_its_own_was_republished_since() {
        let store = MemStore::new();
        let mut r1 = release(&store, "r-000001", "1.0");
        let mut r2 = release(&store, "r-000002", "2.0");
        desire(&store, &mut r1, Target::Machine(m("vm-1")));
        assign(&store, &r1, "vm-1", 1);
        let group_seq = desire(&store, &mut r2, Target::Group(g("g")));
        // r1 goes to another machine later: its release seq is now above the group's.
        assert!(desire(&store, &mut r1, Target::Machine(m("vm-3"))) > group_seq);
        let touched = store
            .transaction(|rec| {
                let desired = desired_for_machine(rec, &m("vm-1"), &[g("g")])?;
                ensure_group_targets(rec, &m("vm-1"), &desired, 2)
            })
            .unwrap();
        assert!(touched.contains(&r2.id), "{touched:?}");
        let rec = store.target(&r2.id, &m("vm-1")).unwrap().unwrap();
        assert_eq!((rec.phase, rec.via), (Phase::Pending, Some(g("g"))));
        assert_eq!(
            store.target(&r1.id, &m("vm-1")).unwrap().unwrap().phase,
            Phase::Superseded
        );
        assert_eq!(
            store.current(&m("vm-1"), &r1.kind).unwrap(),
            Some(r2.id.clone())
        );
        // Nothing changes when it reports again.
        assert!(store
            .transaction(|rec| {
                let desired = desired_for_machine(rec, &m("vm-1"), &[g("g")])?;
                ensure_group_targets(rec, &m("vm-1"), &desired, 3)
            })
            .unwrap()
            .is_empty());
    }
}
