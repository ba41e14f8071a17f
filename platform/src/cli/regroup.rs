//! `fleetcast machine groups`: one machine (the `machine_groups` op, which every platform
//! since groups could change knows), or many named, listed in a file or read from a group's
//! members (`machine_groups_batch`, at most [`MAX_GROUPS_BATCH`] a request, after a
//! confirmation).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleetcast_broker::admin::AdminError;
use fleetcast_proto::admin::{MachineFilter, MAX_GROUPS_BATCH};
use fleetcast_proto::calls;
use fleetcast_proto::{GroupId, MachineId};

use super::{confirm, ClientArgs};

/// What every change of groups is followed by, on the machine and on an external broker.
const AFTERWARDS: &str = "the agent follows its new groups by itself (an agent older than 2026-11-29 follows the `groups` of its config: make them match and restart it); on Mosquitto, regenerate the ACL (fleetcast broker mosquitto-config) and reload it";

/// How many machines the confirmation names.
const SHOWN: usize = 5;

/// The machines a `machine groups` command names.
pub struct Selection {
    pub machines: Vec<MachineId>,
    /// Every machine in this group, read before the first change.
    pub members_of: Option<GroupId>,
    /// One machine id per line.
    pub from_file: Option<PathBuf>,
}

impl Selection {
    /// One machine named and nothing else: the single-machine op serves it.
    fn single(&self) -> Option<&MachineId> {
        match self.machines.as_slice() {
            [one] if self.members_of.is_none() && self.from_file.is_none() => Some(one),
            _ => None,
        }
    }

    /// Whether, run again after some batches, the selection names only the machines not
    /// changed yet: the members of a group they leave, and nothing else.
    fn rereads_only_the_rest(&self, remove: &[GroupId]) -> bool {
        let leaving = |g: &GroupId| remove.contains(g);
        self.machines.is_empty()
            && self.from_file.is_none()
            && self.members_of.as_ref().is_some_and(leaving)
    }
}

