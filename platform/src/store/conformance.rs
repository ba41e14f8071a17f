//! The same assertions against every [`Store`] implementation, so they cannot drift: each case
//! is a function of a `&dyn Store`, and [`conformance!`] runs it on a fresh [`SledStore`] (in a
//! temp dir) and a fresh [`MemStore`].

use std::sync::{Arc, Barrier};

use fleetcast_proto::admin::{
    ArtifactInfo, AuditEntry, FleetEvent, MachineInfo, OperatorInfo, TargetRecord,
};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::rollout::{RolloutState, WavePlan};
use fleetcast_proto::{acl::Role, ArtifactId, GroupId, Kind, MachineId, Phase, ReleaseId, Target};

use super::*;

fn m(s: &str) -> MachineId {
    MachineId::new(s).unwrap()
}

fn r(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

fn app() -> Kind {
    Kind::new("app").unwrap()
}

fn target(release: &str, machine: &str) -> TargetRecord {
    crate::domain::target::new_target(
        &crate::fixtures::release(release, "1.0"),
        m(machine),
        None,
        0,
    )
}

fn event(machine: &str, phase: Phase) -> FleetEvent {
    FleetEvent {
        id: 0,
        recorded_at_ms: 1,
        machine: m(machine),
        release: None,
        kind: app(),
        version: "1".into(),
        phase,
        at_ms: 2,
        attempt: 1,
        progress: None,
        error: None,
        detail: None,
    }
}

fn notice(target: Target, kind: &Kind, seq: u64) -> DesiredNotice {
    DesiredNotice {
        topic: format!("{target}/{kind}"),
        seq,
        release: r("r-000001"),
        kind: kind.clone(),
        target,
        payload: "{}".into(),
    }
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> String) -> Vec<String> {
    items.iter().map(id).collect()
}

fn ids_and_seqs_start_at_one_and_only_grow(s: &dyn Store) {
    assert_eq!(s.next_seq().unwrap(), 1);
    assert_eq!(s.next_seq().unwrap(), 2);
    // Release ids count on their own.
    assert_eq!(s.next_release_id().unwrap().as_str(), "r-000001");
    assert_eq!(s.next_release_id().unwrap().as_str(), "r-000002");
    assert_eq!(s.next_seq().unwrap(), 3);
    // Raised, never lowered.
    s.raise_seq(1000).unwrap();
    assert_eq!(s.next_seq().unwrap(), 1001);
    s.raise_seq(10).unwrap();
    assert_eq!(s.next_seq().unwrap(), 1002);
    let mut e = event("vm-1", Phase::Notified);
    s.append_event(&mut e).unwrap();
    let mut a = audit("first");
    s.append_audit(&mut a).unwrap();
    assert_eq!(
        (e.id, a.id),
        (1, 1),
        "events and audit entries are numbered apart"
    );
    s.append_event(&mut e).unwrap();
    assert_eq!(e.id, 2);
    // Several at once take the next ids in order, and one alone follows them.
    let mut batch = [
        event("vm-1", Phase::Downloading),
        event("vm-1", Phase::Installed),
    ];
    s.append_events(&mut batch).unwrap();
    assert_eq!((batch[0].id, batch[1].id), (3, 4));
    s.append_events(&mut []).unwrap();
    s.append_event(&mut e).unwrap();
    assert_eq!(e.id, 5);
    let stored = s.events().unwrap();
    assert_eq!(
        stored.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(stored[3].phase, Phase::Installed);
}

fn replay_counters_keep_the_highest_and_report_the_previous(s: &dyn Store) {
    let vm1 = m("vm-1");
    assert_eq!(s.counter(&vm1, "status").unwrap(), 0);
    assert_eq!(s.raise_counter(&vm1, "status", 5).unwrap(), 0);
    // A replay (equal or lower) leaves it.
    assert_eq!(s.raise_counter(&vm1, "status", 5).unwrap(), 5);
    assert_eq!(s.raise_counter(&vm1, "status", 3).unwrap(), 5);
    assert_eq!(s.counter(&vm1, "status").unwrap(), 5);
    assert_eq!(s.raise_counter(&vm1, "status", 9).unwrap(), 5);
    // Per machine and per channel.
    assert_eq!(s.counter(&vm1, "state").unwrap(), 0);
    assert_eq!(s.counter(&m("vm-10"), "status").unwrap(), 0);
    assert_eq!(s.raise_counter(&m("vm-10"), "status", 1).unwrap(), 0);
    assert_eq!(s.counter(&vm1, "status").unwrap(), 9);
}

fn resetting_a_machines_counters_leaves_every_other_machines(s: &dyn Store) {
    let (vm1, vm10) = (m("vm-1"), m("vm-10"));
    for (machine, channel) in [(&vm1, "status"), (&vm1, "chunks"), (&vm10, "status")] {
        s.raise_counter(machine, channel, u64::MAX).unwrap();
    }
    let r1 = r("r-1");
    for machine in [&vm1, &vm10] {
        s.bump_event_count(machine, Some(&r1), 1).unwrap();
        s.bump_event_count(machine, None, 1).unwrap();
    }
    s.reset_counters(&vm1).unwrap();
    assert_eq!(s.bump_event_count(&vm1, Some(&r1), 1).unwrap(), 1);
    assert_eq!(s.bump_event_count(&vm1, None, 1).unwrap(), 1);
    assert_eq!(s.bump_event_count(&vm10, Some(&r1), 1).unwrap(), 2);
    assert_eq!(s.counter(&vm1, "status").unwrap(), 0);
    assert_eq!(s.counter(&vm1, "chunks").unwrap(), 0);
    // `vm-10` starts with `vm-1`: only the machine's own keys go.
    assert_eq!(s.counter(&vm10, "status").unwrap(), u64::MAX);
    assert_eq!(
        s.raise_counter(&vm1, "status", 1).unwrap(),
        0,
        "fresh again"
    );
}

fn event_counts_are_per_machine_and_release(s: &dyn Store) {
    let (vm1, r1) = (m("vm-1"), r("r-1"));
    assert_eq!(s.bump_event_count(&vm1, Some(&r1), 1).unwrap(), 1);
    assert_eq!(s.bump_event_count(&vm1, Some(&r1), 1).unwrap(), 2);
    assert_eq!(s.bump_event_count(&vm1, None, 1).unwrap(), 1);
    assert_eq!(s.bump_event_count(&vm1, Some(&r("r-10")), 1).unwrap(), 1);
    assert_eq!(s.bump_event_count(&m("vm-2"), Some(&r1), 1).unwrap(), 1);
    assert_eq!(s.event_count(&vm1, Some(&r1)).unwrap(), 2);
    assert_eq!(
        s.bump_event_count(&vm1, Some(&r1), 5).unwrap(),
        7,
        "several at once"
    );
    assert_eq!(s.event_count(&vm1, Some(&r1)).unwrap(), 7);
    assert_eq!(s.event_count(&m("vm-3"), None).unwrap(), 0);
}

fn scans_by_prefix_take_only_their_own_keys(s: &dyn Store) {
    s.transaction(|rec| {
        for (rel, mach) in [
            ("r-1", "a"),
            ("r-1", "ab"),
            ("r-1", "a-b"),
            ("r-10", "a"),
            ("r-2", "a"),
        ] {
            rec.put_target(&target(rel, mach))?;
        }
        rec.set_current(&m("a"), &app(), &r("r-2"))?;
        rec.set_current(&m("a"), &Kind::new("os").unwrap(), &r("r-10"))?;
        rec.set_current(&m("ab"), &app(), &r("r-1"))
    })
    .unwrap();
    let machines = |rel| ids(&s.targets_of(&r(rel)).unwrap(), |t| t.machine.to_string());
    assert_eq!(machines("r-1"), ["a", "a-b", "ab"]);
    assert_eq!(machines("r-10"), ["a"]);
    assert_eq!(machines("r-3"), Vec::<String>::new());
    let releases = |mach| {
        let mut rs = ids(&s.targets_of_machine(&m(mach)).unwrap(), |t| {
            t.release.to_string()
        });
        rs.sort();
        rs
    };
    assert_eq!(releases("a"), ["r-1", "r-10", "r-2"]);
    assert_eq!(releases("ab"), ["r-1"]);
    assert_eq!(releases("b"), Vec::<String>::new());
    assert_eq!(
        ids(&s.current_releases(&m("a")).unwrap(), |r| r.to_string()),
        ["r-2", "r-10"],
        "by kind: app, os"
    );
    assert_eq!(s.current(&m("ab"), &app()).unwrap(), Some(r("r-1")));
    assert_eq!(
        s.current(&m("ab"), &Kind::new("os").unwrap()).unwrap(),
        None
    );
    // Artifacts a machine may fetch: those of its current releases that exist.
    s.transaction(|rec| rec.put_release(&crate::fixtures::release("r-2", "2.0")))
        .unwrap();
    assert_eq!(
        s.machine_artifacts(&m("a")).unwrap(),
        [ArtifactId::of(b"2.0")]
    );
}

fn rewriting_a_target_record_replaces_it(s: &dyn Store) {
    s.transaction(|rec| rec.put_target(&target("r-1", "a")))
        .unwrap();
    let mut again = target("r-1", "a");
    again.phase = Phase::Downloading;
    s.transaction(|rec| rec.put_target(&again)).unwrap();
    assert_eq!(s.targets_of_machine(&m("a")).unwrap(), [again.clone()]);
    assert_eq!(s.target(&r("r-1"), &m("a")).unwrap(), Some(again));
    assert_eq!(s.target(&r("r-1"), &m("b")).unwrap(), None);
}

fn audit(action: &str) -> AuditEntry {
    AuditEntry {
        id: 0,
        at_ms: 1,
        operator: "admin".into(),
        client: "fleetcast-op-admin".into(),
        action: action.into(),
        request: serde_json::json!({}),
        result: "ok".into(),
    }
}

fn events_page_by_id(s: &dyn Store) {
    for phase in [
        Phase::Notified,
        Phase::Downloading,
        Phase::Downloaded,
        Phase::Installing,
        Phase::Installed,
    ] {
        s.append_event(&mut event("vm-1", phase)).unwrap();
    }
    let page = |since, limit| {
        let (events, more) = s.events_since(since, limit).unwrap();
        (events.iter().map(|e| e.id).collect::<Vec<_>>(), more)
    };
    assert_eq!(page(0, 2), (vec![1, 2], true));
    assert_eq!(page(2, 2), (vec![3, 4], true));
    assert_eq!(
        page(3, 2),
        (vec![4, 5], false),
        "a full last page says no more"
    );
    assert_eq!(page(4, 10), (vec![5], false));
    assert_eq!(page(5, 10), (vec![], false));
    assert_eq!(page(u64::MAX, 10), (vec![], false));
    let all = s.events().unwrap();
    assert_eq!(
        all.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(all[4].phase, Phase::Installed);
}

fn events_are_pruned_oldest_first_to_the_newest_kept(s: &dyn Store) {
    assert_eq!(
        s.prune_events(3, 100).unwrap(),
        0,
        "nothing stored: nothing to delete"
    );
    assert_eq!(s.last_event_id().unwrap(), 0);
    for _ in 0..10 {
        s.append_event(&mut event("vm-1", Phase::Notified)).unwrap();
    }
    let ids = || -> Vec<u64> { s.events().unwrap().iter().map(|e| e.id).collect() };
    assert_eq!(s.prune_events(3, 4).unwrap(), 4, "at most a batch");
    assert_eq!(ids(), [5, 6, 7, 8, 9, 10]);
    assert_eq!(s.prune_events(3, 4).unwrap(), 3, "fewer than a batch: done");
    assert_eq!(ids(), [8, 9, 10]);
    assert_eq!(s.prune_events(3, 4).unwrap(), 0);
    let (page, more) = s.events_since(0, 10).unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), [8, 9, 10]);
    assert!(!more);
    s.append_event(&mut event("vm-1", Phase::Installed))
        .unwrap();
    assert_eq!(ids(), [8, 9, 10, 11], "ids go on from the newest");
    assert_eq!(s.last_event_id().unwrap(), 11);
    assert_eq!(
        s.prune_events(u64::MAX, 4).unwrap(),
        0,
        "keeping everything"
    );
}

/// Events stored together (as ingest stores a batch's, in blocks on sled) page from every
/// cursor as if each were alone, and are pruned no further than the newest kept.
fn events_stored_together_page_and_prune_as_if_alone(s: &dyn Store) {
    s.append_event(&mut event("vm-first", Phase::Notified))
        .unwrap();
    let mut batch: Vec<FleetEvent> = (0..40)
        .map(|i| {
            let mut e = event(&format!("vm-{i}"), Phase::Downloading);
            // Large texts close a block early on sled.
            e.detail = (i % 7 == 3).then(|| "d".repeat(2_000));
            e
        })
        .collect();
    s.append_events(&mut batch).unwrap();
    s.append_event(&mut event("vm-last", Phase::Installed))
        .unwrap();
    let newest = 42u64;
    for since in 0..=newest + 1 {
        for limit in [1, 2, 7, 16, 17, 33, 100] {
            let (page, more) = s.events_since(since, limit).unwrap();
            let expected: Vec<u64> = (since + 1..=newest).take(limit).collect();
            let got: Vec<u64> = page.iter().map(|e| e.id).collect();
            assert_eq!(got, expected, "since {since}, limit {limit}");
            let left = newest.saturating_sub(since) as usize;
            assert_eq!(more, left > limit, "since {since}, limit {limit}");
            for e in &page {
                let machine = match e.id {
                    1 => "vm-first".to_owned(),
                    42 => "vm-last".to_owned(),
                    id => format!("vm-{}", id - 2),
                };
                assert_eq!(e.machine.as_str(), machine, "event {}", e.id);
                assert_eq!(
                    e.detail.is_some(),
                    (2..42).contains(&e.id) && (e.id - 2) % 7 == 3
                );
            }
        }
    }
    let kept = 10;
    while s.prune_events(kept, 1).unwrap() == 1 {}
    let ids: Vec<u64> = s.events().unwrap().iter().map(|e| e.id).collect();
    let oldest = ids[0];
    assert_eq!(
        ids,
        (oldest..=newest).collect::<Vec<_>>(),
        "a suffix is kept"
    );
    assert!(
        oldest <= newest - kept + 1,
        "the newest {kept} stay: {ids:?}"
    );
    let block = crate::store::sled::EVENTS_PER_BLOCK as u64;
    assert!(
        oldest > newest - kept + 1 - block,
        "at most a block more than kept stays: {ids:?}"
    );
}

fn audit_pages_by_id(s: &dyn Store) {
    for action in ["a", "b", "c"] {
        s.append_audit(&mut audit(action)).unwrap();
    }
    let (entries, more) = s.audit_since(0, 2).unwrap();
    assert_eq!(ids(&entries, |e| e.action.clone()), ["a", "b"]);
    assert!(more);
    let (entries, more) = s.audit_since(2, 2).unwrap();
    assert_eq!(ids(&entries, |e| format!("{}{}", e.id, e.action)), ["3c"]);
    assert!(!more);
}

fn desired_notices_are_keyed_by_target_and_kind(s: &dyn Store) {
    let os = Kind::new("os").unwrap();
    // A group and a machine of the same name are different targets.
    let g = Target::Group(GroupId::new("vm-1").unwrap());
    let mt = Target::Machine(m("vm-1"));
    let other = Target::Machine(m("vm-10"));
    s.transaction(|rec| {
        rec.put_desired(&notice(mt.clone(), &app(), 1))?;
        rec.put_desired(&notice(g.clone(), &app(), 2))?;
        rec.put_desired(&notice(mt.clone(), &app(), 3))?;
        rec.put_desired(&notice(mt.clone(), &os, 4))?;
        rec.put_desired(&notice(other.clone(), &app(), 5))
    })
    .unwrap();
    assert_eq!(s.desired(&mt, &app()).unwrap().unwrap().seq, 3);
    assert_eq!(s.desired(&g, &app()).unwrap().unwrap().seq, 2);
    assert_eq!(s.desired(&g, &os).unwrap(), None);
    let seqs = |v: Vec<DesiredNotice>| v.iter().map(|n| n.seq).collect::<Vec<_>>();
    assert_eq!(seqs(s.desired_for(&mt).unwrap()), [3, 4]);
    assert_eq!(seqs(s.desired_for(&g).unwrap()), [2]);
    assert_eq!(seqs(s.all_desired().unwrap()), [2, 3, 4, 5]);
    s.transaction(|rec| rec.remove_desired(&mt, &app()))
        .unwrap();
    s.transaction(|rec| rec.remove_desired(&mt, &app()))
        .unwrap();
    assert_eq!(seqs(s.desired_for(&mt).unwrap()), [4]);
    assert_eq!(seqs(s.all_desired().unwrap()), [2, 4, 5]);
}

fn rollouts_are_stored_by_release(s: &dyn Store) {
    let plan = WavePlan {
        waves_bp: vec![5000, 10000],
        success_bp: 10000,
        failure_bp: 0,
        wave_timeout_ms: 0,
    };
    let start = |rel: &str| {
        crate::domain::rollout::start(&r(rel), plan.clone(), [m("vm-1"), m("vm-2")], 5).0
    };
    let (r2, mut r1) = (start("r-2"), start("r-1"));
    s.transaction(|rec| {
        rec.put_rollout(&r2)?;
        rec.put_rollout(&r1)
    })
    .unwrap();
    assert_eq!(s.rollout(&r("r-1")).unwrap(), Some(r1.clone()));
    assert_eq!(s.rollout(&r("r-3")).unwrap(), None);
    r1.state = RolloutState::Cancelled {
        reason: "by admin".into(),
    };
    s.transaction(|rec| rec.put_rollout(&r1)).unwrap();
    let all = s.rollouts().unwrap();
    assert_eq!(ids(&all, |r| r.release.to_string()), ["r-1", "r-2"]);
    assert_eq!(all[0], r1);
}

fn removing_a_release_and_its_targets_leaves_no_key_naming_them(s: &dyn Store) {
    let (r1, r10) = (r("r-1"), r("r-10"));
    let plan = WavePlan::new(vec![10000], 10000, 0, 0).unwrap();
    let rollout = crate::domain::rollout::start(&r1, plan, [m("a")], 5).0;
    s.transaction(|rec| {
        rec.put_release(&crate::fixtures::release("r-1", "1.0"))?;
        rec.put_release(&crate::fixtures::release("r-10", "2.0"))?;
        for (rel, mach) in [("r-1", "a"), ("r-1", "ab"), ("r-10", "a")] {
            rec.put_target(&target(rel, mach))?;
        }
        rec.put_rollout(&rollout)?;
        rec.set_current(&m("ab"), &app(), &r1)?;
        rec.set_current(&m("a"), &app(), &r10)
    })
    .unwrap();
    for (mach, rel) in [("a", &r1), ("ab", &r1), ("a", &r10)] {
        s.bump_event_count(&m(mach), Some(rel), 3).unwrap();
    }
    let removed = s
        .transaction(|rec| -> Result<_, StoreError> {
            let mut removed = Vec::new();
            for t in rec.targets_of(&r1)? {
                removed.push(rec.remove_target(&r1, &t.machine)?);
            }
            removed.push(rec.remove_target(&r1, &m("b"))?);
            rec.remove_current(&m("ab"), &app())?;
            removed.push(rec.remove_rollout(&r1)?);
            removed.push(rec.remove_release(&r1)?);
            removed.push(rec.remove_release(&r1)?);
            Ok(removed)
        })
        .unwrap();
    assert_eq!(removed, [true, true, false, true, true, false]);
    assert_eq!(s.release(&r1).unwrap(), None);
    assert_eq!(s.targets_of(&r1).unwrap(), []);
    assert_eq!(
        (s.target(&r1, &m("a")).unwrap(), s.rollout(&r1).unwrap()),
        (None, None)
    );
    assert_eq!(s.current(&m("ab"), &app()).unwrap(), None);
    assert_eq!(s.event_count(&m("a"), Some(&r1)).unwrap(), 0);
    assert_eq!(s.targets_of_machine(&m("ab")).unwrap(), []);
    // `r-10` (whose id starts with `r-1`) and what names it stay.
    assert_eq!(
        s.targets_of_machine(&m("a")).unwrap(),
        [target("r-10", "a")]
    );
    assert_eq!(s.current(&m("a"), &app()).unwrap(), Some(r10.clone()));
    assert_eq!(s.event_count(&m("a"), Some(&r10)).unwrap(), 3);
    assert_eq!(ids(&s.releases().unwrap(), |r| r.id.to_string()), ["r-10"]);
}

fn admin_counters_are_one_per_client_until_removed(s: &dyn Store) {
    let counter = |client: &str, ctr, at_ms| AdminCounter {
        client: client.into(),
        ctr,
        at_ms,
    };
    assert_eq!(s.admin_counters().unwrap(), []);
    s.put_admin_counter(&counter("op-b.1", 4, 100)).unwrap();
    s.put_admin_counter(&counter("op-a.1", 9, 200)).unwrap();
    s.put_admin_counter(&counter("op-b.1", 5, 300)).unwrap();
    assert_eq!(
        s.admin_counters().unwrap(),
        [counter("op-a.1", 9, 200), counter("op-b.1", 5, 300)]
    );
    s.remove_admin_counter("op-a.1").unwrap();
    s.remove_admin_counter("op-c.1").unwrap();
    assert_eq!(s.admin_counters().unwrap(), [counter("op-b.1", 5, 300)]);
}

fn machines_come_in_id_order_after_a_cursor(s: &dyn Store) {
    s.transaction(|rec| {
        for id in ["vm-3", "vm-1", "vm-2"] {
            rec.put_machine(&MachineInfo::new(m(id), 0))?;
        }
        let mut again = MachineInfo::new(m("vm-1"), 0);
        again.online = true;
        rec.put_machine(&again)
    })
    .unwrap();
    let after = |after: Option<&str>| -> Vec<String> {
        let after = after.map(m);
        s.machines_after(after.as_ref())
            .map(|r| r.unwrap().id.to_string())
            .collect()
    };
    assert_eq!(after(None), ["vm-1", "vm-2", "vm-3"]);
    assert_eq!(after(Some("vm-1")), ["vm-2", "vm-3"]);
    assert_eq!(after(Some("vm-10")), ["vm-2", "vm-3"]);
    assert_eq!(after(Some("vm-3")), Vec::<String>::new());
    // Lazily: a caller can stop after a page.
    assert_eq!(s.machines_after(None).take(1).count(), 1);
    assert_eq!(
        ids(&s.machines().unwrap(), |i| i.id.to_string()),
        after(None)
    );
    assert!(s.machine(&m("vm-1")).unwrap().unwrap().online);
    assert_eq!(s.machine(&m("vm-4")).unwrap(), None);
}

fn secrets_are_kept_until_removed(s: &dyn Store) {
    let secret = Secret::from_bytes([7; 32]);
    s.transaction(|rec| rec.put_secret(&m("vm-1"), &secret))
        .unwrap();
    assert_eq!(s.secret(&m("vm-1")).unwrap(), Some(secret));
    assert!(s.transaction(|rec| rec.remove_secret(&m("vm-1"))).unwrap());
    assert!(!s.transaction(|rec| rec.remove_secret(&m("vm-1"))).unwrap());
    assert_eq!(s.secret(&m("vm-1")).unwrap(), None);
}

fn history_skips_repeats_and_keeps_the_latest(s: &dyn Store) {
    let vm1 = m("vm-1");
    let push = |v: &str| {
        s.transaction(|rec| rec.push_history(&vm1, &app(), v))
            .unwrap()
    };
    assert!(push("1.0"));
    assert!(!push("1.0"));
    assert!(push("2.0"));
    assert!(
        push("1.0"),
        "an earlier version installed again is history too"
    );
    assert_eq!(s.history(&vm1, &app()).unwrap(), ["1.0", "2.0", "1.0"]);
    assert_eq!(
        s.history(&vm1, &Kind::new("os").unwrap()).unwrap(),
        Vec::<String>::new()
    );
    // Kinds with a history, counted per machine (`vm-10` starts with `vm-1`).
    s.transaction(|rec| {
        rec.push_history(&vm1, &Kind::new("os").unwrap(), "7")?;
        rec.push_history(&m("vm-10"), &app(), "1.0")
    })
    .unwrap();
    assert_eq!(s.history_kinds(&vm1).unwrap(), 2);
    assert_eq!(s.history_kinds(&m("vm-10")).unwrap(), 1);
    assert_eq!(s.history_kinds(&m("vm-2")).unwrap(), 0);
    for i in 0..HISTORY_LEN + 5 {
        push(&format!("3.{i}"));
    }
    let h = s.history(&vm1, &app()).unwrap();
    assert_eq!(h.len(), HISTORY_LEN);
    assert_eq!(h.last().unwrap(), &format!("3.{}", HISTORY_LEN + 4));
}

fn operators_and_integrators(s: &dyn Store) {
    let op = |name: &str, role| OperatorRecord {
        info: OperatorInfo {
            name: name.into(),
            role,
            created_at_ms: 1,
            created_by: "platform".into(),
        },
        secret: Secret::from_bytes([1; 32]),
    };
    assert!(!s.bootstrapped().unwrap());
    s.transaction(|rec| {
        rec.put_operator(&op("zed", Role::Viewer))?;
        rec.put_operator(&op("admin", Role::Admin))?;
        rec.put_integrator(&IntegratorRecord {
            name: "dash".into(),
            secret: Secret::from_bytes([2; 32]),
            created_at_ms: 1,
            created_by: "admin".into(),
        })?;
        rec.set_bootstrapped()
    })
    .unwrap();
    assert!(s.bootstrapped().unwrap());
    assert_eq!(s.operator("admin").unwrap().unwrap().role(), Role::Admin);
    assert_eq!(
        ids(&s.operators().unwrap(), |o| o.info.name.clone()),
        ["admin", "zed"]
    );
    assert!(s.transaction(|rec| rec.remove_operator("zed")).unwrap());
    assert!(!s.transaction(|rec| rec.remove_operator("zed")).unwrap());
    assert_eq!(s.operator("zed").unwrap(), None);
    assert_eq!(s.integrator("dash").unwrap().unwrap().created_by, "admin");
    assert_eq!(s.integrator("nobody").unwrap(), None);
    assert_eq!(s.integrators().unwrap().len(), 1);
    assert!(s.transaction(|rec| rec.remove_integrator("dash")).unwrap());
    assert!(!s.transaction(|rec| rec.remove_integrator("dash")).unwrap());
    assert_eq!(s.integrator("dash").unwrap(), None);
    assert!(s.integrators().unwrap().is_empty());
}

fn artifacts_are_found_by_id_and_by_kind_and_version(s: &dyn Store) {
    let info = |version: &str| ArtifactInfo {
        id: ArtifactId::of(version.as_bytes()),
        kind: app(),
        version: version.into(),
        name: "a.bin".into(),
        size: 3,
        chunk_size: 1024,
        notes: None,
        uploaded_at_ms: 0,
        removed_at_ms: None,
    };
    s.put_artifact(&info("1.0")).unwrap();
    s.put_artifact(&info("2.0")).unwrap();
    assert_eq!(s.artifact(&info("1.0").id).unwrap(), Some(info("1.0")));
    assert_eq!(
        s.artifact_for_version(&app(), "2.0").unwrap(),
        Some(info("2.0"))
    );
    assert_eq!(s.artifact_for_version(&app(), "3.0").unwrap(), None);
    assert_eq!(
        s.artifact_for_version(&Kind::new("os").unwrap(), "1.0")
            .unwrap(),
        None
    );
    assert_eq!(s.artifacts().unwrap().len(), 2);
}

/// Two threads read, change and write back one release 100 times each, pausing between the
/// read and the write: without the records lock most updates would be lost.
fn transactions_run_one_at_a_time(s: Arc<dyn Store>) {
    let id = r("r-1");
    s.transaction(|rec| rec.put_release(&crate::fixtures::release("r-1", "1.0")))
        .unwrap();
    let start = Arc::new(Barrier::new(2));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (s, start, id) = (s.clone(), start.clone(), id.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..100 {
                    s.transaction(|rec| {
                        let mut info = rec.release(&id)?.expect("stored above");
                        std::thread::yield_now();
                        info.seq += 1;
                        rec.put_release(&info)
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(s.release(&id).unwrap().unwrap().seq, 200);
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sled_store {
            $(
                #[test]
                fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::SledStore::open(&dir.path().join("db")).unwrap();
                    super::$case(&store);
                }
            )*
            #[test]
            fn transactions_run_one_at_a_time() {
                let dir = tempfile::tempdir().unwrap();
                let store = super::SledStore::open(&dir.path().join("db")).unwrap();
                super::transactions_run_one_at_a_time(std::sync::Arc::new(store));
            }
        }
        mod mem_store {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::MemStore::new());
                }
            )*
            #[test]
            fn transactions_run_one_at_a_time() {
                super::transactions_run_one_at_a_time(std::sync::Arc::new(super::MemStore::new()));
            }
        }
    };
}

conformance!(
    ids_and_seqs_start_at_one_and_only_grow,
    replay_counters_keep_the_highest_and_report_the_previous,
    resetting_a_machines_counters_leaves_every_other_machines,
    event_counts_are_per_machine_and_release,
    scans_by_prefix_take_only_their_own_keys,
    rewriting_a_target_record_replaces_it,
    events_page_by_id,
    events_are_pruned_oldest_first_to_the_newest_kept,
    events_stored_together_page_and_prune_as_if_alone,
    audit_pages_by_id,
    desired_notices_are_keyed_by_target_and_kind,
    rollouts_are_stored_by_release,
    removing_a_release_and_its_targets_leaves_no_key_naming_them,
    machines_come_in_id_order_after_a_cursor,
    admin_counters_are_one_per_client_until_removed,
    secrets_are_kept_until_removed,
    history_skips_repeats_and_keeps_the_latest,
    operators_and_integrators,
    artifacts_are_found_by_id_and_by_kind_and_version,
);
