//! The platform's database behind the [`Store`] trait: what is stored, and the rules for
//! changing it. [`SledStore`] is the embedded implementation (its on-disk layout is documented in
//! [`sled`]); [`MemStore`] keeps everything in memory, for unit tests of the logic around it.
//!
//! Three traits, by what a caller may do without coordinating with other tasks:
//! - [`Reads`]: every read. Always allowed.
//! - [`Records`]: the writes of records that the admin and ingest tasks both read, change and
//!   write back (releases, targets, current releases, rollouts, desired notices, history,
//!   machines and secrets, operators and integrators). A `&dyn Records` exists only inside
//!   `store.transaction(|tx| ...)` (on `dyn Store` and on each implementation, over
//!   [`Store::with_records`]), which holds the store's records lock: code that changes these
//!   records cannot forget the lock. Read what you are about to change through it too.
//! - [`Store`]: [`Reads`], plus what needs no lock: durability ([`Store::flush`]), allocators
//!   (notice/command seq, release ids), append-only logs (events, audit, numbered by the store),
//!   single-key atomic updates (replay counters, event counts), immutable records (artifacts),
//!   and transactions.
//!
//! What an implementation must provide (the conformance tests in `store/conformance.rs` run the
//! same assertions against every implementation):
//! - durability at flush: writes are durable once a later [`Store::flush`] returns; callers
//!   flush before acknowledging anything, so what is lost in a crash was never acknowledged.
//! - isolation of a records transaction: transactions run one at a time, and each sees its own
//!   writes. There is no rollback: a transaction that fails midway keeps what it wrote.
//!   Transactions do not nest (the lock is not reentrant).
//! - allocators and ids that only grow, never repeated, also across a reopen; single-key
//!   updates that are atomic without the records lock.
//! - scans in key order, with exact prefixes: ids cannot hold `/`, so `r-1/` does not match
//!   `r-10/...` (the key helpers in [`key`] are the one definition of every composite key).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use fleetcast_proto::acl::Role;
use fleetcast_proto::admin::{
    ArtifactInfo, AuditEntry, FleetEvent, MachineInfo, OperatorInfo, ReleaseInfo, TargetRecord,
};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::rollout::RolloutInfo;
use fleetcast_proto::{ArtifactId, Kind, MachineId, ReleaseId, Target};
use serde::{Deserialize, Serialize};

pub mod compact;
mod mem;
pub mod sled;

#[cfg(test)]
mod conformance;

pub use self::mem::MemStore;
pub use self::sled::{SledStore, CACHE_BYTES, SCHEMA_VERSION};

/// Versions of one kind a machine's history keeps (oldest dropped first).
pub const HISTORY_LEN: usize = 32;

/// The error of any store operation. Implementations report their own failures as
/// [`StoreError::Backend`] (and [`StoreError::Open`]), so the domain never names one.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the database {} is in use by another process (a `fleetcast serve`, or a `fleetcast db` command, on the same data directory): stop it first, or give this one a --data of its own", path.display())]
    Locked { path: std::path::PathBuf },
    #[error("database {op} on tree {tree} failed: {source}")]
    Backend {
        op: &'static str,
        tree: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("record {key:?} in tree {tree} is corrupt: {reason}")]
    Corrupt {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error(
        "database schema version {found} is not supported (this build reads {SCHEMA_VERSION})"
    )]
    Schema { found: u64 },
}

/// A signed notice the platform wants delivered on `topic` (retained), kept to re-publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredNotice {
    pub topic: String,
    pub seq: u64,
    pub release: ReleaseId,
    pub kind: Kind,
    pub target: Target,
    /// The exact signed envelope (UTF-8 JSON).
    pub payload: String,
}

/// An operator: what the platform shows of it, and the secret its requests are MAC'd with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRecord {
    #[serde(flatten)]
    pub info: OperatorInfo,
    pub secret: Secret,
}

impl OperatorRecord {
    pub fn role(&self) -> Role {
        self.info.role
    }
}

/// A read-only integrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegratorRecord {
    pub name: String,
    pub secret: Secret,
    pub created_at_ms: u64,
    pub created_by: String,
}

/// The last counter the platform accepted from one admin client (an operator's client id) for a
/// change, and when: kept across restarts so a change replayed within the freshness window after
/// a restart is refused, as it is before one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminCounter {
    pub client: String,
    pub ctr: u64,
    pub at_ms: u64,
}

/// The composite keys every implementation uses (sled's on-disk keys; see [`sled`]).
pub mod key {
    use fleetcast_proto::{Kind, MachineId, ReleaseId, Target};

