//! [`SledStore`]: the embedded [`Store`], on sled. One tree per record family, values are JSON
//! of the proto record types. The records lock is a mutex beside the database; sled's own
//! writes are atomic per key, which the allocators and single-key updates use.
//!
//! ## Layout (schema version 2)
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `schema` / `seq` / `event` / `release` / `audit` | u64 big-endian: schema version; last notice/command `seq` (one platform-wide counter); last event id; last release number; last audit entry id. Markers (`bootstrapped`, `machine_targets`): present once done. `compacted`: u64 BE, the size on disk right after the last compaction ([`super::compact`]) |
//! | `artifacts` | artifact id (hex) | `ArtifactInfo` |
//! | `artifact_versions` | `kind/version` | artifact id (hex). A kind+version names one set of bytes forever |
//! | `releases` | release id (`r-000001`) | `ReleaseInfo`. `release_remove` deletes it with the `targets`, `machine_targets`, `event_counts` and `rollouts` keys that name it (and notices, `current` entries no one reads) |
//! | `targets` | `release/machine` | `TargetRecord` (one per machine a release reached) |
//! | `machine_targets` | `machine/release` | empty: an index of `targets` by machine, so one machine's history reads its own records rather than every release's (written before its target record; built from `targets` once, at the first open by a build that has it, marked by `meta` `machine_targets`) |
//! | `current` | `machine/kind` | release id of the newest release targeting that machine for that kind (to mark the previous one superseded) |
//! | `machines` | machine id | `MachineInfo` (provisioned groups, online, last seen, reported state) |
//! | `secrets` | machine id | `Secret` (hex) |
//! | `counters` | `machine/channel` (`status`, `state`, `chunks`) | u64 BE: last accepted MAC'd counter (replay protection) |
//! | `events` | u64 BE id of the block's last event | JSON array of `FleetEvent`s with consecutive ids (a block: at most [`EVENTS_PER_BLOCK`] events and [`EVENT_BLOCK_BYTES`], or one larger event): every accepted status event with machine and platform times; the newest `events_kept` (`retention`, whole blocks). Schema 1 stored each event alone, as an object under its own id; such a record is read as a block of one |
//! | `desired` | `machine/{m}/{kind}` or `group/{g}/{kind}` | [`DesiredNotice`]: the signed notice currently desired there, re-published by the reconciler |
//! | `history` | `machine/kind` | JSON list of versions the machine reported installed, oldest first (default rollback target) |
//! | `operators` | operator name | [`OperatorRecord`]: role, who created it, its secret |
//! | `integrators` | integrator name | [`IntegratorRecord`]: its secret (the broker password derives from it) |
//! | `audit` | u64 BE entry id | `AuditEntry`: every operator action and refusal, with who and when |
//! | `event_counts` | `machine/release` (`machine/-` without a release) | u64 BE: events stored for that pair (capped) |
//! | `rollouts` | release id | `RolloutInfo`: a staged rollout's plan, wave order, state and transitions |
//! | `admin_counters` | admin client id | [`AdminCounter`]: the client's last accepted change counter and when (replay protection across restarts; entries older than the freshness window are removed) |
//!
//! Ids cannot hold `/`, so `a/b` keys are unambiguous and prefix scans (`release/`) are exact.
//! Writes become durable only at [`Store::flush`]; callers flush before acknowledging anything.
//! Composite keys come from [`super::key`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parking_lot::{RwLock, RwLockReadGuard};

use fleetcast_proto::admin::{
    ArtifactInfo, AuditEntry, FleetEvent, MachineInfo, ReleaseInfo, TargetRecord,
};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::rollout::RolloutInfo;
use fleetcast_proto::{ArtifactId, Kind, MachineId, ReleaseId, Target};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    key, AdminCounter, DesiredNotice, Flush, IntegratorRecord, OperatorRecord, Reads, ReadsThrough,
    Records, Store, StoreError,
};

/// 2: events are stored in blocks (an array under the id of its last event). A version 1
/// database is read as it is (its lone events are blocks of one) and marked 2 at its first
/// open, so that an older build, which would take a block for a corrupt record, refuses it.
pub const SCHEMA_VERSION: u64 = 2;

/// Events stored under one key at most. One sled insert per event was most of what storing a
/// status cost (ingest: 6 of 8 µs per event; sled alone, 220-byte records: 8 µs per insert
/// one by one against 2.2 µs per record in blocks of 16, ad hoc 2026-11-27). sled splits a
/// leaf above 16 entries and writes a node over 128 KiB as a file of its own (a blob), so a
/// block stays small: 16 events of about 220 bytes, or fewer large ones.
pub const EVENTS_PER_BLOCK: usize = 16;
/// A block holds at most this many bytes, unless one event alone is larger (an event's texts
/// may take 8 KiB).
pub const EVENT_BLOCK_BYTES: usize = 3 * 1024;
/// sled's page cache. Its default (1 GiB) let `serve` grow by the size of what it stored, for
/// months, until the cache filled: the event log grows with every rollout. What ingest and the
/// admin requests read is recent (targets of live releases, machines), so a small cache holds
/// the working set; older records are read from disk when asked for. sled counts what it
/// caches by its size on disk, and takes more than that in memory (spacejam/sled#986). At
/// 64 MiB, `serve` grew 102 -> 278 MB over thirty 1,000-machine rollouts (the cache filling
/// with events and target records), at 16 MiB 104 -> 233 MB (ad hoc, 2026-11-26), and the
/// ingest bench stored 10,100-10,400 events/s against 10,300-10,500 (within its noise). By
/// their sizes, 16 MiB holds the machine, secret and counter records of 10,000 machines and
/// one release's targets for them (about 8 MB on disk); not measured at 10,000.
pub const CACHE_BYTES: u64 = 16 * 1024 * 1024;

fn backend(op: &'static str, tree: &'static str) -> impl FnOnce(::sled::Error) -> StoreError {
    move |source| StoreError::Backend {
        op,
        tree,
        source: Box::new(source),
    }
}

