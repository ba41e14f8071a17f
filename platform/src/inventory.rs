//! Inventory and history for operators (`machine_query`, `versions`, `history`): which
//! machines match a filter, the installed versions of a kind with the fleet's standing against a
//! release, and every release that reached one machine.
//!
//! The decisions are pure functions ([`matches`](fn@matches), [`standing`], [`Tally`], [`page`]) tested
//! below; the `query`/`versions`/`history` functions only read the store around them. They run
//! on the platform so that a 10,000-machine fleet answers in one short reply: the full machine
//! list is ~3 MB of JSON, more than the broker's 2 MiB packet once sealed, so listings come in
//! pages of at most [`PAGE_BYTES`] and counts come already aggregated.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fleetcast_proto::admin::{
    Compliance, MachineFilter, MachineInfo, ReleaseInfo, TargetRecord, VersionCount, VersionReport,
};
use fleetcast_proto::calls::{HistoryPage, Page};
use fleetcast_proto::release::compare_versions;
use fleetcast_proto::{Kind, MachineId, Phase, ReleaseId};
use serde::Serialize;

use crate::domain;
use crate::ops::{known_release, refused, OpError};
use crate::store::{Store, StoreError};

/// Runs a read of the whole fleet on the blocking pool: it can take a while at 10,000
/// machines, and the async threads carry the ingest meanwhile.
pub async fn off_thread<T: Send + 'static>(
    store: &Arc<dyn Store>,
    read: impl FnOnce(&dyn Store) -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || read(&*store))
        .await
        .map_err(|e| OpError::Refused(format!("inventory task failed: {e}")))?
}

/// Most JSON bytes of records in one page. Sealed (base64 of nonce, JSON and tag) with the
/// envelope around it, a page stays well below the broker's 2 MiB packet limit.
pub const PAGE_BYTES: usize = 1 << 20;

/// Most records in one page (and the default).
pub const MAX_PAGE_ITEMS: u32 = 1000;

/// Takes items while they fit `limit` items and `budget` bytes of JSON (at least one, however
/// large), and says whether any item is left after the page.
pub fn page<T: Serialize, E>(
    items: impl IntoIterator<Item = Result<T, E>>,
    limit: usize,
    budget: usize,
) -> Result<(Vec<T>, bool), E> {
    let mut out = Vec::new();
    let mut used = 0;
    for item in items {
        let item = item?;
        // The comma between records counts too.
        let size = serde_json::to_vec(&item).map_or(0, |v| v.len()) + 1;
        if out.len() >= limit || (!out.is_empty() && used + size > budget) {
            return Ok((out, true));
        }
        used += size;
        out.push(item);
    }
    Ok((out, false))
}

fn page_limit(limit: Option<u32>) -> usize {
    limit.unwrap_or(MAX_PAGE_ITEMS).clamp(1, MAX_PAGE_ITEMS) as usize
}

/// Whether `m` passes every condition `f` sets. `assigned` is the phase of the platform's
/// record of the machine's current release of `f.kind` (None: no release of it reached the
/// machine); it is ignored without `f.kind`.
pub fn matches(m: &MachineInfo, f: &MachineFilter, assigned: Option<Phase>) -> bool {
    if let Some(g) = &f.group {
        if !m.groups.contains(g) {
            return false;
        }
    }
    if let Some(online) = f.online {
        if m.online != online {
            return false;
        }
    }
    let installed = |kind: &Kind| m.kinds.get(kind).and_then(|k| k.version.as_deref());
    match (&f.kind, &f.version) {
        (Some(kind), version) => {
            if !m.kinds.contains_key(kind) && assigned.is_none() {
                return false;
            }
            if version.is_some() && installed(kind) != version.as_deref() {
                return false;
            }
            if f.phase.is_some() && assigned != f.phase {
                return false;
            }
        }
        (None, Some(v)) => {
            if !m.kinds.values().any(|k| k.version.as_deref() == Some(v)) {
                return false;
            }
        }
        (None, None) => {}
    }
    true
}