    /// `targets`: `release/machine`.
    pub fn target(release: &ReleaseId, machine: &MachineId) -> String {
        format!("{release}/{machine}")
    }

    /// `machine_targets`: `machine/release`.
    pub fn machine_target(machine: &MachineId, release: &ReleaseId) -> String {
        format!("{machine}/{release}")
    }

    /// `current` and `history`: `machine/kind`.
    pub fn machine_kind(machine: &MachineId, kind: &Kind) -> String {
        format!("{machine}/{kind}")
    }

    /// `artifact_versions`: `kind/version`.
    pub fn artifact_version(kind: &Kind, version: &str) -> String {
        format!("{kind}/{version}")
    }

    /// `counters`: `machine/channel`.
    pub fn counter(machine: &MachineId, channel: &str) -> String {
        format!("{machine}/{channel}")
    }

    /// `event_counts`: `machine/release`, `machine/-` without a release.
    pub fn event_count(machine: &MachineId, release: Option<&ReleaseId>) -> String {
        match release {
            Some(r) => format!("{machine}/{r}"),
            None => format!("{machine}/-"),
        }
    }

    /// `desired`: `machine/{m}/{kind}` or `group/{g}/{kind}`.
    pub fn desired(target: &Target, kind: &Kind) -> String {
        format!("{}{kind}", desired_prefix(target))
    }

    /// Every desired notice of `target`.
    pub fn desired_prefix(target: &Target) -> String {
        match target {
            Target::Machine(m) => format!("machine/{m}/"),
            Target::Group(g) => format!("group/{g}/"),
        }
    }

    /// The release id of the `n`th release.
    pub fn release_id(n: u64) -> ReleaseId {
        ReleaseId::new(format!("r-{n:06}")).expect("valid release id")
    }
}

/// Every read. Lists come in key order.
pub trait Reads {
    // --- artifacts ---

    fn artifact(&self, id: &ArtifactId) -> Result<Option<ArtifactInfo>, StoreError>;

    /// The artifact uploaded as `kind` `version` (a kind+version names one set of bytes forever).
    fn artifact_for_version(
        &self,
        kind: &Kind,
        version: &str,
    ) -> Result<Option<ArtifactInfo>, StoreError>;

    fn artifacts(&self) -> Result<Vec<ArtifactInfo>, StoreError>;

    // --- releases, targets, current ---

    fn release(&self, id: &ReleaseId) -> Result<Option<ReleaseInfo>, StoreError>;

    fn releases(&self) -> Result<Vec<ReleaseInfo>, StoreError>;

    /// The record of `machine` for `release`, if the release reached it.
    fn target(
        &self,
        release: &ReleaseId,
        machine: &MachineId,
    ) -> Result<Option<TargetRecord>, StoreError>;

    /// Every target record of `release`, by machine id.
    fn targets_of(&self, release: &ReleaseId) -> Result<Vec<TargetRecord>, StoreError>;

    /// Every target record of `machine` (any release, any kind), by release id. O(its own
    /// records), not O(all records).
    fn targets_of_machine(&self, machine: &MachineId) -> Result<Vec<TargetRecord>, StoreError>;

    /// The newest release targeting `machine` for `kind`.
    fn current(&self, machine: &MachineId, kind: &Kind) -> Result<Option<ReleaseId>, StoreError>;

    /// The current release of each kind of `machine`, by kind.
    fn current_releases(&self, machine: &MachineId) -> Result<Vec<ReleaseId>, StoreError>;

    /// The artifacts `machine` may fetch: those of the releases currently assigned to it.
    fn machine_artifacts(&self, machine: &MachineId) -> Result<Vec<ArtifactId>, StoreError> {
        let mut out = Vec::new();
        for r in self.current_releases(machine)? {
            if let Some(info) = self.release(&r)? {
                out.push(info.artifact.id);
            }
        }
        Ok(out)
    }

    // --- staged rollouts ---

    /// The staged rollout of `release`, if it was published in waves.
    fn rollout(&self, release: &ReleaseId) -> Result<Option<RolloutInfo>, StoreError>;

    /// Every staged rollout, by release id.
    fn rollouts(&self) -> Result<Vec<RolloutInfo>, StoreError>;

    // --- machines, secrets, history ---

    fn machine(&self, id: &MachineId) -> Result<Option<MachineInfo>, StoreError>;

    fn machines(&self) -> Result<Vec<MachineInfo>, StoreError>;