/// One tree and its name (for errors).
#[derive(Clone)]
struct T {
    name: &'static str,
    tree: ::sled::Tree,
}

impl T {
    fn err(&self, op: &'static str) -> impl FnOnce(::sled::Error) -> StoreError {
        backend(op, self.name)
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

    fn put<V: Serialize + ?Sized>(&self, key: &str, value: &V) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.tree.insert(key, bytes).map_err(self.err("write"))?;
        Ok(())
    }

    /// Writes every `(key, value)` in one sled batch: atomic, also across a crash.
    fn put_all<'a, V: Serialize + 'a>(
        &self,
        items: impl IntoIterator<Item = (&'a str, &'a V)>,
    ) -> Result<(), StoreError> {
        let mut batch = ::sled::Batch::default();
        for (key, value) in items {
            batch.insert(key, serde_json::to_vec(value).expect("records serialize"));
        }
        self.tree.apply_batch(batch).map_err(self.err("write"))
    }

    fn remove(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.tree.remove(key).map_err(self.err("remove"))?.is_some())
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

    /// Adds one to the u64 under `key` (0 when absent), atomically; returns the new value.
    fn increment(&self, key: &str) -> Result<u64, StoreError> {
        self.increment_by(key, 1)
    }

    /// Adds `by` to the u64 BE counter at `key` (absent: 0), atomically; the new value.
    fn increment_by(&self, key: &str, by: u64) -> Result<u64, StoreError> {
        self.update_counter(key, |n| n + by)
    }

    /// Replaces the u64 BE counter at `key` (absent: 0) with `f` of it, atomically; the new
    /// value.
    fn update_counter(&self, key: &str, f: impl Fn(u64) -> u64) -> Result<u64, StoreError> {
        let next = self
            .tree
            .update_and_fetch(key, |old| {
                let n = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some(f(n).to_be_bytes().to_vec())
            })
            .map_err(self.err("update"))?
            .expect("update_and_fetch returned the new value");
        Ok(u64::from_be_bytes(
            <[u8; 8]>::try_from(next.as_ref()).expect("8 bytes"),
        ))
    }

    /// Stores `value` under the u64 BE id `id`.
    fn put_numbered<V: Serialize>(&self, id: u64, value: &V) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.tree
            .insert(id.to_be_bytes(), bytes)
            .map_err(self.err("write"))?;
        Ok(())
    }

    /// Records numbered by u64 BE id above `since`, at most `limit`, and whether more follow.
    /// A key is the id of its record, or of the last record of a block of them stored together
    /// (a JSON array with consecutive ids: the event log's), so the first key above `since` is
    /// the block that holds `since + 1`, and what a block holds up to `since` is skipped.
    fn range_after<V: DeserializeOwned + Numbered>(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<V>, bool), StoreError> {
        let mut out = Vec::new();
        let start = since.saturating_add(1).to_be_bytes();
        for item in self.tree.range(start..) {
            let (k, v) = item.map_err(self.err("scan"))?;
            let key = hex::encode(&k);
            let records = match v.first() {
                Some(b'[') => self.decode(&key, &v)?,
                _ => vec![self.decode(&key, &v)?],
            };
            for record in records.into_iter().filter(|r: &V| r.id() > since) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(record);
            }
        }
        Ok((out, false))
    }
}

/// A record numbered by the store (events, audit entries).
trait Numbered {
    fn id(&self) -> u64;
}

impl Numbered for FleetEvent {
    fn id(&self) -> u64 {
        self.id
    }
}

impl Numbered for AuditEntry {
    fn id(&self) -> u64 {
        self.id
    }
}

/// Whether opening failed because another `Db` (a previous instance whose background threads
/// are still letting go) holds the file lock. sled 0.34 reports that as `Other` with this text,
/// not as `WouldBlock`.
pub(super) fn lock_held(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// The trees. Reads and [`Records`] writes; the latter only through
/// [`SledStore::with_records`], which is the one place that hands out a `&Tables`.
struct Tables {
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
    admin_counters: T,
}

/// The platform's database on sled. Cheap to share behind an `Arc`.
///
/// The open database can be replaced while the store is in use ([`SledStore::compact`]):
/// reads take the one open now (an `Arc`, so a read that began before a replacement finishes
/// on the database it began on, which holds the same records), writes hold `writes` shared
/// while they write, and a compaction holds it exclusively from its flush to the swap, so no
/// write lands in the old database after its copy began.
pub struct SledStore {
    path: PathBuf,
    open: RwLock<Arc<Open>>,
    writes: RwLock<()>,
    /// Held by a compaction: a second one (the hourly look and an operator's `db_compact` at
    /// once) is refused rather than copying the database again right after.
    pub(super) compacting: Mutex<()>,
    /// Serialises transactions (read-modify-write of records) between the admin and ingest tasks.
    records: Mutex<()>,
}

/// Runs `wait`, which blocks until a compaction ends: on a worker thread of a multi-threaded
/// tokio runtime through `block_in_place`, which hands the thread's other tasks to another
/// worker first, so that a write waiting for the copy holds up only the task that makes it
/// (with two workers, two such writes would otherwise stop every connection and transfer for
/// as long as the copy takes). Anywhere else (a blocking thread, a test's single-threaded
/// runtime, no runtime), as it is.
pub(crate) fn off_the_runtime<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

thread_local! {
    /// The stores (by address) whose `writes` lock this thread holds, once per hold.
    static HOLDING: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A write's hold on [`SledStore::writes`]: the lock itself for a thread's first hold, nothing
/// for a hold nested in it.
struct Writing<'a> {
    key: usize,
    _guard: Option<RwLockReadGuard<'a, ()>>,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        HOLDING.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(at) = h.iter().rposition(|k| *k == self.key) {
                h.remove(at);
            }
        });
    }
}

/// One opened database and its trees.
pub(super) struct Open {
    pub(super) db: ::sled::Db,
    t: Tables,
}

/// A read's hold on the database open when it began ([`ReadsThrough::Reader`]).
pub struct Snapshot(Arc<Open>);

impl std::ops::Deref for Snapshot {
    type Target = dyn Reads;

