//! Operator CLI <-> platform requests on `fleet/admin/{client}/...`, and the records they
//! return. The same record types are what the platform keeps in sled, so the CLI, the store and
//! integrators see one shape.
//!
//! Requests are MAC'd with the operator secret ([`crate::auth::Purpose::Admin`]); the platform
//! refuses requests whose `at_ms` is more than [`ADMIN_FRESHNESS_MS`] away from its clock and
//! `(client, ctr)` pairs it has already seen. Responses go to `fleet/admin/{client}/response`.
//! Artifact bytes travel as `UploadPart` chunk frames on `fleet/admin/{client}/upload`; they
//! need no MAC because the committed file must hash to the id named in the MAC'd
//! `upload_begin`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::acl::Role;
use crate::auth::{PlatformPublicKey, Secret};
use crate::ids::{ArtifactId, GroupId, Kind, MachineId, ReleaseId};
use crate::release::{ArtifactRef, InstallPolicy, Target};
use crate::rollout::{RolloutInfo, RolloutReport, StagedProgress, WavePlan};
use crate::status::{KindState, Phase, Progress};

/// Most machines one `machine_provision_batch` may register (its answer carries a secret and
/// the platform key for each: ~0.5 KiB sealed, so a batch stays far below the packet limit).
pub const MAX_PROVISION_BATCH: usize = 1000;

/// Most machines one `machine_groups_batch` may move: one sled transaction, one flush, one
/// `groups` command each (the CLI moves a longer list in batches).
pub const MAX_GROUPS_BATCH: usize = 1000;

/// One machine to register, and the groups it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub machine: MachineId,
    #[serde(default)]
    pub groups: Vec<GroupId>,
}

/// How far an admin request's clock may be from the platform's.
pub const ADMIN_FRESHNESS_MS: u64 = 5 * 60 * 1000;

