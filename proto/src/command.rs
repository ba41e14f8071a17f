//! Signed commands on `fleet/machines/{m}/command` (not retained: a command is for now).

use serde::{Deserialize, Serialize};

use crate::ids::{GroupId, MachineId, ReleaseId};

/// What the operator asks one machine to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum CommandAction {
    /// Install a `download_only` release that is downloaded (or download it first).
    Activate { release: ReleaseId },
    /// Stop working on a release that is not installed yet.
    Cancel { release: ReleaseId },
    /// Re-send state and the last status of every kind now.
    Report,
    /// The groups the machine is in on the platform, all of them: it follows these groups'
    /// release topics from now on instead of those of its config (protocol.md §5). Sent when
    /// the machine's state reports other groups than the platform's.
    Groups { groups: Vec<GroupId> },
}

/// The signed body of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub machine: MachineId,
    /// Drawn from the same platform-wide counter as notice `seq`; a machine refuses a command
    /// whose seq is not above the last command it accepted.
    pub seq: u64,
    pub issued_at_ms: u64,
    #[serde(flatten)]
    pub action: CommandAction,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_with_a_flat_action_tag() {
        let c = Command {
            machine: MachineId::new("vm-1").unwrap(),
            seq: 9,
            issued_at_ms: 5,
            action: CommandAction::Activate {
                release: ReleaseId::new("r-1").unwrap(),
            },
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["action"], "activate");
        assert_eq!(json["release"], "r-1");
        assert_eq!(serde_json::from_value::<Command>(json).unwrap(), c);
        let report: Command = serde_json::from_str(
            r#"{"machine":"vm-1","seq":1,"issued_at_ms":0,"action":"report"}"#,
        )
        .unwrap();
        assert_eq!(report.action, CommandAction::Report);
        let groups: Command = serde_json::from_str(
            r#"{"machine":"vm-1","seq":2,"issued_at_ms":0,"action":"groups","groups":["a","b"]}"#,
        )
        .unwrap();
        assert_eq!(
            groups.action,
            CommandAction::Groups {
                groups: vec![GroupId::new("a").unwrap(), GroupId::new("b").unwrap()]
            }
        );
        // Every group is named: an absent list is refused, not read as "no group".
        assert!(serde_json::from_str::<Command>(
            r#"{"machine":"vm-1","seq":2,"issued_at_ms":0,"action":"groups"}"#
        )
        .is_err());
    }
}
