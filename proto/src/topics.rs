//! The topic scheme: builders for every topic and a parser that turns a received topic back into
//! a typed [`Route`]. The prefix (default `fleet`) is configurable so several fleets can share a
//! broker.

use crate::ids::{ArtifactId, GroupId, Kind, MachineId};
use crate::release::Target;

/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "fleet";

/// Builds and parses topics under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

/// A topic the platform or a machine receives, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    MachineRelease(MachineId, Kind),
    GroupRelease(GroupId, Kind),
    Command(MachineId),
    MachineChunks(MachineId),
    ArtifactChunks(ArtifactId),
    ChunkRequest(MachineId),
    Status(MachineId),
    StatusAck(MachineId),
    State(MachineId),
    Online(MachineId),
    AdminRequest(String),
    AdminResponse(String),
    AdminUpload(String),
    RolloutProgress(String),
    Events,
    /// An integrator asks for stored events (`integrators/{client}/events/get`).
    IntegratorEventsGet(String),
    /// The platform's answer to an integrator (`integrators/{client}/events`).
    IntegratorEvents(String),
    /// The retained chain of platform signing keys.
    PlatformKeys,
}

/// One of the release filters a machine subscribes with, parsed: every kind's notice for one
/// target ([`Topics::machine_release_filter`], [`Topics::group_release_filter`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseFilter {
    Machine(MachineId),
    Group(GroupId),
}

impl Default for Topics {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Topics {
    /// `prefix` must be non-empty and hold no wildcard; a trailing `/` is dropped.
    pub fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        assert!(
            !prefix.is_empty() && !prefix.contains(['+', '#']),
            "topic prefix {prefix:?} must be non-empty and hold no wildcard"
        );
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn machine_release(&self, m: &MachineId, kind: &Kind) -> String {
        format!("{}/machines/{m}/release/{kind}", self.prefix)
    }
    pub fn group_release(&self, g: &GroupId, kind: &Kind) -> String {
        format!("{}/groups/{g}/release/{kind}", self.prefix)
    }
    /// The release topic a notice for `target` is published on.
    pub fn release(&self, target: &Target, kind: &Kind) -> String {
        match target {
            Target::Machine(m) => self.machine_release(m, kind),
            Target::Group(g) => self.group_release(g, kind),
        }
    }
    /// Every release topic of one machine: subscribe with this.
    pub fn machine_release_filter(&self, m: &MachineId) -> String {
        format!("{}/machines/{m}/release/+", self.prefix)
    }
    pub fn group_release_filter(&self, g: &GroupId) -> String {
        format!("{}/groups/{g}/release/+", self.prefix)
    }
    pub fn command(&self, m: &MachineId) -> String {
        format!("{}/machines/{m}/command", self.prefix)
    }
    pub fn machine_chunks(&self, m: &MachineId) -> String {
        format!("{}/machines/{m}/chunks", self.prefix)
    }
    pub fn artifact_chunks(&self, a: &ArtifactId) -> String {
        format!("{}/artifacts/{a}/chunks", self.prefix)
    }
    pub fn chunk_request(&self, m: &MachineId) -> String {
        format!("{}/machines/{m}/chunks/get", self.prefix)
    }
    pub fn status(&self, m: &MachineId) -> String {
        format!("{}/machines/{m}/status", self.prefix)
    }
    /// Acknowledgements of stored status events (MAC'd with the machine's secret), platform ->
    /// machine.
    pub fn status_ack(&self, m: &MachineId) -> String {
        format!("{}/machines/{m}/status/ack", self.prefix)
    }
    pub fn state(&self, m: &MachineId) -> String {
        format!("{}/machines/{m}/state", self.prefix)
    }
    pub fn online(&self, m: &MachineId) -> String {
        format!("{}/machines/{m}/online", self.prefix)
    }
    pub fn admin_request(&self, client: &str) -> String {
        format!("{}/admin/{client}/request", self.prefix)
    }
    pub fn admin_response(&self, client: &str) -> String {
        format!("{}/admin/{client}/response", self.prefix)
    }
    pub fn admin_upload(&self, client: &str) -> String {
        format!("{}/admin/{client}/upload", self.prefix)
    }
    pub fn rollout_progress(&self, release: &str) -> String {
        format!("{}/rollouts/{release}/progress", self.prefix)
    }
    pub fn events(&self) -> String {
        format!("{}/events", self.prefix)
    }
    /// An integrator's request for stored events (integrator -> platform).
    pub fn integrator_events_get(&self, client: &str) -> String {
        format!("{}/integrators/{client}/events/get", self.prefix)
    }
    /// The platform's signed answer to an integrator's request.
    pub fn integrator_events(&self, client: &str) -> String {
        format!("{}/integrators/{client}/events", self.prefix)
    }
    pub fn platform_integrator_request_filter(&self) -> String {
        format!("{}/integrators/+/events/get", self.prefix)
    }
    /// The retained, signed chain of platform keys (key rotation), read by every machine.
    pub fn platform_keys(&self) -> String {
        format!("{}/platform/keys", self.prefix)
    }