/// Body of a MAC'd admin request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminRequest {
    /// The requesting CLI's MQTT client id; responses go to its response topic.
    pub client: String,
    /// Correlates the response.
    pub id: u64,
    /// Strictly increasing per client (the CLI uses its clock in microseconds).
    pub ctr: u64,
    pub at_ms: u64,
    #[serde(flatten)]
    pub op: AdminOp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminOp {
    /// Announce an upload. Reply: `upload_ready`, or `artifact` when those bytes are stored.
    UploadBegin {
        kind: Kind,
        version: String,
        name: String,
        size: u64,
        artifact: ArtifactId,
        chunk_size: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notes: Option<String>,
    },
    /// All parts sent. Reply: `artifact`, or `upload_missing` to resend some parts.
    UploadCommit {
        artifact: ArtifactId,
    },
    ArtifactList,
    /// Deletes the stored bytes of `kind` `version` to free disk space; its record stays,
    /// marked removed, so the version stays bound to those bytes (uploading the same file again
    /// restores it; other bytes under that version are refused). Refused while any machine may
    /// still fetch it (the artifact of a notice desired for a machine or group, of a machine's
    /// current release of that kind, or of a staged rollout not finished) or runs it (a
    /// machine's last state). Reply: `artifact`.
    ArtifactRemove {
        kind: Kind,
        version: String,
    },
    ReleaseCreate {
        kind: Kind,
        version: String,
        policy: InstallPolicy,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notes: Option<String>,
    },
    /// What publishing would send, without sending. Reply: `plan`, with one page of its
    /// targets by machine id after `after` (at most `limit`, default and cap
    /// [`MAX_PLAN_PAGE`]) and the counts over all of them; without `after` and `limit` (a
    /// request from before paging), every target.
    ReleasePlan {
        release: ReleaseId,
        #[serde(default)]
        machines: Vec<MachineId>,
        #[serde(default)]
        groups: Vec<GroupId>,
        /// See [`AdminOp::ReleasePublish`].
        #[serde(default, skip_serializing_if = "is_false")]
        allow_empty: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<MachineId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Reply: `plan` (what was sent). Refused, with nothing stored or sent, when a named group
    /// has no machine (a typo, most likely) unless `allow_empty`: a group's notice is retained,
    /// so machines that join the group later still get it.
    ///
    /// With `waves`, a staged rollout: the targets are ordered (see [`RolloutInfo::order`]),
    /// only the first wave is notified now, each on its own machine topic, and the platform
    /// widens, pauses or completes it by itself (`rollout_*` ops follow and steer it).
    ReleasePublish {
        release: ReleaseId,
        #[serde(default)]
        machines: Vec<MachineId>,
        #[serde(default)]
        groups: Vec<GroupId>,
        #[serde(default, skip_serializing_if = "is_false")]
        allow_empty: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        waves: Option<WavePlan>,
    },
    /// Every release at once. Reply: `releases`. A long history (or releases naming many
    /// machines) passes the packet limit: [`AdminOp::ReleaseQuery`] pages them.
    ReleaseList,
    /// The release, its aggregate over every target, and one page of its target records by
    /// machine id after `after` (at most `limit`, default and cap [`MAX_STATUS_PAGE`]; `0`
    /// gives the aggregate alone). Reply: `release_status`.
    ReleaseStatus {
        release: ReleaseId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<MachineId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Reply: `machines`.
    Machines,
    /// Register a machine. Reply: `provisioned`. A machine that exists (revoked or not) is
    /// refused unless `rotate`: then it gets a new secret (and the groups are added), the old
    /// secret stops working at once and its broker session is closed.
    MachineProvision {
        machine: MachineId,
        #[serde(default)]
        groups: Vec<GroupId>,
        #[serde(default, skip_serializing_if = "is_false")]
        rotate: bool,
    },
    /// Roll a machine's or group's kind back to a stable version (default: the version
    /// installed before the current one). Reply: `plan`. A group no machine belongs to is
    /// refused unless `allow_empty` (as for `release_publish`).
    Rollback {
        target: Target,
        kind: Kind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(default, skip_serializing_if = "is_false")]
        allow_empty: bool,
    },
    /// Install a downloaded `download_only` release now: on `machines` and the release's
    /// targets in `groups` (neither: every target). Reply: `done`.
    Activate {
        release: ReleaseId,
        #[serde(default)]
        machines: Vec<MachineId>,
        /// Absent from older clients: none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        groups: Vec<GroupId>,
    },
    /// Register many machines in one round trip (at most [`MAX_PROVISION_BATCH`]).
    /// Reply: `provisioned_batch`, in request order. Existing machines: as for
    /// `machine_provision` (without `rotate`, the whole batch is refused and nothing changes).
    MachineProvisionBatch {
        machines: Vec<MachineSpec>,
        #[serde(default, skip_serializing_if = "is_false")]
        rotate: bool,
    },
    /// Revoke a machine: its secret stops working at once and its broker session is closed.
    /// Reply: `done`.
    MachineRevoke {
        machine: MachineId,
    },
    /// Create an operator with its own credentials. Reply: `operator_created`.
    OperatorAdd {
        name: String,
        role: Role,
    },
    /// Reply: `operators`.
    OperatorList,
    /// Revoke an operator's credentials. Reply: `done`.
    OperatorRevoke {
        name: String,
    },
    /// Create a read-only integrator. Reply: `integrator_created`. One that exists is refused
    /// unless `rotate`: then it gets a new secret, the old password stops working at once and
    /// its broker sessions are closed (an integrator that does not exist is created).
    IntegratorAdd {
        name: String,
        #[serde(default, skip_serializing_if = "is_false")]
        rotate: bool,
    },
    /// Reply: `integrators` (no secrets).
    IntegratorList,
    /// Remove an integrator: its password stops working at once and its broker sessions are
    /// closed; the name may be added again. Reply: `done`.
    IntegratorRevoke {
        name: String,
    },
    /// Change the groups a machine belongs to, without a new secret: `add` first, then
    /// `remove` (each must name a group it is in). Any change closes its sessions on the
    /// embedded broker (so the subscriptions its old groups granted end), and the machine is
    /// told its groups (a `groups` command). Reply: `done`.
    MachineGroups {
        machine: MachineId,
        #[serde(default)]
        add: Vec<GroupId>,
        #[serde(default)]
        remove: Vec<GroupId>,
    },
    /// `machine_groups` for many machines at once (1 to [`MAX_GROUPS_BATCH`]), all or nothing:
    /// an unknown machine, or one not in a group to remove, refuses the whole request. Each
    /// machine's sessions are closed, and those with none closed are told their groups now.
    /// Reply: `done`.
    MachineGroupsBatch {
        machines: Vec<MachineId>,
        #[serde(default)]
        add: Vec<GroupId>,
        #[serde(default)]
        remove: Vec<GroupId>,
    },
    /// Whether `machine_provision_batch` with these machines would be accepted, changing
    /// nothing (at most [`MAX_PROVISION_BATCH`]): a long list is checked whole before its
    /// first batch is applied. Reply: `done`, or the refusal the batch would get.
    MachineProvisionCheck {
        machines: Vec<MachineSpec>,
        #[serde(default, skip_serializing_if = "is_false")]
        rotate: bool,
    },
    /// Stored events with an id above `since`, oldest first. Reply: `events`.
    EventsSince {
        since: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// The audit log: operator actions with an id above `since`. Reply: `audit`.
    Audit {
        #[serde(default)]
        since: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Rotate the platform signing key (announced under the old key). Reply: `done`.
    KeyRotate,
    /// Mosquitto password and ACL files. Without `after` and `limit`: for the whole fleet at
    /// once. With either: one page, the platform's own, operator and integrator users first,
    /// then machines by id after `after` (at most `limit`, default and cap
    /// [`MAX_MOSQUITTO_PAGE`]); the pages, appended in order, are the whole files.
    /// Reply: `mosquitto_files`.
    MosquittoConfig {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<MachineId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// The platform's counters since it started (traffic, ingestion). Reply: `stats`.
    Stats,
    /// A staged rollout: its waves, state and recorded transitions. Reply: `rollout`.
    RolloutStatus {
        release: ReleaseId,
    },
    /// No further wave starts until `rollout_resume`. Reply: `rollout`.
    RolloutPause {
        release: ReleaseId,
    },
    /// Go on with a paused rollout: the failures so far are accepted and the wave's timer
    /// restarts; with `advance`, the next wave starts at once. Reply: `rollout`.
    RolloutResume {
        release: ReleaseId,
        #[serde(default, skip_serializing_if = "is_false")]
        advance: bool,
    },
    /// Stop a rollout for good: no further notices; machines notified that have not begun
    /// installing get a `cancel` command and their notice is cleared. Reply: `rollout`.
    RolloutCancel {
        release: ReleaseId,
    },
    /// Send the release again to `machines` and its targets in `groups`, or (with `failed`)
    /// to every target whose record is a failure (in `groups`, if any are named) plus
    /// `machines`: each starts a new round. Reply: `plan`.
    ReleaseRetry {
        release: ReleaseId,
        #[serde(default)]
        machines: Vec<MachineId>,
        #[serde(default, skip_serializing_if = "is_false")]
        failed: bool,
        /// Absent from older clients: none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        groups: Vec<GroupId>,
    },
    /// The machines matching `filter`, by id, one page after `after`. Reply: `machine_page`.
    MachineQuery {
        #[serde(flatten)]
        filter: MachineFilter,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<MachineId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Installed versions of `kind` across the fleet, and compliance with `release` (default:
    /// the newest published release of `kind`). Reply: `versions`.
    Versions {
        kind: Kind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<ReleaseId>,
    },
    /// The target records of every release that reached `machine`, newest release first, one
    /// page before `before`. Reply: `history`.
    History {
        machine: MachineId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<Kind>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<ReleaseId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Releases in the order they were made, one page after `after` (at most `limit`, default
    /// and cap [`MAX_RELEASE_PAGE`]). Reply: `release_page`.
    ReleaseQuery {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<ReleaseId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Deletes releases (at most [`MAX_RELEASE_REMOVE`]) with their target records, staged
    /// rollouts and the keys that name them; their events stay. All or nothing: refused, with
    /// every reason, while any of them is still needed (desired for a group or followed by a
    /// machine, a staged rollout running or paused, a machine not revoked still working on it
    /// or having it as its current release of its kind, or what `rollback` of a group it was
    /// published to reads). With `check`, changes nothing and says which could go and why the
    /// others stay. Reply: `release_removal`.
    ReleaseRemove {
        releases: Vec<ReleaseId>,
        #[serde(default, skip_serializing_if = "is_false")]
        check: bool,
    },
    /// Compacts the platform's database now, while the platform runs: its live records are
    /// copied into a fresh file, read back and compared, which then takes the old one's place
    /// (sled's file keeps what later writes replace). Writes (reports, changes) wait for the
    /// copy; reads and connections go on. `serve` also does it by itself when it is due.
    /// Reply: `compacted`.
    DbCompact,
    /// Backs the platform up now, while it runs, into a new directory `backups/<UTC time>` of
    /// its data dir, laid out as a data dir: the database copied (read back and compared),
    /// the keys in force, and the artifact files (hard links where the file system allows).
    /// Writes wait for the copy of the database and the artifacts' links, so the three agree;
    /// reads and connections go on. `fleetcast serve --data` that directory starts the
    /// platform as it was. Reply: `backed_up`.
    DbBackup,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl AdminOp {
    /// The wire name of the operation (`"release_publish"`).
    pub fn name(&self) -> &'static str {
        match self {
            AdminOp::UploadBegin { .. } => "upload_begin",
            AdminOp::UploadCommit { .. } => "upload_commit",
            AdminOp::ArtifactList => "artifact_list",
            AdminOp::ArtifactRemove { .. } => "artifact_remove",
            AdminOp::ReleaseCreate { .. } => "release_create",
            AdminOp::ReleasePlan { .. } => "release_plan",
            AdminOp::ReleasePublish { .. } => "release_publish",
            AdminOp::ReleaseList => "release_list",
            AdminOp::ReleaseStatus { .. } => "release_status",
            AdminOp::Machines => "machines",
            AdminOp::MachineProvision { .. } => "machine_provision",
            AdminOp::Rollback { .. } => "rollback",
            AdminOp::Activate { .. } => "activate",
            AdminOp::MachineRevoke { .. } => "machine_revoke",
            AdminOp::MachineProvisionBatch { .. } => "machine_provision_batch",
            AdminOp::OperatorAdd { .. } => "operator_add",
            AdminOp::OperatorList => "operator_list",
            AdminOp::OperatorRevoke { .. } => "operator_revoke",
            AdminOp::IntegratorAdd { .. } => "integrator_add",
            AdminOp::IntegratorList => "integrator_list",
            AdminOp::IntegratorRevoke { .. } => "integrator_revoke",
            AdminOp::MachineGroups { .. } => "machine_groups",
            AdminOp::MachineGroupsBatch { .. } => "machine_groups_batch",
            AdminOp::MachineProvisionCheck { .. } => "machine_provision_check",
            AdminOp::EventsSince { .. } => "events_since",
            AdminOp::Audit { .. } => "audit",
            AdminOp::KeyRotate => "key_rotate",
            AdminOp::MosquittoConfig { .. } => "mosquitto_config",
            AdminOp::Stats => "stats",
            AdminOp::RolloutStatus { .. } => "rollout_status",
            AdminOp::RolloutPause { .. } => "rollout_pause",
            AdminOp::RolloutResume { .. } => "rollout_resume",
            AdminOp::RolloutCancel { .. } => "rollout_cancel",
            AdminOp::ReleaseRetry { .. } => "release_retry",
            AdminOp::MachineQuery { .. } => "machine_query",
            AdminOp::Versions { .. } => "versions",
            AdminOp::History { .. } => "history",
            AdminOp::ReleaseQuery { .. } => "release_query",
            AdminOp::ReleaseRemove { .. } => "release_remove",
            AdminOp::DbCompact => "db_compact",
            AdminOp::DbBackup => "db_backup",
        }
    }

    /// The least role allowed to run this operation.
    pub fn required_role(&self) -> Role {
        match self {
            AdminOp::ArtifactList
            | AdminOp::ReleasePlan { .. }
            | AdminOp::ReleaseList
            | AdminOp::ReleaseQuery { .. }
            | AdminOp::ReleaseStatus { .. }
            | AdminOp::Machines
            | AdminOp::EventsSince { .. }
            | AdminOp::Stats
            | AdminOp::RolloutStatus { .. }
            | AdminOp::MachineQuery { .. }
            | AdminOp::Versions { .. }
            | AdminOp::History { .. } => Role::Viewer,
            AdminOp::UploadBegin { .. }
            | AdminOp::UploadCommit { .. }
            | AdminOp::ArtifactRemove { .. }
            | AdminOp::ReleaseCreate { .. }
            | AdminOp::ReleasePublish { .. }
            | AdminOp::Rollback { .. }
            | AdminOp::Activate { .. }
            | AdminOp::RolloutPause { .. }
            | AdminOp::RolloutResume { .. }
            | AdminOp::RolloutCancel { .. }
            | AdminOp::ReleaseRetry { .. }
            | AdminOp::ReleaseRemove { .. } => Role::Operator,
            AdminOp::MachineProvision { .. }
            | AdminOp::MachineProvisionBatch { .. }
            | AdminOp::MachineRevoke { .. }
            | AdminOp::OperatorAdd { .. }
            | AdminOp::OperatorList
            | AdminOp::OperatorRevoke { .. }
            | AdminOp::IntegratorAdd { .. }
            | AdminOp::IntegratorList
            | AdminOp::IntegratorRevoke { .. }
            | AdminOp::MachineGroups { .. }
            | AdminOp::MachineGroupsBatch { .. }
            | AdminOp::MachineProvisionCheck { .. }
            | AdminOp::Audit { .. }
            | AdminOp::KeyRotate
            | AdminOp::MosquittoConfig { .. }
            | AdminOp::DbCompact
            | AdminOp::DbBackup => Role::Admin,
        }
    }

    /// Whether the operation changes anything (recorded in the audit log; a retry is answered
    /// from memory, not run again).
    pub fn is_change(&self) -> bool {
        !matches!(
            self,
            AdminOp::ArtifactList
                | AdminOp::MosquittoConfig { .. }
                | AdminOp::ReleasePlan { .. }
                | AdminOp::ReleaseList
                | AdminOp::ReleaseQuery { .. }
                | AdminOp::ReleaseStatus { .. }
                | AdminOp::Machines
                | AdminOp::EventsSince { .. }
                | AdminOp::Audit { .. }
                | AdminOp::OperatorList
                | AdminOp::IntegratorList
                | AdminOp::MachineProvisionCheck { .. }
                | AdminOp::Stats
                | AdminOp::RolloutStatus { .. }
                | AdminOp::MachineQuery { .. }
                | AdminOp::Versions { .. }
                | AdminOp::History { .. }
                | AdminOp::ReleaseRemove { check: true, .. }
        )
    }

    /// Whether the request is recorded in the audit log: every change, and the start of an
    /// export of the broker's credentials (`mosquitto_config` without `after`: once per export,
    /// not once per page). Exporting changes nothing, so a retried page is read again rather
    /// than kept in memory (a 50,000-machine export is ~50 pages of up to 1.4 MB).
    pub fn is_audited(&self) -> bool {
        self.is_change() || matches!(self, AdminOp::MosquittoConfig { after: None, .. })
    }
}

/// What travels on `fleet/admin/{client}/response`: the response sealed for the requesting
/// operator ([`crate::auth::Secret::seal_box`], purpose `AdminResponse`, context = the client
/// id), or, when the platform could not authenticate the request (so it has no key to seal
/// with), a plain error that the client must treat as unverified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unverified_error: Option<String>,
}

/// A response: exactly one of `ok` and `error` is set. Sealed inside a [`ResponseEnvelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminResponse {
    pub id: u64,
    /// The counter of the request it answers: a client accepts only the answer to its own
    /// request, so an old sealed response cannot be replayed as a new one.
    #[serde(default)]
    pub ctr: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<AdminReply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminResponse {
    pub fn ok(id: u64, ctr: u64, reply: AdminReply) -> Self {
        Self {
            id,
            ctr,
            ok: Some(reply),
            error: None,
        }
    }
    pub fn error(id: u64, ctr: u64, message: impl Into<String>) -> Self {
        Self {
            id,
            ctr,
            ok: None,
            error: Some(message.into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum AdminReply {
    UploadReady {
        parts: u32,
        part_size: u32,
    },
    UploadMissing {
        parts: Vec<(u32, u32)>,
    },
    Artifact {
        artifact: ArtifactInfo,
    },
    Artifacts {
        artifacts: Vec<ArtifactInfo>,
    },
    Release {
        release: ReleaseInfo,
    },
    Releases {
        releases: Vec<ReleaseInfo>,
    },
    Plan {
        plan: PlanReport,
    },
    ReleaseStatus {
        status: ReleaseStatus,
    },
    Machines {
        machines: Vec<MachineInfo>,
    },
    Provisioned {
        machine: ProvisionedMachine,
    },
    ProvisionedBatch {
        machines: Vec<ProvisionedMachine>,
    },
    Done {
        message: String,
    },
    OperatorCreated {
        operator: OperatorProfile,
    },
    Operators {
        operators: Vec<OperatorInfo>,
    },
    IntegratorCreated {
        integrator: IntegratorProfile,
    },
    Integrators {
        integrators: Vec<IntegratorInfo>,
    },
    Events {
        events: Vec<FleetEvent>,
        next: u64,
        more: bool,
    },
    Audit {
        entries: Vec<AuditEntry>,
        next: u64,
        more: bool,
    },
    Stats {
        stats: PlatformStats,
    },
    /// Mosquitto's `password_file` and `acl_file` contents (one page of them when asked for
    /// pages: append the next, from `after = next`, while `more`).
    MosquittoFiles {
        passwd: String,
        acl: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<MachineId>,
        #[serde(default)]
        more: bool,
    },
    Rollout {
        rollout: RolloutReport,
    },
    /// One page of `machine_query`: ask again with `after = next` while `more`.
    MachinePage {
        machines: Vec<MachineInfo>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<MachineId>,
        more: bool,
    },
    Versions {
        report: VersionReport,
    },
    /// One page of `history`: ask again with `before = next` while `more`.
    History {
        machine: MachineId,
        targets: Vec<TargetRecord>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<ReleaseId>,
        more: bool,
    },
    /// One page of `release_query`: ask again with `after = next` while `more`.
    ReleasePage {
        releases: Vec<ReleaseInfo>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<ReleaseId>,
        more: bool,
    },
    /// What `release_remove` removed (`removed`), or with `check` would remove: each release
    /// named, in request order.
    ReleaseRemoval {
        releases: Vec<ReleaseRemoval>,
        removed: bool,
    },
    Compacted {
        compaction: Compaction,
    },
    BackedUp {
        backup: Backup,
    },
}

/// What `db_compact` did to the platform's database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compaction {
    /// Bytes on disk before and after.
    pub before_bytes: u64,
    pub after_bytes: u64,
    /// Records copied (and read back), and their bytes of keys and values.
    pub records: u64,
    pub live_bytes: u64,
    /// How long writes waited: the flush, the copy, its check and the swap.
    pub took_ms: u64,
}

/// What `db_backup` made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// The backup's directory, on the platform's host.
    pub path: String,
    /// Records copied (and read back), their bytes of keys and values, and the copy's size on
    /// disk.
    pub records: u64,
    pub live_bytes: u64,
    pub db_bytes: u64,
    /// Artifact files (each artifact's bytes and its manifest) in the backup, and their bytes;
    /// how many of them are copies (the rest are hard links, which take no space).
    pub artifact_files: u64,
    pub artifact_bytes: u64,
    pub artifact_files_copied: u64,
    /// The key generation backed up.
    pub key_gen: u32,
    /// How long writes waited (the database's copy, its check, and the artifacts' links), and
    /// the whole backup.
    pub writes_held_ms: u64,
    pub took_ms: u64,
}

/// Most releases one `release_remove` names: the CLI removes a longer list in batches.
pub const MAX_RELEASE_REMOVE: usize = 100;

/// One release of a `release_remove` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRemoval {
    pub release: ReleaseId,
    pub kind: Kind,
    pub version: String,
    /// Its target records: what removing it deletes beside its own record.
    pub targets: u32,
    /// Why it is still needed (it stays); absent when it can go (or went).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
}

/// An operator as the platform records it (without its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorInfo {
    pub name: String,
    pub role: Role,
    pub created_at_ms: u64,
    /// Who created it (`platform` for the first admin).
    pub created_by: String,
}

/// Everything an operator's CLI needs: printed once by `fleetcast operator add` as a TOML
/// profile. The secret never leaves the platform otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorProfile {
    pub operator: String,
    pub role: Role,
    pub secret: Secret,
    pub platform_key: PlatformPublicKey,
    pub topic_prefix: String,
}

/// A read-only subscriber's broker credentials and what it needs to verify what it reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegratorProfile {
    pub name: String,
    /// Broker username (also its client id, optionally with a `.suffix`).
    pub username: String,
    /// Broker password.
    pub password: String,
    pub platform_key: PlatformPublicKey,
    /// Generation of `platform_key` in the key chain (0 until the first rotation; absent from
    /// platforms before 2026-11-29 23:00, which issued only generation 0 correctly).
    #[serde(default)]
    pub platform_key_gen: u32,
    pub topic_prefix: String,
}

/// An integrator as `integrator list` shows it (its secret stays on the platform).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegratorInfo {
    pub name: String,
    /// Its broker username (also its client id, optionally with a `.suffix`).
    pub username: String,
    pub created_at_ms: u64,
    /// The operator who created it, or last gave it a new secret.
    pub created_by: String,
}

/// Counters of a running platform (`fleetcast stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformStats {
    /// Since the platform process started.
    pub uptime_ms: u64,
    /// Chunk requests that passed their MAC and replay checks.
    pub chunk_requests: u64,
    /// Chunk, manifest and error frames published, and their bytes (frame headers included).
    pub chunk_frames_sent: u64,
    pub chunk_bytes_sent: u64,
    /// The part of `chunk_bytes_sent` published once for every machine fetching the artifact.
    pub chunk_bytes_broadcast: u64,
    /// Chunk and manifest frames asked for and not sent at all (nor read): every machine that
    /// asked had the frame queued at the embedded broker's gateway or was written it less than
    /// 2 s before (it asked while the frame was on its way). Absent (0) from platforms before
    /// 2026-11-28 19:30.
    #[serde(default)]
    pub chunk_frames_unneeded: u64,
    /// Status events stored (each acknowledged only after its batch was flushed).
    pub status_events_stored: u64,
    /// Ingest batches flushed.
    pub ingest_flushes: u64,
    /// Status events received again after they were stored, and acknowledged again: a
    /// machine resent what it had not seen acknowledged (10 s without an ack: a lost or late
    /// acknowledgement, or a connection that dropped). Many mean acks are being lost.
    #[serde(default)]
    pub status_events_resent: u64,
    /// Machine reports (status, state, online) dropped: bad MAC, unknown machine, malformed or
    /// out-of-bounds body, replayed counter (retained states a reconnect brings back are not
    /// counted). An attack, or a misconfigured machine; logged a few per machine per minute.
    #[serde(default)]
    pub reports_dropped: u64,
    /// Chunk requests refused (bad MAC, replay, an artifact not the machine's, over budget).
    #[serde(default)]
    pub chunk_requests_refused: u64,
    /// The id of the newest status event stored (not since the start: ever; 0 when none):
    /// where a reader of the newest events starts (`fleetcast events --last N`). Absent (0)
    /// from platforms before 2026-11-28.
    #[serde(default)]
    pub last_event_id: u64,
    /// The embedded broker's gateway (absent on an external broker, whose own tools count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayCounters>,
    /// The database's file (absent from platforms before 2026-11-29 16:00, and from a store
    /// kept in memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSize>,
}

/// How large the platform's database file is, against its size after its last compaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseSize {
    /// Bytes on disk now (sled's files: it keeps what later writes replace, so this grows
    /// with every write, not with what is stored).
    pub on_disk_bytes: u64,
    /// Bytes on disk right after its last compaction; absent: never compacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compacted_bytes: Option<u64>,
    /// 64 MiB or more and 4 times `compacted_bytes`: `serve` compacts it within the hour (it
    /// reads the size hourly) and at its next start, unless `--compact never`.
    pub compaction_due: bool,
}

/// What the embedded broker's gateway has seen since the platform started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayCounters {
    /// Sessions that passed authentication, and those open now.
    pub connections: u64,
    pub active: u64,
    /// CONNECTs refused (bad credentials, a client id or will the principal may not use).
    pub refused: u64,
    /// Sessions closed for a publish or subscribe their principal may not make: an attack, or
    /// a misconfigured client.
    pub violations: u64,
    /// Filters refused in a SUBACK with the session kept: a machine subscribing to a group it
    /// is not in on the platform (an agent that does not know the `groups` command, whose
    /// config still names a group it was moved out of). Absent (0) before 2026-11-29 15:00.
    #[serde(default)]
    pub subscriptions_refused: u64,
    /// Frames the gateway delivered itself (chunk frames, acks, events; one per receiving
    /// session), and those it dropped because a session's queue was full (a machine reading
    /// slower than the broadcast; it asks for the missing chunks again).
    pub frames_delivered: u64,
    pub frames_dropped: u64,
    /// Chunk frames not queued for a session again because the same frame was queued for it
    /// and not yet written (its machine asked again before reading what it had asked for).
    #[serde(default)]
    pub frames_already_queued: u64,
    /// Of `frames_delivered`, chunk and manifest frames: a group rollout needs one per machine
    /// per frame of the artifact; what is above that is frames sent to a machine again.
    #[serde(default)]
    pub chunk_frames_delivered: u64,
    /// Chunk frames not sent to a session again because the same frame was written to it
    /// less than 2 s before (on its way when its machine asked).
    #[serde(default)]
    pub frames_recently_written: u64,
    /// Of `chunk_frames_delivered`, frames queued for a machine when it subscribed to their
    /// artifact, broadcast to the others less than 2 s before (it had subscribed too late for
    /// them). Absent (0) from platforms before 2026-11-28 20:00.
    #[serde(default)]
    pub frames_caught_up: u64,
    /// Notices, commands, key chains and operators' replies served from the gateway, and
    /// sessions closed because they did not read them.
    pub served: u64,
    pub closed_unread: u64,
}

/// One operator action, recorded before its answer is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: u64,
    pub at_ms: u64,
    /// The operator (`fleetcast-op-<name>` authenticated by its own key).
    pub operator: String,
    pub client: String,
    /// The operation (`release_publish`, ...).
    pub action: String,
    /// The request's fields, as sent.
    pub request: serde_json::Value,
    /// `ok`, or the error text.
    pub result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    pub id: ArtifactId,
    pub kind: Kind,
    pub version: String,
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    pub uploaded_at_ms: u64,
    /// When its bytes were deleted (`artifact_remove`); absent while they are stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub id: ReleaseId,
    pub kind: Kind,
    pub version: String,
    pub artifact: ArtifactRef,
    pub policy: InstallPolicy,
    #[serde(default)]
    pub rollback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    pub created_at_ms: u64,
    /// Set at first publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at_ms: Option<u64>,
    /// The notice seq of the latest publish (0 before).
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub machines: Vec<MachineId>,
    #[serde(default)]
    pub groups: Vec<GroupId>,
}

/// What a publish sends (or sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishPlan {
    pub release: ReleaseInfo,
    /// Every topic a notice is (or would be) published on, retained.
    pub topics: Vec<String>,
    /// Each targeted machine, with the group it was reached through (None = named directly).
    pub targets: Vec<(MachineId, Option<GroupId>)>,
    /// A staged publish: the rollout it started (only its first wave was notified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutInfo>,
}