    fn deref(&self) -> &Self::Target {
        &self.0.t
    }
}

impl SledStore {
    /// Opens (or creates) the database. Retries briefly while a previous instance in this
    /// process is still releasing the file lock.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(did) =
            super::compact::finish_interrupted(path).map_err(|e| StoreError::Open {
                path: path.to_owned(),
                source: Box::new(e),
            })?
        {
            tracing::warn!(db = %path.display(), "{did}");
        }
        Ok(SledStore {
            path: path.to_owned(),
            open: RwLock::new(Arc::new(Open::at(path)?)),
            writes: RwLock::new(()),
            compacting: Mutex::new(()),
            records: Mutex::new(()),
        })
    }

    /// The database open now, for a read.
    fn now(&self) -> Arc<Open> {
        self.open.read().clone()
    }

    /// The database open now, and the hold that keeps a compaction from copying it until the
    /// write is done ([`Writing`]).
    fn writing(&self) -> (Writing<'_>, Arc<Open>) {
        let key = self as *const Self as usize;
        let nested = HOLDING.with(|h| {
            let mut h = h.borrow_mut();
            let nested = h.contains(&key);
            h.push(key);
            nested
        });
        // A compaction waiting for the lock keeps new holders out (so that a steady stream of
        // writes cannot starve it); a thread that holds it already (a write inside a
        // transaction) must not wait for a compaction that waits for it.
        let held = Writing {
            key,
            _guard: (!nested).then(|| {
                self.writes
                    .try_read()
                    .unwrap_or_else(|| off_the_runtime(|| self.writes.read()))
            }),
        };
        (held, self.now())
    }

    /// See [`Store::with_records`].
    pub fn transaction<T>(&self, f: impl FnOnce(&dyn Records) -> T) -> T {
        super::run_transaction(self, f)
    }

    /// Compacts the database while the store stays in use ([`super::compact`]): writes wait
    /// from the flush before the copy until the copy, verified, has taken the old database's
    /// place and is open; reads go on meanwhile, on the old one. The old database's memory
    /// (sled's caches and its record of every page) goes with it once the last read on it
    /// ends, and its files are deleted then, by a thread of their own.
    pub fn compact(&self) -> Result<super::compact::Report, super::compact::CompactError> {
        let Ok(_compacting) = self.compacting.try_lock() else {
            return Err(super::compact::CompactError::Running(self.path.clone()));
        };
        let held = self.writes.write();
        let old = self.now();
        let (report, new) = match super::compact::online(&self.path, &old.db, || {
            Open::at(&self.path).map_err(super::compact::CompactError::Reopen)
        }) {
            Ok(done) => done,
            // Writes held until the process ends: none may land in the database the next
            // start deletes.
            Err(e @ super::compact::CompactError::Stranded { .. }) => {
                tracing::error!(error = %e, "stopping the platform");
                eprintln!("fleetcast: stopping: {e}");
                std::process::exit(1);
            }
            Err(e) => return Err(e),
        };
        *self.open.write() = Arc::new(new);
        drop(held);
        drop(old);
        // Once the reads that began on it have ended; no one waits for that.
        let path = self.path.clone();
        std::thread::spawn(move || super::compact::delete_replaced(&path));
        Ok(report)
    }

    /// Copies the database into a new one at `to` while the store stays in use, and verifies
    /// the copy (as a compaction does), then runs `also`; writes wait from before the
    /// copy until `also` returns, reads go on. The store's own database is left as it is.
    pub fn backup(
        &self,
        to: &Path,
        also: &mut dyn FnMut() -> Result<(), super::compact::CompactError>,
    ) -> Result<super::compact::Report, super::compact::CompactError> {
        let _held = self.writes.write();
        let r = super::compact::copy_to(&self.now().db, to)?;
        also()?;
        Ok(r)
    }
}

impl Open {
    /// Opens the database at `path` (waiting while a previous instance lets go of it) and
    /// its trees, and brings its layout to this build's.
    fn at(path: &Path) -> Result<Self, StoreError> {
        let mut attempt = 0;
        let db = loop {
            match ::sled::Config::new()
                .path(path)
                .cache_capacity(CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                Err(::sled::Error::Io(e)) if lock_held(&e) => {
                    if attempt == 50 {
                        return Err(StoreError::Locked {
                            path: path.to_owned(),
                        });
                    }
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.to_owned(),
                        source: Box::new(source),
                    })
                }
            }
        };
        let tree = |name: &'static str| -> Result<T, StoreError> {
            let tree = db.open_tree(name).map_err(backend("open", name))?;
            Ok(T { name, tree })
        };
        let t = Tables {
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
            admin_counters: tree("admin_counters")?,
        };
        let store = Open { db, t };
        match store.t.meta.get_u64("schema")? {
            None => {
                store.t.meta.put_u64("schema", SCHEMA_VERSION)?;
                store.flush()?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(1) => {
                store.t.meta.put_u64("schema", SCHEMA_VERSION)?;
                store.flush()?;
            }
            Some(found) => return Err(StoreError::Schema { found }),
        }
        store.index_machine_targets()?;
        Ok(store)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend("flush", "*"))
    }

    /// Builds the `machine_targets` index from `targets` once: a database written before the
    /// index existed has target records without index entries.
    fn index_machine_targets(&self) -> Result<(), StoreError> {
        if self.t.meta.get_u64("machine_targets")?.is_some() {
            return Ok(());
        }
        let mut indexed = 0u64;
        for item in self.t.targets.tree.iter() {
            let (k, v) = item.map_err(self.t.targets.err("scan"))?;
            let rec: TargetRecord = self.t.targets.decode(&String::from_utf8_lossy(&k), &v)?;
            self.t.index_target(&rec)?;
            indexed += 1;
        }
        self.t.meta.put_u64("machine_targets", 1)?;
        self.flush()?;
        if indexed > 0 {
            tracing::info!(records = indexed, "indexed target records by machine");
        }
        Ok(())
    }
}