/// The phase of `machine`'s record of its current release of `kind`, if one reached it.
fn current_phase(
    store: &dyn Store,
    machine: &MachineId,
    kind: &Kind,
) -> Result<Option<Phase>, StoreError> {
    let Some(release) = store.current(machine, kind)? else {
        return Ok(None);
    };
    Ok(store.target(&release, machine)?.map(|t| t.phase))
}

/// One page of the machines matching `filter`, in id order after `after`.
pub fn query(
    store: &dyn Store,
    filter: &MachineFilter,
    after: Option<&MachineId>,
    limit: Option<u32>,
) -> Result<Page<MachineInfo, Option<MachineId>>, OpError> {
    if filter.phase.is_some() && filter.kind.is_none() {
        return refused("a phase filter needs a kind: the phase is that of the machine's current release of the kind");
    }
    let matching = store.machines_after(after).filter_map(|m| {
        let m = match m {
            Ok(m) => m,
            Err(e) => return Some(Err(e)),
        };
        let assigned = match &filter.kind {
            Some(kind) => match current_phase(store, &m.id, kind) {
                Ok(p) => p,
                Err(e) => return Some(Err(e)),
            },
            None => None,
        };
        matches(&m, filter, assigned).then_some(Ok(m))
    });
    let (machines, more) = page(matching, page_limit(limit), PAGE_BYTES)?;
    let next = machines.last().map(|m| m.id.clone());
    Ok(Page {
        items: machines,
        next,
        more,
    })
}

/// Release ids in the order the platform made them: `r-000009` < `r-000010` < `r-1000000`
/// (its ids are `r-` and a zero-padded counter, so a longer id is a later one).
pub fn release_order(a: &ReleaseId, b: &ReleaseId) -> Ordering {
    let (a, b) = (a.as_str(), b.as_str());
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The newest (last created) release of `kind` that was published.
pub fn newest_published<'a>(releases: &'a [ReleaseInfo], kind: &Kind) -> Option<&'a ReleaseInfo> {
    releases
        .iter()
        .filter(|r| &r.kind == kind && domain::release::is_published(r))
        .max_by(|a, b| release_order(&a.id, &b.id))
}

/// Where one machine stands with a release of `version`. Each machine is in exactly one: the
/// first that applies, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It runs `version`, whatever its record says.
    OnTarget,
    /// The release has no record for it.
    NotTargeted,
    /// Its record is in a failure phase.
    Failed,
    /// Its record finished without failure (installed, superseded) and it runs another version.
    Replaced,
    /// Its record is not final and it is not online.
    Offline,
    /// Its record is not final and it is online.
    InProgress,
}

/// `m`'s standing with a release of `version` of `kind`, given its record's phase.
pub fn standing(m: &MachineInfo, kind: &Kind, version: &str, record: Option<Phase>) -> Standing {
    let installed = m.kinds.get(kind).and_then(|k| k.version.as_deref());
    if installed == Some(version) {
        return Standing::OnTarget;
    }
    match record {
        None => Standing::NotTargeted,
        Some(p) if p.is_failure() => Standing::Failed,
        Some(p) if p.is_final() => Standing::Replaced,
        Some(_) if !m.online => Standing::Offline,
        Some(_) => Standing::InProgress,
    }
}

/// Counts machines into a [`VersionReport`], one at a time (the fleet is read as a stream).
pub struct Tally {
    kind: Kind,
    /// The release compared against, and its record's phase per machine it reached.
    reference: Option<(ReleaseInfo, HashMap<MachineId, Phase>)>,
    versions: BTreeMap<String, u32>,
    machines: u32,
    without: u32,
    revoked: u32,
    compliance: Option<Compliance>,
}

impl Tally {
    pub fn new(kind: Kind, reference: Option<(ReleaseInfo, HashMap<MachineId, Phase>)>) -> Self {
        let compliance = reference
            .as_ref()
            .map(|(r, _)| Compliance::new(r.id.clone(), r.version.clone()));
        Self {
            kind,
            reference,
            versions: BTreeMap::new(),
            machines: 0,
            without: 0,
            revoked: 0,
            compliance,
        }
    }

