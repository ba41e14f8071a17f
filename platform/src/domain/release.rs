//! A release's life as pure decisions. No I/O, no clock: the caller loads the release and its
//! target records, asks here, stores the result and sends what follows.
//!
//! A release is created unpublished (`seq` 0) for one uploaded artifact; each publish (to more
//! machines or groups, a retry, a staged rollout's start) gives it the seq of its newest
//! notices and adds its recipients. A staged rollout's own states (running, paused,
//! completed, cancelled) are [`super::rollout`]'s; a machine's record for the release is
//! [`super::target`]'s. From its records follow the release's progress, which machines a
//! retry or an `activate` reaches, and which version a rollback goes back to.

use std::collections::BTreeMap;

use fleetcast_proto::admin::{ArtifactInfo, ReleaseInfo, RolloutProgress, TargetRecord};
use fleetcast_proto::release::ArtifactRef;
use fleetcast_proto::rollout::RolloutState;
use fleetcast_proto::{GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId};

/// Why an operation on a release does nothing; the text goes back to the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("machine {machine} is not a target of release {release}; nothing was sent")]
    NotATarget {
        release: ReleaseId,
        machine: MachineId,
    },
    #[error("release {0} has no failed machines; nothing was sent")]
    NoFailedMachines(ReleaseId),
    #[error("name machines to retry (--machines) or ask for every failed one (--failed)")]
    NoMachinesNamed,
    #[error("release {0} has no target machines yet")]
    NoTargets(ReleaseId),
    #[error(
        "no target of release {release} is in group {group} (`fleetcast release status \
         {release}` lists them); nothing was sent"
    )]
    NoTargetInGroup { release: ReleaseId, group: GroupId },
    #[error("release {release} already has a {state} staged rollout; cancel it first")]
    RolloutInProgress {
        release: ReleaseId,
        state: &'static str,
    },
    #[error(
        "release {release} has a {state} staged rollout: publishing it without --waves would \
         send it to its machines at once, past the waves; nothing was sent. Go on with the \
         rollout (`fleetcast rollout resume {release}`, `--advance` starts the next wave now), \
         or stop it first (`fleetcast rollout cancel {release}`) and then publish without waves"
    )]
    PublishDuringRollout {
        release: ReleaseId,
        state: &'static str,
    },
    #[error(
        "release {release} was published to group {group} without waves: its members were sent \
         it already, so waves cannot hold them back; nothing was sent. To stage a release, \
         create a new one (`fleetcast release create`) and publish that with --waves"
    )]
    StagedOverGroupNotice { release: ReleaseId, group: GroupId },
    #[error("no earlier {kind} version known for machine {machine}; pass --to VERSION")]
    NoEarlierVersion { machine: MachineId, kind: Kind },
    #[error("group {group} has no {kind} release yet; pass --to VERSION")]
    NoGroupRelease { group: GroupId, kind: Kind },
    #[error("group {group} had no {kind} release before {current}; pass --to VERSION")]
    NoEarlierGroupRelease {
        group: GroupId,
        kind: Kind,
        current: String,
    },
}

/// A new, unpublished release `id` of `artifact` (its kind and version).
pub fn new(
    id: ReleaseId,
    artifact: ArtifactInfo,
    policy: InstallPolicy,
    notes: Option<String>,
    rollback: bool,
    now_ms: u64,
) -> ReleaseInfo {
    ReleaseInfo {
        id,
        kind: artifact.kind,
        version: artifact.version,
        artifact: ArtifactRef {
            id: artifact.id,
            size: artifact.size,
            chunk_size: artifact.chunk_size,
            name: artifact.name,
        },
        policy,
        rollback,
        notes,
        created_at_ms: now_ms,
        published_at_ms: None,
        seq: 0,
        machines: vec![],
        groups: vec![],
    }
}

/// Whether `release` was ever published.
pub fn is_published(release: &ReleaseInfo) -> bool {
    release.seq > 0
}