impl Tables {
    fn index_target(&self, rec: &TargetRecord) -> Result<(), StoreError> {
        // Only the first write of a record creates its entry: status events rewrite records
        // often, and an unconditional insert would grow the log each time.
        let key = key::machine_target(&rec.machine, &rec.release);
        self.machine_targets
            .tree
            .compare_and_swap(key.as_str(), None as Option<&[u8]>, Some(&[][..]))
            .map_err(self.machine_targets.err("write"))?
            .ok();
        Ok(())
    }
}

impl ReadsThrough for SledStore {
    type Reader<'a> = Snapshot;

    fn reads(&self) -> Snapshot {
        Snapshot(self.now())
    }

    fn machines_after_through<'a>(
        &'a self,
        after: Option<&MachineId>,
    ) -> Box<dyn Iterator<Item = Result<MachineInfo, StoreError>> + 'a> {
        machines_from(self.now().t.machines.clone(), after)
    }
}

impl Store for SledStore {
    fn flush(&self) -> Result<(), StoreError> {
        self.now().flush()
    }

    fn size_on_disk(&self) -> Result<Option<super::compact::Sizes>, StoreError> {
        super::compact::sizes(&self.now().db)
            .map(Some)
            .map_err(|e| StoreError::Backend {
                op: "size",
                tree: "meta",
                source: Box::new(e),
            })
    }

    fn compact_online(
        &self,
    ) -> Option<Result<super::compact::Report, super::compact::CompactError>> {
        Some(self.compact())
    }

    fn backup_online(
        &self,
        to: &Path,
        also: &mut dyn FnMut() -> Result<(), super::compact::CompactError>,
    ) -> Option<Result<super::compact::Report, super::compact::CompactError>> {
        Some(self.backup(to, also))
    }