/// Most targets in one page of a plan (`release_plan`), and in the first page that a publish,
/// retry or rollback answers with. A page also ends before its targets pass about 1 MiB of
/// JSON, less what the rest of the reply takes.
pub const MAX_PLAN_PAGE: u32 = 1000;

/// Most notice topics a plan reply lists (the first, in publish order); `topics_total` counts
/// them all.
pub const PLAN_TOPICS_SHOWN: usize = 1000;

/// Most machines a [`ReleaseInfo`] lists in `machines` in a reply (the first named): a release
/// retried or published to thousands of machines by name would otherwise carry them all in
/// every reply that names the release. Every target is in `release_status`.
pub const RELEASE_MACHINES_SHOWN: usize = 100;

/// Most releases in one `release_list` page (and the default); a page also ends before its
/// records pass about 1 MiB of JSON.
pub const MAX_RELEASE_PAGE: u32 = 1000;

/// Most machines in one `mosquitto_config` page (and the default when paging); a page also
/// ends before its text passes about 1 MiB.
pub const MAX_MOSQUITTO_PAGE: u32 = 1000;

/// How many target machines a plan reached through one group (`group` absent: named directly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCount {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupId>,
    pub machines: u32,
}

/// A [`PublishPlan`] as the operator is told it (reply `plan`): the counts over every target and
/// topic, and bounded lists. `plan.targets` is one page of the targets by machine id (ask
/// `release_plan` again with `after = next` while `more`), `plan.topics` the first
/// [`PLAN_TOPICS_SHOWN`] topics, `plan.rollout`'s `order` the first
/// [`crate::rollout::ROLLOUT_ORDER_SHOWN`] machines, and `plan.release.machines` the first
/// [`RELEASE_MACHINES_SHOWN`]. On the wire the plan's fields and these sit in one object.
///
/// A reply from a platform before bounded plans has no counts: its lists are whole, and the
/// methods below count them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanReport {
    #[serde(flatten)]
    pub plan: PublishPlan,
    /// Every target machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets_total: Option<u32>,
    /// Every notice topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics_total: Option<u32>,
    /// Every target, counted per group it was reached through: named directly first, then by
    /// group id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Vec<GroupCount>>,
    /// The last machine of `plan.targets`: where the next page starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<MachineId>,
    /// Whether targets follow this page.
    #[serde(default)]
    pub more: bool,
    /// In a plan shown before publishing (`release_plan`, its first page): how many targets last reported a
    /// version of the release's kind above the release's (protocol §1 order). Unless the
    /// release is a rollback they will reject it as a downgrade. Absent from other replies,
    /// and from platforms before 2026-11-28 19:30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newer_installed: Option<u32>,
}