    /// Machines in id order, starting after `after` (from the first without), read lazily so
    /// a caller can stop once a page is full.
    fn machines_after<'a>(
        &'a self,
        after: Option<&MachineId>,
    ) -> Box<dyn Iterator<Item = Result<MachineInfo, StoreError>> + 'a>;

    fn secret(&self, id: &MachineId) -> Result<Option<Secret>, StoreError>;

    /// Versions of `kind` the machine reported installed, oldest first.
    fn history(&self, machine: &MachineId, kind: &Kind) -> Result<Vec<String>, StoreError>;

    /// How many kinds the machine has a history of.
    fn history_kinds(&self, machine: &MachineId) -> Result<usize, StoreError>;

    // --- operators, integrators ---

    /// Whether the first admin operator was created (once per database).
    fn bootstrapped(&self) -> Result<bool, StoreError>;

    fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError>;

    fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError>;

    fn integrator(&self, name: &str) -> Result<Option<IntegratorRecord>, StoreError>;

    fn integrators(&self) -> Result<Vec<IntegratorRecord>, StoreError>;

    // --- replay counters ---

    /// The last accepted MAC'd counter of `machine` on `channel` (0 when none).
    fn counter(&self, machine: &MachineId, channel: &str) -> Result<u64, StoreError>;

    /// Every admin client's last accepted change counter, in client order.
    fn admin_counters(&self) -> Result<Vec<AdminCounter>, StoreError>;

    // --- events and audit ---

    /// Events with an id above `since`, oldest first, at most `limit`; and whether more follow.
    fn events_since(&self, since: u64, limit: usize)
        -> Result<(Vec<FleetEvent>, bool), StoreError>;

    /// Every stored event, oldest first.
    fn events(&self) -> Result<Vec<FleetEvent>, StoreError>;

    /// The id of the newest event ever stored (0: none); ids are never reused.
    fn last_event_id(&self) -> Result<u64, StoreError>;

    /// Audit entries with an id above `since`, oldest first, at most `limit`; and whether more
    /// follow.
    fn audit_since(&self, since: u64, limit: usize) -> Result<(Vec<AuditEntry>, bool), StoreError>;

    // --- desired notices ---

    fn desired(&self, target: &Target, kind: &Kind) -> Result<Option<DesiredNotice>, StoreError>;

    /// Desired notices under `target` (all kinds).
    fn desired_for(&self, target: &Target) -> Result<Vec<DesiredNotice>, StoreError>;

    fn all_desired(&self) -> Result<Vec<DesiredNotice>, StoreError>;
}

/// Writes of records that several tasks read, change and write back. Reachable only inside
/// `transaction` (records lock held; see [`Store::with_records`]).
pub trait Records: Reads {
    fn put_release(&self, info: &ReleaseInfo) -> Result<(), StoreError>;

    /// Stores a target record (and whatever index finds it by machine).
    fn put_target(&self, rec: &TargetRecord) -> Result<(), StoreError>;

    fn set_current(
        &self,
        machine: &MachineId,
        kind: &Kind,
        release: &ReleaseId,
    ) -> Result<(), StoreError>;

    fn put_rollout(&self, info: &RolloutInfo) -> Result<(), StoreError>;

    /// Forgets a release's record (`release_remove`, after its target records). Returns
    /// whether there was one.
    fn remove_release(&self, id: &ReleaseId) -> Result<bool, StoreError>;

    /// Forgets `machine`'s target record of `release`, the entry that finds it by machine and
    /// the count of its stored events (the events themselves stay). Returns whether there was
    /// a record.
    fn remove_target(&self, release: &ReleaseId, machine: &MachineId) -> Result<bool, StoreError>;

    /// Forgets which release is `machine`'s current one of `kind`.
    fn remove_current(&self, machine: &MachineId, kind: &Kind) -> Result<(), StoreError>;

    /// Forgets the staged rollout of `release`. Returns whether there was one.
    fn remove_rollout(&self, release: &ReleaseId) -> Result<bool, StoreError>;

    /// Stores `notice` as the one desired on its target for its kind.
    fn put_desired(&self, notice: &DesiredNotice) -> Result<(), StoreError>;

    /// Forgets the notice desired on `target` for `kind` (a cancelled rollout's).
    fn remove_desired(&self, target: &Target, kind: &Kind) -> Result<(), StoreError>;

    fn put_machine(&self, info: &MachineInfo) -> Result<(), StoreError>;

