//! [`MemStore`]: a [`Store`] in memory, for unit tests of the logic around the store. Each
//! record family is a `BTreeMap` under the same keys sled uses ([`super::key`]), so scans come
//! in the same order; values are kept as typed records. Flush does nothing: nothing survives
//! the store.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use fleetcast_proto::admin::{
    ArtifactInfo, AuditEntry, FleetEvent, MachineInfo, ReleaseInfo, TargetRecord,
};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::rollout::RolloutInfo;
use fleetcast_proto::{ArtifactId, Kind, MachineId, ReleaseId, Target};

use super::{
    key, AdminCounter, DesiredNotice, Flush, IntegratorRecord, OperatorRecord, Reads, ReadsThrough,
    Records, Store, StoreError,
};

#[derive(Default)]
struct Data {
    last_seq: u64,
    last_release: u64,
    last_event: u64,
    last_audit: u64,
    bootstrapped: bool,
    artifacts: BTreeMap<String, ArtifactInfo>,
    artifact_versions: BTreeMap<String, ArtifactId>,
    releases: BTreeMap<String, ReleaseInfo>,
    targets: BTreeMap<String, TargetRecord>,
    machine_targets: BTreeSet<String>,
    current: BTreeMap<String, ReleaseId>,
    machines: BTreeMap<String, MachineInfo>,
    secrets: BTreeMap<String, Secret>,
    counters: BTreeMap<String, u64>,
    events: BTreeMap<u64, FleetEvent>,
    desired: BTreeMap<String, DesiredNotice>,
    history: BTreeMap<String, Vec<String>>,
    operators: BTreeMap<String, OperatorRecord>,
    integrators: BTreeMap<String, IntegratorRecord>,
    audit: BTreeMap<u64, AuditEntry>,
    event_counts: BTreeMap<String, u64>,
    rollouts: BTreeMap<String, RolloutInfo>,
    admin_counters: BTreeMap<String, AdminCounter>,
}

/// Values under keys starting with `prefix`, in key order.
fn scan<V: Clone>(map: &BTreeMap<String, V>, prefix: &str) -> Vec<V> {
    map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v.clone())
        .collect()
}

/// Values with an id above `since`, at most `limit`, and whether more follow.
fn page<V: Clone>(map: &BTreeMap<u64, V>, since: u64, limit: usize) -> (Vec<V>, bool) {
    let from = since.saturating_add(1);
    let out: Vec<V> = map
        .range(from..)
        .take(limit)
        .map(|(_, v)| v.clone())
        .collect();
    let more = map.range(from..).nth(limit).is_some();
    (out, more)
}

/// The records, each lock held for one operation. [`Records`] only through
/// [`MemStore::with_records`].
#[derive(Default)]
struct Tables(Mutex<Data>);

impl Tables {
    fn lock(&self) -> MutexGuard<'_, Data> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The platform's database in memory.
#[derive(Default)]
pub struct MemStore {
    t: Tables,
    /// Serialises transactions, like sled's: the records themselves are locked per operation.
    records: Mutex<()>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`Store::with_records`].
    pub fn transaction<T>(&self, f: impl FnOnce(&dyn Records) -> T) -> T {
        super::run_transaction(self, f)
    }
}

impl ReadsThrough for MemStore {
    type Reader<'a> = &'a (dyn Reads + 'static);

    fn reads(&self) -> Self::Reader<'_> {
        &self.t
    }

    fn machines_after_through<'a>(
        &'a self,
        after: Option<&MachineId>,
    ) -> Box<dyn Iterator<Item = Result<MachineInfo, StoreError>> + 'a> {
        self.t.machines_after(after)
    }
}

impl Store for MemStore {
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn flush_async(&self) -> Flush<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn with_records(&self, f: &mut dyn FnMut(&dyn Records)) {
        let _records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        f(&self.t)
    }

    fn next_seq(&self) -> Result<u64, StoreError> {
        let mut d = self.t.lock();
        d.last_seq += 1;
        Ok(d.last_seq)
    }

    fn raise_seq(&self, at_least: u64) -> Result<(), StoreError> {
        let mut d = self.t.lock();
        d.last_seq = d.last_seq.max(at_least);
        Ok(())
    }

    fn next_release_id(&self) -> Result<ReleaseId, StoreError> {
        let mut d = self.t.lock();
        d.last_release += 1;
        Ok(key::release_id(d.last_release))
    }