    fn flush_async(&self) -> Flush<'_> {
        let open = self.now();
        Box::pin(async move {
            open.db
                .flush_async()
                .await
                .map(|_| ())
                .map_err(backend("flush", "*"))
        })
    }

    fn with_records(&self, f: &mut dyn FnMut(&dyn Records)) {
        let _records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let (_held, open) = self.writing();
        f(&open.t)
    }

    fn next_seq(&self) -> Result<u64, StoreError> {
        self.writing().1.t.meta.increment("seq")
    }

    fn raise_seq(&self, at_least: u64) -> Result<(), StoreError> {
        let (_held, open) = self.writing();
        open.t.meta.update_counter("seq", |n| n.max(at_least))?;
        Ok(())
    }

    fn next_release_id(&self) -> Result<ReleaseId, StoreError> {
        let (_held, open) = self.writing();
        Ok(key::release_id(open.t.meta.increment("release")?))
    }

    fn put_artifact(&self, info: &ArtifactInfo) -> Result<(), StoreError> {
        let (_held, open) = self.writing();
        open.t.artifacts.put(&info.id.to_hex(), info)?;
        open.t
            .artifact_versions
            .put(&key::artifact_version(&info.kind, &info.version), &info.id)
    }

    fn append_event(&self, event: &mut FleetEvent) -> Result<(), StoreError> {
        self.append_events(std::slice::from_mut(event))
    }

    /// In blocks: one sled insert per [`EVENTS_PER_BLOCK`] events.
    fn append_events(&self, events: &mut [FleetEvent]) -> Result<(), StoreError> {
        let (_held, open) = self.writing();
        if events.is_empty() {
            return Ok(());
        }
        let last = open.t.meta.increment_by("event", events.len() as u64)?;
        let first = last + 1 - events.len() as u64;
        for (event, id) in events.iter_mut().zip(first..) {
            event.id = id;
        }
        let tree = &open.t.events;
        let write = |block: &mut Vec<u8>, last: u64| {
            block.push(b']');
            let written = tree.tree.insert(last.to_be_bytes(), block.as_slice());
            block.clear();
            written.map(|_| ()).map_err(tree.err("write"))
        };
        let (mut block, mut one) = (Vec::with_capacity(EVENT_BLOCK_BYTES + 2), Vec::new());
        let mut in_block = 0;
        for (i, event) in events.iter().enumerate() {
            one.clear();
            serde_json::to_writer(&mut one, event).expect("events serialize");
            // A block holds more than EVENT_BLOCK_BYTES only if one event alone does.
            if in_block > 0 && block.len() + one.len() >= EVENT_BLOCK_BYTES {
                write(&mut block, events[i - 1].id)?;
                in_block = 0;
            }
            block.push(if in_block == 0 { b'[' } else { b',' });
            block.extend_from_slice(&one);
            in_block += 1;
            if in_block == EVENTS_PER_BLOCK {
                write(&mut block, event.id)?;
                in_block = 0;
            }
        }
        if in_block > 0 {
            write(&mut block, events[events.len() - 1].id)?;
        }
        Ok(())
    }

    fn prune_events(&self, keep: u64, batch: usize) -> Result<usize, StoreError> {
        let (_held, open) = self.writing();
        let newest = open.t.meta.get_u64("event")?.unwrap_or(0);
        let below = newest.saturating_sub(keep);
        if below == 0 {
            return Ok(0);
        }
        // A record is a block keyed by its last id: it goes once all of its events are old.
        // One remove at a time, each under its own epoch guard: a `Batch` of 5,000 removes made
        // `serve` grow by 20-30 MB per pass (1,000 machines, 20,000 kept: 100 -> 327 MB over
        // twenty rollouts against 104 -> 213 MB without pruning; one at a time: 99 -> 204 MB
        // over sixteen, against 104 -> 200 MB). Why, not profiled: perhaps the node versions
        // a batch replaces all wait for its end to be freed.
        let events = &open.t.events;
        let mut deleted = 0;
        while deleted < batch {
            let Some((key, _)) = events.tree.first().map_err(events.err("scan"))? else {
                break;
            };
            if key.as_ref() > below.to_be_bytes().as_slice() {
                break;
            }
            events.tree.remove(key).map_err(events.err("delete"))?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn append_audit(&self, entry: &mut AuditEntry) -> Result<(), StoreError> {
        let (_held, open) = self.writing();
        entry.id = open.t.meta.increment("audit")?;
        open.t.audit.put_numbered(entry.id, entry)
    }

    fn raise_counter(
        &self,
        machine: &MachineId,
        channel: &str,
        ctr: u64,
    ) -> Result<u64, StoreError> {
        let (_held, open) = self.writing();
        let t = &open.t.counters;
        let key = key::counter(machine, channel);
        loop {
            let old = t.tree.get(&key).map_err(t.err("read"))?;
            let last = old
                .as_ref()
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if ctr <= last {
                return Ok(last);
            }
            let swapped = t
                .tree
                .compare_and_swap(key.as_str(), old, Some(&ctr.to_be_bytes()[..]))
                .map_err(t.err("write"))?;
            if swapped.is_ok() {
                return Ok(last);
            }
        }
    }

    fn reset_counters(&self, machine: &MachineId) -> Result<(), StoreError> {
        let (_held, open) = self.writing();
        let prefix = format!("{machine}/");
        for t in [&open.t.counters, &open.t.event_counts] {
            for item in t.tree.scan_prefix(prefix.as_bytes()) {
                let (key, _) = item.map_err(t.err("read"))?;
                t.tree.remove(key).map_err(t.err("write"))?;
            }
        }
        Ok(())
    }

    fn put_admin_counter(&self, counter: &AdminCounter) -> Result<(), StoreError> {
        let (_held, open) = self.writing();
        open.t.admin_counters.put(&counter.client, counter)
    }

    fn remove_admin_counter(&self, client: &str) -> Result<(), StoreError> {
        let (_held, open) = self.writing();
        open.t.admin_counters.remove(client).map(drop)
    }

    fn bump_event_count(
        &self,
        machine: &MachineId,
        release: Option<&ReleaseId>,
        by: u64,
    ) -> Result<u64, StoreError> {
        let (_held, open) = self.writing();
        open.t
            .event_counts
            .increment_by(&key::event_count(machine, release), by)
    }

    fn event_count(
        &self,
        machine: &MachineId,
        release: Option<&ReleaseId>,
    ) -> Result<u64, StoreError> {
        Ok(self
            .now()
            .t
            .event_counts
            .get_u64(&key::event_count(machine, release))?
            .unwrap_or(0))
    }
}

/// Machines in id order after `after`, read lazily from `t` (a handle of its own: the
/// iterator may outlive the call that made it).
fn machines_from(
    t: T,
    after: Option<&MachineId>,
) -> Box<dyn Iterator<Item = Result<MachineInfo, StoreError>>> {
    use std::ops::Bound;
    let start = match after {
        Some(m) => Bound::Excluded(::sled::IVec::from(m.as_str())),
        None => Bound::Unbounded,
    };
    let range = t.tree.range::<::sled::IVec, _>((start, Bound::Unbounded));
    Box::new(range.map(move |item| {
        let (k, v) = item.map_err(t.err("scan"))?;
        t.decode(&String::from_utf8_lossy(&k), &v)
    }))
}

impl Reads for Tables {
    fn artifact(&self, id: &ArtifactId) -> Result<Option<ArtifactInfo>, StoreError> {
        self.artifacts.get(&id.to_hex())
    }

    fn artifact_for_version(
        &self,
        kind: &Kind,
        version: &str,
    ) -> Result<Option<ArtifactInfo>, StoreError> {
        let Some(id) = self
            .artifact_versions
            .get::<ArtifactId>(&key::artifact_version(kind, version))?
        else {
            return Ok(None);
        };
        // The bytes' record names the version they are now: removed bytes that no release
        // names may be uploaded again as another version (`uploads`), which frees this one.
        Ok(self
            .artifact(&id)?
            .filter(|a| a.kind == *kind && a.version == version))
    }

    fn artifacts(&self) -> Result<Vec<ArtifactInfo>, StoreError> {
        self.artifacts.scan("")
    }

    fn release(&self, id: &ReleaseId) -> Result<Option<ReleaseInfo>, StoreError> {
        self.releases.get(id.as_str())
    }

    fn releases(&self) -> Result<Vec<ReleaseInfo>, StoreError> {
        self.releases.scan("")
    }

    fn target(
        &self,
        release: &ReleaseId,
        machine: &MachineId,
    ) -> Result<Option<TargetRecord>, StoreError> {
        self.targets.get(&key::target(release, machine))
    }

    fn targets_of(&self, release: &ReleaseId) -> Result<Vec<TargetRecord>, StoreError> {
        self.targets.scan(&format!("{release}/"))
    }

    /// Reads the machine's index entries and their records.
    fn targets_of_machine(&self, machine: &MachineId) -> Result<Vec<TargetRecord>, StoreError> {
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

    fn current(&self, machine: &MachineId, kind: &Kind) -> Result<Option<ReleaseId>, StoreError> {
        self.current.get(&key::machine_kind(machine, kind))
    }

    fn current_releases(&self, machine: &MachineId) -> Result<Vec<ReleaseId>, StoreError> {
        self.current.scan(&format!("{machine}/"))
    }

    fn rollout(&self, release: &ReleaseId) -> Result<Option<RolloutInfo>, StoreError> {
        self.rollouts.get(release.as_str())
    }

    fn rollouts(&self) -> Result<Vec<RolloutInfo>, StoreError> {
        self.rollouts.scan("")
    }

    fn machine(&self, id: &MachineId) -> Result<Option<MachineInfo>, StoreError> {
        self.machines.get(id.as_str())
    }

    fn machines(&self) -> Result<Vec<MachineInfo>, StoreError> {
        self.machines.scan("")
    }

    fn machines_after<'a>(
        &'a self,
        after: Option<&MachineId>,
    ) -> Box<dyn Iterator<Item = Result<MachineInfo, StoreError>> + 'a> {
        machines_from(self.machines.clone(), after)
    }

    fn secret(&self, id: &MachineId) -> Result<Option<Secret>, StoreError> {
        self.secrets.get(id.as_str())
    }

    fn history(&self, machine: &MachineId, kind: &Kind) -> Result<Vec<String>, StoreError> {
        Ok(self
            .history
            .get(&key::machine_kind(machine, kind))?
            .unwrap_or_default())
    }

    fn history_kinds(&self, machine: &MachineId) -> Result<usize, StoreError> {
        let t = &self.history;
        let mut n = 0;
        for item in t.tree.scan_prefix(format!("{machine}/")) {
            item.map_err(t.err("scan"))?;
            n += 1;
        }
        Ok(n)
    }

    fn bootstrapped(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get_u64("bootstrapped")?.is_some())
    }

    fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        self.operators.get(name)
    }

    fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.operators.scan("")
    }

    fn integrator(&self, name: &str) -> Result<Option<IntegratorRecord>, StoreError> {
        self.integrators.get(name)
    }

    fn integrators(&self) -> Result<Vec<IntegratorRecord>, StoreError> {
        self.integrators.scan("")
    }

    fn admin_counters(&self) -> Result<Vec<AdminCounter>, StoreError> {
        self.admin_counters.scan("")
    }

    fn counter(&self, machine: &MachineId, channel: &str) -> Result<u64, StoreError> {
        Ok(self
            .counters
            .get_u64(&key::counter(machine, channel))?
            .unwrap_or(0))
    }

    fn events_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<FleetEvent>, bool), StoreError> {
        self.events.range_after(since, limit)
    }

    fn events(&self) -> Result<Vec<FleetEvent>, StoreError> {
        Ok(self.events.range_after(0, usize::MAX)?.0)
    }

    fn last_event_id(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get_u64("event")?.unwrap_or(0))
    }

    fn audit_since(&self, since: u64, limit: usize) -> Result<(Vec<AuditEntry>, bool), StoreError> {
        self.audit.range_after(since, limit)
    }

    fn desired(&self, target: &Target, kind: &Kind) -> Result<Option<DesiredNotice>, StoreError> {
        self.desired.get(&key::desired(target, kind))
    }

    fn desired_for(&self, target: &Target) -> Result<Vec<DesiredNotice>, StoreError> {
        self.desired.scan(&key::desired_prefix(target))
    }

    fn all_desired(&self) -> Result<Vec<DesiredNotice>, StoreError> {
        self.desired.scan("")
    }
}