    /// Filters the platform subscribes to for what machines send.
    pub fn platform_status_filter(&self) -> String {
        format!("{}/machines/+/status", self.prefix)
    }
    pub fn platform_state_filter(&self) -> String {
        format!("{}/machines/+/state", self.prefix)
    }
    pub fn platform_online_filter(&self) -> String {
        format!("{}/machines/+/online", self.prefix)
    }
    pub fn platform_chunk_request_filter(&self) -> String {
        format!("{}/machines/+/chunks/get", self.prefix)
    }
    /// The filters that may carry bulk chunk frames (brokers size their logs for these). The
    /// platform sends every chunk and manifest frame to the artifact's topic and only error
    /// frames to a machine's own; a log takes memory only for what it holds, so sizing both
    /// costs nothing while a machine's own topic stays quiet.
    pub fn chunk_filters(&self) -> Vec<String> {
        vec![
            format!("{}/machines/+/chunks", self.prefix),
            format!("{}/artifacts/+/chunks", self.prefix),
        ]
    }
    /// Every filter that carries bulk frames: the chunk topics and operators' upload parts
    /// (up to 32 parts of 64 KiB in flight per upload).
    pub fn bulk_filters(&self) -> Vec<String> {
        let mut all = self.chunk_filters();
        all.push(self.platform_admin_upload_filter());
        all
    }
    /// The platform's wildcard subscriptions for small messages: one filter each for what
    /// every machine, operator and integrator sends, so each must hold the platform's backlog.
    pub fn platform_inbound_filters(&self) -> Vec<String> {
        vec![
            self.platform_status_filter(),
            self.platform_state_filter(),
            self.platform_online_filter(),
            self.platform_chunk_request_filter(),
            self.platform_admin_request_filter(),
            self.platform_integrator_request_filter(),
        ]
    }
    /// The inbound filters that take a whole fleet's message at once when it (re)connects
    /// together: states and `online`.
    pub fn platform_burst_filters(&self) -> Vec<String> {
        vec![self.platform_state_filter(), self.platform_online_filter()]
    }
    pub fn platform_admin_request_filter(&self) -> String {
        format!("{}/admin/+/request", self.prefix)
    }
    pub fn platform_admin_upload_filter(&self) -> String {
        format!("{}/admin/+/upload", self.prefix)
    }

    /// Parses a topic under this prefix. `None` for anything that is not one of ours or that
    /// holds an invalid id: such messages are dropped (and logged) by the caller.
    pub fn parse(&self, topic: &str) -> Option<Route> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let machine = |s: &str| MachineId::new(s).ok();
        let route = match parts.as_slice() {
            ["machines", m, "release", k] => {
                Route::MachineRelease(machine(m)?, Kind::new(*k).ok()?)
            }
            ["groups", g, "release", k] => {
                Route::GroupRelease(GroupId::new(*g).ok()?, Kind::new(*k).ok()?)
            }
            ["machines", m, "command"] => Route::Command(machine(m)?),
            ["machines", m, "chunks"] => Route::MachineChunks(machine(m)?),
            ["machines", m, "chunks", "get"] => Route::ChunkRequest(machine(m)?),
            ["machines", m, "status"] => Route::Status(machine(m)?),
            ["machines", m, "status", "ack"] => Route::StatusAck(machine(m)?),
            ["machines", m, "state"] => Route::State(machine(m)?),
            ["machines", m, "online"] => Route::Online(machine(m)?),
            ["artifacts", a, "chunks"] => Route::ArtifactChunks(a.parse().ok()?),
            ["admin", c, "request"] => Route::AdminRequest(valid_client(c)?),
            ["admin", c, "response"] => Route::AdminResponse(valid_client(c)?),
            ["admin", c, "upload"] => Route::AdminUpload(valid_client(c)?),
            ["rollouts", r, "progress"] => Route::RolloutProgress(valid_client(r)?),
            ["events"] => Route::Events,
            ["integrators", c, "events", "get"] => Route::IntegratorEventsGet(valid_client(c)?),
            ["integrators", c, "events"] => Route::IntegratorEvents(valid_client(c)?),
            ["platform", "keys"] => Route::PlatformKeys,
            _ => return None,
        };
        Some(route)
    }
}

impl Topics {
    /// Parses one of the release filters machines subscribe with (exactly as
    /// [`Topics::machine_release_filter`] and [`Topics::group_release_filter`] build them).
    /// `None` for any other filter.
    pub fn parse_release_filter(&self, filter: &str) -> Option<ReleaseFilter> {
        let rest = filter.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            ["machines", m, "release", "+"] => MachineId::new(*m).ok().map(ReleaseFilter::Machine),
            ["groups", g, "release", "+"] => GroupId::new(*g).ok().map(ReleaseFilter::Group),
            _ => None,
        }
    }
}