    pub fn add(&mut self, m: &MachineInfo) {
        if m.revoked_at_ms.is_some() {
            self.revoked += 1;
            return;
        }
        self.machines += 1;
        match m.kinds.get(&self.kind).and_then(|k| k.version.as_ref()) {
            Some(v) => *self.versions.entry(v.clone()).or_default() += 1,
            None => self.without += 1,
        }
        let (Some((release, records)), Some(c)) = (&self.reference, &mut self.compliance) else {
            return;
        };
        let bucket = match standing(m, &self.kind, &release.version, records.get(&m.id).copied()) {
            Standing::OnTarget => &mut c.on_target,
            Standing::NotTargeted => &mut c.not_targeted,
            Standing::Failed => &mut c.failed,
            Standing::Replaced => &mut c.replaced,
            Standing::Offline => &mut c.offline,
            Standing::InProgress => &mut c.in_progress,
        };
        *bucket += 1;
    }

    pub fn finish(self) -> VersionReport {
        let mut versions: Vec<VersionCount> = self
            .versions
            .into_iter()
            .map(|(version, machines)| VersionCount { version, machines })
            .collect();
        // Version order; two spellings of one version (`1.01`, `1.1`) stay apart, by text.
        versions.sort_by(|a, b| {
            compare_versions(&a.version, &b.version).then_with(|| a.version.cmp(&b.version))
        });
        VersionReport {
            kind: self.kind,
            machines: self.machines,
            versions,
            without: self.without,
            revoked: self.revoked,
            compliance: self.compliance,
        }
    }
}

/// The versions of `kind` across the fleet, and its standing with `release` (default: the
/// newest published release of `kind`).
pub fn versions(
    store: &dyn Store,
    kind: &Kind,
    release: Option<&ReleaseId>,
) -> Result<VersionReport, OpError> {
    let reference = match release {
        Some(id) => {
            let r = known_release(store, id)?;
            if &r.kind != kind {
                return refused(format!("release {id} is of kind {}, not {kind}", r.kind));
            }
            Some(r)
        }
        None => newest_published(&store.releases()?, kind).cloned(),
    };
    let reference = match reference {
        Some(r) => {
            let records = store
                .targets_of(&r.id)?
                .into_iter()
                .map(|t| (t.machine, t.phase))
                .collect();
            Some((r, records))
        }
        None => None,
    };
    let mut tally = Tally::new(kind.clone(), reference);
    for m in store.machines_after(None) {
        tally.add(&m?);
    }
    Ok(tally.finish())
}

/// `records` of one machine, newest release first, only those of `kind` and older than
/// `before` when given.
pub fn newest_first(
    mut records: Vec<TargetRecord>,
    kind: Option<&Kind>,
    before: Option<&ReleaseId>,
) -> Vec<TargetRecord> {
    records.retain(|t| {
        kind.is_none_or(|k| &t.kind == k)
            && before.is_none_or(|b| release_order(&t.release, b) == Ordering::Less)
    });
    records.sort_by(|a, b| release_order(&b.release, &a.release));
    records
}