    /// Stores every record of `infos` in one atomic write: after a crash, all of them are
    /// stored or none (`machine_groups_batch`).
    fn put_machines(&self, infos: &[MachineInfo]) -> Result<(), StoreError>;

    fn put_secret(&self, id: &MachineId, secret: &Secret) -> Result<(), StoreError>;

    /// Forgets a machine's secret: nothing it sends verifies any more, and the broker refuses it.
    /// Returns whether there was one.
    fn remove_secret(&self, id: &MachineId) -> Result<bool, StoreError>;

    /// Replaces `machine`'s history of `kind`.
    fn put_history(
        &self,
        machine: &MachineId,
        kind: &Kind,
        versions: &[String],
    ) -> Result<(), StoreError>;

    /// Appends `version` unless it is already the latest entry (keeping the last
    /// [`HISTORY_LEN`]). Returns whether it changed.
    fn push_history(
        &self,
        machine: &MachineId,
        kind: &Kind,
        version: &str,
    ) -> Result<bool, StoreError> {
        let mut h = self.history(machine, kind)?;
        if h.last().map(String::as_str) == Some(version) {
            return Ok(false);
        }
        h.push(version.to_owned());
        if h.len() > HISTORY_LEN {
            h.drain(..h.len() - HISTORY_LEN);
        }
        self.put_history(machine, kind, &h)?;
        Ok(true)
    }

    fn set_bootstrapped(&self) -> Result<(), StoreError>;

    fn put_operator(&self, rec: &OperatorRecord) -> Result<(), StoreError>;

    /// Returns whether the operator existed.
    fn remove_operator(&self, name: &str) -> Result<bool, StoreError>;

    fn put_integrator(&self, rec: &IntegratorRecord) -> Result<(), StoreError>;

    /// Returns whether the integrator existed.
    fn remove_integrator(&self, name: &str) -> Result<bool, StoreError>;
}

/// What [`Store::flush_async`] returns.
pub type Flush<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// The platform's database. Shared as `Arc<dyn Store>`.
pub trait Store: Reads + Send + Sync {
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// [`Store::flush`] without blocking the async thread.
    fn flush_async(&self) -> Flush<'_>;

    /// The database's bytes on disk and its size right after its last compaction (sled's
    /// files; [`compact`]); `None` for a store without files. Reads the file system: call it
    /// off the async threads.
    fn size_on_disk(&self) -> Result<Option<compact::Sizes>, StoreError> {
        Ok(None)
    }

    /// Compacts the database while the store stays in use ([`SledStore::compact`]: writes wait
    /// until it is done); `None` for a store without files. Blocks for as long as the copy
    /// takes: call it off the async threads.
    fn compact_online(&self) -> Option<Result<compact::Report, compact::CompactError>> {
        None
    }

    /// Copies the database, in use, into a new one at `to` ([`SledStore::backup`]), then runs
    /// `also` (what else the backup takes: keys, artifact files), all with every write held, so
    /// that what `also` reads agrees with the copy; `None` for a store without files. Blocks
    /// for as long as the copy takes: call it off the async threads.
    fn backup_online(
        &self,
        to: &Path,
        also: &mut dyn FnMut() -> Result<(), compact::CompactError>,
    ) -> Option<Result<compact::Report, compact::CompactError>> {
        let _ = (to, also);
        None
    }

    /// Runs `f` once with the records lock held. Callers use `transaction` (on `dyn Store`,
    /// and on each implementation), which returns what `f` returns.
    fn with_records(&self, f: &mut dyn FnMut(&dyn Records));

    /// The next notice/command `seq` (platform-wide, strictly increasing).
    fn next_seq(&self) -> Result<u64, StoreError>;

    /// Makes every later [`Store::next_seq`] above `at_least` (nothing if it is already).
    fn raise_seq(&self, at_least: u64) -> Result<(), StoreError>;

    /// A release id never handed out before (`r-000001`, `r-000002`, ...).
    fn next_release_id(&self) -> Result<ReleaseId, StoreError>;

    /// Records a committed artifact under its id and its kind/version. Written again only to
    /// mark its bytes removed (`artifact_remove`) or stored again (the same bytes uploaded
    /// again): its id, kind and version never change.
    fn put_artifact(&self, info: &ArtifactInfo) -> Result<(), StoreError>;

    /// Stores a status event under the next event id, which it fills in.
    fn append_event(&self, event: &mut FleetEvent) -> Result<(), StoreError>;

    /// Stores an audit entry under the next entry id, which it fills in.
    fn append_audit(&self, entry: &mut AuditEntry) -> Result<(), StoreError>;

