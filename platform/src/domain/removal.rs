//! Whether a release may be removed (`release_remove`), as a pure decision: the caller reads
//! what the platform still does with the release ([`Uses`]), asks [`why_kept`], and deletes
//! only when nothing keeps it.
//!
//! A release stays while removing it would lose something a machine or an operator still
//! needs: a notice of it in force (a group's: machines behind on it are sent it again and new
//! members become its targets; or one a machine follows), a staged rollout of it that may
//! still send it, a machine still working on it (its results would be dropped), a machine whose
//! current release of its kind it is (the platform lets a machine fetch that again, and marks
//! it superseded when the next one comes), and what `rollback --group` reads (the group's
//! newest release and the one it rolls back to). A revoked machine keeps nothing: it can fetch
//! and report nothing.

use fleetcast_proto::admin::ReleaseInfo;
use fleetcast_proto::rollout::RolloutState;
use fleetcast_proto::{GroupId, MachineId, Phase, Target};

/// The most machines (or notice targets) a reason names; it counts the others.
pub const NAMED: usize = 5;

/// What the platform still reads of one release.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Uses {
    /// Where a notice of it is in force: a group, or a machine that follows its own notice
    /// (one that a newer notice to a group of the machine replaced is not).
    pub desired_on: Vec<Target>,
    /// Its staged rollout's state, if it was published in waves.
    pub rollout: Option<RolloutState>,
    /// Machines not revoked whose record of it is not final, with that phase.
    pub working: Vec<(MachineId, Phase)>,
    /// Machines not revoked whose current release of its kind it is.
    pub current_of: Vec<MachineId>,
    /// Groups whose `rollback` reads it.
    pub rollback_of: Vec<(GroupId, RollbackRead)>,
}

/// What `rollback --group` takes from a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackRead {
    /// The group's newest release of the kind: what it rolls back from.
    From,
    /// The newest one before that with another version: what it rolls back to.
    To,
}

/// Why `release` must stay, every reason in one text; `None`: nothing needs it.
pub fn why_kept(release: &ReleaseInfo, uses: &Uses) -> Option<String> {
    let kind = &release.kind;
    let mut why = Vec::new();
    if !uses.desired_on.is_empty() {
        let on: Vec<String> = uses.desired_on.iter().map(|t| t.to_string()).collect();
        why.push(format!(
            "it is what the platform wants on {} (machines behind on it are sent it again, and \
             new members of a group become its targets): publish a newer {kind} release there, \
             or roll back, first",
            list(&on)
        ));
    }
    if let Some(state) = uses.rollout.as_ref().filter(|s| !s.is_finished()) {
        why.push(format!(
            "its staged rollout is {} (it may still send it; `fleetcast rollout cancel {}` \
             stops it)",
            state.name(),
            release.id
        ));
    }
    if !uses.working.is_empty() {
        let machines: Vec<MachineId> = uses.working.iter().map(|(m, _)| m.clone()).collect();
        let (verb, first) = (
            if machines.len() == 1 { "is" } else { "are" },
            uses.working[0].1,
        );
        why.push(format!(
            "{} {verb} still working on it (first: {first}), and what they report would be \
             dropped: wait for them, or publish a newer {kind} release to them, or revoke them",
            named(&machines)
        ));
    }
    if !uses.current_of.is_empty() {
        why.push(format!(
            "it is the current {kind} release of {} (the platform lets a machine fetch its \
             current release again, for a retry or a reinstall): publish a newer {kind} release \
             to them first",
            named(&uses.current_of)
        ));
    }
    for (group, read) in &uses.rollback_of {
        let what = match read {
            RollbackRead::From => "from",
            RollbackRead::To => "to",
        };
        why.push(format!(
            "`fleetcast rollback --group {group} --kind {kind}` rolls back {what} it: publish \
             newer {kind} releases to the group first"
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// "3 machines (vm-1, vm-2, vm-3)", naming at most [`NAMED`].
pub fn named(machines: &[MachineId]) -> String {
    let names: Vec<String> = machines.iter().map(|m| m.to_string()).collect();
    let s = if machines.len() == 1 { "" } else { "s" };
    format!("{} machine{s} ({})", machines.len(), list(&names))
}

/// "a, b, c and 4 more", naming at most [`NAMED`].
fn list(items: &[String]) -> String {
    let shown = items[..items.len().min(NAMED)].join(", ");
    match items.len().saturating_sub(NAMED) {
        0 => shown,
        n => format!("{shown} and {n} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{g, m, release};

    fn r() -> ReleaseInfo {
        release("r-000002", "2.0")
    }

    fn kept(uses: Uses) -> String {
        why_kept(&r(), &uses).expect("kept")
    }

    #[test]
    fn a_release_nothing_reads_may_go() {
        assert_eq!(why_kept(&r(), &Uses::default()), None);
        // A finished rollout sends nothing more.
        for state in [
            RolloutState::Completed,
            RolloutState::Cancelled {
                reason: "by admin".into(),
            },
        ] {
            let uses = Uses {
                rollout: Some(state),
                ..Uses::default()
            };
            assert_eq!(why_kept(&r(), &uses), None);
        }
    }

    #[test]
    fn each_use_keeps_it_and_says_what_to_do() {
        let desired = kept(Uses {
            desired_on: vec![Target::Group(g("g1")), Target::Machine(m("vm-1"))],
            ..Uses::default()
        });
        assert!(
            desired.contains("wants on group g1, machine vm-1")
                && desired.contains("publish a newer app release there"),
            "{desired}"
        );
        let rollout = kept(Uses {
            rollout: Some(RolloutState::Paused {
                reason: "failures".into(),
            }),
            ..Uses::default()
        });
        assert!(
            rollout.contains("rollout is paused")
                && rollout.contains("fleetcast rollout cancel r-000002"),
            "{rollout}"
        );
        let working = kept(Uses {
            working: vec![(m("vm-1"), Phase::Downloading)],
            ..Uses::default()
        });
        assert!(
            working.starts_with("1 machine (vm-1) is still working on it (first: downloading)"),
            "{working}"
        );
        let current = kept(Uses {
            current_of: (0..7).map(|i| m(&format!("vm-{i}"))).collect(),
            ..Uses::default()
        });
        assert!(
            current.contains(
                "current app release of 7 machines (vm-0, vm-1, vm-2, vm-3, vm-4 and 2 more)"
            ),
            "{current}"
        );
        let rollback = kept(Uses {
            rollback_of: vec![(g("g1"), RollbackRead::To)],
            ..Uses::default()
        });
        assert!(
            rollback.contains("`fleetcast rollback --group g1 --kind app` rolls back to it"),
            "{rollback}"
        );
        // Every reason at once.
        let all = kept(Uses {
            desired_on: vec![Target::Group(g("g1"))],
            current_of: vec![m("vm-1")],
            rollback_of: vec![(g("g1"), RollbackRead::From)],
            ..Uses::default()
        });
        assert_eq!(all.matches("; ").count(), 2, "{all}");
    }
}