/// Records a publish on `release`: the seq of its newest notices, the first publish's time,
/// and the named machines and groups among its recipients (each once, in order of first
/// publish).
pub fn record_publish(
    release: &mut ReleaseInfo,
    seq: u64,
    now_ms: u64,
    machines: &[MachineId],
    groups: &[GroupId],
) {
    release.seq = seq;
    release.published_at_ms.get_or_insert(now_ms);
    for m in machines {
        if !release.machines.contains(m) {
            release.machines.push(m.clone());
        }
    }
    for g in groups {
        if !release.groups.contains(g) {
            release.groups.push(g.clone());
        }
    }
}

/// A staged rollout may start unless the release's previous one is still running or paused,
/// or the release is the live notice of a group (`sent_to_group`: such groups a target belongs
/// to). Why the second: a group notice already reached every member, so waves over them would
/// hold back nobody, while `rollout status` and `cancel` would claim to steer them.
pub fn may_stage(
    release: &ReleaseId,
    rollout: Option<&RolloutState>,
    sent_to_group: &[GroupId],
) -> Result<(), Refused> {
    match rollout {
        Some(state @ (RolloutState::Running | RolloutState::Paused { .. })) => {
            Err(Refused::RolloutInProgress {
                release: release.clone(),
                state: state.name(),
            })
        }
        Some(RolloutState::Completed | RolloutState::Cancelled { .. }) | None => {
            match sent_to_group.first() {
                Some(group) => Err(Refused::StagedOverGroupNotice {
                    release: release.clone(),
                    group: group.clone(),
                }),
                None => Ok(()),
            }
        }
    }
}

/// A publish without waves may go ahead unless the release's staged rollout is running or
/// paused: it would reach the machines of later waves at once (a group's notice reaches every
/// member), and `rollout cancel` only tells the waves' machines to drop it. After a completed
/// rollout every target was notified, so publishing to more is an ordinary publish; after a
/// cancelled one it is the operator's explicit choice: the machines told to drop it have a
/// finished (`cancelled`) record, so they start a new round with the new notice.
pub fn may_publish_at_once(
    release: &ReleaseId,
    rollout: Option<&RolloutState>,
) -> Result<(), Refused> {
    match rollout {
        Some(state @ (RolloutState::Running | RolloutState::Paused { .. })) => {
            Err(Refused::PublishDuringRollout {
                release: release.clone(),
                state: state.name(),
            })
        }
        Some(RolloutState::Completed | RolloutState::Cancelled { .. }) | None => Ok(()),
    }
}

/// Whether a target in `phase` failed: a failure phase other than `cancelled` (an operator's
/// doing, not the machine's). These count against a rollout's failure threshold and are what
/// `release retry --failed` restarts.
pub fn failed(phase: Phase) -> bool {
    phase.is_failure() && phase != Phase::Cancelled
}

/// The machines a retry of `release` sends it to again: with `failed`, every target that
/// [`failed`] (only those in `groups`, when groups are named) plus the named `machines`;
/// without, the named `machines`, each of which must be a target, and every target in
/// `groups`. `in_group` says whether a target is in a group ([`in_groups`]).
pub fn retry_targets(
    release: &ReleaseId,
    targets: &[TargetRecord],
    machines: &[MachineId],
    groups: &[GroupId],
    failed_ones: bool,
    in_group: impl Fn(&TargetRecord, &GroupId) -> bool,
) -> Result<Vec<MachineId>, Refused> {
    let grouped = in_groups(release, targets, groups, in_group)?;
    // Named machines must be targets, with `failed_ones` too: a retry is not a way to send a
    // release to a machine it was never published to (it was, with --failed).
    let named = named_targets(release, targets, machines)?;
    let mut chosen: Vec<MachineId> = if failed_ones {
        targets
            .iter()
            .filter(|t| failed(t.phase))
            .filter(|t| groups.is_empty() || grouped.contains(&t.machine))
            .map(|t| t.machine.clone())
            .collect()
    } else {
        Vec::new()
    };
    add_missing(&mut chosen, &named);
    if !failed_ones {
        add_missing(&mut chosen, &grouped);
    }
    if chosen.is_empty() {
        return Err(if failed_ones {
            Refused::NoFailedMachines(release.clone())
        } else {
            Refused::NoMachinesNamed
        });
    }
    Ok(chosen)
}