    fn put_artifact(&self, info: &ArtifactInfo) -> Result<(), StoreError> {
        let mut d = self.t.lock();
        d.artifacts.insert(info.id.to_hex(), info.clone());
        d.artifact_versions
            .insert(key::artifact_version(&info.kind, &info.version), info.id);
        Ok(())
    }

    fn append_event(&self, event: &mut FleetEvent) -> Result<(), StoreError> {
        let mut d = self.t.lock();
        d.last_event += 1;
        event.id = d.last_event;
        d.events.insert(event.id, event.clone());
        Ok(())
    }

    fn prune_events(&self, keep: u64, batch: usize) -> Result<usize, StoreError> {
        let mut d = self.t.lock();
        let below = d.last_event.saturating_sub(keep);
        let mut deleted = 0;
        while deleted < batch
            && d.events
                .first_key_value()
                .is_some_and(|(id, _)| *id <= below)
        {
            d.events.pop_first();
            deleted += 1;
        }
        Ok(deleted)
    }

    fn append_audit(&self, entry: &mut AuditEntry) -> Result<(), StoreError> {
        let mut d = self.t.lock();
        d.last_audit += 1;
        entry.id = d.last_audit;
        d.audit.insert(entry.id, entry.clone());
        Ok(())
    }

    fn raise_counter(
        &self,
        machine: &MachineId,
        channel: &str,
        ctr: u64,
    ) -> Result<u64, StoreError> {
        let mut d = self.t.lock();
        let c = d
            .counters
            .entry(key::counter(machine, channel))
            .or_default();
        let last = *c;
        *c = last.max(ctr);
        Ok(last)
    }

    fn reset_counters(&self, machine: &MachineId) -> Result<(), StoreError> {
        let prefix = format!("{machine}/");
        let mut d = self.t.lock();
        d.counters.retain(|key, _| !key.starts_with(&prefix));
        d.event_counts.retain(|key, _| !key.starts_with(&prefix));
        Ok(())
    }

    fn put_admin_counter(&self, counter: &AdminCounter) -> Result<(), StoreError> {
        let mut d = self.t.lock();
        d.admin_counters
            .insert(counter.client.clone(), counter.clone());
        Ok(())
    }

    fn remove_admin_counter(&self, client: &str) -> Result<(), StoreError> {
        self.t.lock().admin_counters.remove(client);
        Ok(())
    }

    fn bump_event_count(
        &self,
        machine: &MachineId,
        release: Option<&ReleaseId>,
        by: u64,
    ) -> Result<u64, StoreError> {
        let mut d = self.t.lock();
        let n = d
            .event_counts
            .entry(key::event_count(machine, release))
            .or_default();
        *n += by;
        Ok(*n)
    }

    fn event_count(
        &self,
        machine: &MachineId,
        release: Option<&ReleaseId>,
    ) -> Result<u64, StoreError> {
        let d = self.t.lock();
        Ok(d.event_counts
            .get(&key::event_count(machine, release))
            .copied()
            .unwrap_or(0))
    }
}

impl Reads for Tables {
    fn artifact(&self, id: &ArtifactId) -> Result<Option<ArtifactInfo>, StoreError> {
        Ok(self.lock().artifacts.get(&id.to_hex()).cloned())
    }

    fn artifact_for_version(
        &self,
        kind: &Kind,
        version: &str,
    ) -> Result<Option<ArtifactInfo>, StoreError> {
        let d = self.lock();
        Ok(d.artifact_versions
            .get(&key::artifact_version(kind, version))
            .and_then(|id| d.artifacts.get(&id.to_hex()))
            .filter(|a| a.kind == *kind && a.version == version)
            .cloned())
    }

    fn artifacts(&self) -> Result<Vec<ArtifactInfo>, StoreError> {
        Ok(scan(&self.lock().artifacts, ""))
    }

    fn release(&self, id: &ReleaseId) -> Result<Option<ReleaseInfo>, StoreError> {
        Ok(self.lock().releases.get(id.as_str()).cloned())
    }

    fn releases(&self) -> Result<Vec<ReleaseInfo>, StoreError> {
        Ok(scan(&self.lock().releases, ""))
    }

    fn target(
        &self,
        release: &ReleaseId,
        machine: &MachineId,
    ) -> Result<Option<TargetRecord>, StoreError> {
        Ok(self
            .lock()
            .targets
            .get(&key::target(release, machine))
            .cloned())
    }

    fn targets_of(&self, release: &ReleaseId) -> Result<Vec<TargetRecord>, StoreError> {
        Ok(scan(&self.lock().targets, &format!("{release}/")))
    }

