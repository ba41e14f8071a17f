//! `artifact_list` and `artifact_remove` (uploads are in [`crate::uploads`], whose staging
//! state the admin task owns).

use std::collections::BTreeSet;

use fleetcast_proto::admin::ArtifactInfo;
use fleetcast_proto::calls;
use fleetcast_proto::release::compare_versions;
use fleetcast_proto::{MachineId, ReleaseId, Target};

use crate::context::Ctx;
use crate::domain::removal::named;
use crate::inventory::off_thread;
use crate::now_ms;
use crate::ops::{refused, OpError};
use crate::publish;
use crate::store::Store;

/// Every stored artifact, by kind, then version (removed ones too, marked).
pub fn list(ctx: &Ctx, _: calls::ArtifactList) -> Result<Vec<ArtifactInfo>, OpError> {
    let mut artifacts = ctx.store.artifacts()?;
    artifacts.sort_by(|a, b| {
        a.kind
            .cmp(&b.kind)
            .then(compare_versions(&a.version, &b.version))
    });
    Ok(artifacts)
}

/// Deletes the bytes of `kind` `version` once no machine may fetch them any more, and marks
/// its record removed (the version stays bound to those bytes, unless, with no release naming
/// them any more, they are uploaded again as another version: `uploads`). The record is marked and
/// flushed before the files go: a crash in between leaves files that [`sweep_removed`]
/// deletes at the next start, never a record whose files are gone without saying so.
/// Removing an artifact already removed deletes whatever of its files is left.
pub async fn remove(ctx: &Ctx, c: calls::ArtifactRemove) -> Result<ArtifactInfo, OpError> {
    let Some(mut info) = ctx.store.artifact_for_version(&c.kind, &c.version)? else {
        return refused(format!("no artifact uploaded for {} {}", c.kind, c.version));
    };
    if info.removed_at_ms.is_none() {
        let artifact = info.clone();
        if let Some(why) = off_thread(&ctx.store, move |store| in_use(store, &artifact)).await? {
            return refused(format!(
                "{} {} is still needed: {why}",
                info.kind, info.version
            ));
        }
        info.removed_at_ms = Some(now_ms());
        ctx.store.put_artifact(&info)?;
        ctx.store.flush_async().await?;
    }
    let (files, id) = (ctx.files.clone(), info.id);
    let freed = tokio::task::spawn_blocking(move || files.remove(&id))
        .await
        .map_err(|e| OpError::Refused(format!("remove task failed: {e}")))??;
    tracing::info!(artifact = %info.id.short(), kind = %info.kind, version = %info.version, freed, "artifact removed");
    Ok(info)
}

/// Why some machine may still fetch `artifact`, if one may: the artifact of a notice desired
/// for a machine or a group (a machine joining the group later fetches it), of a staged
/// rollout that has machines still to notify, or of a machine's current release of its kind
/// (the platform lets a machine fetch that again: a retry, a reinstall); or why it is still
/// wanted: some machine runs it. `None`: no machine may fetch it, as the chunk server decides
/// (`publish::fetchable_artifacts`), and none runs it.
fn in_use(store: &dyn Store, artifact: &ArtifactInfo) -> Result<Option<String>, OpError> {
    let releases: BTreeSet<ReleaseId> = store
        .releases()?
        .into_iter()
        .filter(|r| r.artifact.id == artifact.id)
        .map(|r| r.id)
        .collect();
    for n in store
        .all_desired()?
        .into_iter()
        .filter(|n| releases.contains(&n.release))
    {
        // A machine's own notice counts only while it is the one the machine follows, as the
        // chunk server decides (`publish::desired_for_machine`): a newer notice of the kind to
        // one of its groups replaces it there, though it stays stored. Why: after a staged
        // rollout (a notice per machine) or a retry, a later release to the group left every
        // machine's old notice in place, and the version could never be removed (a review
        // from an operator's side, 2026-11-29). A revoked machine fetches nothing.
        if let Target::Machine(m) = &n.target {
            let (revoked, groups) = match store.machine(m)? {
                Some(info) => (info.revoked_at_ms.is_some(), info.groups),
                None => (false, Vec::new()),
            };
            let followed = !revoked
                && publish::desired_for_machine(store, m, &groups)?
                    .get(&n.kind)
                    .is_some_and(|d| d.seq == n.seq);
            if !followed {
                continue;
            }
        }
        return Ok(Some(format!(
            "release {} is what the platform wants on {} (a newer release of {} to it replaces that)",
            n.release, n.target, n.kind
        )));
    }
    if let Some(r) = store
        .rollouts()?
        .into_iter()
        .find(|r| releases.contains(&r.release) && !r.state.is_finished())
    {
        return Ok(Some(format!(
            "the staged rollout of release {} is {} (complete or cancel it first)",
            r.release,
            r.state.name()
        )));
    }
    for release in &releases {
        let mut machines = Vec::new();
        for t in store.targets_of(release)? {
            if store.current(&t.machine, &artifact.kind)?.as_ref() == Some(release)
                && store
                    .machine(&t.machine)?
                    .is_none_or(|m| m.revoked_at_ms.is_none())
            {
                machines.push(t.machine);
            }
        }
        if !machines.is_empty() {
            return Ok(Some(format!(
                "release {release} is the current {} release of {}, which may fetch it again; publish a newer release to them first",
                artifact.kind,
                named(&machines)
            )));
        }
    }
    // What machines run: the version to go back to (`rollback`) for as long as they do,
    // shipped ones (no artifact id in their state) included.
    let running: Vec<MachineId> = store
        .machines()?
        .into_iter()
        .filter(|m| m.revoked_at_ms.is_none())
        .filter(|m| {
            m.kinds
                .get(&artifact.kind)
                .is_some_and(|k| match k.artifact {
                    Some(id) => id == artifact.id,
                    None => k.version.as_deref() == Some(artifact.version.as_str()),
                })
        })
        .map(|m| m.id)
        .collect();
    if !running.is_empty() {
        let (verb, whose) = match running.len() {
            1 => ("runs", "its"),
            _ => ("run", "their"),
        };
        return Ok(Some(format!(
            "{} {verb} it, by {whose} last state, and a rollback to it needs the file",
            named(&running)
        )));
    }
    Ok(None)
}