fn add_missing(chosen: &mut Vec<MachineId>, more: &[MachineId]) {
    for m in more {
        if !chosen.contains(m) {
            chosen.push(m.clone());
        }
    }
}

/// The targets of `release` in any of `groups` (`in_group`: reached through the group, or a
/// member of it now), in record order. Each named group must hold one: a group that holds
/// none is most likely a typo, as for a publish.
pub fn in_groups(
    release: &ReleaseId,
    targets: &[TargetRecord],
    groups: &[GroupId],
    in_group: impl Fn(&TargetRecord, &GroupId) -> bool,
) -> Result<Vec<MachineId>, Refused> {
    if let Some(g) = groups
        .iter()
        .find(|g| !targets.iter().any(|t| in_group(t, g)))
    {
        return Err(Refused::NoTargetInGroup {
            release: release.clone(),
            group: g.clone(),
        });
    }
    Ok(targets
        .iter()
        .filter(|t| groups.iter().any(|g| in_group(t, g)))
        .map(|t| t.machine.clone())
        .collect())
}

/// The named `machines`, each of which must be one of `targets`.
fn named_targets(
    release: &ReleaseId,
    targets: &[TargetRecord],
    machines: &[MachineId],
) -> Result<Vec<MachineId>, Refused> {
    match machines
        .iter()
        .find(|m| !targets.iter().any(|t| &t.machine == *m))
    {
        Some(m) => Err(Refused::NotATarget {
            release: release.clone(),
            machine: m.clone(),
        }),
        None => Ok(machines.to_vec()),
    }
}

/// The machines an `activate` of `release` goes to: the named `machines` (each must be a
/// target) and the targets in `groups` ([`in_groups`]), or every target when neither is named.
pub fn activate_targets(
    release: &ReleaseId,
    targets: &[TargetRecord],
    machines: &[MachineId],
    groups: &[GroupId],
    in_group: impl Fn(&TargetRecord, &GroupId) -> bool,
) -> Result<Vec<MachineId>, Refused> {
    let chosen: Vec<MachineId> = if machines.is_empty() && groups.is_empty() {
        targets.iter().map(|t| t.machine.clone()).collect()
    } else {
        let mut named = named_targets(release, targets, machines)?;
        add_missing(&mut named, &in_groups(release, targets, groups, in_group)?);
        named
    };
    if chosen.is_empty() {
        return Err(Refused::NoTargets(release.clone()));
    }
    Ok(chosen)
}