pub async fn run(
    selection: Selection,
    add: Vec<GroupId>,
    remove: Vec<GroupId>,
    yes: bool,
    client: &ClientArgs,
) -> anyhow::Result<()> {
    if let Some(machine) = selection.single() {
        let message = client
            .call(calls::MachineGroups {
                machine: machine.clone(),
                add,
                remove,
            })
            .await?;
        println!("{message}\n{AFTERWARDS}");
        return Ok(());
    }
    let from_file = match &selection.from_file {
        Some(file) => read_machine_ids(file)?,
        None => Vec::new(),
    };
    // Read whole before the first change: `--members-of G --remove G` empties G as it goes.
    let members = match &selection.members_of {
        Some(group) => members_of(client, group).await?,
        None => Vec::new(),
    };
    let rerun_same = remove.is_empty() || selection.rereads_only_the_rest(&remove);
    let machines = union([selection.machines, from_file, members]);
    if machines.is_empty() {
        println!("no machine to change: nothing was done");
        return Ok(());
    }
    println!("{}", plan_text(&machines, &add, &remove));
    let question = format!("Change the groups of {} machine(s)?", machines.len());
    if !confirm(&question, yes)? {
        anyhow::bail!("nothing was changed");
    }
    let admin = client.connect().await?;
    let mut moved = 0;
    let mut result = Ok(());
    for batch in machines.chunks(MAX_GROUPS_BATCH) {
        let call = calls::MachineGroupsBatch {
            machines: batch.to_vec(),
            add: add.clone(),
            remove: remove.clone(),
        };
        match admin.call(call).await {
            Ok(message) => {
                println!("{message}");
                moved += batch.len();
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    admin.close().await;
    if let Err(e) = result {
        if let AdminError::UnknownOp { .. } = e {
            return Err(anyhow::Error::from(e).context(
                "this platform moves one machine per request: update it, or run `fleetcast machine groups ID --add .. --remove ..` for each machine",
            ));
        }
        let e = anyhow::Error::from(e);
        if moved == 0 {
            return Err(e);
        }
        return Err(e.context(partly_moved(&machines, moved, rerun_same)));
    }
    println!("{AFTERWARDS}");
    Ok(())
}

/// Every machine in `group` now, page by page (`machine_query`, as `fleetcast machines
/// --group` reads them).
async fn members_of(client: &ClientArgs, group: &GroupId) -> anyhow::Result<Vec<MachineId>> {
    let filter = MachineFilter {
        group: Some(group.clone()),
        ..Default::default()
    };
    let machines = super::machines::query(client, filter)
        .await
        .with_context(|| format!("reading the machines of group {group}"))?;
    Ok(machines.into_iter().map(|m| m.id).collect())
}

fn read_machine_ids(file: &Path) -> anyhow::Result<Vec<MachineId>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    parse_machine_ids(&text).with_context(|| format!("{}", file.display()))
}

/// A list of machine ids, one per line; `#` starts a comment, blank lines are skipped, and an
/// id listed twice is refused (as in a `provision --from-file` list).
pub fn parse_machine_ids(text: &str) -> anyhow::Result<Vec<MachineId>> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (line, at) in super::machines::list_lines(text) {
        let machine = MachineId::new(line).with_context(|| format!("line {at}"))?;
        anyhow::ensure!(
            seen.insert(machine.clone()),
            "line {at}: {machine} is listed twice"
        );
        out.push(machine);
    }
    Ok(out)
}

/// The machines of every list, each once, in the order first named.
fn union<const N: usize>(lists: [Vec<MachineId>; N]) -> Vec<MachineId> {
    let mut seen = BTreeSet::new();
    lists
        .into_iter()
        .flatten()
        .filter(|m| seen.insert(m.clone()))
        .collect()
}

/// What the command will do, before it is confirmed.
pub fn plan_text(machines: &[MachineId], add: &[GroupId], remove: &[GroupId]) -> String {
    let mut names = machines[..machines.len().min(SHOWN)]
        .iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if machines.len() > SHOWN {
        names.push_str(&format!(" and {} more", machines.len() - SHOWN));
    }
    let mut change = Vec::new();
    if !add.is_empty() {
        change.push(format!("add to {}", groups(add)));
    }
    if !remove.is_empty() {
        change.push(format!("remove from {}", groups(remove)));
    }
    format!(
        "{} machine(s) ({names}): {}; each one's broker session is closed and its agent told its new groups ({} request(s) of at most {MAX_GROUPS_BATCH})",
        machines.len(),
        change.join(", then "),
        machines.len().div_ceil(MAX_GROUPS_BATCH),
    )
}

fn groups(groups: &[GroupId]) -> String {
    groups
        .iter()
        .map(|g| g.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// What a run that failed after its first batch did, and how to go on: the machines of
/// `machines` before `moved` have their new groups. `rerun_same`: the same command would name
/// only the machines not moved yet (or moving one again changes nothing).
pub fn partly_moved(machines: &[MachineId], moved: usize, rerun_same: bool) -> String {
    let total = machines.len();
    let again = if rerun_same {
        "rerun the same command"
    } else {
        "rerun with the remaining machines only (--from-file with the rest of the list)"
    };
    format!(
        "changed the groups of {moved} of {total} machine(s) before this error; the {} from {} on were not changed (if the error was a timeout, `fleetcast machines` shows whether the last batch was): {again}",
        total - moved,
        machines[moved]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MachineId {
        MachineId::new(s).unwrap()
    }

    #[test]
    fn an_id_list_skips_comments_and_blank_lines_and_names_a_bad_or_repeated_line() {
        let ids = parse_machine_ids("# shanghai shops\nvm-001\n\n  vm-002  # corner\n").unwrap();
        assert_eq!(ids, vec![m("vm-001"), m("vm-002")]);
        let err = parse_machine_ids("vm-1\nvm/2\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let err = parse_machine_ids("vm-1\n# again\nvm-1\n").unwrap_err();
        assert_eq!(err.to_string(), "line 3: vm-1 is listed twice");
    }

    #[test]
    fn machines_from_several_sources_are_moved_once_each_in_the_order_named() {
        let got = union([
            vec![m("vm-3"), m("vm-1")],
            vec![m("vm-1"), m("vm-2")],
            vec![m("vm-2"), m("vm-4")],
        ]);
        assert_eq!(got, vec![m("vm-3"), m("vm-1"), m("vm-2"), m("vm-4")]);
    }

    #[test]
    fn one_machine_named_alone_uses_the_single_machine_op() {
        let sel = |machines: Vec<MachineId>, members_of: Option<&str>| Selection {
            machines,
            members_of: members_of.map(|g| GroupId::new(g).unwrap()),
            from_file: None,
        };
        assert_eq!(sel(vec![m("vm-1")], None).single(), Some(&m("vm-1")));
        assert_eq!(sel(vec![m("vm-1"), m("vm-2")], None).single(), None);
        assert_eq!(sel(vec![m("vm-1")], Some("shanghai")).single(), None);
        assert_eq!(sel(vec![], Some("shanghai")).single(), None);
    }

    #[test]
    fn the_command_needs_machines_and_a_change() {
        use clap::Parser;
        let parse = |argv: &[&str]| {
            let base = ["fleetcast", "machine", "groups"];
            crate::cli::Cli::try_parse_from(base.iter().chain(argv)).map(|_| ())
        };
        assert!(parse(&["vm-1", "vm-2", "--add", "g"]).is_ok());
        assert!(parse(&["--members-of", "s", "--remove", "s", "--yes"]).is_ok());
        assert!(parse(&["--from-file", "ids.txt", "--add", "g"]).is_ok());
        assert!(parse(&["--add", "g"]).is_err(), "no machine");
        assert!(parse(&["--members-of", "s"]).is_err(), "no change");
    }

    #[test]
    fn the_plan_counts_the_machines_names_a_few_and_says_how_many_requests() {
        let machines: Vec<MachineId> = (1..=1200).map(|i| m(&format!("vm-{i:04}"))).collect();
        let g = |s: &str| GroupId::new(s).unwrap();
        assert_eq!(
            plan_text(&machines, &[g("east-china")], &[g("shanghai")]),
            "1200 machine(s) (vm-0001, vm-0002, vm-0003, vm-0004, vm-0005 and 1195 more): add to east-china, then remove from shanghai; each one's broker session is closed and its agent told its new groups (2 request(s) of at most 1000)"
        );
    }

    #[test]
    fn a_run_failing_after_its_first_batch_says_how_many_moved_and_how_to_go_on() {
        let machines: Vec<MachineId> = (1..=2500).map(|i| m(&format!("vm-{i:04}"))).collect();
        let text = partly_moved(&machines, 1000, false);
        for want in [
            "changed the groups of 1000 of 2500 machine(s) before this error",
            "the 1500 from vm-1001 on were not changed",
            "rerun with the remaining machines only",
        ] {
            assert!(text.contains(want), "{want} missing: {text}");
        }
        assert!(partly_moved(&machines, 2000, true).ends_with("rerun the same command"));
    }
}
