//! Who may publish and subscribe where: the broker-side half of fleetcast's security.
//!
//! Message-level trust (signatures, MACs, verified chunks) protects integrity on any broker.
//! This policy protects availability and confidentiality at the broker: a client holding one
//! machine's credentials can publish only that machine's reports and read only that machine's,
//! its groups' and artifact-broadcast topics. The embedded broker's gateway enforces it on every
//! packet; the Mosquitto files fleetcast generates express the same policy.
//!
//! Broker usernames name the principal:
//!
//! | username | principal | client ids it may use |
//! |---|---|---|
//! | `fleetcast-platform` | the platform service | `fleetcast-platform` or `fleetcast-platform.<s>` |
//! | `fleetcast-op-<name>` | operator `<name>` (role from the platform's store) | the username, or `<username>.<s>` |
//! | `fleetcast-int-<name>` | integrator `<name>` (read-only) | the username, or `<username>.<s>` |
//! | anything else | the machine with that id | exactly the machine id |
//!
//! `<s>` is a session suffix (`[A-Za-z0-9_-]{1,32}`), so one operator can run several CLI
//! commands at once. Operator and integrator names use `[A-Za-z0-9_-]{1,40}`: no dot, so the
//! suffix is unambiguous.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{ArtifactId, GroupId, MachineId};
use crate::topics::Topics;

/// Username prefix of operators.
pub const OPERATOR_PREFIX: &str = "fleetcast-op-";
/// Username prefix of integrators.
pub const INTEGRATOR_PREFIX: &str = "fleetcast-int-";
/// Username of the platform service.
pub const PLATFORM_USER: &str = "fleetcast-platform";
/// Longest operator or integrator name.
pub const MAX_NAME_LEN: usize = 40;

/// What an operator may do. Ordered: each role may do everything the roles before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything the platform records; changes nothing.
    Viewer,
    /// Uploads artifacts, creates and publishes releases, rolls back, activates.
    Operator,
    /// Everything, plus identities (machines, operators, integrators) and keys.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "unknown role {s:?}: expected viewer, operator or admin"
            )),
        }
    }
}

/// Checks an operator or integrator name: `[A-Za-z0-9_-]{1,40}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name {name:?} must be 1 to {MAX_NAME_LEN} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        return Err(format!(
            "name {name:?} has character {c:?}; allowed are A-Z a-z 0-9 _ -"
        ));
    }
    Ok(())
}

/// Who a broker client is, once its credentials have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Platform,
    Operator { name: String, role: Role },
    Integrator { name: String },
    Machine { id: MachineId, groups: Vec<GroupId> },
}

/// What a username claims to be, before the credentials are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Platform,
    Operator(String),
    Integrator(String),
    Machine(MachineId),
}

impl Claim {
    /// Parses a broker username. `None` for a name no principal can have.
    pub fn parse(username: &str) -> Option<Claim> {
        if username == PLATFORM_USER {
            return Some(Claim::Platform);
        }
        if let Some(name) = username.strip_prefix(OPERATOR_PREFIX) {
            return validate_name(name)
                .ok()
                .map(|_| Claim::Operator(name.to_owned()));
        }
        if let Some(name) = username.strip_prefix(INTEGRATOR_PREFIX) {
            return validate_name(name)
                .ok()
                .map(|_| Claim::Integrator(name.to_owned()));
        }
        // Every other fleetcast- name is reserved.
        if username.starts_with("fleetcast-") {
            return None;
        }
        MachineId::new(username).ok().map(Claim::Machine)
    }
}

/// The broker username of an operator.
pub fn operator_username(name: &str) -> String {
    format!("{OPERATOR_PREFIX}{name}")
}

/// The broker username of an integrator.
pub fn integrator_username(name: &str) -> String {
    format!("{INTEGRATOR_PREFIX}{name}")
}

/// The operator a client id belongs to (`fleetcast-op-<name>` or `fleetcast-op-<name>.<s>`).
pub fn operator_of_client(client_id: &str) -> Option<&str> {
    name_of_client(OPERATOR_PREFIX, client_id)
}

/// The integrator a client id belongs to (`fleetcast-int-<name>[.<s>]`).
pub fn integrator_of_client(client_id: &str) -> Option<&str> {
    name_of_client(INTEGRATOR_PREFIX, client_id)
}

fn name_of_client<'a>(prefix: &str, client_id: &'a str) -> Option<&'a str> {
    let rest = client_id.strip_prefix(prefix)?;
    let name = match rest.split_once('.') {
        Some((name, suffix)) if is_session_suffix(suffix) => name,
        Some(_) => return None,
        None => rest,
    };
    validate_name(name).ok().map(|_| name)
}