    /// Deletes stored events whose id is `keep` or more below the newest id handed out, oldest
    /// first, at most `batch` records; returns how many records it deleted (fewer than `batch`:
    /// none left to delete). A record is one event, or a block of events stored together
    /// ([`sled`] stores them so): a block goes once all of its events are that old, so up to
    /// one block's worth more than `keep` may stay. Not durable by itself: a delete lost in a
    /// crash is made again.
    fn prune_events(&self, keep: u64, batch: usize) -> Result<usize, StoreError>;

    /// Raises `machine`'s replay counter on `channel` to `ctr` if `ctr` is above it, atomically.
    /// Returns the counter before: `ctr` was fresh if it is above that, a replay otherwise.
    fn raise_counter(
        &self,
        machine: &MachineId,
        channel: &str,
        ctr: u64,
    ) -> Result<u64, StoreError>;

    /// Forgets every replay counter of `machine` (all channels), so counting starts again from
    /// 0, and its stored-event counts (per release). Only for a machine whose secret was just
    /// replaced: nothing MAC'd with the old one verifies any more, and counters the old one
    /// raised (a stolen config can raise them to `u64::MAX`, and use up the event cap of its
    /// releases) must not lock out the machine that holds the new one. Not durable by itself.
    fn reset_counters(&self, machine: &MachineId) -> Result<(), StoreError>;

    /// Stores `counter` as its client's last accepted change counter (replacing the one before).
    /// Not durable by itself: the admin task writes it before it runs the change, and the
    /// change's own flush makes both durable.
    fn put_admin_counter(&self, counter: &AdminCounter) -> Result<(), StoreError>;

    /// Forgets `client`'s admin counter (its requests could no longer pass the freshness
    /// check). Not durable by itself.
    fn remove_admin_counter(&self, client: &str) -> Result<(), StoreError>;

    /// Counts `by` more stored events for `(machine, release)`, atomically; returns the new
    /// count.
    fn bump_event_count(
        &self,
        machine: &MachineId,
        release: Option<&ReleaseId>,
        by: u64,
    ) -> Result<u64, StoreError>;

    /// The stored events counted for `(machine, release)`.
    fn event_count(
        &self,
        machine: &MachineId,
        release: Option<&ReleaseId>,
    ) -> Result<u64, StoreError>;

    /// Stores status events under the next event ids, in order, filling them in (one
    /// [`Store::append_event`] each unless the store can take them together: [`sled`] stores
    /// them in blocks, one write per block).
    fn append_events(&self, events: &mut [FleetEvent]) -> Result<(), StoreError> {
        events.iter_mut().try_for_each(|e| self.append_event(e))
    }
}

impl dyn Store + '_ {
    /// Runs `f` with the records lock held: the only way to a [`Records`]. Keep it short and
    /// synchronous (ingest waits on it); decide and store inside, send after.
    pub fn transaction<T>(&self, f: impl FnOnce(&dyn Records) -> T) -> T {
        run_transaction(self, f)
    }
}

/// `transaction` for a concrete store (an inherent method there, as on `dyn Store`).
fn run_transaction<S: Store + ?Sized, T>(store: &S, f: impl FnOnce(&dyn Records) -> T) -> T {
    let mut f = Some(f);
    let mut out = None;
    store.with_records(&mut |records| {
        if let Some(f) = f.take() {
            out = Some(f(records));
        }
    });
    out.expect("Store::with_records runs its closure")
}

/// A type whose reads are those of another [`Reads`] (a store whose records live in a part only
/// its transactions hand out).
pub trait ReadsThrough {
    /// What one read goes through: a reference, or a handle that keeps the records it reads
    /// from alive while the store replaces them ([`SledStore::compact`] does).
    type Reader<'a>: std::ops::Deref<Target = dyn Reads>
    where
        Self: 'a;

    fn reads(&self) -> Self::Reader<'_>;

    /// [`Reads::machines_after`]: its iterator outlives the call, so it cannot go through a
    /// [`ReadsThrough::Reader`] made for the call.
    fn machines_after_through<'a>(
        &'a self,
        after: Option<&MachineId>,
    ) -> Box<dyn Iterator<Item = Result<MachineInfo, StoreError>> + 'a>;
}