    fn targets_of_machine(&self, machine: &MachineId) -> Result<Vec<TargetRecord>, StoreError> {
        let d = self.lock();
        let prefix = format!("{machine}/");
        Ok(d.machine_targets
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .map_while(|k| k.strip_prefix(&prefix))
            .filter_map(|release| d.targets.get(&format!("{release}/{machine}")).cloned())
            .collect())
    }

    fn current(&self, machine: &MachineId, kind: &Kind) -> Result<Option<ReleaseId>, StoreError> {
        Ok(self
            .lock()
            .current
            .get(&key::machine_kind(machine, kind))
            .cloned())
    }

    fn current_releases(&self, machine: &MachineId) -> Result<Vec<ReleaseId>, StoreError> {
        Ok(scan(&self.lock().current, &format!("{machine}/")))
    }

    fn rollout(&self, release: &ReleaseId) -> Result<Option<RolloutInfo>, StoreError> {
        Ok(self.lock().rollouts.get(release.as_str()).cloned())
    }

    fn rollouts(&self) -> Result<Vec<RolloutInfo>, StoreError> {
        Ok(scan(&self.lock().rollouts, ""))
    }

    fn machine(&self, id: &MachineId) -> Result<Option<MachineInfo>, StoreError> {
        Ok(self.lock().machines.get(id.as_str()).cloned())
    }

    fn machines(&self) -> Result<Vec<MachineInfo>, StoreError> {
        Ok(scan(&self.lock().machines, ""))
    }

    /// One lock per machine read, like sled's lazy range.
    fn machines_after<'a>(
        &'a self,
        after: Option<&MachineId>,
    ) -> Box<dyn Iterator<Item = Result<MachineInfo, StoreError>> + 'a> {
        let mut last: Option<String> = after.map(|m| m.to_string());
        Box::new(std::iter::from_fn(move || {
            let d = self.lock();
            let (k, v) = match &last {
                Some(l) => d
                    .machines
                    .range::<str, _>((Bound::Excluded(l.as_str()), Bound::Unbounded))
                    .next()?,
                None => d.machines.iter().next()?,
            };
            let v = v.clone();
            last = Some(k.clone());
            Some(Ok(v))
        }))
    }

    fn secret(&self, id: &MachineId) -> Result<Option<Secret>, StoreError> {
        Ok(self.lock().secrets.get(id.as_str()).cloned())
    }

    fn history(&self, machine: &MachineId, kind: &Kind) -> Result<Vec<String>, StoreError> {
        Ok(self
            .lock()
            .history
            .get(&key::machine_kind(machine, kind))
            .cloned()
            .unwrap_or_default())
    }

    fn history_kinds(&self, machine: &MachineId) -> Result<usize, StoreError> {
        let prefix = format!("{machine}/");
        Ok(self
            .lock()
            .history
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .count())
    }

    fn bootstrapped(&self) -> Result<bool, StoreError> {
        Ok(self.lock().bootstrapped)
    }

    fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        Ok(self.lock().operators.get(name).cloned())
    }

    fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        Ok(scan(&self.lock().operators, ""))
    }

    fn integrator(&self, name: &str) -> Result<Option<IntegratorRecord>, StoreError> {
        Ok(self.lock().integrators.get(name).cloned())
    }

    fn integrators(&self) -> Result<Vec<IntegratorRecord>, StoreError> {
        Ok(scan(&self.lock().integrators, ""))
    }

    fn admin_counters(&self) -> Result<Vec<AdminCounter>, StoreError> {
        Ok(scan(&self.lock().admin_counters, ""))
    }

    fn counter(&self, machine: &MachineId, channel: &str) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .counters
            .get(&key::counter(machine, channel))
            .copied()
            .unwrap_or(0))
    }

    fn events_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<FleetEvent>, bool), StoreError> {
        Ok(page(&self.lock().events, since, limit))
    }

    fn events(&self) -> Result<Vec<FleetEvent>, StoreError> {
        Ok(self.lock().events.values().cloned().collect())
    }

    fn last_event_id(&self) -> Result<u64, StoreError> {
        Ok(self.lock().last_event)
    }

    fn audit_since(&self, since: u64, limit: usize) -> Result<(Vec<AuditEntry>, bool), StoreError> {
        Ok(page(&self.lock().audit, since, limit))
    }

    fn desired(&self, target: &Target, kind: &Kind) -> Result<Option<DesiredNotice>, StoreError> {
        Ok(self
            .lock()
            .desired
            .get(&key::desired(target, kind))
            .cloned())
    }

    fn desired_for(&self, target: &Target) -> Result<Vec<DesiredNotice>, StoreError> {
        Ok(scan(&self.lock().desired, &key::desired_prefix(target)))
    }

    fn all_desired(&self) -> Result<Vec<DesiredNotice>, StoreError> {
        Ok(scan(&self.lock().desired, ""))
    }
}