fn valid_client(s: &str) -> Option<String> {
    MachineId::new(s).ok().map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MachineId {
        MachineId::new(s).unwrap()
    }

    #[test]
    fn every_built_topic_parses_back_to_its_route() {
        let t = Topics::default();
        let k = Kind::new("app").unwrap();
        let g = GroupId::new("shanghai").unwrap();
        let a = ArtifactId::of(b"x");
        let cases = [
            (
                t.machine_release(&m("vm-1"), &k),
                Route::MachineRelease(m("vm-1"), k.clone()),
            ),
            (
                t.group_release(&g, &k),
                Route::GroupRelease(g.clone(), k.clone()),
            ),
            (t.command(&m("vm-1")), Route::Command(m("vm-1"))),
            (
                t.machine_chunks(&m("vm-1")),
                Route::MachineChunks(m("vm-1")),
            ),
            (t.artifact_chunks(&a), Route::ArtifactChunks(a)),
            (t.chunk_request(&m("vm-1")), Route::ChunkRequest(m("vm-1"))),
            (t.status(&m("vm-1")), Route::Status(m("vm-1"))),
            (t.status_ack(&m("vm-1")), Route::StatusAck(m("vm-1"))),
            (t.state(&m("vm-1")), Route::State(m("vm-1"))),
            (t.online(&m("vm-1")), Route::Online(m("vm-1"))),
            (
                t.admin_request("cli-1"),
                Route::AdminRequest("cli-1".into()),
            ),
            (
                t.admin_response("cli-1"),
                Route::AdminResponse("cli-1".into()),
            ),
            (t.admin_upload("cli-1"), Route::AdminUpload("cli-1".into())),
            (
                t.rollout_progress("r-1"),
                Route::RolloutProgress("r-1".into()),
            ),
            (t.events(), Route::Events),
            (
                t.integrator_events_get("fleetcast-int-erp"),
                Route::IntegratorEventsGet("fleetcast-int-erp".into()),
            ),
            (
                t.integrator_events("fleetcast-int-erp"),
                Route::IntegratorEvents("fleetcast-int-erp".into()),
            ),
            (t.platform_keys(), Route::PlatformKeys),
        ];
        for (topic, route) in cases {
            assert_eq!(t.parse(&topic), Some(route), "{topic}");
        }
    }

    #[test]
    fn topics_are_the_documented_strings() {
        let t = Topics::default();
        let app = Kind::new("app").unwrap();
        assert_eq!(
            t.release(&Target::Machine(m("vm-1")), &app),
            "fleet/machines/vm-1/release/app"
        );
        assert_eq!(
            t.release(&Target::Group(GroupId::new("g").unwrap()), &app),
            "fleet/groups/g/release/app"
        );
        assert_eq!(
            t.chunk_filters(),
            vec!["fleet/machines/+/chunks", "fleet/artifacts/+/chunks"]
        );
        assert!(t
            .platform_inbound_filters()
            .contains(&"fleet/machines/+/status".to_owned()));
        assert!(t
            .bulk_filters()
            .contains(&"fleet/admin/+/upload".to_owned()));
        assert_eq!(t.status(&m("vm-001")), "fleet/machines/vm-001/status");
        assert_eq!(
            t.group_release(&GroupId::new("g").unwrap(), &Kind::new("firmware").unwrap()),
            "fleet/groups/g/release/firmware"
        );
        assert_eq!(t.platform_status_filter(), "fleet/machines/+/status");
    }

    #[test]
    fn release_filters_parse_back_and_nothing_else_does() {
        let t = Topics::default();
        let g = GroupId::new("g-1").unwrap();
        assert_eq!(
            t.parse_release_filter(&t.machine_release_filter(&m("vm-1"))),
            Some(ReleaseFilter::Machine(m("vm-1")))
        );
        assert_eq!(
            t.parse_release_filter(&t.group_release_filter(&g)),
            Some(ReleaseFilter::Group(g))
        );
        for other in [
            "fleet/machines/vm-1/release/app",
            "fleet/machines/+/release/+",
            "fleet/machines/vm-1/release/#",
            "fleet/groups/a b/release/+",
            "other/groups/g/release/+",
            "fleet/machines/vm-1/command",
        ] {
            assert_eq!(t.parse_release_filter(other), None, "{other}");
        }
    }

    #[test]
    fn foreign_or_malformed_topics_do_not_parse() {
        let t = Topics::new("fleet/");
        for bad in [
            "other/machines/vm-1/status",
            "fleet/machines/vm-1/status/extra",
            "fleet/machines//status",
            "fleet/machines/a b/status",
            "fleet/artifacts/nothex/chunks",
            "fleetx/machines/vm-1/status",
            "fleet",
        ] {
            assert_eq!(t.parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_custom_prefix_is_honoured() {
        let t = Topics::new("acme/prod");
        let topic = t.status(&m("vm-1"));
        assert_eq!(topic, "acme/prod/machines/vm-1/status");
        assert_eq!(t.parse(&topic), Some(Route::Status(m("vm-1"))));
        assert_eq!(Topics::default().parse(&topic), None);
    }
}