impl<S: ReadsThrough> Reads for S {
    fn artifact(&self, id: &ArtifactId) -> Result<Option<ArtifactInfo>, StoreError> {
        self.reads().artifact(id)
    }
    fn artifact_for_version(
        &self,
        kind: &Kind,
        version: &str,
    ) -> Result<Option<ArtifactInfo>, StoreError> {
        self.reads().artifact_for_version(kind, version)
    }
    fn artifacts(&self) -> Result<Vec<ArtifactInfo>, StoreError> {
        self.reads().artifacts()
    }
    fn release(&self, id: &ReleaseId) -> Result<Option<ReleaseInfo>, StoreError> {
        self.reads().release(id)
    }
    fn releases(&self) -> Result<Vec<ReleaseInfo>, StoreError> {
        self.reads().releases()
    }
    fn target(
        &self,
        release: &ReleaseId,
        machine: &MachineId,
    ) -> Result<Option<TargetRecord>, StoreError> {
        self.reads().target(release, machine)
    }
    fn targets_of(&self, release: &ReleaseId) -> Result<Vec<TargetRecord>, StoreError> {
        self.reads().targets_of(release)
    }
    fn targets_of_machine(&self, machine: &MachineId) -> Result<Vec<TargetRecord>, StoreError> {
        self.reads().targets_of_machine(machine)
    }
    fn current(&self, machine: &MachineId, kind: &Kind) -> Result<Option<ReleaseId>, StoreError> {
        self.reads().current(machine, kind)
    }
    fn current_releases(&self, machine: &MachineId) -> Result<Vec<ReleaseId>, StoreError> {
        self.reads().current_releases(machine)
    }
    fn machine_artifacts(&self, machine: &MachineId) -> Result<Vec<ArtifactId>, StoreError> {
        self.reads().machine_artifacts(machine)
    }
    fn rollout(&self, release: &ReleaseId) -> Result<Option<RolloutInfo>, StoreError> {
        self.reads().rollout(release)
    }
    fn rollouts(&self) -> Result<Vec<RolloutInfo>, StoreError> {
        self.reads().rollouts()
    }
    fn machine(&self, id: &MachineId) -> Result<Option<MachineInfo>, StoreError> {
        self.reads().machine(id)
    }
    fn machines(&self) -> Result<Vec<MachineInfo>, StoreError> {
        self.reads().machines()
    }
    fn machines_after<'a>(
        &'a self,
        after: Option<&MachineId>,
    ) -> Box<dyn Iterator<Item = Result<MachineInfo, StoreError>> + 'a> {
        self.machines_after_through(after)
    }
    fn secret(&self, id: &MachineId) -> Result<Option<Secret>, StoreError> {
        self.reads().secret(id)
    }
    fn history(&self, machine: &MachineId, kind: &Kind) -> Result<Vec<String>, StoreError> {
        self.reads().history(machine, kind)
    }
    fn history_kinds(&self, machine: &MachineId) -> Result<usize, StoreError> {
        self.reads().history_kinds(machine)
    }
    fn bootstrapped(&self) -> Result<bool, StoreError> {
        self.reads().bootstrapped()
    }
    fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        self.reads().operator(name)
    }
    fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.reads().operators()
    }
    fn integrator(&self, name: &str) -> Result<Option<IntegratorRecord>, StoreError> {
        self.reads().integrator(name)
    }
    fn integrators(&self) -> Result<Vec<IntegratorRecord>, StoreError> {
        self.reads().integrators()
    }
    fn counter(&self, machine: &MachineId, channel: &str) -> Result<u64, StoreError> {
        self.reads().counter(machine, channel)
    }
    fn admin_counters(&self) -> Result<Vec<AdminCounter>, StoreError> {
        self.reads().admin_counters()
    }
    fn events_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<FleetEvent>, bool), StoreError> {
        self.reads().events_since(since, limit)
    }
    fn events(&self) -> Result<Vec<FleetEvent>, StoreError> {
        self.reads().events()
    }
    fn last_event_id(&self) -> Result<u64, StoreError> {
        self.reads().last_event_id()
    }
    fn audit_since(&self, since: u64, limit: usize) -> Result<(Vec<AuditEntry>, bool), StoreError> {
        self.reads().audit_since(since, limit)
    }
    fn desired(&self, target: &Target, kind: &Kind) -> Result<Option<DesiredNotice>, StoreError> {
        self.reads().desired(target, kind)
    }
    fn desired_for(&self, target: &Target) -> Result<Vec<DesiredNotice>, StoreError> {
        self.reads().desired_for(target)
    }
    fn all_desired(&self) -> Result<Vec<DesiredNotice>, StoreError> {
        self.reads().all_desired()
    }
}