impl Records for Tables {
    fn put_release(&self, info: &ReleaseInfo) -> Result<(), StoreError> {
        self.releases.put(info.id.as_str(), info)
    }

    /// Stores the record and its `machine_targets` entry first: a record that reaches the disk
    /// is never missing from its machine's index.
    fn put_target(&self, rec: &TargetRecord) -> Result<(), StoreError> {
        self.index_target(rec)?;
        self.targets
            .put(&key::target(&rec.release, &rec.machine), rec)
    }

    fn set_current(
        &self,
        machine: &MachineId,
        kind: &Kind,
        release: &ReleaseId,
    ) -> Result<(), StoreError> {
        self.current.put(&key::machine_kind(machine, kind), release)
    }

    fn put_rollout(&self, info: &RolloutInfo) -> Result<(), StoreError> {
        self.rollouts.put(info.release.as_str(), info)
    }

    fn remove_release(&self, id: &ReleaseId) -> Result<bool, StoreError> {
        self.releases.remove(id.as_str())
    }

    /// The index entry and the event count first, the record last: a crash in between leaves
    /// the record, which the next removal of the release finds (by release) and removes.
    fn remove_target(&self, release: &ReleaseId, machine: &MachineId) -> Result<bool, StoreError> {
        self.machine_targets
            .remove(&key::machine_target(machine, release))?;
        self.event_counts
            .remove(&key::event_count(machine, Some(release)))?;
        self.targets.remove(&key::target(release, machine))
    }

    fn remove_current(&self, machine: &MachineId, kind: &Kind) -> Result<(), StoreError> {
        self.current.remove(&key::machine_kind(machine, kind))?;
        Ok(())
    }

    fn remove_rollout(&self, release: &ReleaseId) -> Result<bool, StoreError> {
        self.rollouts.remove(release.as_str())
    }

    fn put_desired(&self, notice: &DesiredNotice) -> Result<(), StoreError> {
        self.desired
            .put(&key::desired(&notice.target, &notice.kind), notice)
    }

    fn remove_desired(&self, target: &Target, kind: &Kind) -> Result<(), StoreError> {
        self.desired.remove(&key::desired(target, kind))?;
        Ok(())
    }

    fn put_machine(&self, info: &MachineInfo) -> Result<(), StoreError> {
        self.machines.put(info.id.as_str(), info)
    }

    fn put_machines(&self, infos: &[MachineInfo]) -> Result<(), StoreError> {
        self.machines
            .put_all(infos.iter().map(|info| (info.id.as_str(), info)))
    }

    fn put_secret(&self, id: &MachineId, secret: &Secret) -> Result<(), StoreError> {
        self.secrets.put(id.as_str(), secret)
    }

    fn remove_secret(&self, id: &MachineId) -> Result<bool, StoreError> {
        self.secrets.remove(id.as_str())
    }

    fn put_history(
        &self,
        machine: &MachineId,
        kind: &Kind,
        versions: &[String],
    ) -> Result<(), StoreError> {
        self.history
            .put(&key::machine_kind(machine, kind), versions)
    }

    fn set_bootstrapped(&self) -> Result<(), StoreError> {
        self.meta.put_u64("bootstrapped", 1)
    }

    fn put_operator(&self, rec: &OperatorRecord) -> Result<(), StoreError> {
        self.operators.put(&rec.info.name, rec)
    }

    fn remove_operator(&self, name: &str) -> Result<bool, StoreError> {
        self.operators.remove(name)
    }

    fn put_integrator(&self, rec: &IntegratorRecord) -> Result<(), StoreError> {
        self.integrators.put(&rec.name, rec)
    }

    fn remove_integrator(&self, name: &str) -> Result<bool, StoreError> {
        self.integrators.remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::m;
    use fleetcast_proto::{GroupId, Phase};

    fn open() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db")).unwrap();
        (dir, store)
    }