impl PlanReport {
    /// How many machines the plan reaches.
    pub fn target_count(&self) -> usize {
        self.targets_total
            .map_or(self.plan.targets.len(), |n| n as usize)
    }

    /// How many notices the plan publishes.
    pub fn topic_count(&self) -> usize {
        self.topics_total
            .map_or(self.plan.topics.len(), |n| n as usize)
    }

    /// The targets per group they were reached through (named directly first).
    pub fn per_group(&self) -> Vec<GroupCount> {
        if let Some(via) = &self.via {
            return via.clone();
        }
        let mut counts: BTreeMap<Option<&GroupId>, u32> = BTreeMap::new();
        for (_, via) in &self.plan.targets {
            *counts.entry(via.as_ref()).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(group, machines)| GroupCount {
                group: group.cloned(),
                machines,
            })
            .collect()
    }
}

impl From<PublishPlan> for PlanReport {
    /// The whole plan, its lists uncut, as one page.
    fn from(plan: PublishPlan) -> Self {
        let mut report = PlanReport {
            plan,
            targets_total: None,
            topics_total: None,
            via: None,
            next: None,
            more: false,
            newer_installed: None,
        };
        report.via = Some(report.per_group());
        report.targets_total = Some(report.plan.targets.len() as u32);
        report.topics_total = Some(report.plan.topics.len() as u32);
        report.next = report.plan.targets.last().map(|(m, _)| m.clone());
        report
    }
}