/// One page of `machine`'s history: the record of every release that reached it.
pub fn history(
    store: &dyn Store,
    machine: &MachineId,
    kind: Option<&Kind>,
    before: Option<&ReleaseId>,
    limit: Option<u32>,
) -> Result<HistoryPage, OpError> {
    if store.machine(machine)?.is_none() {
        return refused(format!("unknown machine {machine}"));
    }
    let records = newest_first(store.targets_of_machine(machine)?, kind, before);
    let (targets, more) = page(
        records.into_iter().map(Ok::<_, OpError>),
        page_limit(limit),
        PAGE_BYTES,
    )?;
    let next = targets.last().map(|t| t.release.clone());
    Ok(HistoryPage {
        machine: machine.clone(),
        page: Page {
            items: targets,
            next,
            more,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::status::KindState;
    use fleetcast_proto::GroupId;

    fn app() -> Kind {
        Kind::new("app").unwrap()
    }

    fn machine(
        id: &str,
        online: bool,
        groups: &[&str],
        kinds: &[(&str, Option<&str>)],
    ) -> MachineInfo {
        let mut m = MachineInfo::new(MachineId::new(id).unwrap(), 0);
        m.online = online;
        m.groups = groups.iter().map(|g| GroupId::new(*g).unwrap()).collect();
        for (k, v) in kinds {
            m.kinds.insert(
                Kind::new(*k).unwrap(),
                KindState {
                    version: v.map(Into::into),
                    ..Default::default()
                },
            );
        }
        m
    }

    fn filter() -> MachineFilter {
        MachineFilter::default()
    }

    #[test]
    fn an_empty_filter_matches_every_machine() {
        let m = machine("vm-1", false, &[], &[]);
        assert!(matches(&m, &filter(), None));
    }

    #[test]
    fn every_condition_set_must_hold() {
        let m = machine(
            "vm-1",
            true,
            &["shanghai"],
            &[("app", Some("2.0")), ("fw", Some("1.0"))],
        );
        let f = MachineFilter {
            group: Some(GroupId::new("shanghai").unwrap()),
            kind: Some(app()),
            version: Some("2.0".into()),
            online: Some(true),
            phase: Some(Phase::Installed),
        };
        assert!(matches(&m, &f, Some(Phase::Installed)));
        let but = |change: fn(&mut MachineFilter)| {
            let mut f = f.clone();
            change(&mut f);
            matches(&m, &f, Some(Phase::Installed))
        };
        assert!(!but(|f| f.group = Some(GroupId::new("beijing").unwrap())));
        assert!(!but(|f| f.kind = Some(Kind::new("os").unwrap())));
        assert!(!but(|f| f.version = Some("1.0".into())));
        assert!(!but(|f| f.online = Some(false)));
        assert!(!but(|f| f.phase = Some(Phase::Downloading)));
        assert!(!matches(&m, &f, Some(Phase::InstallFailed)));
        assert!(!matches(&m, &f, None), "no current release: no phase");
    }

    #[test]
    fn a_version_without_a_kind_matches_any_kind() {
        let m = machine(
            "vm-1",
            true,
            &[],
            &[("app", Some("2.0")), ("fw", Some("1.0"))],
        );
        let version = |v: &str| MachineFilter {
            version: Some(v.into()),
            ..filter()
        };
        assert!(matches(&m, &version("1.0"), None));
        assert!(matches(&m, &version("2.0"), None));
        assert!(!matches(&m, &version("3.0"), None));
        // With a kind, only that kind's version counts.
        let fw_2 = MachineFilter {
            kind: Some(Kind::new("fw").unwrap()),
            ..version("2.0")
        };
        assert!(!matches(&m, &fw_2, None));
    }

    #[test]
    fn a_kind_matches_machines_that_report_it_or_that_a_release_of_it_reached() {
        let reports = machine("vm-1", true, &[], &[("app", None)]);
        let silent = machine("vm-2", false, &[], &[]);
        let f = MachineFilter {
            kind: Some(app()),
            ..filter()
        };
        assert!(matches(&reports, &f, None));
        assert!(!matches(&silent, &f, None));
        assert!(matches(&silent, &f, Some(Phase::Pending)));
        let pending = MachineFilter {
            phase: Some(Phase::Pending),
            ..f
        };
        assert!(matches(&silent, &pending, Some(Phase::Pending)));
        assert!(!matches(&reports, &pending, None));
    }

    #[test]
    fn a_page_stops_at_its_limit_or_its_byte_budget_and_knows_if_more_follow() {
        let items = || (0..5u32).map(Ok::<_, ()>);
        assert_eq!(page(items(), 10, 1000), Ok((vec![0, 1, 2, 3, 4], false)));
        assert_eq!(page(items(), 5, 1000), Ok((vec![0, 1, 2, 3, 4], false)));
        assert_eq!(page(items(), 2, 1000), Ok((vec![0, 1], true)));
        // Each number is 1 byte of JSON plus its comma: 3 fit in 6 bytes.
        assert_eq!(page(items(), 10, 6), Ok((vec![0, 1, 2], true)));
        // One record larger than the budget still goes, alone.
        let big = vec![Ok::<_, ()>("x".repeat(100)), Ok("y".into())];
        assert_eq!(page(big, 10, 10).unwrap().0.len(), 1);
        assert_eq!(
            page(Vec::<Result<u8, ()>>::new(), 10, 10),
            Ok((vec![], false))
        );
        assert_eq!(page(vec![Ok(1), Err("bad")], 10, 10), Err("bad"));
    }

    #[test]
    fn a_page_of_the_largest_ordinary_machines_fits_the_packet_limit_once_sealed() {
        let mut m = machine(
            "vm-0123456789-abcdef",
            true,
            &["shanghai-district-7", "all"],
            &[],
        );
        m.last_seen_ms = Some(1_795_608_000_000);
        m.agent_version = Some("0.1.0".into());
        for kind in ["app", "firmware", "os", "payment"] {
            m.kinds.insert(
                Kind::new(kind).unwrap(),
                KindState {
                    version: Some("2026.11.25-build.1234".into()),
                    artifact: Some(fleetcast_proto::ArtifactId::of(kind.as_bytes())),
                    release: Some(ReleaseId::new("r-000123").unwrap()),
                    phase: Some(Phase::Installed),
                    seq: 123_456,
                },
            );
        }
        let fleet = std::iter::repeat_n(m, 10_000).map(Ok::<_, ()>);
        let (machines, more) = page(fleet, MAX_PAGE_ITEMS as usize, PAGE_BYTES).unwrap();
        assert!(more);
        let reply = fleetcast_proto::admin::AdminReply::MachinePage {
            next: Some(machines[0].id.clone()),
            machines,
            more,
        };
        let json =
            serde_json::to_vec(&fleetcast_proto::admin::AdminResponse::ok(1, 1, reply)).unwrap();
        // Sealed: base64 of a 24-byte nonce, the JSON and a 16-byte tag; plus the envelope.
        let sealed = (json.len() + 40).div_ceil(3) * 4 + 64;
        assert!(sealed < 2 * 1024 * 1024, "{sealed} bytes");
    }

    #[test]
    fn releases_order_by_their_counter_even_past_six_digits() {
        let r = |s: &str| ReleaseId::new(s).unwrap();
        assert_eq!(
            release_order(&r("r-000009"), &r("r-000010")),
            Ordering::Less
        );
        assert_eq!(
            release_order(&r("r-999999"), &r("r-1000000")),
            Ordering::Less
        );
        assert_eq!(
            release_order(&r("r-000002"), &r("r-000002")),
            Ordering::Equal
        );
    }

    fn published(id: &str, kind: &str, version: &str, seq: u64) -> ReleaseInfo {
        ReleaseInfo {
            kind: Kind::new(kind).unwrap(),
            seq,
            ..crate::fixtures::release(id, version)
        }
    }

    #[test]
    fn the_reference_release_is_the_last_created_published_one_of_the_kind() {
        let releases = vec![
            published("r-000001", "app", "1.0", 1),
            published("r-000003", "app", "1.1", 2),
            published("r-000002", "app", "3.0", 5),
            published("r-000004", "app", "2.0", 0),
            published("r-000005", "fw", "9.0", 6),
        ];
        let newest = newest_published(&releases, &app()).unwrap();
        assert_eq!(
            newest.id.as_str(),
            "r-000003",
            "unpublished r-000004 does not count"
        );
        assert!(newest_published(&releases, &Kind::new("os").unwrap()).is_none());
    }

    #[test]
    fn each_machine_stands_in_exactly_one_bucket_in_the_documented_order() {
        let on = |v: Option<&str>, online: bool| machine("vm", online, &[], &[("app", v)]);
        let s = |m: &MachineInfo, p: Option<Phase>| standing(m, &app(), "2.0", p);
        // Running the version wins over anything its record says, online or not.
        assert_eq!(
            s(&on(Some("2.0"), false), Some(Phase::InstallFailed)),
            Standing::OnTarget
        );
        assert_eq!(s(&on(Some("2.0"), true), None), Standing::OnTarget);
        assert_eq!(s(&on(Some("1.0"), false), None), Standing::NotTargeted);
        assert_eq!(s(&on(None, true), None), Standing::NotTargeted);
        for failure in [
            Phase::DownloadFailed,
            Phase::InstallFailed,
            Phase::RolledBack,
            Phase::Rejected,
            Phase::Cancelled,
        ] {
            assert_eq!(s(&on(Some("1.0"), false), Some(failure)), Standing::Failed);
        }
        assert_eq!(
            s(&on(Some("1.0"), true), Some(Phase::Installed)),
            Standing::Replaced
        );
        assert_eq!(
            s(&on(Some("1.0"), false), Some(Phase::Superseded)),
            Standing::Replaced
        );
        for unfinished in [
            Phase::Pending,
            Phase::Notified,
            Phase::Deferred,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Installing,
        ] {
            assert_eq!(
                s(&on(Some("1.0"), false), Some(unfinished)),
                Standing::Offline
            );
            assert_eq!(s(&on(None, true), Some(unfinished)), Standing::InProgress);
        }
    }

    #[test]
    fn a_tally_counts_versions_in_version_order_and_every_machine_once() {
        let release = published("r-000007", "app", "2.10", 3);
        let mut records = HashMap::new();
        let mut fleet = vec![
            machine("a", true, &[], &[("app", Some("2.10"))]),
            machine("b", true, &[], &[("app", Some("2.9"))]),
            machine("c", false, &[], &[("app", Some("2.9"))]),
            machine("d", true, &[], &[("fw", Some("1.0"))]),
            machine("e", true, &[], &[("app", Some("10.0"))]),
            machine("f", true, &[], &[("app", Some("2.9"))]),
        ];
        let mut gone = machine("g", false, &[], &[("app", Some("1.0"))]);
        gone.revoked_at_ms = Some(5);
        fleet.push(gone);
        for (id, phase) in [
            ("a", Phase::Installed),
            ("b", Phase::Downloading),
            ("c", Phase::Notified),
            ("d", Phase::InstallFailed),
            ("g", Phase::Pending),
        ] {
            records.insert(MachineId::new(id).unwrap(), phase);
        }
        let mut tally = Tally::new(app(), Some((release, records)));
        for m in &fleet {
            tally.add(m);
        }
        let report = tally.finish();
        let versions: Vec<(&str, u32)> = report
            .versions
            .iter()
            .map(|v| (v.version.as_str(), v.machines))
            .collect();
        assert_eq!(versions, [("2.9", 3), ("2.10", 1), ("10.0", 1)]);
        assert_eq!((report.machines, report.without, report.revoked), (6, 1, 1));
        let c = report.compliance.unwrap();
        assert_eq!(
            (c.release.as_str(), c.version.as_str()),
            ("r-000007", "2.10")
        );
        assert_eq!(
            (
                c.on_target,
                c.in_progress,
                c.offline,
                c.failed,
                c.not_targeted,
                c.replaced
            ),
            (1, 1, 1, 1, 2, 0)
        );
        let sum = c.on_target + c.in_progress + c.offline + c.failed + c.not_targeted + c.replaced;
        assert_eq!(sum, report.machines);
    }

    #[test]
    fn without_a_published_release_there_is_no_compliance() {
        let mut tally = Tally::new(app(), None);
        tally.add(&machine("a", true, &[], &[("app", Some("1.0"))]));
        let report = tally.finish();
        assert_eq!(report.compliance, None);
        assert_eq!(report.versions.len(), 1);
    }

    #[test]
    fn history_is_newest_release_first_filtered_by_kind_and_cursor() {
        let rec = |r: &str, kind: &str| TargetRecord {
            kind: Kind::new(kind).unwrap(),
            ..crate::domain::target::new_target(
                &crate::fixtures::release(r, "1.0"),
                MachineId::new("vm-1").unwrap(),
                None,
                0,
            )
        };
        let records = vec![
            rec("r-000009", "app"),
            rec("r-000100", "fw"),
            rec("r-000010", "app"),
            rec("r-000002", "app"),
        ];
        let ids = |v: Vec<TargetRecord>| -> Vec<String> {
            v.into_iter().map(|t| t.release.to_string()).collect()
        };
        assert_eq!(
            ids(newest_first(records.clone(), None, None)),
            ["r-000100", "r-000010", "r-000009", "r-000002"]
        );
        assert_eq!(
            ids(newest_first(records.clone(), Some(&app()), None)),
            ["r-000010", "r-000009", "r-000002"]
        );
        let before = ReleaseId::new("r-000010").unwrap();
        assert_eq!(
            ids(newest_first(records, None, Some(&before))),
            ["r-000009", "r-000002"]
        );
    }
}