fn is_session_suffix(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

impl Principal {
    /// The broker username this principal connects with.
    pub fn username(&self) -> String {
        match self {
            Principal::Platform => PLATFORM_USER.to_owned(),
            Principal::Operator { name, .. } => operator_username(name),
            Principal::Integrator { name } => integrator_username(name),
            Principal::Machine { id, .. } => id.to_string(),
        }
    }

    /// Whether this principal may connect with `client_id`. Machines must use their own id, so
    /// no client can take over another's session.
    pub fn accepts_client_id(&self, client_id: &str) -> bool {
        let user = self.username();
        match self {
            Principal::Machine { .. } => client_id == user,
            _ => {
                client_id == user
                    || client_id
                        .strip_prefix(user.as_str())
                        .and_then(|rest| rest.strip_prefix('.'))
                        .is_some_and(is_session_suffix)
            }
        }
    }

    /// Whether this principal, connected as `client_id`, may publish on `topic`.
    pub fn may_publish(&self, topics: &Topics, client_id: &str, topic: &str) -> bool {
        if topic.contains(['+', '#']) {
            return false;
        }
        let Some(rest) = under_prefix(topics, topic) else {
            return matches!(self, Principal::Platform);
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match self {
            Principal::Platform => true,
            Principal::Machine { id, .. } => {
                matches!(
                    parts.as_slice(),
                    ["machines", m, "status" | "state" | "online"] if *m == id.as_str()
                ) || matches!(
                    parts.as_slice(),
                    ["machines", m, "chunks", "get"] if *m == id.as_str()
                )
            }
            Principal::Operator { .. } => matches!(
                parts.as_slice(),
                ["admin", c, "request" | "upload"] if *c == client_id
            ),
            Principal::Integrator { .. } => matches!(
                parts.as_slice(),
                ["integrators", c, "events", "get"] if *c == client_id
            ),
        }
    }

    /// The group whose notices `filter` asks for, when this is a machine and the group (a valid
    /// group id) is not one of its own: what an agent whose config still names a group the
    /// platform removed it from subscribes to. The embedded broker refuses such a filter in the
    /// SUBACK and keeps the connection (nothing of that group is delivered either way).
    pub fn foreign_group_filter<'f>(&self, topics: &Topics, filter: &'f str) -> Option<&'f str> {
        let Principal::Machine { groups, .. } = self else {
            return None;
        };
        let rest = under_prefix(topics, filter)?;
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            ["groups", g, "release", "+"]
                if GroupId::new(*g).is_ok() && !groups.iter().any(|mine| mine.as_str() == *g) =>
            {
                Some(*g)
            }
            _ => None,
        }
    }

    /// Whether this principal, connected as `client_id`, may subscribe to `filter`. A `+` in
    /// the filter is allowed only where this principal may read every topic it matches; `#`
    /// only for the platform.
    pub fn may_subscribe(&self, topics: &Topics, client_id: &str, filter: &str) -> bool {
        if matches!(self, Principal::Platform) {
            return true;
        }
        let Some(rest) = under_prefix(topics, filter) else {
            return false;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.iter().any(|p| p.contains('#')) {
            return false;
        }
        // A wildcard may only stand for a whole level.
        if parts.iter().any(|p| p.contains('+') && *p != "+") {
            return false;
        }
        let integrator_topics = |parts: &[&str]| match parts {
            ["events"] | ["platform", "keys"] => true,
            ["rollouts", r, "progress"] => *r == "+" || MachineId::new(*r).is_ok(),
            _ => false,
        };
        match self {
            Principal::Platform => true,
            Principal::Machine { id, groups } => {
                let me = id.as_str();
                // Only the protocol's own filters, each served by the embedded broker's gateway
                // (none reaches rumqttd): a release topic is read through its `+` filter only.
                // Concrete kinds were each a filter of their own on rumqttd, which keeps a log
                // per filter for ever and matches every new one on its one router thread: one
                // machine subscribing to a million kinds took `serve` to 5.7 GB and stalled
                // the broker for the fleet.
                match parts.as_slice() {
                    ["machines", m, "release", "+"] => *m == me,
                    ["machines", m, "command" | "chunks"] => *m == me,
                    ["machines", m, "status", "ack"] => *m == me,
                    ["groups", g, "release", "+"] => groups.iter().any(|mine| mine.as_str() == *g),
                    // A concrete artifact only: a wildcard would read every broadcast.
                    ["artifacts", a, "chunks"] => a.parse::<ArtifactId>().is_ok(),
                    ["platform", "keys"] => true,
                    _ => false,
                }
            }
            Principal::Operator { .. } => match parts.as_slice() {
                ["admin", c, "response"] => *c == client_id,
                p => integrator_topics(p),
            },
            Principal::Integrator { .. } => match parts.as_slice() {
                ["integrators", c, "events"] => *c == client_id,
                p => integrator_topics(p),
            },
        }
    }
}