    fn event(machine: &str) -> FleetEvent {
        FleetEvent {
            id: 0,
            recorded_at_ms: 1,
            machine: m(machine),
            release: None,
            kind: Kind::new("app").unwrap(),
            version: "1".into(),
            phase: Phase::Installed,
            at_ms: 2,
            attempt: 1,
            progress: None,
            error: None,
            detail: None,
        }
    }

    #[test]
    fn counters_survive_a_reopen_and_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = SledStore::open(&path).unwrap();
            assert_eq!(s.next_seq().unwrap(), 1);
            assert_eq!(s.next_seq().unwrap(), 2);
            assert_eq!(s.next_release_id().unwrap().as_str(), "r-000001");
            assert_eq!(s.raise_counter(&m("vm-1"), "status", 42).unwrap(), 0);
            s.append_event(&mut event("vm-1")).unwrap();
            s.flush().unwrap();
        }
        let s = SledStore::open(&path).unwrap();
        assert_eq!(s.next_seq().unwrap(), 3);
        assert_eq!(s.next_release_id().unwrap().as_str(), "r-000002");
        assert_eq!(s.counter(&m("vm-1"), "status").unwrap(), 42);
        assert_eq!(s.counter(&m("vm-1"), "state").unwrap(), 0);
        let mut e = event("vm-1");
        s.append_event(&mut e).unwrap();
        assert_eq!(e.id, 2);
    }

    #[test]
    fn machines_stored_together_replace_their_records_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let in_group = |id: &str, group: &str| {
            let mut info = MachineInfo::new(m(id), 1);
            info.groups = vec![GroupId::new(group).unwrap()];
            info
        };
        {
            let s = SledStore::open(&path).unwrap();
            s.transaction(|rec| rec.put_machine(&in_group("vm-1", "shanghai")))
                .unwrap();
            let moved = [
                in_group("vm-1", "east-china"),
                in_group("vm-2", "east-china"),
            ];
            s.transaction(|rec| rec.put_machines(&moved)).unwrap();
            s.flush().unwrap();
        }
        let s = SledStore::open(&path).unwrap();
        let groups: Vec<(String, Vec<GroupId>)> = s
            .machines()
            .unwrap()
            .into_iter()
            .map(|i| (i.id.to_string(), i.groups))
            .collect();
        let east = vec![GroupId::new("east-china").unwrap()];
        assert_eq!(
            groups,
            vec![("vm-1".into(), east.clone()), ("vm-2".into(), east)]
        );
    }

    /// While a compaction holds the writes, tasks that write wait on threads of their own: on a
    /// runtime of two workers, two of them waiting do not stop a third task that only reads.
    #[test]
    fn writes_waiting_for_a_compaction_leave_the_runtimes_workers_to_other_tasks() {
        let (_d, s) = open();
        let s = std::sync::Arc::new(s);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let held = s.writes.write();
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        rt.block_on(async {
            let writers: Vec<_> = (0..2)
                .map(|i| {
                    let s = s.clone();
                    tokio::spawn(async move { s.next_seq().map(|_| i) })
                })
                .collect();
            let ticker = tokio::spawn({
                let (s, ticks) = (s.clone(), ticks.clone());
                async move {
                    loop {
                        s.machine(&m("vm-1")).unwrap();
                        ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            });
            // Both writers are waiting (on the workers, unless handed off) for a second.
            std::thread::sleep(Duration::from_millis(100));
            let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(1)))
                .await
                .unwrap();
            let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
            drop(held);
            for w in writers {
                w.await.unwrap().unwrap();
            }
            ticker.abort();
            assert!(
                during >= 20,
                "the reading task ran {during} times in the second the writes waited"
            );
        });
    }

    #[test]
    fn opening_waits_for_a_previous_instance_to_let_go_of_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let first = SledStore::open(&path).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let second = SledStore::open(&path);
        closer.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
    }

    /// A second `serve` on the same data directory: after the wait, an error that says so
    /// (it was sled's "could not acquire lock ... WouldBlock").
    #[test]
    fn a_database_another_process_keeps_open_is_named_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = SledStore::open(&path).unwrap();
        let err = SledStore::open(&path).err().expect("the lock is held");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_record_is_reported_not_panicked() {
        let (_d, s) = open();
        s.now()
            .t
            .machines
            .tree
            .insert("vm-9", b"not json".to_vec())
            .unwrap();
        let err = s.machine(&m("vm-9")).unwrap_err();
        assert!(err.to_string().contains("machines"), "{err}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let db = ::sled::open(&path).unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert("schema", &3u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        match SledStore::open(&path) {
            Err(StoreError::Schema { found: 3 }) => {}
            other => panic!("{:?}", other.err()),
        }
    }

    fn json<V: Serialize>(v: &V) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn target(r: &str, mach: &str) -> TargetRecord {
        crate::domain::target::new_target(&crate::fixtures::release(r, "1.0"), m(mach), None, 0)
    }

    fn releases_of(s: &SledStore, mach: &str) -> Vec<String> {
        s.targets_of_machine(&m(mach))
            .unwrap()
            .into_iter()
            .map(|t| t.release.to_string())
            .collect()
    }

    #[test]
    fn rewriting_a_target_record_keeps_one_index_entry() {
        let (_d, s) = open();
        for (r, mach) in [("r-1", "a"), ("r-1", "ab"), ("r-2", "a"), ("r-2", "b")] {
            s.transaction(|rec| rec.put_target(&target(r, mach)))
                .unwrap();
        }
        // Every status event rewrites its record.
        let mut again = target("r-2", "a");
        again.phase = Phase::Downloading;
        s.transaction(|rec| rec.put_target(&again)).unwrap();
        assert_eq!(s.now().t.machine_targets.tree.len(), 4);
        assert_eq!(releases_of(&s, "a"), ["r-1", "r-2"]);
    }

    #[test]
    fn a_database_from_before_the_index_is_indexed_at_its_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = SledStore::open(&path).unwrap();
            // What an older build left: records, no index entries, no marker.
            for (r, mach) in [("r-1", "a"), ("r-2", "a"), ("r-2", "b")] {
                let rec = target(r, mach);
                s.now().t.targets.put(&format!("{r}/{mach}"), &rec).unwrap();
            }
            s.now().t.meta.tree.remove("machine_targets").unwrap();
            s.flush().unwrap();
            assert_eq!(releases_of(&s, "a"), Vec::<String>::new());
        }
        let s = SledStore::open(&path).unwrap();
        assert_eq!(releases_of(&s, "a"), ["r-1", "r-2"]);
        assert_eq!(releases_of(&s, "b"), ["r-2"]);
    }

    /// The layout table above, written with plain sled (as an existing data dir has it), is what
    /// this implementation reads: tree names, keys, JSON values and big-endian counters.
    #[test]
    fn a_database_laid_out_as_documented_opens_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let app = Kind::new("app").unwrap();
        let r3 = ReleaseId::new("r-000003").unwrap();
        let release = crate::fixtures::release("r-000003", "1.0");
        let rec = target("r-000003", "vm-1");
        let group = Target::Group(GroupId::new("g").unwrap());
        let notice = DesiredNotice {
            topic: "fleet/groups/g/release/app".into(),
            seq: 7,
            release: r3.clone(),
            kind: app.clone(),
            target: group.clone(),
            payload: "{}".into(),
        };
        let mut stored_event = event("vm-1");
        stored_event.id = 1;
        {
            let db = ::sled::open(&path).unwrap();
            let put = |tree: &str, key: &[u8], value: &[u8]| {
                db.open_tree(tree).unwrap().insert(key, value).unwrap();
            };
            for (k, v) in [("schema", 1u64), ("seq", 7), ("release", 3), ("event", 1)] {
                put("meta", k.as_bytes(), &v.to_be_bytes());
            }
            put("meta", b"machine_targets", &1u64.to_be_bytes());
            put("releases", b"r-000003", &json(&release));
            put("targets", b"r-000003/vm-1", &json(&rec));
            put("machine_targets", b"vm-1/r-000003", b"");
            put("current", b"vm-1/app", b"\"r-000003\"");
            put("counters", b"vm-1/status", &9u64.to_be_bytes());
            put("event_counts", b"vm-1/r-000003", &1u64.to_be_bytes());
            put("history", b"vm-1/app", br#"["0.9","1.0"]"#);
            put("desired", b"group/g/app", &json(&notice));
            put("events", &1u64.to_be_bytes(), &json(&stored_event));
            db.flush().unwrap();
        }
        let s = SledStore::open(&path).unwrap();
        assert_eq!(s.next_seq().unwrap(), 8);
        assert_eq!(s.next_release_id().unwrap().as_str(), "r-000004");
        assert_eq!(s.release(&r3).unwrap(), Some(release.clone()));
        assert_eq!(s.target(&r3, &m("vm-1")).unwrap().as_ref(), Some(&rec));
        assert_eq!(s.targets_of_machine(&m("vm-1")).unwrap(), [rec]);
        assert_eq!(s.current(&m("vm-1"), &app).unwrap(), Some(r3.clone()));
        assert_eq!(
            s.machine_artifacts(&m("vm-1")).unwrap(),
            [release.artifact.id]
        );
        assert_eq!(s.raise_counter(&m("vm-1"), "status", 9).unwrap(), 9);
        assert_eq!(s.bump_event_count(&m("vm-1"), Some(&r3), 1).unwrap(), 2);
        assert_eq!(s.history(&m("vm-1"), &app).unwrap(), ["0.9", "1.0"]);
        assert_eq!(s.desired(&group, &app).unwrap(), Some(notice));
        assert_eq!(s.events().unwrap(), [stored_event.clone()]);
        let mut next = event("vm-1");
        s.append_event(&mut next).unwrap();
        assert_eq!(next.id, 2);
        // Events stored since sit in blocks beside the lone one of schema 1, and the database
        // is marked 2, which an older build refuses rather than take a block for corrupt.
        let mut more: Vec<FleetEvent> = (0..20).map(|_| event("vm-2")).collect();
        s.append_events(&mut more).unwrap();
        let ids: Vec<u64> = s.events().unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, (1..=22).collect::<Vec<_>>());
        assert_eq!(s.events_since(0, 1).unwrap(), (vec![stored_event], true));
        assert_eq!(
            s.now().t.meta.get_u64("schema").unwrap(),
            Some(SCHEMA_VERSION)
        );
    }

    #[test]
    fn events_stored_together_take_one_record_per_block() {
        let (_d, s) = open();
        let mut batch: Vec<FleetEvent> = (0..40).map(|_| event("vm-1")).collect();
        s.append_events(&mut batch).unwrap();
        // 40 small events: blocks of 16, 16 and 8, each under the id of its last event.
        let keys: Vec<u64> = (s.now().t.events.tree.iter())
            .map(|kv| u64::from_be_bytes(kv.unwrap().0.as_ref().try_into().unwrap()))
            .collect();
        assert_eq!(keys, [16, 32, 40]);
        // An event that would take a block past its size starts one; alone it may be larger.
        let mut big = event("vm-1");
        big.detail = Some("d".repeat(EVENT_BLOCK_BYTES));
        let mut batch = vec![event("vm-1"), big, event("vm-1")];
        s.append_events(&mut batch).unwrap();
        let keys: Vec<u64> = (s.now().t.events.tree.iter())
            .map(|kv| u64::from_be_bytes(kv.unwrap().0.as_ref().try_into().unwrap()))
            .collect();
        assert_eq!(keys, [16, 32, 40, 41, 42, 43]);
        let sizes: Vec<usize> = (s.now().t.events.tree.iter())
            .map(|kv| kv.unwrap().1.len())
            .collect();
        assert!(sizes[4] > EVENT_BLOCK_BYTES, "{sizes:?}");
        assert!(
            sizes
                .iter()
                .enumerate()
                .all(|(i, &n)| i == 4 || n <= EVENT_BLOCK_BYTES),
            "{sizes:?}"
        );
    }
}