/// Deletes files left of artifacts marked removed (a crash between marking and deleting).
/// Run at start, before any chunk is served.
pub fn sweep_removed(store: &dyn Store, files: &crate::artifacts::ArtifactStore) {
    let artifacts = match store.artifacts() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list artifacts to delete files of removed ones");
            return;
        }
    };
    for a in artifacts.iter().filter(|a| a.removed_at_ms.is_some()) {
        match files.remove(&a.id) {
            Ok(0) => {}
            Ok(freed) => {
                tracing::info!(artifact = %a.id.short(), kind = %a.kind, version = %a.version, freed, "files of a removed artifact deleted")
            }
            Err(e) => {
                tracing::warn!(artifact = %a.id.short(), error = %e, "files of a removed artifact not deleted")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetcast_proto::admin::MachineInfo;
    use fleetcast_proto::rollout::{RolloutInfo, RolloutState, WavePlan};
    use fleetcast_proto::status::KindState;
    use fleetcast_proto::{InstallPolicy, Kind, Target};

    use super::*;
    use crate::domain::target::new_target;
    use crate::fixtures::{g, m};
    use crate::ops::releases;
    use crate::store::{DesiredNotice, StoreError};

    fn app() -> Kind {
        Kind::new("app").unwrap()
    }

    /// Stores `app` `version` (files and record), and a release `r-{version}` of it.
    fn add(ctx: &Ctx, version: &str) -> (ArtifactInfo, ReleaseId) {
        let bytes = format!("the bytes of {version}").repeat(300).into_bytes();
        let info = crate::fixtures::stored_artifact(ctx, &bytes, version);
        let id = info.id;
        let mut release = crate::fixtures::release(&format!("r-{version}"), version);
        release.artifact.id = id;
        ctx.store
            .transaction(|tx| tx.put_release(&release))
            .unwrap();
        (info, release.id)
    }

    async fn remove_app(ctx: &Ctx, version: &str) -> Result<ArtifactInfo, OpError> {
        remove(
            ctx,
            calls::ArtifactRemove {
                kind: app(),
                version: version.into(),
            },
        )
        .await
    }

    /// What `publish` stores for `target`: `release`'s notice of kind app, with `seq`.
    fn notice(release: &ReleaseId, target: Target, seq: u64) -> DesiredNotice {
        DesiredNotice {
            topic: format!("t-{target}"),
            seq,
            release: release.clone(),
            kind: app(),
            target,
            payload: "{}".into(),
        }
    }

    fn refusal(r: Result<ArtifactInfo, OpError>) -> String {
        match r {
            Err(OpError::Refused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_artifact_no_machine_needs_loses_its_files_and_keeps_its_record() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let (info, release) = add(&ctx, "2.3.0");
        assert!(ctx.files.exists(&info.id));
        let removed = remove_app(&ctx, "2.3.0").await.unwrap();
        assert!(removed.removed_at_ms.is_some());
        assert!(!ctx.files.path(&info.id).exists());
        assert!(!ctx.files.manifest_path(&info.id).exists());
        let listed = list(&ctx, calls::ArtifactList {}).unwrap();
        assert_eq!(listed, vec![removed.clone()]);

        // Nothing can send it any more, and each says why.
        let create = releases::create(
            &ctx,
            calls::ReleaseCreate {
                kind: app(),
                version: "2.3.0".into(),
                policy: InstallPolicy::Immediate,
                notes: None,
            },
        )
        .await
        .unwrap_err();
        assert!(
            create.to_string().contains("app 2.3.0 was removed"),
            "{create}"
        );
        let publish = releases::publish(
            &ctx,
            calls::ReleasePublish {
                release: release.clone(),
                machines: vec![m("vm-1")],
                groups: vec![],
                allow_empty: false,
                waves: None,
            },
        )
        .await
        .unwrap_err();
        assert!(
            publish.to_string().contains("cannot send release r-2.3.0")
                && publish.to_string().contains("was removed"),
            "{publish}"
        );
        let rollback = releases::rollback(
            &ctx,
            calls::Rollback {
                target: Target::Group(g("g1")),
                kind: app(),
                to: Some("2.3.0".into()),
                allow_empty: true,
            },
        )
        .await
        .unwrap_err();
        assert!(
            rollback
                .to_string()
                .contains("cannot roll back to app 2.3.0")
                && rollback.to_string().contains("was removed"),
            "{rollback}"
        );
        // Removing it again is no error (and deletes whatever was left).
        std::fs::write(ctx.files.path(&info.id), b"left over").unwrap();
        remove_app(&ctx, "2.3.0").await.unwrap();
        assert!(!ctx.files.path(&info.id).exists());
        let unknown = refusal(remove_app(&ctx, "9.9.9").await);
        assert!(
            unknown.contains("no artifact uploaded for app 9.9.9"),
            "{unknown}"
        );
    }

    /// A machine's own notice (a staged rollout's wave, a retry, `--machines`) holds a version
    /// only while the machine follows it: a newer release of the kind to its group replaces it
    /// there, and a revoked machine follows nothing. Before, such notices stayed stored and the
    /// version could never be removed.
    #[tokio::test]
    async fn a_machines_own_notice_a_group_release_replaced_holds_nothing() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let store = &ctx.store;
        let (a, ra) = add(&ctx, "2.3.0");
        let (_, rb) = add(&ctx, "2.4.0");
        let mut vm1 = MachineInfo::new(m("vm-1"), 0);
        vm1.groups = vec![g("g1")];
        let vm2 = MachineInfo::new(m("vm-2"), 0);
        store
            .transaction(|tx| {
                tx.put_machine(&vm1)?;
                tx.put_machine(&vm2)?;
                tx.put_desired(&notice(&ra, Target::Machine(m("vm-1")), 1))?;
                tx.put_desired(&notice(&ra, Target::Machine(m("vm-2")), 2))
            })
            .unwrap();
        let why = refusal(remove_app(&ctx, "2.3.0").await);
        assert!(why.contains("wants on machine vm-1"), "{why}");
        // 2.4.0 to vm-1's group: vm-1 follows that now; vm-2 still follows its own.
        store
            .transaction(|tx| tx.put_desired(&notice(&rb, Target::Group(g("g1")), 3)))
            .unwrap();
        let why = refusal(remove_app(&ctx, "2.3.0").await);
        assert!(why.contains("wants on machine vm-2"), "{why}");
        // vm-2 is revoked: it fetches nothing.
        let mut revoked = vm2.clone();
        revoked.revoked_at_ms = Some(5);
        store.transaction(|tx| tx.put_machine(&revoked)).unwrap();
        remove_app(&ctx, "2.3.0").await.unwrap();
        assert!(!ctx.files.exists(&a.id));
    }

    #[tokio::test]
    async fn files_left_by_a_removal_cut_short_are_deleted_at_start() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let (mut info, _) = add(&ctx, "2.3.0");
        let (kept, _) = add(&ctx, "2.4.0");
        // Marked removed, then the process stopped before the files went.
        info.removed_at_ms = Some(5);
        ctx.store.put_artifact(&info).unwrap();
        sweep_removed(&*ctx.store, &ctx.files);
        assert!(!ctx.files.path(&info.id).exists());
        assert!(!ctx.files.manifest_path(&info.id).exists());
        assert!(
            ctx.files.exists(&kept.id),
            "a stored artifact is left alone"
        );
    }

    #[tokio::test]
    async fn an_artifact_a_machine_may_still_fetch_or_runs_is_kept_with_the_reason() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let store = &ctx.store;
        let (a, ra) = add(&ctx, "2.3.0");

        // Wanted on a group: a machine joining it later fetches it.
        store
            .transaction(|tx| tx.put_desired(&notice(&ra, Target::Group(g("g1")), 1)))
            .unwrap();
        let why = refusal(remove_app(&ctx, "2.3.0").await);
        assert!(
            why.contains("release r-2.3.0 is what the platform wants on group g1"),
            "{why}"
        );
        assert!(ctx.files.exists(&a.id), "nothing deleted when refused");
        store
            .transaction(|tx| tx.remove_desired(&Target::Group(g("g1")), &app()))
            .unwrap();

        // A staged rollout with machines still to notify.
        let mut rollout = RolloutInfo {
            release: ra.clone(),
            plan: WavePlan {
                waves_bp: vec![1000, 10000],
                success_bp: 9000,
                failure_bp: 500,
                wave_timeout_ms: 0,
            },
            order: vec![m("vm-1"), m("vm-2")],
            wave: 0,
            wave_started_ms: 0,
            state: RolloutState::Paused {
                reason: "by an operator".into(),
            },
            failures_accepted: 0,
            accepted: vec![],
            skipped: vec![],
            log: vec![],
        };
        store.transaction(|tx| tx.put_rollout(&rollout)).unwrap();
        let why = refusal(remove_app(&ctx, "2.3.0").await);
        assert!(
            why.contains("staged rollout of release r-2.3.0 is paused"),
            "{why}"
        );
        rollout.state = RolloutState::Completed;
        store.transaction(|tx| tx.put_rollout(&rollout)).unwrap();

        // Six machines' current release: they may fetch it again.
        let release = store.release(&ra).unwrap().unwrap();
        store
            .transaction(|tx| {
                for i in 1..=6 {
                    let machine = m(&format!("vm-{i}"));
                    tx.put_target(&new_target(&release, machine.clone(), None, 0))?;
                    tx.set_current(&machine, &app(), &ra)?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let why = refusal(remove_app(&ctx, "2.3.0").await);
        assert!(
            why.contains("release r-2.3.0 is the current app release of 6 machines (vm-1, vm-2, vm-3, vm-4, vm-5 and 1 more)"),
            "{why}"
        );
        // A newer release became their current one.
        let (_, rb) = add(&ctx, "2.4.0");
        let newer = store.release(&rb).unwrap().unwrap();
        store
            .transaction(|tx| {
                for i in 1..=6 {
                    let machine = m(&format!("vm-{i}"));
                    tx.put_target(&new_target(&newer, machine.clone(), None, 0))?;
                    tx.set_current(&machine, &app(), &rb)?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();

        // One machine still runs it (by its artifact), another a shipped 2.3.0 (no artifact id
        // in its state): what a rollback goes back to.
        let mut runs = MachineInfo::new(m("vm-7"), 0);
        runs.kinds.insert(
            app(),
            KindState {
                version: Some("2.3.0".into()),
                artifact: Some(a.id),
                ..KindState::default()
            },
        );
        store.transaction(|tx| tx.put_machine(&runs)).unwrap();
        let why = refusal(remove_app(&ctx, "2.3.0").await);
        assert!(why.contains("1 machine (vm-7) runs it"), "{why}");
        let mut shipped = MachineInfo::new(m("vm-8"), 0);
        shipped.kinds.insert(
            app(),
            KindState {
                version: Some("2.3.0".into()),
                ..KindState::default()
            },
        );
        runs.kinds.get_mut(&app()).unwrap().artifact = None;
        runs.kinds.get_mut(&app()).unwrap().version = Some("2.4.0".into());
        store
            .transaction(|tx| {
                tx.put_machine(&runs)?;
                tx.put_machine(&shipped)
            })
            .unwrap();
        let why = refusal(remove_app(&ctx, "2.3.0").await);
        assert!(why.contains("1 machine (vm-8) runs it"), "{why}");
        // Revoked, it counts no more; then nothing holds it.
        shipped.revoked_at_ms = Some(1);
        store.transaction(|tx| tx.put_machine(&shipped)).unwrap();
        remove_app(&ctx, "2.3.0").await.unwrap();
        assert!(!ctx.files.path(&a.id).exists());
        // 2.4.0 is the current release of six machines: kept.
        let why = refusal(remove_app(&ctx, "2.4.0").await);
        assert!(why.contains("current app release of 6 machines"), "{why}");
    }
}
