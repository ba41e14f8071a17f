//! sled persistence: one tree per record family, values are JSON of the proto record types.
//!
//! ## Layout (schema version 1)
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `schema` / `seq` / `event` / `release` | u64 big-endian: schema version; last notice/command `seq` (one platform-wide counter); last event id; last release number |
//! | `artifacts` | artifact id (hex) | `ArtifactInfo` |
//! | `artifact_versions` | `kind/version` | artifact id (hex). A kind+version names one set of bytes forever |
//! | `releases` | release id (`r-000001`) | `ReleaseInfo` |
//! | `targets` | `release/machine` | `TargetRecord` (one per machine a release reached) |
//! | `machine_targets` | `machine/release` | empty: an index of `targets` by machine, so one machine's history reads its own records rather than every release's (written before its target record; built from `targets` once, at the first open by a build that has it, marked by `meta` `machine_targets`) |
//! | `current` | `machine/kind` | release id of the newest release targeting that machine for that kind (to mark the previous one superseded) |
//! | `machines` | machine id | `MachineInfo` (provisioned groups, online, last seen, reported state) |
//! | `secrets` | machine id | `Secret` (hex) |
//! | `counters` | `machine/channel` (`status`, `state`, `chunks`) | u64 BE: last accepted MAC'd counter (replay protection) |
//! | `events` | u64 BE event id | `FleetEvent`: every accepted status event with machine and platform times |
//! | `desired` | `machine/{m}/{kind}` or `group/{g}/{kind}` | [`DesiredNotice`]: the signed notice currently desired there, re-published by the reconciler |
//! | `history` | `machine/kind` | JSON list of versions the machine reported installed, oldest first (default rollback target) |
//! | `operators` | operator name | [`OperatorRecord`]: role, who created it, its secret |
//! | `integrators` | integrator name | [`IntegratorRecord`]: its secret (the broker password derives from it) |
//! | `audit` | u64 BE entry id | `AuditEntry`: every operator action and refusal, with who and when |
//! | `event_counts` | `machine/release` (`machine/-` without a release) | u64 BE: events stored for that pair (capped) |
//! | `rollouts` | release id | `RolloutInfo`: a staged rollout's plan, wave order, state and transitions |
//!
//! Ids cannot hold `/`, so `a/b` keys are unambiguous and prefix scans (`release/`) are exact.
//! Writes become durable only at [`Store::flush`]; callers flush before acknowledging anything.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fleetcast_proto::acl::Role;
use fleetcast_proto::admin::{
    ArtifactInfo, AuditEntry, FleetEvent, MachineInfo, OperatorInfo, ReleaseInfo, TargetRecord,
};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::rollout::RolloutInfo;
use fleetcast_proto::{ArtifactId, Kind, MachineId, ReleaseId, Target};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u64 = 1;
/// sled's page cache. Its default (1 GiB) let `serve` grow by the size of what it stored, for
/// months, until the cache filled: the event log grows with every rollout. What ingest and the
/// admin requests read is recent (targets of live releases, machines), so a small cache holds
/// the working set; older records are read from disk when asked for.
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("database {op} on tree {tree} failed: {source}")]
    Sled {
        op: &'static str,
        tree: &'static str,
        source: sled::Error,
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

#[derive(Clone)]
struct T {
    name: &'static str,
    tree: sled::Tree,
}

impl T {
    fn err(&self, op: &'static str) -> impl FnOnce(sled::Error) -> StoreError + '_ {
        move |source| StoreError::Sled {
            op,
            tree: self.name,
            source,
        }
    }

    fn get<V: DeserializeOwned>(&self, key: &str) -> Result<Option<V>, StoreError> {
        match self.tree.get(key).map_err(self.err("read"))? {
            None => Ok(None),
            Some(bytes) => self.decode(key, &bytes).map(Some),
        }
    }

    fn decode<V: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<V, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            tree: self.name,
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }

    fn put<V: Serialize>(&self, key: &str, value: &V) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.tree.insert(key, bytes).map_err(self.err("write"))?;
        Ok(())
    }

    fn scan<V: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<V>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item.map_err(self.err("scan"))?;
            out.push(self.decode(&String::from_utf8_lossy(&k), &v)?);
        }
        Ok(out)
    }

    fn get_u64(&self, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree
            .get(key)
            .map_err(self.err("read"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    fn put_u64(&self, key: &str, value: u64) -> Result<(), StoreError> {
        self.tree
            .insert(key, &value.to_be_bytes())
            .map_err(self.err("write"))?;
        Ok(())
    }
}

/// Records keyed by u64 BE id above `since`, at most `limit`, and whether more follow.
fn range_after<V: DeserializeOwned>(
    t: &T,
    since: u64,
    limit: usize,
) -> Result<(Vec<V>, bool), StoreError> {
    let mut out = Vec::new();
    let start = since.saturating_add(1).to_be_bytes();
    for item in t.tree.range(start..) {
        let (k, v) = item.map_err(t.err("scan"))?;
        if out.len() == limit {
            return Ok((out, true));
        }
        out.push(t.decode(&hex::encode(&k), &v)?);
    }
    Ok((out, false))
}

/// Whether opening failed because another `Db` (a previous instance whose background threads
/// are still letting go) holds the file lock. sled 0.34 reports that as `Other` with this text,
/// not as `WouldBlock`.
fn lock_held(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// The platform's database. Cheap to share behind an `Arc`.
pub struct Store {
    db: sled::Db,
    meta: T,
    artifacts: T,
    artifact_versions: T,
    releases: T,
    targets: T,
    machine_targets: T,
    current: T,
    machines: T,
    secrets: T,
    counters: T,
    events: T,
    desired: T,
    history: T,
    operators: T,
    integrators: T,
    audit: T,
    event_counts: T,
    rollouts: T,
    /// Serialises read-modify-write of records between the admin and ingest tasks.
    records: Mutex<()>,
}

impl Store {
    /// Opens (or creates) the database. Retries briefly while a previous instance in this
    /// process is still releasing the file lock.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut attempt = 0;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if attempt < 50 && lock_held(&e) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        };
        let tree = |name: &'static str| -> Result<T, StoreError> {
            let tree = db.open_tree(name).map_err(|source| StoreError::Sled {
                op: "open",
                tree: name,
                source,
            })?;
            Ok(T { name, tree })
        };
        let store = Store {
            meta: tree("meta")?,
            artifacts: tree("artifacts")?,
            artifact_versions: tree("artifact_versions")?,
            releases: tree("releases")?,
            targets: tree("targets")?,
            machine_targets: tree("machine_targets")?,
            current: tree("current")?,
            machines: tree("machines")?,
            secrets: tree("secrets")?,
            counters: tree("counters")?,
            events: tree("events")?,
            desired: tree("desired")?,
            history: tree("history")?,
            operators: tree("operators")?,
            integrators: tree("integrators")?,
            audit: tree("audit")?,
            event_counts: tree("event_counts")?,
            rollouts: tree("rollouts")?,
            records: Mutex::new(()),
            db,
        };
        match store.meta.get_u64("schema")? {
            None => {
                store.meta.put_u64("schema", SCHEMA_VERSION)?;
                store.flush()?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(found) => return Err(StoreError::Schema { found }),
        }
        store.index_machine_targets()?;
        Ok(store)
    }

    /// Builds the `machine_targets` index from `targets` once: a database written before the
    /// index existed has target records without index entries.
    fn index_machine_targets(&self) -> Result<(), StoreError> {
        if self.meta.get_u64("machine_targets")?.is_some() {
            return Ok(());
        }
        let mut indexed = 0u64;
        for item in self.targets.tree.iter() {
            let (k, v) = item.map_err(self.targets.err("scan"))?;
            let rec: TargetRecord = self.targets.decode(&String::from_utf8_lossy(&k), &v)?;
            self.index_target(&rec)?;
            indexed += 1;
        }
        self.meta.put_u64("machine_targets", 1)?;
        self.flush()?;
        if indexed > 0 {
            tracing::info!(records = indexed, "indexed target records by machine");
        }
        Ok(())
    }

    fn index_target(&self, rec: &TargetRecord) -> Result<(), StoreError> {
        // Only the first write of a record creates its entry: status events rewrite records
        // often, and an unconditional insert would grow the log each time.
        let key = format!("{}/{}", rec.machine, rec.release);
        self.machine_targets
            .tree
            .compare_and_swap(key.as_str(), None as Option<&[u8]>, Some(&[][..]))
            .map_err(self.machine_targets.err("write"))?
            .ok();
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|source| StoreError::Sled {
                op: "flush",
                tree: "*",
                source,
            })
    }

    pub async fn flush_async(&self) -> Result<(), StoreError> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|source| StoreError::Sled {
                op: "flush",
                tree: "*",
                source,
            })
    }

    /// Held while reading, changing and writing back records another task may change too.
    pub fn lock_records(&self) -> MutexGuard<'_, ()> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next(&self, key: &'static str) -> Result<u64, StoreError> {
        let next = self
            .meta
            .tree
            .update_and_fetch(key, |old| {
                let n = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })
            .map_err(self.meta.err("update"))?
            .expect("update_and_fetch returned the new value");
        Ok(u64::from_be_bytes(
            <[u8; 8]>::try_from(next.as_ref()).expect("8 bytes"),
        ))
    }

    /// The next notice/command `seq` (platform-wide, strictly increasing).
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        self.next("seq")
    }

    pub fn next_release_id(&self) -> Result<ReleaseId, StoreError> {
        let n = self.next("release")?;
        Ok(ReleaseId::new(format!("r-{n:06}")).expect("valid release id"))
    }

    // --- artifacts ---

    pub fn artifact(&self, id: &ArtifactId) -> Result<Option<ArtifactInfo>, StoreError> {
        self.artifacts.get(&id.to_hex())
    }

    pub fn artifact_for_version(
        &self,
        kind: &Kind,
        version: &str,
    ) -> Result<Option<ArtifactInfo>, StoreError> {
        let key = format!("{kind}/{version}");
        let Some(id) = self.artifact_versions.get::<ArtifactId>(&key)? else {
            return Ok(None);
        };
        self.artifact(&id)
    }

    /// Records a committed artifact under its id and its kind/version.
    pub fn put_artifact(&self, info: &ArtifactInfo) -> Result<(), StoreError> {
        self.artifacts.put(&info.id.to_hex(), info)?;
        self.artifact_versions
            .put(&format!("{}/{}", info.kind, info.version), &info.id)
    }

    pub fn artifacts(&self) -> Result<Vec<ArtifactInfo>, StoreError> {
        self.artifacts.scan("")
    }

    // --- releases and targets ---

    pub fn release(&self, id: &ReleaseId) -> Result<Option<ReleaseInfo>, StoreError> {
        self.releases.get(id.as_str())
    }

    pub fn put_release(&self, info: &ReleaseInfo) -> Result<(), StoreError> {
        self.releases.put(info.id.as_str(), info)
    }

    pub fn releases(&self) -> Result<Vec<ReleaseInfo>, StoreError> {
        self.releases.scan("")
    }

    /// The staged rollout of `release`, if it was published in waves.
    pub fn rollout(&self, release: &ReleaseId) -> Result<Option<RolloutInfo>, StoreError> {
        self.rollouts.get(release.as_str())
    }

    pub fn put_rollout(&self, info: &RolloutInfo) -> Result<(), StoreError> {
        self.rollouts.put(info.release.as_str(), info)
    }

    /// Every staged rollout, oldest release first.
    pub fn rollouts(&self) -> Result<Vec<RolloutInfo>, StoreError> {
        self.rollouts.scan("")
    }

    pub fn target(
        &self,
        release: &ReleaseId,
        machine: &MachineId,
    ) -> Result<Option<TargetRecord>, StoreError> {
        self.targets.get(&format!("{release}/{machine}"))
    }

    /// Stores a target record, and its `machine_targets` entry first: a record that reaches
    /// the disk is never missing from its machine's index.
    pub fn put_target(&self, rec: &TargetRecord) -> Result<(), StoreError> {
        self.index_target(rec)?;
        self.targets
            .put(&format!("{}/{}", rec.release, rec.machine), rec)
    }

    /// Every target record of `machine` (any release, any kind), in no particular order.
    /// Reads the machine's index entries and their records: O(its own records).
    pub fn targets_of_machine(&self, machine: &MachineId) -> Result<Vec<TargetRecord>, StoreError> {
        let prefix = format!("{machine}/");
        let mut out = Vec::new();
        for item in self.machine_targets.tree.scan_prefix(prefix.as_bytes()) {
            let (k, _) = item.map_err(self.machine_targets.err("scan"))?;
            let key = String::from_utf8_lossy(&k);
            let Some(release) = key.strip_prefix(&prefix) else {
                continue;
            };
            // An entry whose record never reached the disk (a crash between the two writes)
            // names nothing.
            if let Some(rec) = self.targets.get(&format!("{release}/{machine}"))? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    pub fn targets_of(&self, release: &ReleaseId) -> Result<Vec<TargetRecord>, StoreError> {
        self.targets.scan(&format!("{release}/"))
    }

    pub fn current(
        &self,
        machine: &MachineId,
        kind: &Kind,
    ) -> Result<Option<ReleaseId>, StoreError> {
        self.current.get(&format!("{machine}/{kind}"))
    }

    pub fn set_current(
        &self,
        machine: &MachineId,
        kind: &Kind,
        release: &ReleaseId,
    ) -> Result<(), StoreError> {
        self.current.put(&format!("{machine}/{kind}"), release)
    }

    // --- machines ---

    pub fn machine(&self, id: &MachineId) -> Result<Option<MachineInfo>, StoreError> {
        self.machines.get(id.as_str())
    }

    pub fn put_machine(&self, info: &MachineInfo) -> Result<(), StoreError> {
        self.machines.put(info.id.as_str(), info)
    }

    pub fn machines(&self) -> Result<Vec<MachineInfo>, StoreError> {
        self.machines.scan("")
    }

    /// Machines in id order, starting after `after` (from the first without), read lazily so
    /// a caller can stop once a page is full.
    pub fn machines_after(
        &self,
        after: Option<&MachineId>,
    ) -> impl Iterator<Item = Result<MachineInfo, StoreError>> + '_ {
        use std::ops::Bound;
        let start = match after {
            Some(m) => Bound::Excluded(sled::IVec::from(m.as_str())),
            None => Bound::Unbounded,
        };
        let t = &self.machines;
        t.tree
            .range::<sled::IVec, _>((start, Bound::Unbounded))
            .map(move |item| {
                let (k, v) = item.map_err(t.err("scan"))?;
                t.decode(&String::from_utf8_lossy(&k), &v)
            })
    }

    pub fn secret(&self, id: &MachineId) -> Result<Option<Secret>, StoreError> {
        self.secrets.get(id.as_str())
    }

    /// Looks up a secret by raw MQTT client id (the broker's auth hook).
    pub fn secret_by_client_id(&self, client: &str) -> Option<Secret> {
        MachineId::new(client)
            .ok()
            .and_then(|m| self.secret(&m).ok().flatten())
    }

    pub fn put_secret(&self, id: &MachineId, secret: &Secret) -> Result<(), StoreError> {
        self.secrets.put(id.as_str(), secret)
    }

    pub fn history(&self, machine: &MachineId, kind: &Kind) -> Result<Vec<String>, StoreError> {
        Ok(self
            .history
            .get(&format!("{machine}/{kind}"))?
            .unwrap_or_default())
    }

    /// Appends `version` unless it is already the latest entry. Returns whether it changed.
    pub fn push_history(
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
        if h.len() > 32 {
            h.remove(0);
        }
        self.history.put(&format!("{machine}/{kind}"), &h)?;
        Ok(true)
    }

    /// Forgets a machine's secret: nothing it sends verifies any more, and the broker refuses it.
    pub fn remove_secret(&self, id: &MachineId) -> Result<bool, StoreError> {
        Ok(self
            .secrets
            .tree
            .remove(id.as_str())
            .map_err(self.secrets.err("remove"))?
            .is_some())
    }

    /// The artifacts `machine` may fetch: those of the releases currently assigned to it.
    pub fn machine_artifacts(&self, machine: &MachineId) -> Result<Vec<ArtifactId>, StoreError> {
        let releases: Vec<ReleaseId> = self.current.scan(&format!("{machine}/"))?;
        let mut out = Vec::new();
        for r in releases {
            if let Some(info) = self.release(&r)? {
                out.push(info.artifact.id);
            }
        }
        Ok(out)
    }

    // --- operators, integrators, audit ---

    /// Whether the first admin operator was created (once per database).
    pub fn bootstrapped(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get_u64("bootstrapped")?.is_some())
    }

    pub fn set_bootstrapped(&self) -> Result<(), StoreError> {
        self.meta.put_u64("bootstrapped", 1)
    }

    pub fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        self.operators.get(name)
    }

    pub fn put_operator(&self, rec: &OperatorRecord) -> Result<(), StoreError> {
        self.operators.put(&rec.info.name, rec)
    }

    pub fn remove_operator(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .operators
            .tree
            .remove(name)
            .map_err(self.operators.err("remove"))?
            .is_some())
    }

    pub fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.operators.scan("")
    }

    pub fn integrator(&self, name: &str) -> Result<Option<IntegratorRecord>, StoreError> {
        self.integrators.get(name)
    }

    pub fn put_integrator(&self, rec: &IntegratorRecord) -> Result<(), StoreError> {
        self.integrators.put(&rec.name, rec)
    }

    pub fn integrators(&self) -> Result<Vec<IntegratorRecord>, StoreError> {
        self.integrators.scan("")
    }

    /// Stores an audit entry under the next id, which it fills in.
    pub fn append_audit(&self, entry: &mut AuditEntry) -> Result<(), StoreError> {
        entry.id = self.next("audit")?;
        let bytes = serde_json::to_vec(entry).expect("records serialize");
        self.audit
            .tree
            .insert(entry.id.to_be_bytes(), bytes)
            .map_err(self.audit.err("write"))?;
        Ok(())
    }

    /// Audit entries with an id above `since`, oldest first, at most `limit`; and whether more
    /// follow.
    pub fn audit_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<AuditEntry>, bool), StoreError> {
        range_after(&self.audit, since, limit)
    }

    /// Counts one more stored event for `(machine, release)` and returns the new count.
    pub fn bump_event_count(
        &self,
        machine: &MachineId,
        release: Option<&ReleaseId>,
    ) -> Result<u64, StoreError> {
        let key = match release {
            Some(r) => format!("{machine}/{r}"),
            None => format!("{machine}/-"),
        };
        let n = self.event_counts.get_u64(&key)?.unwrap_or(0) + 1;
        self.event_counts.put_u64(&key, n)?;
        Ok(n)
    }

    // --- replay counters ---

    pub fn counter(&self, machine: &MachineId, channel: &str) -> Result<u64, StoreError> {
        Ok(self
            .counters
            .get_u64(&format!("{machine}/{channel}"))?
            .unwrap_or(0))
    }

    pub fn set_counter(
        &self,
        machine: &MachineId,
        channel: &str,
        ctr: u64,
    ) -> Result<(), StoreError> {
        self.counters.put_u64(&format!("{machine}/{channel}"), ctr)
    }

    // --- events ---

    /// Stores a status event under the next event id, which it fills in.
    pub fn append_event(&self, event: &mut FleetEvent) -> Result<(), StoreError> {
        let id = self.next("event")?;
        event.id = id;
        let bytes = serde_json::to_vec(event).expect("records serialize");
        self.events
            .tree
            .insert(id.to_be_bytes(), bytes)
            .map_err(self.events.err("write"))?;
        Ok(())
    }

    /// Events with an id above `since`, oldest first, at most `limit`; and whether more follow.
    pub fn events_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<FleetEvent>, bool), StoreError> {
        range_after(&self.events, since, limit)
    }

    /// The id of the newest stored event (0 when none).
    pub fn last_event_id(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get_u64("event")?.unwrap_or(0))
    }

    /// Every stored event, oldest first.
    pub fn events(&self) -> Result<Vec<FleetEvent>, StoreError> {
        let mut out = Vec::new();
        for item in self.events.tree.iter() {
            let (k, v) = item.map_err(self.events.err("scan"))?;
            out.push(self.events.decode(&hex::encode(&k), &v)?);
        }
        Ok(out)
    }

    // --- desired notices ---

    pub fn desired_key(target: &Target, kind: &Kind) -> String {
        match target {
            Target::Machine(m) => format!("machine/{m}/{kind}"),
            Target::Group(g) => format!("group/{g}/{kind}"),
        }
    }

    pub fn desired(
        &self,
        target: &Target,
        kind: &Kind,
    ) -> Result<Option<DesiredNotice>, StoreError> {
        self.desired.get(&Self::desired_key(target, kind))
    }

    pub fn put_desired(&self, notice: &DesiredNotice) -> Result<(), StoreError> {
        self.desired
            .put(&Self::desired_key(&notice.target, &notice.kind), notice)
    }

    /// Forgets the notice desired on `target` for `kind` (a cancelled rollout's).
    pub fn remove_desired(&self, target: &Target, kind: &Kind) -> Result<(), StoreError> {
        self.desired
            .tree
            .remove(Self::desired_key(target, kind).as_str())
            .map_err(self.desired.err("remove"))?;
        Ok(())
    }

    /// Desired notices under `target` (all kinds).
    pub fn desired_for(&self, target: &Target) -> Result<Vec<DesiredNotice>, StoreError> {
        let prefix = match target {
            Target::Machine(m) => format!("machine/{m}/"),
            Target::Group(g) => format!("group/{g}/"),
        };
        self.desired.scan(&prefix)
    }

    pub fn all_desired(&self) -> Result<Vec<DesiredNotice>, StoreError> {
        self.desired.scan("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::admin::FleetEvent;
    use fleetcast_proto::{GroupId, Phase};

    fn m(s: &str) -> MachineId {
        MachineId::new(s).unwrap()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        (dir, store)
    }

    #[test]
    fn counters_survive_a_reopen_and_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.next_seq().unwrap(), 1);
            assert_eq!(s.next_seq().unwrap(), 2);
            assert_eq!(s.next_release_id().unwrap().as_str(), "r-000001");
            s.set_counter(&m("vm-1"), "status", 42).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.next_seq().unwrap(), 3);
        assert_eq!(s.next_release_id().unwrap().as_str(), "r-000002");
        assert_eq!(s.counter(&m("vm-1"), "status").unwrap(), 42);
        assert_eq!(s.counter(&m("vm-1"), "state").unwrap(), 0);
    }

    #[test]
    fn opening_waits_for_a_previous_instance_to_let_go_of_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let first = Store::open(&path).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let second = Store::open(&path);
        closer.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
    }

    #[test]
    fn events_are_numbered_in_order() {
        let (_d, s) = open();
        for phase in [Phase::Notified, Phase::Downloading, Phase::Installed] {
            let mut e = FleetEvent {
                id: 0,
                recorded_at_ms: 1,
                machine: m("vm-1"),
                release: None,
                kind: Kind::new("app").unwrap(),
                version: "1".into(),
                phase,
                at_ms: 2,
                attempt: 1,
                progress: None,
                error: None,
                detail: None,
            };
            s.append_event(&mut e).unwrap();
        }
        let ev = s.events().unwrap();
        assert_eq!(ev.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(ev[2].phase, Phase::Installed);
    }

    #[test]
    fn desired_notices_are_keyed_by_machine_or_group_and_kind() {
        let (_d, s) = open();
        let app = Kind::new("app").unwrap();
        let notice = |target: Target, seq| DesiredNotice {
            topic: "t".into(),
            seq,
            release: ReleaseId::new("r-1").unwrap(),
            kind: app.clone(),
            target,
            payload: "{}".into(),
        };
        let g = Target::Group(GroupId::new("vm-1").unwrap());
        let mt = Target::Machine(m("vm-1"));
        s.put_desired(&notice(mt.clone(), 1)).unwrap();
        s.put_desired(&notice(g.clone(), 2)).unwrap();
        s.put_desired(&notice(mt.clone(), 3)).unwrap();
        assert_eq!(s.desired(&mt, &app).unwrap().unwrap().seq, 3);
        assert_eq!(s.desired(&g, &app).unwrap().unwrap().seq, 2);
        assert_eq!(s.desired_for(&mt).unwrap().len(), 1);
        assert_eq!(s.all_desired().unwrap().len(), 2);
    }

    #[test]
    fn history_skips_repeats_and_a_corrupt_record_is_reported_not_panicked() {
        let (_d, s) = open();
        let app = Kind::new("app").unwrap();
        assert!(s.push_history(&m("vm-1"), &app, "1.0").unwrap());
        assert!(!s.push_history(&m("vm-1"), &app, "1.0").unwrap());
        assert!(s.push_history(&m("vm-1"), &app, "2.0").unwrap());
        assert_eq!(s.history(&m("vm-1"), &app).unwrap(), vec!["1.0", "2.0"]);
        s.machines
            .tree
            .insert("vm-9", b"not json".to_vec())
            .unwrap();
        let err = s.machine(&m("vm-9")).unwrap_err();
        assert!(err.to_string().contains("machines"), "{err}");
    }

    #[test]
    fn targets_scan_only_their_release() {
        let (_d, s) = open();
        let rec = |r: &str, mach: &str| TargetRecord {
            release: ReleaseId::new(r).unwrap(),
            machine: m(mach),
            kind: Kind::new("app").unwrap(),
            version: "1".into(),
            via: None,
            phase: Phase::Pending,
            phase_at_ms: 0,
            notified_at_ms: None,
            download: None,
            upgrade: None,
            error: None,
            attempts: 0,
            progress: None,
            updated_at_ms: 0,
        };
        s.put_target(&rec("r-1", "a")).unwrap();
        s.put_target(&rec("r-1", "b")).unwrap();
        s.put_target(&rec("r-10", "a")).unwrap();
        assert_eq!(
            s.targets_of(&ReleaseId::new("r-1").unwrap()).unwrap().len(),
            2
        );
    }

    fn target(r: &str, mach: &str) -> TargetRecord {
        crate::domain::target::new_target(&crate::fixtures::release(r, "1.0"), m(mach), None, 0)
    }

    fn releases_of(s: &Store, mach: &str) -> Vec<String> {
        let mut rs: Vec<String> = s
            .targets_of_machine(&m(mach))
            .unwrap()
            .into_iter()
            .map(|t| t.release.to_string())
            .collect();
        rs.sort();
        rs
    }

    #[test]
    fn a_machines_targets_are_found_through_the_index_and_only_its_own() {
        let (_d, s) = open();
        for (r, mach) in [("r-1", "a"), ("r-1", "ab"), ("r-2", "a"), ("r-2", "b")] {
            s.put_target(&target(r, mach)).unwrap();
        }
        // Rewriting a record (every status event does) keeps one entry.
        let mut again = target("r-2", "a");
        again.phase = Phase::Downloading;
        s.put_target(&again).unwrap();
        assert_eq!(releases_of(&s, "a"), ["r-1", "r-2"]);
        assert_eq!(releases_of(&s, "ab"), ["r-1"]);
        assert_eq!(releases_of(&s, "c"), Vec::<String>::new());
        assert_eq!(s.machine_targets.tree.len(), 4);
        let found = s.targets_of_machine(&m("a")).unwrap();
        assert!(found.iter().any(|t| t.phase == Phase::Downloading));
    }

    #[test]
    fn a_database_from_before_the_index_is_indexed_at_its_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            // What an older build left: records, no index entries, no marker.
            for (r, mach) in [("r-1", "a"), ("r-2", "a"), ("r-2", "b")] {
                let rec = target(r, mach);
                s.targets.put(&format!("{r}/{mach}"), &rec).unwrap();
            }
            s.meta.tree.remove("machine_targets").unwrap();
            s.flush().unwrap();
            assert_eq!(releases_of(&s, "a"), Vec::<String>::new());
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(releases_of(&s, "a"), ["r-1", "r-2"]);
        assert_eq!(releases_of(&s, "b"), ["r-2"]);
    }

    #[test]
    fn machines_are_read_in_id_order_after_a_cursor() {
        let (_d, s) = open();
        for id in ["vm-3", "vm-1", "vm-2"] {
            s.put_machine(&MachineInfo::new(m(id), 0)).unwrap();
        }
        let ids = |after: Option<&str>| -> Vec<String> {
            let after = after.map(m);
            s.machines_after(after.as_ref())
                .map(|r| r.unwrap().id.to_string())
                .collect()
        };
        assert_eq!(ids(None), ["vm-1", "vm-2", "vm-3"]);
        assert_eq!(ids(Some("vm-1")), ["vm-2", "vm-3"]);
        assert_eq!(ids(Some("vm-10")), ["vm-2", "vm-3"]);
        assert_eq!(ids(Some("vm-3")), Vec::<String>::new());
    }
}