/// One step's result for one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    pub phase: Phase,
    pub ok: bool,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything recorded for one (release, machine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    pub release: ReleaseId,
    pub machine: MachineId,
    pub kind: Kind,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<GroupId>,
    pub phase: Phase,
    /// When the current phase was entered (machine clock for reported phases).
    pub phase_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<StepResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<StepResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The `detail` of the machine's latest report on this release, if it had one: why a
    /// `deferred` install waits (`waiting for window 02:00-04:00`, `waiting for the machine to
    /// be idle`). Absent from platforms before 2026-11-29 23:30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Platform clock of the last change.
    pub updated_at_ms: u64,
}

/// Most target records in one `release_status` page, and the page size when none is asked
/// for. The platform also ends a page before its records pass 1 MiB of JSON, so a page of
/// records with long error texts still fits the broker's 2 MiB packet once sealed.
pub const MAX_STATUS_PAGE: u32 = 1000;

/// One page of a release's status: `release`, `progress` and the download bytes count every
/// target; `targets` is the page (by machine id). Ask again with `after = next` while `more`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseStatus {
    pub release: ReleaseInfo,
    pub targets: Vec<TargetRecord>,
    pub progress: RolloutProgress,
    /// The last machine of this page: where the next page starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<MachineId>,
    /// Whether targets follow this page.
    #[serde(default)]
    pub more: bool,
    /// Artifact bytes the targets have verified (a finished download counts the whole
    /// artifact, a failed or running one its last reported progress), over every target.
    #[serde(default)]
    pub bytes_done: u64,
    /// The artifact's size times the number of targets.
    #[serde(default)]
    pub bytes_total: u64,
    /// For a release published in waves: where its rollout stands. `targets` and `progress`
    /// then cover only the machines notified so far. Absent otherwise, and from a platform
    /// before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedProgress>,
}

/// Aggregate of one release, retained on `fleet/rollouts/{r}/progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutProgress {
    pub release: ReleaseId,
    pub kind: Kind,
    pub version: String,
    pub total: u32,
    /// Machines per current phase.
    pub phases: BTreeMap<Phase, u32>,
    /// Machines in a final phase.
    pub finished: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub id: MachineId,
    #[serde(default)]
    pub groups: Vec<GroupId>,
    pub provisioned_at_ms: u64,
    #[serde(default)]
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub kinds: BTreeMap<Kind, KindState>,
    /// Set when an operator revoked the machine: it can no longer connect or report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// Generation of the platform key the machine said it trusts in its last state (§6.2
    /// `key_gen`; 0 until it says otherwise): after `key rotate`, the machines still below the
    /// new generation have not followed the key chain yet.
    #[serde(default)]
    pub key_gen: u32,
}

impl MachineInfo {
    /// A machine the platform has just learned of, seen nowhere yet.
    pub fn new(id: MachineId, provisioned_at_ms: u64) -> Self {
        Self {
            id,
            groups: Vec::new(),
            provisioned_at_ms,
            online: false,
            last_seen_ms: None,
            agent_version: None,
            busy: false,
            kinds: BTreeMap::new(),
            revoked_at_ms: None,
            key_gen: 0,
        }
    }
}

/// Which machines `machine_query` returns: a machine matches when every field that is set
/// holds (docs/cli.md, `fleetcast machines`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFilter {
    /// Provisioned in this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupId>,
    /// Reports a state for this kind, or a release of it reached the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// Installed version of `kind` (of any kind without `kind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// Phase of the platform's target record of the machine's current release of `kind`
    /// (needs `kind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
}