fn under_prefix<'a>(topics: &Topics, topic: &'a str) -> Option<&'a str> {
    topic.strip_prefix(topics.prefix())?.strip_prefix('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, groups: &[&str]) -> Principal {
        Principal::Machine {
            id: MachineId::new(id).unwrap(),
            groups: groups.iter().map(|g| GroupId::new(*g).unwrap()).collect(),
        }
    }

    #[test]
    fn a_machines_filter_for_a_group_it_is_not_in_is_foreign_and_nothing_else_is() {
        let vm = machine("vm-1", &["north"]);
        fn foreign<'f>(p: &Principal, f: &'f str) -> Option<&'f str> {
            p.foreign_group_filter(&Topics::default(), f)
        }
        assert_eq!(foreign(&vm, "fleet/groups/south/release/+"), Some("south"));
        for not in [
            "fleet/groups/north/release/+",   // its own
            "fleet/groups/+/release/+",       // not a group id: a violation
            "fleet/groups/south/release/app", // not the protocol's filter
            "fleet/machines/vm-2/release/+",  // another machine
            "other/groups/south/release/+",   // another prefix
        ] {
            assert_eq!(foreign(&vm, not), None, "{not}");
        }
        assert_eq!(
            foreign(&Principal::Platform, "fleet/groups/south/release/+"),
            None
        );
    }

    #[test]
    fn usernames_name_their_principal_and_reserved_names_name_none() {
        assert_eq!(Claim::parse("fleetcast-platform"), Some(Claim::Platform));
        assert_eq!(
            Claim::parse("fleetcast-op-alice"),
            Some(Claim::Operator("alice".into()))
        );
        assert_eq!(
            Claim::parse("fleetcast-int-erp"),
            Some(Claim::Integrator("erp".into()))
        );
        assert_eq!(
            Claim::parse("vm-001"),
            Some(Claim::Machine(MachineId::new("vm-001").unwrap()))
        );
        for bad in [
            "fleetcast-x",
            "fleetcast-op-a.b",
            "fleetcast-op-",
            "a/b",
            "",
        ] {
            assert_eq!(Claim::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn machines_must_use_their_own_client_id_and_operators_may_add_a_session_suffix() {
        let m = machine("vm-1", &[]);
        assert!(m.accepts_client_id("vm-1"));
        assert!(!m.accepts_client_id("vm-1.x"));
        assert!(!m.accepts_client_id("vm-2"));
        let op = Principal::Operator {
            name: "alice".into(),
            role: Role::Viewer,
        };
        assert!(op.accepts_client_id("fleetcast-op-alice"));
        assert!(op.accepts_client_id("fleetcast-op-alice.1a2b3c4d"));
        assert!(!op.accepts_client_id("fleetcast-op-alice2"));
        assert!(!op.accepts_client_id("fleetcast-op-alice."));
        assert!(!op.accepts_client_id("fleetcast-op-alice.a.b"));
        assert!(!op.accepts_client_id("fleetcast-op-bob.1"));
    }

    #[test]
    fn a_machine_publishes_only_its_own_reports() {
        let t = Topics::default();
        let m = machine("vm-1", &["shanghai"]);
        for ok in [
            "fleet/machines/vm-1/status",
            "fleet/machines/vm-1/state",
            "fleet/machines/vm-1/online",
            "fleet/machines/vm-1/chunks/get",
        ] {
            assert!(m.may_publish(&t, "vm-1", ok), "{ok}");
        }
        for bad in [
            "fleet/machines/vm-2/status",
            "fleet/machines/vm-2/online",
            "fleet/machines/vm-1/release/app",
            "fleet/groups/shanghai/release/app",
            "fleet/machines/vm-1/status/ack",
            "fleet/machines/vm-1/chunks",
            "fleet/admin/vm-1/request",
            "fleet/admin/fleetcast-op-a/response",
            "fleet/events",
            "fleet/rollouts/r-1/progress",
            "fleet/platform/keys",
            "other/machines/vm-1/status",
            "fleet/machines/+/status",
        ] {
            assert!(!m.may_publish(&t, "vm-1", bad), "{bad}");
        }
    }

    #[test]
    fn a_machine_reads_only_its_own_its_groups_and_concrete_artifact_topics() {
        let t = Topics::default();
        let m = machine("vm-1", &["shanghai"]);
        let a = ArtifactId::of(b"x");
        for ok in [
            "fleet/machines/vm-1/release/+".to_owned(),
            "fleet/machines/vm-1/command".to_owned(),
            "fleet/machines/vm-1/status/ack".to_owned(),
            "fleet/machines/vm-1/chunks".to_owned(),
            "fleet/groups/shanghai/release/+".to_owned(),
            format!("fleet/artifacts/{a}/chunks"),
            "fleet/platform/keys".to_owned(),
        ] {
            assert!(m.may_subscribe(&t, "vm-1", &ok), "{ok}");
        }
        for bad in [
            "#",
            "fleet/#",
            "fleet/+/vm-1/command",
            "fleet/machines/+/command",
            "fleet/machines/vm-2/release/+",
            "fleet/machines/vm-1/status",
            "fleet/machines/vm-1/chunks/get",
            "fleet/groups/beijing/release/+",
            "fleet/groups/+/release/+",
            "fleet/artifacts/+/chunks",
            "fleet/admin/+/response",
            "fleet/events",
            "fleet/rollouts/+/progress",
            "fleet/machines/vm-1/release/a+",
            "fleet/machines/vm-1/release/#",
            // A concrete kind: the `+` filter reads them all, served by the gateway.
            "fleet/machines/vm-1/release/app",
            "fleet/groups/shanghai/release/app",
        ] {
            assert!(!m.may_subscribe(&t, "vm-1", bad), "{bad}");
        }
    }

    #[test]
    fn operators_use_only_their_own_admin_topics_and_integrators_only_read() {
        let t = Topics::default();
        let op = Principal::Operator {
            name: "alice".into(),
            role: Role::Admin,
        };
        let c = "fleetcast-op-alice.1234";
        assert!(op.may_publish(&t, c, &format!("fleet/admin/{c}/request")));
        assert!(op.may_publish(&t, c, &format!("fleet/admin/{c}/upload")));
        assert!(op.may_subscribe(&t, c, &format!("fleet/admin/{c}/response")));
        assert!(op.may_subscribe(&t, c, "fleet/events"));
        assert!(!op.may_publish(&t, c, "fleet/admin/fleetcast-op-bob/request"));
        assert!(!op.may_subscribe(&t, c, "fleet/admin/+/response"));
        assert!(!op.may_publish(&t, c, "fleet/machines/vm-1/release/app"));
        assert!(!op.may_subscribe(&t, c, "fleet/machines/vm-1/chunks"));

        let int = Principal::Integrator { name: "erp".into() };
        let c = "fleetcast-int-erp";
        for ok in [
            "fleet/events",
            "fleet/rollouts/+/progress",
            "fleet/rollouts/r-000001/progress",
            "fleet/platform/keys",
            "fleet/integrators/fleetcast-int-erp/events",
        ] {
            assert!(int.may_subscribe(&t, c, ok), "{ok}");
        }
        assert!(int.may_publish(&t, c, "fleet/integrators/fleetcast-int-erp/events/get"));
        for bad in [
            "fleet/events",
            "fleet/rollouts/r-1/progress",
            "fleet/machines/vm-1/online",
            "fleet/integrators/fleetcast-int-other/events/get",
        ] {
            assert!(!int.may_publish(&t, c, bad), "{bad}");
        }
        for bad in [
            "fleet/#",
            "fleet/machines/+/status",
            "fleet/admin/+/response",
        ] {
            assert!(!int.may_subscribe(&t, c, bad), "{bad}");
        }
    }

    #[test]
    fn the_operator_is_read_from_the_client_id() {
        assert_eq!(operator_of_client("fleetcast-op-alice"), Some("alice"));
        assert_eq!(operator_of_client("fleetcast-op-alice.1f2e"), Some("alice"));
        assert_eq!(operator_of_client("fleetcast-op-alice.a.b"), None);
        assert_eq!(operator_of_client("fleetcast-int-alice"), None);
        assert_eq!(operator_of_client("vm-1"), None);
        assert_eq!(integrator_of_client("fleetcast-int-erp.x"), Some("erp"));
        assert_eq!(integrator_of_client("fleetcast-op-erp"), None);
    }

    #[test]
    fn roles_are_ordered_and_parse_from_their_names() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(r.to_string().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().is_err());
    }
}
