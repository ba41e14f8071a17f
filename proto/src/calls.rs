//! Typed admin calls: one struct per [`AdminOp`] variant, each naming the reply it expects.
//!
//! The wire format is [`AdminOp`] and [`AdminReply`], unchanged: a call is converted into its
//! `AdminOp` before it is sent, and [`Call::reply`] takes the one reply variant that answers
//! it (anything else comes back as `Err`, for the client to report). So a caller writes
//! `client.call(ReleaseCreate { .. }).await?` and gets a [`ReleaseInfo`]
//! record, not an `AdminReply` to match by hand.

use crate::acl::Role;
use crate::admin::*;
use crate::ids::{ArtifactId, GroupId, Kind, MachineId, ReleaseId};
use crate::release::{InstallPolicy, Target};
use crate::rollout::{RolloutReport, WavePlan};

/// One admin operation and the reply that answers it.
pub trait Call: Into<AdminOp> {
    /// What a successful answer carries.
    type Reply;
    /// The wire name of the operation (`"release_publish"`).
    const OP: &'static str;
    /// The wire name of the reply variant expected (`"plan"`; upload steps name two).
    const REPLY: &'static str;
    /// The typed reply, or the reply itself (boxed: it is rare and may be large) when it is
    /// not the one this call expects.
    fn reply(r: AdminReply) -> Result<Self::Reply, Box<AdminReply>>;
    /// The reply on the wire: the inverse of [`Call::reply`] (what the platform sends).
    fn wrap(reply: Self::Reply) -> AdminReply;
}

/// The wire name (`reply` tag) of a reply variant.
pub fn reply_name(r: &AdminReply) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("reply").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "reply".into())
}

macro_rules! calls {
    ($(
        $(#[$doc:meta])*
        $name:ident = $op:literal { $($field:ident : $ty:ty),* $(,)? }
            -> $reply:literal $rty:ty { $pat:pat => $out:expr; $r:ident => $back:expr }
    )*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name { $(pub $field: $ty),* }

        impl From<$name> for AdminOp {
            fn from(c: $name) -> AdminOp {
                #[allow(unused_variables)]
                let $name { $($field),* } = c;
                AdminOp::$name { $($field),* }
            }
        }

        impl Call for $name {
            type Reply = $rty;
            const OP: &'static str = $op;
            const REPLY: &'static str = $reply;
            fn reply(r: AdminReply) -> Result<$rty, Box<AdminReply>> {
                #[allow(unreachable_patterns)]
                match r {
                    $pat => Ok($out),
                    other => Err(Box::new(other)),
                }
            }
            fn wrap($r: $rty) -> AdminReply {
                $back
            }
        }
    )*

        /// Any admin operation as its typed call: what the platform dispatches on.
        #[derive(Debug, Clone, PartialEq)]
        pub enum AnyCall { $($name($name)),* }

        impl From<AdminOp> for AnyCall {
            fn from(op: AdminOp) -> AnyCall {
                match op {
                    $(AdminOp::$name { $($field),* } => AnyCall::$name($name { $($field),* }),)*
                }
            }
        }
    };
}

/// Answer to `upload_begin`: send the parts, or the bytes are already stored.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadStart {
    Ready { parts: u32, part_size: u32 },
    Stored(ArtifactInfo),
}

/// Answer to `upload_commit`: committed, or these part ranges must be sent again.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadEnd {
    Stored(ArtifactInfo),
    Missing(Vec<(u32, u32)>),
}

/// One page of a paged reply (`events`, `audit`): read again from `next` while `more`.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T, N> {
    pub items: Vec<T>,
    pub next: N,
    pub more: bool,
}

/// Mosquitto's `password_file` and `acl_file` contents, or one page of them: append the page
/// from `after = next` while `more`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoFiles {
    pub passwd: String,
    pub acl: String,
    pub next: Option<MachineId>,
    pub more: bool,
}

/// Answer to `release_remove`: each release named, and whether they were removed (not with
/// `check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub releases: Vec<ReleaseRemoval>,
    pub removed: bool,
}

/// One page of `history` for `machine`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    pub machine: MachineId,
    pub page: Page<TargetRecord, Option<ReleaseId>>,
}