/// Installed versions of one kind across the fleet (revoked machines left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionReport {
    pub kind: Kind,
    /// Machines counted: provisioned and not revoked.
    pub machines: u32,
    /// Each installed version with its machines, in version order (oldest first).
    pub versions: Vec<VersionCount>,
    /// Machines with no installed version of `kind`.
    pub without: u32,
    /// Revoked machines, not counted anywhere else.
    pub revoked: u32,
    /// Absent when no release of `kind` was published (and none was named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance: Option<Compliance>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionCount {
    pub version: String,
    pub machines: u32,
}

/// Where the fleet stands with one release. Every counted machine is in exactly one bucket,
/// taken in this order (docs/cli.md, `fleetcast versions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compliance {
    pub release: ReleaseId,
    pub version: String,
    /// Runs `version`.
    pub on_target: u32,
    /// The release never reached it.
    pub not_targeted: u32,
    /// Its record of the release ended in a failure phase.
    pub failed: u32,
    /// Its record ended without failure (installed, or superseded), yet it runs another
    /// version now.
    pub replaced: u32,
    /// Its record is in a non-final phase and the machine is not online.
    pub offline: u32,
    /// Its record is in a non-final phase and the machine is online.
    pub in_progress: u32,
}

impl Compliance {
    /// No machine counted yet.
    pub fn new(release: ReleaseId, version: String) -> Self {
        Self {
            release,
            version,
            on_target: 0,
            not_targeted: 0,
            failed: 0,
            replaced: 0,
            offline: 0,
            in_progress: 0,
        }
    }
}

/// Everything a machine needs to join: printed by `fleetcast machine provision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionedMachine {
    pub machine: MachineId,
    pub groups: Vec<GroupId>,
    pub secret: Secret,
    pub platform_key: PlatformPublicKey,
    /// Generation of `platform_key` in the key chain (0 until the first rotation).
    #[serde(default)]
    pub platform_key_gen: u32,
    pub topic_prefix: String,
}