/// The aggregate of one release over its target records.
pub fn progress(release: &ReleaseInfo, targets: &[TargetRecord], now_ms: u64) -> RolloutProgress {
    let mut phases = BTreeMap::new();
    let (mut finished, mut succeeded, mut failed) = (0, 0, 0);
    for t in targets {
        *phases.entry(t.phase).or_insert(0) += 1;
        finished += u32::from(t.phase.is_final());
        succeeded += u32::from(t.phase == Phase::Installed);
        failed += u32::from(t.phase.is_failure());
    }
    RolloutProgress {
        release: release.id.clone(),
        kind: release.kind.clone(),
        version: release.version.clone(),
        total: targets.len() as u32,
        phases,
        finished,
        succeeded,
        failed,
        updated_at_ms: now_ms,
    }
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

/// The version `machine`'s rollback of `kind` goes to when none is named: the one before the
/// version it runs (`installed`, else the last it was given).
pub fn machine_rollback_version(
    machine: &MachineId,
    kind: &Kind,
    installed: Option<&str>,
    history: &[String],
) -> Result<String, Refused> {
    let current = installed.or(history.last().map(String::as_str));
    previous_version(history, current).ok_or_else(|| Refused::NoEarlierVersion {
        machine: machine.clone(),
        kind: kind.clone(),
    })
}

/// The version `group`'s rollback of `kind` goes to when none is named: that of the newest
/// release published to the group before its current one (the newest) with another version.
pub fn group_rollback_version(
    group: &GroupId,
    kind: &Kind,
    releases: &[ReleaseInfo],
) -> Result<String, Refused> {
    let Some((current, to)) = group_rollback_releases(group, kind, releases) else {
        return Err(Refused::NoGroupRelease {
            group: group.clone(),
            kind: kind.clone(),
        });
    };
    match to {
        Some(r) => Ok(r.version.clone()),
        None => Err(Refused::NoEarlierGroupRelease {
            group: group.clone(),
            kind: kind.clone(),
            current: current.version.clone(),
        }),
    }
}

/// The releases [`group_rollback_version`] reads for `group` and `kind`: the newest published
/// to the group (what it rolls back from) and the newest one before it with another version
/// (what it rolls back to), if there is one. No other release changes its choice, so these are
/// the ones `release_remove` keeps for it.
pub fn group_rollback_releases<'a>(
    group: &GroupId,
    kind: &Kind,
    releases: &'a [ReleaseInfo],
) -> Option<(&'a ReleaseInfo, Option<&'a ReleaseInfo>)> {
    let mut published: Vec<&ReleaseInfo> = releases
        .iter()
        .filter(|r| &r.kind == kind && is_published(r) && r.groups.contains(group))
        .collect();
    published.sort_by_key(|r| r.seq);
    let current = published.pop()?;
    let to = published
        .iter()
        .rev()
        .find(|r| r.version != current.version)
        .copied();
    Some((current, to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::target;
    use crate::fixtures::{g, m};

    fn rel(id: &str) -> ReleaseId {
        ReleaseId::new(id).unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Records of `release` for machines in the given phases.
    fn records(release: &ReleaseInfo, phases: &[(&str, Phase)]) -> Vec<TargetRecord> {
        phases
            .iter()
            .map(|(machine, phase)| {
                let mut t = target::new_target(release, m(machine), None, 0);
                t.phase = *phase;
                t
            })
            .collect()
    }

    #[test]
    fn a_new_release_is_unpublished_and_names_its_artifact() {
        let artifact = ArtifactInfo {
            id: fleetcast_proto::ArtifactId::of(b"v2"),
            kind: Kind::new("app").unwrap(),
            version: "2.0".into(),
            name: "app.bin".into(),
            size: 2,
            chunk_size: 65536,
            notes: Some("artifact notes".into()),
            uploaded_at_ms: 1,
            removed_at_ms: None,
        };
        let r = new(
            rel("r-000007"),
            artifact.clone(),
            InstallPolicy::Immediate,
            Some("release notes".into()),
            false,
            5,
        );
        assert!(!is_published(&r));
        assert_eq!((r.kind, r.version.as_str()), (artifact.kind, "2.0"));
        assert_eq!(
            (r.artifact.id, r.artifact.name.as_str()),
            (artifact.id, "app.bin")
        );
        assert_eq!(
            (r.notes.as_deref(), r.created_at_ms, r.published_at_ms),
            (Some("release notes"), 5, None)
        );
    }

    #[test]
    fn publishing_again_takes_the_new_seq_keeps_the_first_time_and_adds_recipients_once() {
        let mut r = crate::fixtures::release("r-000001", "1.0");
        record_publish(&mut r, 4, 100, &[m("vm-1")], &[g("north")]);
        assert!(is_published(&r));
        record_publish(
            &mut r,
            9,
            200,
            &[m("vm-2"), m("vm-1")],
            &[g("north"), g("south")],
        );
        assert_eq!((r.seq, r.published_at_ms), (9, Some(100)));
        assert_eq!(r.machines, [m("vm-1"), m("vm-2")]);
        assert_eq!(r.groups, [g("north"), g("south")]);
    }

    #[test]
    fn a_staged_rollout_may_not_start_while_the_previous_one_runs_or_is_paused() {
        let id = rel("r-000001");
        assert_eq!(may_stage(&id, None, &[]), Ok(()));
        assert_eq!(may_stage(&id, Some(&RolloutState::Completed), &[]), Ok(()));
        let cancelled = RolloutState::Cancelled {
            reason: "by ops".into(),
        };
        assert_eq!(may_stage(&id, Some(&cancelled), &[]), Ok(()));
        let paused = RolloutState::Paused {
            reason: "failures".into(),
        };
        for state in [RolloutState::Running, paused] {
            let err = may_stage(&id, Some(&state), &[]).unwrap_err();
            assert!(err.to_string().contains("cancel it first"), "{err}");
        }
    }

    #[test]
    fn a_staged_rollout_may_not_start_over_a_group_the_release_was_sent_to_at_once() {
        let id = rel("r-000001");
        for previous in [None, Some(RolloutState::Completed)] {
            let err = may_stage(&id, previous.as_ref(), &[g("shanghai")]).unwrap_err();
            assert_eq!(
                err,
                Refused::StagedOverGroupNotice {
                    release: id.clone(),
                    group: g("shanghai")
                }
            );
            assert!(
                err.to_string().contains("create a new one"),
                "says what to do: {err}"
            );
        }
    }

    #[test]
    fn a_release_in_a_live_staged_rollout_is_not_published_at_once() {
        let id = rel("r-000042");
        let paused = RolloutState::Paused {
            reason: "by ops".into(),
        };
        for state in [RolloutState::Running, paused] {
            let err = may_publish_at_once(&id, Some(&state)).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("has a {} staged rollout", state.name()))
                    && text.contains("fleetcast rollout resume r-000042")
                    && text.contains("fleetcast rollout cancel r-000042"),
                "{text}"
            );
        }
        // Once it is over, publishing is the operator's plain choice.
        let cancelled = RolloutState::Cancelled {
            reason: "by ops".into(),
        };
        for state in [None, Some(RolloutState::Completed), Some(cancelled)] {
            assert_eq!(may_publish_at_once(&id, state.as_ref()), Ok(()));
        }
    }

    #[test]
    fn retrying_failed_machines_takes_failures_but_not_cancelled_or_finished_ones() {
        assert!(failed(Phase::Rejected) && !failed(Phase::Cancelled) && !failed(Phase::Superseded));
        let r = crate::fixtures::release("r-000001", "1.0");
        let targets = records(
            &r,
            &[
                ("vm-1", Phase::DownloadFailed),
                ("vm-2", Phase::Installed),
                ("vm-3", Phase::Cancelled),
                ("vm-4", Phase::RolledBack),
                ("vm-5", Phase::Downloading),
            ],
        );
        assert_eq!(
            retry_targets(&r.id, &targets, &[], &[], true, no_group).unwrap(),
            [m("vm-1"), m("vm-4")]
        );
        // Named machines are added to the failed ones.
        assert_eq!(
            retry_targets(&r.id, &targets, &[m("vm-2")], &[], true, no_group).unwrap(),
            [m("vm-1"), m("vm-4"), m("vm-2")]
        );
        assert_eq!(
            retry_targets(
                &r.id,
                &targets,
                &[m("vm-5"), m("vm-2")],
                &[],
                false,
                no_group
            )
            .unwrap(),
            [m("vm-5"), m("vm-2")]
        );
    }

    #[test]
    fn a_retry_refuses_machines_that_are_not_targets_and_a_retry_of_nobody() {
        let r = crate::fixtures::release("r-000001", "1.0");
        let targets = records(&r, &[("vm-1", Phase::Installed)]);
        for failed_ones in [false, true] {
            assert_eq!(
                retry_targets(&r.id, &targets, &[m("vm-9")], &[], failed_ones, no_group),
                Err(Refused::NotATarget {
                    release: r.id.clone(),
                    machine: m("vm-9")
                }),
                "failed_ones {failed_ones}"
            );
        }
        assert_eq!(
            retry_targets(&r.id, &targets, &[], &[], true, no_group),
            Err(Refused::NoFailedMachines(r.id.clone()))
        );
        assert_eq!(
            retry_targets(&r.id, &targets, &[], &[], false, no_group),
            Err(Refused::NoMachinesNamed)
        );
    }

    #[test]
    fn activate_goes_to_every_target_or_to_the_named_targets_only() {
        let r = crate::fixtures::release("r-000001", "1.0");
        let targets = records(&r, &[("vm-1", Phase::Deferred), ("vm-2", Phase::Deferred)]);
        assert_eq!(
            activate_targets(&r.id, &targets, &[], &[], no_group).unwrap(),
            [m("vm-1"), m("vm-2")]
        );
        assert_eq!(
            activate_targets(&r.id, &targets, &[m("vm-2")], &[], no_group).unwrap(),
            [m("vm-2")]
        );
        assert!(matches!(
            activate_targets(&r.id, &targets, &[m("vm-2"), m("vm-3")], &[], no_group),
            Err(Refused::NotATarget { machine, .. }) if machine == m("vm-3")
        ));
        assert_eq!(
            activate_targets(&r.id, &[], &[], &[], no_group),
            Err(Refused::NoTargets(r.id.clone()))
        );
    }

    fn no_group(_: &TargetRecord, _: &GroupId) -> bool {
        false
    }

    /// vm-1, vm-2 reached via group north; vm-3 named directly but a member of north now; vm-4
    /// in south.
    fn grouped(r: &ReleaseInfo) -> (Vec<TargetRecord>, impl Fn(&TargetRecord, &GroupId) -> bool) {
        let mut targets = records(
            r,
            &[
                ("vm-1", Phase::Deferred),
                ("vm-2", Phase::DownloadFailed),
                ("vm-3", Phase::InstallFailed),
                ("vm-4", Phase::DownloadFailed),
            ],
        );
        targets[0].via = Some(g("north"));
        targets[1].via = Some(g("north"));
        targets[3].via = Some(g("south"));
        let in_group = |t: &TargetRecord, group: &GroupId| {
            t.via.as_ref() == Some(group) || (t.machine == m("vm-3") && group == &g("north"))
        };
        (targets, in_group)
    }

    #[test]
    fn activate_and_retry_take_a_releases_targets_in_the_named_groups() {
        let r = crate::fixtures::release("r-000001", "1.0");
        let (targets, in_group) = grouped(&r);
        assert_eq!(
            activate_targets(&r.id, &targets, &[], &[g("north")], &in_group).unwrap(),
            [m("vm-1"), m("vm-2"), m("vm-3")]
        );
        assert_eq!(
            activate_targets(&r.id, &targets, &[m("vm-4")], &[g("north")], &in_group).unwrap(),
            [m("vm-4"), m("vm-1"), m("vm-2"), m("vm-3")]
        );
        // --failed --groups: the failed ones in the group; without --failed: all of them.
        assert_eq!(
            retry_targets(&r.id, &targets, &[], &[g("north")], true, &in_group).unwrap(),
            [m("vm-2"), m("vm-3")]
        );
        assert_eq!(
            retry_targets(&r.id, &targets, &[], &[g("south")], false, &in_group).unwrap(),
            [m("vm-4")]
        );
        // A group holding no target is refused, as a typo.
        let typo = Refused::NoTargetInGroup {
            release: r.id.clone(),
            group: g("nort"),
        };
        assert_eq!(
            activate_targets(&r.id, &targets, &[], &[g("nort")], &in_group),
            Err(typo.clone())
        );
        assert_eq!(
            retry_targets(&r.id, &targets, &[], &[g("nort")], true, &in_group),
            Err(typo)
        );
        // A group whose targets have not failed: nothing to retry.
        let (mut targets, _) = grouped(&r);
        targets[3].phase = Phase::Installed;
        assert_eq!(
            retry_targets(&r.id, &targets, &[], &[g("south")], true, &in_group),
            Err(Refused::NoFailedMachines(r.id.clone()))
        );
    }

    #[test]
    fn progress_counts_machines_per_phase_and_outcome() {
        let r = crate::fixtures::release("r-000001", "2.4.1");
        let targets = records(
            &r,
            &[
                ("vm-1", Phase::Installed),
                ("vm-2", Phase::InstallFailed),
                ("vm-3", Phase::Pending),
            ],
        );
        let p = progress(&r, &targets, 7);
        assert_eq!((p.total, p.finished, p.succeeded, p.failed), (3, 2, 1, 1));
        assert_eq!(p.phases.get(&Phase::Pending), Some(&1));
        assert_eq!(p.updated_at_ms, 7);
    }

    #[test]
    fn the_previous_version_is_the_one_before_the_current_one() {
        let h = strings(&["1.0", "2.0", "3.0"]);
        assert_eq!(previous_version(&h, Some("3.0")).as_deref(), Some("2.0"));
        assert_eq!(previous_version(&h, Some("2.0")).as_deref(), Some("1.0"));
        assert_eq!(previous_version(&h, Some("1.0")), None);
        assert_eq!(previous_version(&h, None), None);
        let back = strings(&["1.0", "2.0", "1.0"]);
        assert_eq!(previous_version(&back, Some("1.0")).as_deref(), Some("2.0"));
    }

    #[test]
    fn a_machine_rolls_back_from_what_it_runs_or_else_from_what_it_was_given_last() {
        let app = Kind::new("app").unwrap();
        let h = strings(&["1.0", "2.0", "3.0"]);
        let to = |installed| machine_rollback_version(&m("vm-1"), &app, installed, &h);
        assert_eq!(to(Some("2.0")).as_deref(), Ok("1.0"));
        assert_eq!(to(None).as_deref(), Ok("2.0"));
        assert!(matches!(
            to(Some("1.0")),
            Err(Refused::NoEarlierVersion { .. })
        ));
    }

    #[test]
    fn a_group_rolls_back_to_its_newest_earlier_release_with_another_version() {
        let app = Kind::new("app").unwrap();
        let north = g("north");
        let published = |id: &str, version: &str, seq: u64, group: &str| {
            let mut r = crate::fixtures::release(id, version);
            record_publish(&mut r, seq, 0, &[], &[g(group)]);
            r
        };
        let mut releases = vec![
            published("r-000001", "1.0", 1, "north"),
            published("r-000002", "2.0", 2, "north"),
            published("r-000003", "9.0", 3, "south"),
            // Published again later: the current release is the one with the highest seq.
            published("r-000004", "3.0", 5, "north"),
            published("r-000005", "3.0", 6, "north"),
            // Never published.
            crate::fixtures::release("r-000006", "4.0"),
        ];
        assert_eq!(
            group_rollback_version(&north, &app, &releases).as_deref(),
            Ok("2.0")
        );
        releases.retain(|r| r.version != "1.0" && r.version != "2.0");
        assert!(matches!(
            group_rollback_version(&north, &app, &releases),
            Err(Refused::NoEarlierGroupRelease { current, .. }) if current == "3.0"
        ));
        assert!(matches!(
            group_rollback_version(&g("east"), &app, &releases),
            Err(Refused::NoGroupRelease { .. })
        ));
    }

    /// What `release_remove` keeps for a group's rollback: removing any other release leaves
    /// the version it rolls back to as it was.
    #[test]
    fn only_the_two_releases_a_group_rollback_reads_change_its_choice() {
        let app = Kind::new("app").unwrap();
        let published = |id: &str, version: &str, seq: u64| {
            let mut r = crate::fixtures::release(id, version);
            record_publish(&mut r, seq, 0, &[], &[g("north")]);
            r
        };
        let releases = vec![
            published("r-000001", "1.0", 1),
            published("r-000002", "2.0", 2),
            published("r-000003", "2.0", 3),
            published("r-000004", "3.0", 4),
            published("r-000005", "3.0", 5),
        ];
        let (from, to) = group_rollback_releases(&g("north"), &app, &releases).unwrap();
        assert_eq!(
            (from.id.as_str(), to.map(|r| r.id.as_str())),
            ("r-000005", Some("r-000003"))
        );
        let before = group_rollback_version(&g("north"), &app, &releases);
        for r in &releases {
            let mut without = releases.clone();
            without.retain(|x| x.id != r.id);
            let after = group_rollback_version(&g("north"), &app, &without);
            if r.id != from.id && Some(&r.id) != to.map(|t| &t.id) {
                assert_eq!(after, before, "without {}", r.id);
            }
        }
        // A group nothing was published to has none.
        assert!(group_rollback_releases(&g("south"), &app, &releases).is_none());
    }
}