calls! {
    /// See [`AdminOp::UploadBegin`].
    UploadBegin = "upload_begin" {
        kind: Kind, version: String, name: String, size: u64, artifact: ArtifactId,
        chunk_size: u32, notes: Option<String>,
    } -> "upload_ready or artifact" UploadStart {
        r @ (AdminReply::UploadReady { .. } | AdminReply::Artifact { .. }) => match r {
            AdminReply::UploadReady { parts, part_size } => UploadStart::Ready { parts, part_size },
            AdminReply::Artifact { artifact } => UploadStart::Stored(artifact),
            _ => unreachable!(),
        };
        r => match r {
            UploadStart::Ready { parts, part_size } => AdminReply::UploadReady { parts, part_size },
            UploadStart::Stored(artifact) => AdminReply::Artifact { artifact },
        }
    }
    /// See [`AdminOp::UploadCommit`].
    UploadCommit = "upload_commit" { artifact: ArtifactId } -> "artifact or upload_missing" UploadEnd {
        r @ (AdminReply::Artifact { .. } | AdminReply::UploadMissing { .. }) => match r {
            AdminReply::Artifact { artifact } => UploadEnd::Stored(artifact),
            AdminReply::UploadMissing { parts } => UploadEnd::Missing(parts),
            _ => unreachable!(),
        };
        r => match r {
            UploadEnd::Stored(artifact) => AdminReply::Artifact { artifact },
            UploadEnd::Missing(parts) => AdminReply::UploadMissing { parts },
        }
    }
    ArtifactList = "artifact_list" {} -> "artifacts" Vec<ArtifactInfo> { AdminReply::Artifacts { artifacts } => artifacts; r => AdminReply::Artifacts { artifacts: r } }
    /// See [`AdminOp::ArtifactRemove`].
    ArtifactRemove = "artifact_remove" { kind: Kind, version: String }
        -> "artifact" ArtifactInfo { AdminReply::Artifact { artifact } => artifact; r => AdminReply::Artifact { artifact: r } }
    ReleaseCreate = "release_create" {
        kind: Kind, version: String, policy: InstallPolicy, notes: Option<String>,
    } -> "release" ReleaseInfo { AdminReply::Release { release } => release; r => AdminReply::Release { release: r } }
    ReleasePlan = "release_plan" {
        release: ReleaseId, machines: Vec<MachineId>, groups: Vec<GroupId>, allow_empty: bool,
        after: Option<MachineId>, limit: Option<u32>,
    } -> "plan" PlanReport { AdminReply::Plan { plan } => plan; r => AdminReply::Plan { plan: r } }
    ReleasePublish = "release_publish" {
        release: ReleaseId, machines: Vec<MachineId>, groups: Vec<GroupId>, allow_empty: bool,
        waves: Option<WavePlan>,
    } -> "plan" PlanReport { AdminReply::Plan { plan } => plan; r => AdminReply::Plan { plan: r } }
    ReleaseList = "release_list" {} -> "releases" Vec<ReleaseInfo> { AdminReply::Releases { releases } => releases; r => AdminReply::Releases { releases: r } }
    ReleaseStatus = "release_status" { release: ReleaseId, after: Option<MachineId>, limit: Option<u32> }
        -> "release_status" crate::admin::ReleaseStatus { AdminReply::ReleaseStatus { status } => status; r => AdminReply::ReleaseStatus { status: r } }
    Machines = "machines" {} -> "machines" Vec<MachineInfo> { AdminReply::Machines { machines } => machines; r => AdminReply::Machines { machines: r } }
    MachineProvision = "machine_provision" {
        machine: MachineId, groups: Vec<GroupId>, rotate: bool,
    } -> "provisioned" ProvisionedMachine { AdminReply::Provisioned { machine } => machine; r => AdminReply::Provisioned { machine: r } }
    Rollback = "rollback" {
        target: Target, kind: Kind, to: Option<String>, allow_empty: bool,
    } -> "plan" PlanReport { AdminReply::Plan { plan } => plan; r => AdminReply::Plan { plan: r } }
    Activate = "activate" { release: ReleaseId, machines: Vec<MachineId>, groups: Vec<GroupId> }
        -> "done" String { AdminReply::Done { message } => message; r => AdminReply::Done { message: r } }
    MachineProvisionBatch = "machine_provision_batch" { machines: Vec<MachineSpec>, rotate: bool }
        -> "provisioned_batch" Vec<ProvisionedMachine> { AdminReply::ProvisionedBatch { machines } => machines; r => AdminReply::ProvisionedBatch { machines: r } }
    MachineRevoke = "machine_revoke" { machine: MachineId }
        -> "done" String { AdminReply::Done { message } => message; r => AdminReply::Done { message: r } }
    OperatorAdd = "operator_add" { name: String, role: Role }
        -> "operator_created" OperatorProfile { AdminReply::OperatorCreated { operator } => operator; r => AdminReply::OperatorCreated { operator: r } }
    OperatorList = "operator_list" {} -> "operators" Vec<OperatorInfo> { AdminReply::Operators { operators } => operators; r => AdminReply::Operators { operators: r } }
    OperatorRevoke = "operator_revoke" { name: String }
        -> "done" String { AdminReply::Done { message } => message; r => AdminReply::Done { message: r } }
    IntegratorAdd = "integrator_add" { name: String, rotate: bool }
        -> "integrator_created" IntegratorProfile { AdminReply::IntegratorCreated { integrator } => integrator; r => AdminReply::IntegratorCreated { integrator: r } }
    IntegratorList = "integrator_list" {} -> "integrators" Vec<IntegratorInfo> { AdminReply::Integrators { integrators } => integrators; r => AdminReply::Integrators { integrators: r } }
    IntegratorRevoke = "integrator_revoke" { name: String }
        -> "done" String { AdminReply::Done { message } => message; r => AdminReply::Done { message: r } }
    MachineGroups = "machine_groups" { machine: MachineId, add: Vec<GroupId>, remove: Vec<GroupId> }
        -> "done" String { AdminReply::Done { message } => message; r => AdminReply::Done { message: r } }
    MachineGroupsBatch = "machine_groups_batch" {
        machines: Vec<MachineId>, add: Vec<GroupId>, remove: Vec<GroupId>,
    } -> "done" String { AdminReply::Done { message } => message; r => AdminReply::Done { message: r } }
    MachineProvisionCheck = "machine_provision_check" { machines: Vec<MachineSpec>, rotate: bool }
        -> "done" String { AdminReply::Done { message } => message; r => AdminReply::Done { message: r } }
    EventsSince = "events_since" { since: u64, limit: Option<u32> }
        -> "events" Page<FleetEvent, u64> {
        AdminReply::Events { events, next, more } => Page { items: events, next, more };
        p => AdminReply::Events { events: p.items, next: p.next, more: p.more }
    }
    Audit = "audit" { since: u64, limit: Option<u32> } -> "audit" Page<AuditEntry, u64> {
        AdminReply::Audit { entries, next, more } => Page { items: entries, next, more };
        p => AdminReply::Audit { entries: p.items, next: p.next, more: p.more }
    }
    KeyRotate = "key_rotate" {} -> "done" String { AdminReply::Done { message } => message; r => AdminReply::Done { message: r } }
    MosquittoConfig = "mosquitto_config" { after: Option<MachineId>, limit: Option<u32> }
        -> "mosquitto_files" MosquittoFiles {
        AdminReply::MosquittoFiles { passwd, acl, next, more } => MosquittoFiles { passwd, acl, next, more };
        f => AdminReply::MosquittoFiles { passwd: f.passwd, acl: f.acl, next: f.next, more: f.more }
    }
    Stats = "stats" {} -> "stats" PlatformStats { AdminReply::Stats { stats } => stats; r => AdminReply::Stats { stats: r } }
    RolloutStatus = "rollout_status" { release: ReleaseId }
        -> "rollout" RolloutReport { AdminReply::Rollout { rollout } => rollout; r => AdminReply::Rollout { rollout: r } }
    RolloutPause = "rollout_pause" { release: ReleaseId }
        -> "rollout" RolloutReport { AdminReply::Rollout { rollout } => rollout; r => AdminReply::Rollout { rollout: r } }
    RolloutResume = "rollout_resume" { release: ReleaseId, advance: bool }
        -> "rollout" RolloutReport { AdminReply::Rollout { rollout } => rollout; r => AdminReply::Rollout { rollout: r } }
    RolloutCancel = "rollout_cancel" { release: ReleaseId }
        -> "rollout" RolloutReport { AdminReply::Rollout { rollout } => rollout; r => AdminReply::Rollout { rollout: r } }
    ReleaseRetry = "release_retry" { release: ReleaseId, machines: Vec<MachineId>, failed: bool, groups: Vec<GroupId> }
        -> "plan" PlanReport { AdminReply::Plan { plan } => plan; r => AdminReply::Plan { plan: r } }
    MachineQuery = "machine_query" {
        filter: MachineFilter, after: Option<MachineId>, limit: Option<u32>,
    } -> "machine_page" Page<MachineInfo, Option<MachineId>> {
        AdminReply::MachinePage { machines, next, more } => Page { items: machines, next, more };
        p => AdminReply::MachinePage { machines: p.items, next: p.next, more: p.more }
    }
    Versions = "versions" { kind: Kind, release: Option<ReleaseId> }
        -> "versions" VersionReport { AdminReply::Versions { report } => report; r => AdminReply::Versions { report: r } }
    History = "history" {
        machine: MachineId, kind: Option<Kind>, before: Option<ReleaseId>, limit: Option<u32>,
    } -> "history" HistoryPage {
        AdminReply::History { machine, targets, next, more } => HistoryPage {
            machine,
            page: Page { items: targets, next, more },
        };
        h => AdminReply::History {
            machine: h.machine,
            targets: h.page.items,
            next: h.page.next,
            more: h.page.more,
        }
    }
    ReleaseQuery = "release_query" { after: Option<ReleaseId>, limit: Option<u32> }
        -> "release_page" Page<ReleaseInfo, Option<ReleaseId>> {
        AdminReply::ReleasePage { releases, next, more } => Page { items: releases, next, more };
        p => AdminReply::ReleasePage { releases: p.items, next: p.next, more: p.more }
    }
    /// See [`AdminOp::DbCompact`].
    DbCompact = "db_compact" {} -> "compacted" Compaction { AdminReply::Compacted { compaction } => compaction; r => AdminReply::Compacted { compaction: r } }
    /// See [`AdminOp::DbBackup`].
    DbBackup = "db_backup" {} -> "backed_up" Backup { AdminReply::BackedUp { backup } => backup; r => AdminReply::BackedUp { backup: r } }
    /// See [`AdminOp::ReleaseRemove`].
    ReleaseRemove = "release_remove" { releases: Vec<ReleaseId>, check: bool }
        -> "release_removal" Removal {
        AdminReply::ReleaseRemoval { releases, removed } => Removal { releases, removed };
        r => AdminReply::ReleaseRemoval { releases: r.releases, removed: r.removed }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::rollout::WavePlan;

    /// The call, once converted, is the same JSON as the request written by hand from the
    /// wire documentation, and carries the op name its `OP` says.
    fn wire<C: Call + Clone>(call: C, expected: Value) {
        let op: AdminOp = call.into();
        assert_eq!(op.name(), C::OP);
        assert_eq!(serde_json::to_value(&op).unwrap(), expected, "{}", C::OP);
        assert_eq!(serde_json::from_value::<AdminOp>(expected).unwrap(), op);
    }

    fn m(s: &str) -> MachineId {
        MachineId::new(s).unwrap()
    }
    fn g(s: &str) -> GroupId {
        GroupId::new(s).unwrap()
    }
    fn k(s: &str) -> Kind {
        Kind::new(s).unwrap()
    }
    fn r(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    #[test]
    fn every_call_is_the_json_of_its_admin_op() {
        let a = ArtifactId::of(b"bytes");
        let waves = json!({"waves_bp": [1000, 10000], "success_bp": 9000, "failure_bp": 500,
            "wave_timeout_ms": 60000});
        let plan: WavePlan = serde_json::from_value(waves.clone()).unwrap();
        wire(
            UploadBegin {
                kind: k("app"),
                version: "1.2".into(),
                name: "app.bin".into(),
                size: 10,
                artifact: a,
                chunk_size: 4,
                notes: Some("n".into()),
            },
            json!({"op": "upload_begin", "kind": "app", "version": "1.2", "name": "app.bin",
                "size": 10, "artifact": a.to_hex(), "chunk_size": 4, "notes": "n"}),
        );
        wire(
            UploadCommit { artifact: a },
            json!({"op": "upload_commit", "artifact": a.to_hex()}),
        );
        wire(ArtifactList {}, json!({"op": "artifact_list"}));
        wire(
            ArtifactRemove {
                kind: k("app"),
                version: "1.2".into(),
            },
            json!({"op": "artifact_remove", "kind": "app", "version": "1.2"}),
        );
        wire(
            ReleaseCreate {
                kind: k("app"),
                version: "1.2".into(),
                policy: InstallPolicy::Immediate,
                notes: None,
            },
            json!({"op": "release_create", "kind": "app", "version": "1.2",
                "policy": {"type": "immediate"}}),
        );
        wire(
            ReleasePlan {
                release: r("r-1"),
                machines: vec![m("vm-1")],
                groups: vec![g("lab")],
                allow_empty: true,
                after: None,
                limit: None,
            },
            json!({"op": "release_plan", "release": "r-1", "machines": ["vm-1"],
                "groups": ["lab"], "allow_empty": true}),
        );
        wire(
            ReleasePlan {
                release: r("r-1"),
                machines: vec![],
                groups: vec![g("lab")],
                allow_empty: false,
                after: Some(m("vm-7")),
                limit: Some(2),
            },
            json!({"op": "release_plan", "release": "r-1", "machines": [], "groups": ["lab"],
                "after": "vm-7", "limit": 2}),
        );
        wire(
            ReleasePublish {
                release: r("r-1"),
                machines: vec![],
                groups: vec![g("lab")],
                allow_empty: false,
                waves: Some(plan),
            },
            json!({"op": "release_publish", "release": "r-1", "machines": [], "groups": ["lab"],
                "waves": waves}),
        );
        wire(ReleaseList {}, json!({"op": "release_list"}));
        wire(
            ReleaseQuery {
                after: None,
                limit: None,
            },
            json!({"op": "release_query"}),
        );
        wire(
            ReleaseQuery {
                after: Some(r("r-000009")),
                limit: Some(50),
            },
            json!({"op": "release_query", "after": "r-000009", "limit": 50}),
        );
        wire(
            ReleaseStatus {
                release: r("r-2"),
                after: None,
                limit: None,
            },
            json!({"op": "release_status", "release": "r-2"}),
        );
        wire(
            ReleaseStatus {
                release: r("r-2"),
                after: Some(m("vm-9")),
                limit: Some(0),
            },
            json!({"op": "release_status", "release": "r-2", "after": "vm-9", "limit": 0}),
        );
        wire(Machines {}, json!({"op": "machines"}));
        wire(
            MachineProvision {
                machine: m("vm-1"),
                groups: vec![g("a"), g("b")],
                rotate: true,
            },
            json!({"op": "machine_provision", "machine": "vm-1", "groups": ["a", "b"],
                "rotate": true}),
        );
        wire(
            Rollback {
                target: Target::Group(g("lab")),
                kind: k("app"),
                to: Some("1.0".into()),
                allow_empty: false,
            },
            json!({"op": "rollback", "target": {"group": "lab"}, "kind": "app", "to": "1.0"}),
        );
        wire(
            Activate {
                release: r("r-1"),
                machines: vec![m("vm-2")],
                groups: vec![],
            },
            json!({"op": "activate", "release": "r-1", "machines": ["vm-2"]}),
        );
        wire(
            Activate {
                release: r("r-1"),
                machines: vec![],
                groups: vec![g("lab")],
            },
            json!({"op": "activate", "release": "r-1", "machines": [], "groups": ["lab"]}),
        );
        wire(
            MachineProvisionBatch {
                machines: vec![MachineSpec {
                    machine: m("vm-3"),
                    groups: vec![g("x")],
                }],
                rotate: false,
            },
            json!({"op": "machine_provision_batch",
                "machines": [{"machine": "vm-3", "groups": ["x"]}]}),
        );
        wire(
            MachineRevoke { machine: m("vm-1") },
            json!({"op": "machine_revoke", "machine": "vm-1"}),
        );
        wire(
            OperatorAdd {
                name: "ann".into(),
                role: Role::Operator,
            },
            json!({"op": "operator_add", "name": "ann", "role": "operator"}),
        );
        wire(OperatorList {}, json!({"op": "operator_list"}));
        wire(
            OperatorRevoke { name: "ann".into() },
            json!({"op": "operator_revoke", "name": "ann"}),
        );
        wire(
            IntegratorAdd {
                name: "bi".into(),
                rotate: false,
            },
            json!({"op": "integrator_add", "name": "bi"}),
        );
        wire(
            IntegratorAdd {
                name: "bi".into(),
                rotate: true,
            },
            json!({"op": "integrator_add", "name": "bi", "rotate": true}),
        );
        wire(IntegratorList {}, json!({"op": "integrator_list"}));
        wire(
            IntegratorRevoke { name: "bi".into() },
            json!({"op": "integrator_revoke", "name": "bi"}),
        );
        wire(
            MachineGroups {
                machine: m("vm-1"),
                add: vec![g("beijing")],
                remove: vec![g("shanghai")],
            },
            json!({"op": "machine_groups", "machine": "vm-1",
                "add": ["beijing"], "remove": ["shanghai"]}),
        );
        wire(
            MachineGroupsBatch {
                machines: vec![m("vm-1"), m("vm-2")],
                add: vec![g("east-china")],
                remove: vec![g("shanghai")],
            },
            json!({"op": "machine_groups_batch", "machines": ["vm-1", "vm-2"],
                "add": ["east-china"], "remove": ["shanghai"]}),
        );
        wire(
            MachineProvisionCheck {
                machines: vec![MachineSpec {
                    machine: m("vm-3"),
                    groups: vec![],
                }],
                rotate: true,
            },
            json!({"op": "machine_provision_check",
                "machines": [{"machine": "vm-3", "groups": []}], "rotate": true}),
        );
        wire(
            EventsSince {
                since: 7,
                limit: Some(50),
            },
            json!({"op": "events_since", "since": 7, "limit": 50}),
        );
        wire(
            Audit {
                since: 3,
                limit: None,
            },
            json!({"op": "audit", "since": 3}),
        );
        wire(KeyRotate {}, json!({"op": "key_rotate"}));
        wire(
            MosquittoConfig {
                after: None,
                limit: None,
            },
            json!({"op": "mosquitto_config"}),
        );
        wire(
            MosquittoConfig {
                after: Some(m("vm-9")),
                limit: Some(500),
            },
            json!({"op": "mosquitto_config", "after": "vm-9", "limit": 500}),
        );
        wire(Stats {}, json!({"op": "stats"}));
        wire(DbCompact {}, json!({"op": "db_compact"}));
        wire(DbBackup {}, json!({"op": "db_backup"}));
        for (op, call) in [
            (
                "rollout_status",
                AdminOp::from(RolloutStatus { release: r("r-1") }),
            ),
            ("rollout_pause", RolloutPause { release: r("r-1") }.into()),
            ("rollout_cancel", RolloutCancel { release: r("r-1") }.into()),
        ] {
            assert_eq!(
                serde_json::to_value(&call).unwrap(),
                json!({"op": op, "release": "r-1"})
            );
        }
        wire(
            RolloutResume {
                release: r("r-1"),
                advance: true,
            },
            json!({"op": "rollout_resume", "release": "r-1", "advance": true}),
        );
        wire(
            ReleaseRetry {
                release: r("r-1"),
                machines: vec![],
                failed: true,
                groups: vec![],
            },
            json!({"op": "release_retry", "release": "r-1", "machines": [], "failed": true}),
        );
        wire(
            ReleaseRetry {
                release: r("r-1"),
                machines: vec![],
                failed: true,
                groups: vec![g("lab")],
            },
            json!({"op": "release_retry", "release": "r-1", "machines": [], "failed": true,
                "groups": ["lab"]}),
        );
        wire(
            MachineQuery {
                filter: MachineFilter {
                    group: Some(g("lab")),
                    online: Some(false),
                    ..MachineFilter::default()
                },
                after: Some(m("vm-9")),
                limit: Some(100),
            },
            json!({"op": "machine_query", "group": "lab", "online": false, "after": "vm-9",
                "limit": 100}),
        );
        wire(
            Versions {
                kind: k("app"),
                release: None,
            },
            json!({"op": "versions", "kind": "app"}),
        );
        wire(
            History {
                machine: m("vm-1"),
                kind: Some(k("app")),
                before: Some(r("r-5")),
                limit: Some(10),
            },
            json!({"op": "history", "machine": "vm-1", "kind": "app", "before": "r-5",
                "limit": 10}),
        );
    }

    #[test]
    fn wrap_is_the_inverse_of_reply_and_any_op_is_its_call() {
        fn round<C: Call>(reply: AdminReply)
        where
            C::Reply: std::fmt::Debug,
        {
            let typed = C::reply(reply.clone()).unwrap();
            assert_eq!(C::wrap(typed), reply, "{}", C::OP);
            let name = reply_name(&reply);
            assert!(C::REPLY.split(" or ").any(|n| n == name), "{name}");
        }
        round::<KeyRotate>(AdminReply::Done {
            message: "m".into(),
        });
        round::<DbCompact>(AdminReply::Compacted {
            compaction: Compaction {
                before_bytes: 80 << 20,
                after_bytes: 30 << 20,
                records: 40_000,
                live_bytes: 13 << 20,
                took_ms: 235,
            },
        });
        round::<DbBackup>(AdminReply::BackedUp {
            backup: Backup {
                path: "/var/lib/fleetcast/backups/2026-11-30T01-00-00Z".into(),
                records: 40_000,
                artifact_files: 4,
                ..Default::default()
            },
        });
        round::<EventsSince>(AdminReply::Events {
            events: vec![],
            next: 4,
            more: true,
        });
        round::<Audit>(AdminReply::Audit {
            entries: vec![],
            next: 2,
            more: false,
        });
        round::<MosquittoConfig>(AdminReply::MosquittoFiles {
            passwd: "p".into(),
            acl: "a".into(),
            next: Some(m("vm-2")),
            more: true,
        });
        round::<ReleaseQuery>(AdminReply::ReleasePage {
            releases: vec![],
            next: Some(r("r-000002")),
            more: true,
        });
        round::<MachineQuery>(AdminReply::MachinePage {
            machines: vec![],
            next: Some(m("vm-1")),
            more: true,
        });
        round::<History>(AdminReply::History {
            machine: m("vm-1"),
            targets: vec![],
            next: Some(r("r-3")),
            more: true,
        });
        round::<UploadBegin>(AdminReply::UploadReady {
            parts: 2,
            part_size: 8,
        });
        round::<UploadCommit>(AdminReply::UploadMissing {
            parts: vec![(0, 1)],
        });
        let call = ReleaseRetry {
            release: r("r-1"),
            machines: vec![m("vm-1")],
            failed: true,
            groups: vec![g("lab")],
        };
        assert_eq!(
            AnyCall::from(AdminOp::from(call.clone())),
            AnyCall::ReleaseRetry(call)
        );
        assert_eq!(AnyCall::from(AdminOp::Stats), AnyCall::Stats(Stats {}));
    }

    #[test]
    fn a_call_takes_only_its_own_reply() {
        let done = || AdminReply::Done {
            message: "revoked".into(),
        };
        assert_eq!(MachineRevoke::reply(done()), Ok("revoked".to_owned()));
        assert_eq!(KeyRotate::REPLY, reply_name(&done()));
        // A `done` is not the `plan` a publish expects: handed back whole, for the error.
        assert_eq!(ReleasePublish::reply(done()), Err(Box::new(done())));
        assert_eq!(reply_name(&done()), "done");
        let page = AdminReply::Events {
            events: vec![],
            next: 9,
            more: true,
        };
        assert_eq!(
            EventsSince::reply(page),
            Ok(Page {
                items: vec![],
                next: 9,
                more: true
            })
        );
        // Upload steps have two good answers each.
        let missing = AdminReply::UploadMissing {
            parts: vec![(2, 3)],
        };
        assert_eq!(
            UploadCommit::reply(missing.clone()),
            Ok(UploadEnd::Missing(vec![(2, 3)]))
        );
        assert_eq!(UploadBegin::reply(missing.clone()), Err(Box::new(missing)));
        assert_eq!(
            UploadBegin::reply(AdminReply::UploadReady {
                parts: 3,
                part_size: 8
            }),
            Ok(UploadStart::Ready {
                parts: 3,
                part_size: 8
            })
        );
    }
}