/// One persisted status event, normalised, as published on `fleet/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetEvent {
    /// Platform-wide event number (the sled key).
    pub id: u64,
    /// Platform clock when it was persisted.
    pub recorded_at_ms: u64,
    pub machine: MachineId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseId>,
    pub kind: Kind,
    pub version: String,
    pub phase: Phase,
    /// Machine clock when the phase was entered.
    pub at_ms: u64,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl FleetEvent {
    /// A machine's status event as the platform stores it: `id` 0 until the log assigns one.
    pub fn recorded(ev: &crate::status::StatusEvent, recorded_at_ms: u64) -> Self {
        Self {
            id: 0,
            recorded_at_ms,
            machine: ev.machine.clone(),
            release: ev.release.clone(),
            kind: ev.kind.clone(),
            version: ev.version.clone(),
            phase: ev.phase,
            at_ms: ev.at_ms,
            attempt: ev.attempt,
            progress: ev.progress,
            error: ev.error.clone(),
            detail: ev.detail.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_requests_are_flat_json_tagged_by_op() {
        let r = AdminRequest {
            client: "cli-1".into(),
            id: 3,
            ctr: 4,
            at_ms: 5,
            op: AdminOp::MachineProvision {
                machine: MachineId::new("vm-1").unwrap(),
                groups: vec![GroupId::new("g").unwrap()],
                rotate: false,
            },
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["op"], "machine_provision");
        assert_eq!(json["machine"], "vm-1");
        assert!(json.get("rotate").is_none(), "left out when false: {json}");
        assert_eq!(serde_json::from_value::<AdminRequest>(json).unwrap(), r);
        let rotate = AdminRequest {
            op: AdminOp::MachineProvisionBatch {
                machines: vec![],
                rotate: true,
            },
            ..r.clone()
        };
        let json = serde_json::to_value(&rotate).unwrap();
        assert_eq!(json["rotate"], true);
        assert_eq!(
            serde_json::from_value::<AdminRequest>(json).unwrap(),
            rotate
        );
        let list: AdminRequest =
            serde_json::from_str(r#"{"client":"c","id":1,"ctr":1,"at_ms":1,"op":"machines"}"#)
                .unwrap();
        assert_eq!(list.op, AdminOp::Machines);
    }

    #[test]
    fn admin_responses_carry_either_a_reply_or_an_error() {
        let ok = AdminResponse::ok(
            1,
            7,
            AdminReply::Done {
                message: "ok".into(),
            },
        );
        let json = serde_json::to_value(&ok).unwrap();
        assert_eq!(json["ok"]["reply"], "done");
        assert!(json.get("error").is_none());
        assert_eq!(serde_json::from_value::<AdminResponse>(json).unwrap(), ok);
        let err = AdminResponse::error(2, 8, "unknown release r-9");
        let back: AdminResponse =
            serde_json::from_str(&serde_json::to_string(&err).unwrap()).unwrap();
        assert_eq!(back.error.as_deref(), Some("unknown release r-9"));
    }

    #[test]
    fn every_op_name_matches_its_wire_tag() {
        let ops = [
            AdminOp::ArtifactList,
            AdminOp::ArtifactRemove {
                kind: Kind::new("app").unwrap(),
                version: "1.0".into(),
            },
            AdminOp::Machines,
            AdminOp::KeyRotate,
            AdminOp::DbCompact,
            AdminOp::EventsSince {
                since: 3,
                limit: None,
            },
            AdminOp::OperatorAdd {
                name: "a".into(),
                role: Role::Viewer,
            },
            AdminOp::MachineRevoke {
                machine: MachineId::new("vm-1").unwrap(),
            },
        ];
        for op in ops {
            let json = serde_json::to_value(&op).unwrap();
            assert_eq!(json["op"], op.name());
        }
    }

    #[test]
    fn viewers_only_read_and_identities_need_an_admin() {
        assert_eq!(AdminOp::Machines.required_role(), Role::Viewer);
        assert!(!AdminOp::Machines.is_change());
        let publish = AdminOp::ReleasePublish {
            release: ReleaseId::new("r-1").unwrap(),
            machines: vec![],
            groups: vec![],
            allow_empty: false,
            waves: None,
        };
        assert_eq!(publish.required_role(), Role::Operator);
        assert!(publish.is_change());
        let remove = AdminOp::ArtifactRemove {
            kind: Kind::new("app").unwrap(),
            version: "1.0".into(),
        };
        assert_eq!(remove.required_role(), Role::Operator);
        assert!(remove.is_change() && remove.is_audited());
        assert_eq!(AdminOp::KeyRotate.required_role(), Role::Admin);
        // Compacting holds every write up for as long as the copy takes: admins only, audited.
        assert_eq!(AdminOp::DbCompact.required_role(), Role::Admin);
        assert!(AdminOp::DbCompact.is_change() && AdminOp::DbCompact.is_audited());
        // Identities: admins only; the list and the provisioning check change nothing.
        let vm1 = MachineId::new("vm-1").unwrap();
        for (op, change) in [
            (AdminOp::IntegratorList, false),
            (AdminOp::IntegratorRevoke { name: "erp".into() }, true),
            (
                AdminOp::IntegratorAdd {
                    name: "erp".into(),
                    rotate: true,
                },
                true,
            ),
            (
                AdminOp::MachineGroups {
                    machine: vm1.clone(),
                    add: vec![],
                    remove: vec![GroupId::new("g").unwrap()],
                },
                true,
            ),
            (
                AdminOp::MachineGroupsBatch {
                    machines: vec![vm1.clone()],
                    add: vec![GroupId::new("g").unwrap()],
                    remove: vec![],
                },
                true,
            ),
            (
                AdminOp::MachineProvisionCheck {
                    machines: vec![MachineSpec {
                        machine: vm1.clone(),
                        groups: vec![],
                    }],
                    rotate: false,
                },
                false,
            ),
        ] {
            assert_eq!(op.required_role(), Role::Admin, "{}", op.name());
            assert_eq!(op.is_change(), change, "{}", op.name());
            assert_eq!(op.is_audited(), change, "{}", op.name());
        }
        // Staged rollouts: a viewer may look; steering one is an operator's change (audited).
        let r = || ReleaseId::new("r-1").unwrap();
        let status = AdminOp::RolloutStatus { release: r() };
        assert_eq!(status.required_role(), Role::Viewer);
        assert!(!status.is_change());
        for steer in [
            AdminOp::RolloutPause { release: r() },
            AdminOp::RolloutResume {
                release: r(),
                advance: true,
            },
            AdminOp::RolloutCancel { release: r() },
            AdminOp::ReleaseRemove {
                releases: vec![r()],
                check: false,
            },
            AdminOp::ReleaseRetry {
                release: r(),
                machines: vec![],
                failed: true,
                groups: vec![],
            },
        ] {
            assert_eq!(steer.required_role(), Role::Operator, "{}", steer.name());
            assert!(steer.is_change(), "{}", steer.name());
        }
    }

    #[test]
    fn a_release_removal_is_an_operators_change_and_its_check_a_read() {
        let remove = |check| AdminOp::ReleaseRemove {
            releases: vec![ReleaseId::new("r-000001").unwrap()],
            check,
        };
        assert_eq!(remove(false).required_role(), Role::Operator);
        assert!(remove(false).is_change() && remove(false).is_audited());
        assert_eq!(remove(true).required_role(), Role::Operator);
        assert!(!remove(true).is_change() && !remove(true).is_audited());
        let wire = serde_json::to_string(&remove(false)).unwrap();
        assert_eq!(wire, r#"{"op":"release_remove","releases":["r-000001"]}"#);
        let back: AdminOp = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, remove(false));
    }

    #[test]
    fn allow_empty_is_off_unless_sent_and_absent_from_the_wire_when_off() {
        let old_client: AdminOp =
            serde_json::from_str(r#"{"op":"release_publish","release":"r-1","groups":["g"]}"#)
                .unwrap();
        let AdminOp::ReleasePublish { allow_empty, .. } = &old_client else {
            panic!("{old_client:?}")
        };
        assert!(!allow_empty);
        assert!(!serde_json::to_string(&old_client)
            .unwrap()
            .contains("allow_empty"));
        let rollback = AdminOp::Rollback {
            target: Target::Group(GroupId::new("g").unwrap()),
            kind: Kind::new("app").unwrap(),
            to: None,
            allow_empty: true,
        };
        let json = serde_json::to_value(&rollback).unwrap();
        assert_eq!(json["allow_empty"], true);
        assert_eq!(serde_json::from_value::<AdminOp>(json).unwrap(), rollback);
    }

    #[test]
    fn unknown_ops_are_refused() {
        let err = serde_json::from_str::<AdminRequest>(
            r#"{"client":"c","id":1,"ctr":1,"at_ms":1,"op":"format_disk"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("format_disk"), "{err}");
    }

    #[test]
    fn a_machine_query_carries_its_filter_beside_the_op_and_an_empty_one_is_just_the_op() {
        let q = AdminOp::MachineQuery {
            filter: MachineFilter {
                group: Some(GroupId::new("shanghai").unwrap()),
                kind: Some(Kind::new("app").unwrap()),
                version: Some("2.4.1".into()),
                online: Some(false),
                phase: Some(Phase::InstallFailed),
            },
            after: Some(MachineId::new("vm-9").unwrap()),
            limit: Some(10),
        };
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "machine_query", "group": "shanghai", "kind": "app",
                "version": "2.4.1", "online": false, "phase": "install_failed",
                "after": "vm-9", "limit": 10})
        );
        assert_eq!(serde_json::from_value::<AdminOp>(json).unwrap(), q);
        // Inside a request, itself flattened, too.
        let req = AdminRequest {
            client: "c".into(),
            id: 1,
            ctr: 2,
            at_ms: 3,
            op: q,
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<AdminRequest>(&text).unwrap(), req);
        let all: AdminOp = serde_json::from_str(r#"{"op":"machine_query"}"#).unwrap();
        assert_eq!(
            all,
            AdminOp::MachineQuery {
                filter: MachineFilter::default(),
                after: None,
                limit: None
            }
        );
        assert_eq!(
            serde_json::to_string(&all).unwrap(),
            r#"{"op":"machine_query"}"#
        );
        assert!(
            serde_json::from_str::<AdminOp>(r#"{"op":"machine_query","phase":"done"}"#).is_err()
        );
    }

    #[test]
    fn inventory_ops_are_read_only_for_viewers_and_named_as_on_the_wire() {
        let ops = [
            AdminOp::MachineQuery {
                filter: MachineFilter::default(),
                after: None,
                limit: None,
            },
            AdminOp::Versions {
                kind: Kind::new("app").unwrap(),
                release: None,
            },
            AdminOp::History {
                machine: MachineId::new("vm-1").unwrap(),
                kind: None,
                before: Some(ReleaseId::new("r-000003").unwrap()),
                limit: Some(5),
            },
        ];
        for op in ops {
            let json = serde_json::to_value(&op).unwrap();
            assert_eq!(json["op"], op.name());
            assert_eq!(op.required_role(), Role::Viewer);
            assert!(!op.is_change());
            assert_eq!(serde_json::from_value::<AdminOp>(json).unwrap(), op);
        }
    }

    #[test]
    fn a_release_status_page_keeps_its_fields_and_an_unpaged_reply_still_parses() {
        let reply: AdminReply = serde_json::from_value(serde_json::json!({
            "reply": "release_status",
            "status": {
                "release": {"id": "r-000007", "kind": "app", "version": "2.4.1",
                    "artifact": {"id": ArtifactId::of(b"a").to_hex(), "size": 2048,
                        "chunk_size": 1024, "name": "app.bin"},
                    "policy": {"type": "immediate"}, "created_at_ms": 1},
                "targets": [],
                "progress": {"release": "r-000007", "kind": "app", "version": "2.4.1",
                    "total": 3, "phases": {"installed": 3}, "finished": 3, "succeeded": 3,
                    "failed": 0, "updated_at_ms": 2}
            }
        }))
        .unwrap();
        // A reply from before paging: one page holding everything.
        let AdminReply::ReleaseStatus { mut status } = reply else {
            panic!("{reply:?}")
        };
        assert_eq!((status.next.as_ref(), status.more), (None, false));
        assert_eq!((status.bytes_done, status.bytes_total), (0, 0));
        status.next = Some(MachineId::new("vm-2").unwrap());
        status.more = true;
        status.bytes_done = 5000;
        status.bytes_total = 6144;
        let json = serde_json::to_value(AdminReply::ReleaseStatus {
            status: status.clone(),
        })
        .unwrap();
        let fields = field_names(&json["status"]);
        assert_eq!(
            fields,
            [
                "bytes_done",
                "bytes_total",
                "more",
                "next",
                "progress",
                "release",
                "targets"
            ]
        );
        assert_eq!(json["status"]["next"], "vm-2");
        assert_eq!(json["status"]["more"], true);
        assert_eq!(json["status"]["progress"]["total"], 3);
        assert_eq!(
            serde_json::from_value::<AdminReply>(json).unwrap(),
            AdminReply::ReleaseStatus { status }
        );
    }

    #[test]
    fn a_release_status_request_without_a_page_is_the_old_request() {
        let old: AdminOp =
            serde_json::from_str(r#"{"op":"release_status","release":"r-1"}"#).unwrap();
        assert_eq!(
            old,
            AdminOp::ReleaseStatus {
                release: ReleaseId::new("r-1").unwrap(),
                after: None,
                limit: None,
            }
        );
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"op":"release_status","release":"r-1"}"#
        );
        assert_eq!(old.required_role(), Role::Viewer);
        assert!(!old.is_change());
    }

    #[test]
    fn version_reports_and_history_pages_round_trip() {
        let report = AdminReply::Versions {
            report: VersionReport {
                kind: Kind::new("app").unwrap(),
                machines: 3,
                versions: vec![VersionCount {
                    version: "1.0".into(),
                    machines: 2,
                }],
                without: 1,
                revoked: 0,
                compliance: Some(Compliance {
                    on_target: 2,
                    offline: 1,
                    ..Compliance::new(ReleaseId::new("r-000001").unwrap(), "1.0".into())
                }),
            },
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["reply"], "versions");
        assert_eq!(json["report"]["compliance"]["on_target"], 2);
        assert_eq!(serde_json::from_value::<AdminReply>(json).unwrap(), report);
        let page = AdminReply::History {
            machine: MachineId::new("vm-1").unwrap(),
            targets: vec![],
            next: None,
            more: false,
        };
        let json = serde_json::to_string(&page).unwrap();
        assert_eq!(
            json,
            r#"{"reply":"history","machine":"vm-1","targets":[],"more":false}"#
        );
        assert_eq!(serde_json::from_str::<AdminReply>(&json).unwrap(), page);
    }
    /// The field names of a JSON object, in order.
    fn field_names(object: &serde_json::Value) -> Vec<&str> {
        object
            .as_object()
            .expect("a JSON object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn release_json() -> serde_json::Value {
        serde_json::json!({"id": "r-000007", "kind": "app", "version": "2.4.1",
            "artifact": {"id": ArtifactId::of(b"a").to_hex(), "size": 2048,
                "chunk_size": 1024, "name": "app.bin"},
            "policy": {"type": "immediate"}, "created_at_ms": 1,
            "machines": ["vm-1"], "groups": ["lab"]})
    }

    #[test]
    fn a_plan_reply_carries_its_counts_beside_the_plan_and_an_old_one_counts_its_lists() {
        // From a platform before bounded plans: whole lists, no counts.
        let old: AdminReply = serde_json::from_value(serde_json::json!({
            "reply": "plan",
            "plan": {"release": release_json(),
                "topics": ["fleet/machines/vm-1/release/app", "fleet/groups/lab/release/app"],
                "targets": [["vm-1", null], ["vm-2", "lab"], ["vm-3", "lab"]]}
        }))
        .unwrap();
        let AdminReply::Plan { plan: mut report } = old else {
            panic!("{old:?}")
        };
        assert_eq!((report.target_count(), report.topic_count()), (3, 2));
        let lab = GroupId::new("lab").unwrap();
        assert_eq!(
            report.per_group(),
            [
                GroupCount {
                    group: None,
                    machines: 1
                },
                GroupCount {
                    group: Some(lab.clone()),
                    machines: 2
                }
            ]
        );
        assert_eq!((report.next.as_ref(), report.more), (None, false));
        // A page of a larger plan: the counts are over everything, the lists a part.
        report.plan.targets.truncate(1);
        report.plan.topics.truncate(1);
        report.targets_total = Some(50_000);
        report.topics_total = Some(2);
        report.via = Some(vec![
            GroupCount {
                group: None,
                machines: 1,
            },
            GroupCount {
                group: Some(lab),
                machines: 49_999,
            },
        ]);
        report.next = Some(MachineId::new("vm-1").unwrap());
        report.more = true;
        let json = serde_json::to_value(AdminReply::Plan {
            plan: report.clone(),
        })
        .unwrap();
        let fields = field_names(&json["plan"]);
        assert_eq!(
            fields,
            [
                "more",
                "next",
                "release",
                "targets",
                "targets_total",
                "topics",
                "topics_total",
                "via"
            ]
        );
        assert_eq!(
            json["plan"]["via"],
            serde_json::json!([{"machines": 1}, {"group": "lab", "machines": 49_999}])
        );
        assert_eq!(json["plan"]["targets"], serde_json::json!([["vm-1", null]]));
        let back: AdminReply = serde_json::from_value(json).unwrap();
        assert_eq!(
            back,
            AdminReply::Plan {
                plan: report.clone()
            }
        );
        assert_eq!((report.target_count(), report.topic_count()), (50_000, 2));
        assert_eq!(report.per_group()[1].machines, 49_999);
    }

    #[test]
    fn a_plan_with_a_rollout_keeps_the_rollout_whole_through_the_flattened_plan() {
        let plan = WavePlan::new(vec![5000], 9500, 500, 0).unwrap();
        let rollout = RolloutInfo {
            release: ReleaseId::new("r-000007").unwrap(),
            plan,
            order: vec![MachineId::new("vm-2").unwrap()],
            wave: 0,
            wave_started_ms: 5,
            state: crate::rollout::RolloutState::Paused {
                reason: "by hand".into(),
            },
            failures_accepted: 1,
            accepted: vec![],
            skipped: vec![],
            log: vec![],
        };
        let mut report = PlanReport::from(PublishPlan {
            release: serde_json::from_value(release_json()).unwrap(),
            topics: vec![],
            targets: vec![(MachineId::new("vm-2").unwrap(), None)],
            rollout: Some(rollout),
        });
        report.more = true;
        let text = serde_json::to_string(&report).unwrap();
        assert!(
            text.contains(r#""state":"paused","reason":"by hand""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<PlanReport>(&text).unwrap(), report);
    }

    #[test]
    fn release_pages_are_a_read_and_unpaged_mosquitto_files_are_the_old_request_and_reply() {
        let old: AdminOp = serde_json::from_str(r#"{"op":"mosquitto_config"}"#).unwrap();
        let unpaged = AdminOp::MosquittoConfig {
            after: None,
            limit: None,
        };
        assert_eq!(old, unpaged);
        assert_eq!(
            serde_json::to_string(&unpaged).unwrap(),
            r#"{"op":"mosquitto_config"}"#
        );
        let query = AdminOp::ReleaseQuery {
            after: Some(ReleaseId::new("r-000009").unwrap()),
            limit: Some(2),
        };
        assert_eq!(
            serde_json::to_value(&query).unwrap(),
            serde_json::json!({"op": "release_query", "after": "r-000009", "limit": 2})
        );
        assert_eq!(query.name(), "release_query");
        assert_eq!(query.required_role(), Role::Viewer);
        assert!(!query.is_change() && !query.is_audited());
        // An export: admins only, changes nothing, audited once (at its first page).
        let first = AdminOp::MosquittoConfig {
            after: None,
            limit: Some(10),
        };
        let next = AdminOp::MosquittoConfig {
            after: Some(MachineId::new("vm-1").unwrap()),
            limit: Some(10),
        };
        for op in [&first, &next] {
            assert_eq!(op.required_role(), Role::Admin);
            assert!(!op.is_change());
        }
        assert!(first.is_audited() && !next.is_audited());
        assert!(AdminOp::KeyRotate.is_audited());
        assert!(!AdminOp::Stats.is_audited());
        let page = AdminReply::ReleasePage {
            releases: vec![serde_json::from_value(release_json()).unwrap()],
            next: Some(ReleaseId::new("r-000007").unwrap()),
            more: true,
        };
        let json = serde_json::to_value(&page).unwrap();
        assert_eq!(json["reply"], "release_page");
        assert_eq!(
            (&json["next"], &json["more"]),
            (&serde_json::json!("r-000007"), &serde_json::json!(true))
        );
        assert_eq!(serde_json::from_value::<AdminReply>(json).unwrap(), page);
        let files: AdminReply =
            serde_json::from_str(r#"{"reply":"mosquitto_files","passwd":"p\n","acl":"a\n"}"#)
                .unwrap();
        assert_eq!(
            files,
            AdminReply::MosquittoFiles {
                passwd: "p\n".into(),
                acl: "a\n".into(),
                next: None,
                more: false
            }
        );
        let page = AdminReply::MosquittoFiles {
            passwd: String::new(),
            acl: String::new(),
            next: Some(MachineId::new("vm-9").unwrap()),
            more: true,
        };
        let json = serde_json::to_value(&page).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"reply": "mosquitto_files", "passwd": "", "acl": "",
                "next": "vm-9", "more": true})
        );
        assert_eq!(serde_json::from_value::<AdminReply>(json).unwrap(), page);
    }
}