impl Records for Tables {
    fn put_release(&self, info: &ReleaseInfo) -> Result<(), StoreError> {
        self.lock()
            .releases
            .insert(info.id.to_string(), info.clone());
        Ok(())
    }

    fn put_target(&self, rec: &TargetRecord) -> Result<(), StoreError> {
        let mut d = self.lock();
        d.machine_targets
            .insert(key::machine_target(&rec.machine, &rec.release));
        d.targets
            .insert(key::target(&rec.release, &rec.machine), rec.clone());
        Ok(())
    }

    fn set_current(
        &self,
        machine: &MachineId,
        kind: &Kind,
        release: &ReleaseId,
    ) -> Result<(), StoreError> {
        self.lock()
            .current
            .insert(key::machine_kind(machine, kind), release.clone());
        Ok(())
    }

    fn put_rollout(&self, info: &RolloutInfo) -> Result<(), StoreError> {
        self.lock()
            .rollouts
            .insert(info.release.to_string(), info.clone());
        Ok(())
    }

    fn remove_release(&self, id: &ReleaseId) -> Result<bool, StoreError> {
        Ok(self.lock().releases.remove(id.as_str()).is_some())
    }

    fn remove_target(&self, release: &ReleaseId, machine: &MachineId) -> Result<bool, StoreError> {
        let mut d = self.lock();
        d.machine_targets
            .remove(&key::machine_target(machine, release));
        d.event_counts
            .remove(&key::event_count(machine, Some(release)));
        Ok(d.targets.remove(&key::target(release, machine)).is_some())
    }

    fn remove_current(&self, machine: &MachineId, kind: &Kind) -> Result<(), StoreError> {
        self.lock()
            .current
            .remove(&key::machine_kind(machine, kind));
        Ok(())
    }

    fn remove_rollout(&self, release: &ReleaseId) -> Result<bool, StoreError> {
        Ok(self.lock().rollouts.remove(release.as_str()).is_some())
    }

    fn put_desired(&self, notice: &DesiredNotice) -> Result<(), StoreError> {
        self.lock()
            .desired
            .insert(key::desired(&notice.target, &notice.kind), notice.clone());
        Ok(())
    }

    fn remove_desired(&self, target: &Target, kind: &Kind) -> Result<(), StoreError> {
        self.lock().desired.remove(&key::desired(target, kind));
        Ok(())
    }

    fn put_machine(&self, info: &MachineInfo) -> Result<(), StoreError> {
        self.lock()
            .machines
            .insert(info.id.to_string(), info.clone());
        Ok(())
    }

    fn put_machines(&self, infos: &[MachineInfo]) -> Result<(), StoreError> {
        let mut tables = self.lock();
        for info in infos {
            tables.machines.insert(info.id.to_string(), info.clone());
        }
        Ok(())
    }

    fn put_secret(&self, id: &MachineId, secret: &Secret) -> Result<(), StoreError> {
        self.lock().secrets.insert(id.to_string(), secret.clone());
        Ok(())
    }

    fn remove_secret(&self, id: &MachineId) -> Result<bool, StoreError> {
        Ok(self.lock().secrets.remove(id.as_str()).is_some())
    }

    fn put_history(
        &self,
        machine: &MachineId,
        kind: &Kind,
        versions: &[String],
    ) -> Result<(), StoreError> {
        self.lock()
            .history
            .insert(key::machine_kind(machine, kind), versions.to_vec());
        Ok(())
    }

    fn set_bootstrapped(&self) -> Result<(), StoreError> {
        self.lock().bootstrapped = true;
        Ok(())
    }

    fn put_operator(&self, rec: &OperatorRecord) -> Result<(), StoreError> {
        self.lock()
            .operators
            .insert(rec.info.name.clone(), rec.clone());
        Ok(())
    }

    fn remove_operator(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.lock().operators.remove(name).is_some())
    }

    fn put_integrator(&self, rec: &IntegratorRecord) -> Result<(), StoreError> {
        self.lock()
            .integrators
            .insert(rec.name.clone(), rec.clone());
        Ok(())
    }

    fn remove_integrator(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.lock().integrators.remove(name).is_some())
    }
}
