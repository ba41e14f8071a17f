//! `release_remove` and `fleetcast release remove` against a real platform: each thing that
//! keeps a release refuses its removal with nothing changed; a removal leaves no record, index
//! or rollout of the release in the store, while its events and the audit entry stay; reads
//! name it an unknown release; a machine's late report on it is acknowledged and changes
//! nothing; `--keep-latest` removes the old releases nothing needs; a viewer removes nothing;
//! a publish sent behind a removal runs after it.

use fleetcast_platform::ops::removal::TARGETS_PER_TRANSACTION;
use fleetcast_platform::store::{Reads, SledStore, Store};
use fleetcast_proto::acl::Role;
use fleetcast_proto::admin::ReleaseRemoval;
use fleetcast_proto::rollout::WavePlan;

use super::bounded::provision_all;
use super::cli::Fleetcast;
use super::*;

/// Why `release` is kept, by `release_remove` with `check` (None: it may go).
async fn kept(admin: &AdminClient, release: &ReleaseId) -> Option<String> {
    let answer = admin
        .call(calls::ReleaseRemove {
            releases: vec![release.clone()],
            check: true,
        })
        .await
        .unwrap();
    assert!(!answer.removed);
    answer.releases[0].kept.clone()
}

async fn remove(
    admin: &AdminClient,
    releases: &[&ReleaseId],
) -> Result<Vec<ReleaseRemoval>, AdminError> {
    admin
        .call(calls::ReleaseRemove {
            releases: releases.iter().map(|r| (*r).clone()).collect(),
            check: false,
        })
        .await
        .map(|r| r.releases)
}

/// Uploads app `versions`, each `size` bytes of its own.
async fn upload_versions(admin: &AdminClient, dir: &Path, versions: &[&str], size: usize) {
    for (i, version) in versions.iter().enumerate() {
        let bytes = data(size, i as u8);
        upload(admin, dir, &format!("{version}.bin"), &bytes, version)
            .await
            .unwrap();
    }
}

/// Creates app `version` (uploaded already) and publishes it to group g1.
async fn to_group(admin: &AdminClient, version: &str) -> ReleaseId {
    let r = create_release(admin, &app(), version, InstallPolicy::Immediate).await;
    publish(admin, &r.id, &[], &["g1"]).await;
    r.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_removed_only_once_nothing_needs_it_and_leaves_nothing_behind() {
    let url = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let mut vm1 = provision(&admin, &url, "vm-1", &["g1"]).await;
    let mut vm2 = provision(&admin, &url, "vm-2", &["g1"]).await;
    let mut vm3 = provision(&admin, &url, "vm-3", &[]).await;
    vm2.peer.subscribe("fleet/machines/vm-2/status/ack").await;
    upload_versions(
        &admin,
        dir.path(),
        &["1.0", "2.0", "3.0", "4.0", "5.0"],
        3000,
    )
    .await;

    // r1 to the group: wanted there, the current release of both, and what a group rollback
    // rolls back from.
    let r1 = to_group(&admin, "1.0").await;
    let why = kept(&admin, &r1).await.expect("kept");
    assert!(why.contains("wants on group g1"), "{why}");
    assert!(
        why.contains("current app release of 2 machines (vm-1, vm-2)"),
        "{why}"
    );
    assert!(
        why.contains("rollback --group g1 --kind app` rolls back from it"),
        "{why}"
    );
    vm1.report_recorded(&admin, &r1, "1.0", Phase::Installed)
        .await;
    let installed_r1 = all_events(&admin).await;

    // r2 replaces it on the group: a group rollback now goes back to it, so it stays.
    let r2 = to_group(&admin, "2.0").await;
    let why = kept(&admin, &r2).await.expect("kept");
    assert!(why.contains("wants on group g1"), "{why}");
    let why = kept(&admin, &r1).await.expect("kept");
    assert_eq!(
        why,
        "`fleetcast rollback --group g1 --kind app` rolls back to it: publish newer app releases to the group first"
    );
    let refused = remove(&admin, &[&r1]).await.unwrap_err().to_string();
    assert!(
        refused.contains("nothing was removed: release r-000001 (app 1.0) is still needed"),
        "{refused}"
    );
    assert_eq!(
        status(&admin, &r1).await.targets.len(),
        2,
        "nothing changed"
    );

    // A release a machine is still working on, with its staged rollout running.
    let r4 = create_release(&admin, &app(), "4.0", InstallPolicy::Immediate)
        .await
        .id;
    let waves = WavePlan::new(vec![10000], 10000, 0, 0).unwrap();
    publish_with(&admin, &r4, &["vm-3"], &[], Some(waves)).await;
    vm3.report_recorded(&admin, &r4, "4.0", Phase::Downloading)
        .await;
    let why = kept(&admin, &r4).await.expect("kept");
    for reason in [
        "wants on machine vm-3",
        "staged rollout is running",
        "1 machine (vm-3) is still working on it (first: downloading)",
        "current app release of 1 machine (vm-3)",
    ] {
        assert!(why.contains(reason), "{reason}: {why}");
    }
    // All or nothing: a removable release named beside it stays too.
    let r3 = to_group(&admin, "3.0").await;
    assert_eq!(kept(&admin, &r1).await, None, "r3 took over the group");
    assert!(remove(&admin, &[&r1, &r4]).await.is_err());
    assert_eq!(
        status(&admin, &r1).await.targets.len(),
        2,
        "nothing changed"
    );

    // A viewer cannot remove it.
    let operator = add_operator(&admin, "val", Role::Viewer).await;
    let viewer = AdminClient::connect_as(&url, Topics::default(), "val", operator.secret, WAIT)
        .await
        .unwrap();
    let err = remove(&viewer, &[&r1]).await.unwrap_err().to_string();
    assert!(
        err.contains("has role viewer; release_remove needs operator"),
        "{err}"
    );
    viewer.close().await;
    assert_eq!(
        status(&admin, &r1).await.targets.len(),
        2,
        "nothing changed"
    );

    // Removed: its records go, its events stay, the removal is audited.
    let removed = remove(&admin, &[&r1]).await.unwrap();
    assert_eq!(
        (removed.len(), removed[0].targets, removed[0].kept.as_ref()),
        (1, 2, None)
    );
    let gone = admin
        .call(calls::ReleaseStatus {
            release: r1.clone(),
            after: None,
            limit: None,
        })
        .await
        .unwrap_err();
    assert!(
        gone.to_string().contains("unknown release r-000001"),
        "{gone}"
    );
    let listed = admin.call(calls::ReleaseList {}).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        [r2.clone(), r4.clone(), r3.clone()],
        "in the order they were made"
    );
    let history = admin
        .call(calls::History {
            machine: m("vm-1"),
            kind: None,
            before: None,
            limit: None,
        })
        .await
        .unwrap();
    assert!(
        history.page.items.iter().all(|t| t.release != r1),
        "{history:?}"
    );
    admin.call(calls::Stats {}).await.unwrap();
    let events = all_events(&admin).await;
    assert_eq!(
        events[..installed_r1.len()],
        installed_r1[..],
        "events stay"
    );
    assert!(events.iter().any(|e| e.release.as_ref() == Some(&r1)));
    let actions: Vec<(String, bool)> = audit(&admin)
        .await
        .into_iter()
        .filter(|e| e.action == "release_remove")
        .map(|e| (e.operator, e.result == "ok"))
        .collect();
    assert_eq!(
        actions,
        [
            ("admin".to_owned(), false),
            ("admin".to_owned(), false),
            ("val".to_owned(), false),
            ("admin".to_owned(), true)
        ],
        "each removal and refusal, checks not"
    );

    // A late report on it is acknowledged, stored nowhere, and recreates nothing.
    let late = vm2.report(Some(&r1), "1.0", Phase::Installed).await;
    vm2.acked_up_to(late.ctr).await;
    assert_eq!(all_events(&admin).await.len(), events.len());

    platform.stop().await;
    let store = SledStore::open(&data_dir.join("db")).unwrap();
    assert_eq!(store.release(&r1).unwrap(), None);
    assert_eq!(store.targets_of(&r1).unwrap(), []);
    for machine in ["vm-1", "vm-2"] {
        let of = store.targets_of_machine(&m(machine)).unwrap();
        assert!(of.iter().all(|t| t.release != r1), "{of:?}");
        assert_eq!(store.event_count(&m(machine), Some(&r1)).unwrap(), 0);
    }
    assert!(store.all_desired().unwrap().iter().all(|n| n.release != r1));
    assert_eq!(store.rollout(&r1).unwrap(), None);
    assert_eq!(store.targets_of(&r2).unwrap().len(), 2, "the others stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_latest_removes_the_old_releases_nothing_needs_after_a_confirmed_plan() {
    let url = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    provisioned(&admin, "vm-1", &["g1"]).await;
    provisioned(&admin, "vm-2", &["g1"]).await;
    let versions = ["1.0", "2.0", "3.0", "4.0"];
    upload_versions(&admin, dir.path(), &versions, 2000).await;
    let mut ids = Vec::new();
    for version in versions {
        ids.push(to_group(&admin, version).await);
    }
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());

    // Named, a release still needed refuses the lot.
    let named = fc
        .run(&["release", "remove", "r-000001", "r-000003", "--yes"])
        .await;
    assert_eq!(named.code, 1, "{named:#?}");
    assert!(
        named
            .stdout
            .contains("r-000003 (app 3.0): `fleetcast rollback --group g1")
            && named.stderr.contains("nothing was removed"),
        "{named:#?}"
    );
    // Unconfirmed (no terminal, no --yes): the plan, and nothing removed.
    let unconfirmed = fc.run(&["release", "remove", "--keep-latest", "1"]).await;
    assert_eq!(unconfirmed.code, 1, "{unconfirmed:#?}");
    assert!(
        unconfirmed
            .stdout
            .starts_with("to remove: 2 release(s), 4 per-machine record(s)\n")
            && unconfirmed
                .stdout
                .contains("kept: 1 release(s) still needed\n  r-000003 (app 3.0)")
            && unconfirmed.stderr.contains("--yes"),
        "{unconfirmed:#?}"
    );
    assert_eq!(admin.call(calls::ReleaseList {}).await.unwrap().len(), 4);

    let out = fc
        .run(&["release", "remove", "--keep-latest", "1", "--yes"])
        .await
        .ok();
    assert!(
        out.ends_with("removed 2 release(s) and 4 per-machine record(s); their events stay\n"),
        "{out}"
    );
    let listed = fc.run(&["release", "list", "--json"]).await.json();
    let left: Vec<&str> = (listed.as_array().unwrap().iter())
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["r-000003", "r-000004"]);
    for cmd in [
        &["release", "status", "r-000001"][..],
        &["release", "watch", "r-000002"],
    ] {
        let gone = fc.run(cmd).await;
        assert_eq!(gone.code, 1, "{gone:#?}");
        assert!(gone.stderr.contains("unknown release"), "{gone:#?}");
    }
    fc.run(&["stats"]).await.ok();
    // Once more: nothing left to remove, said so.
    let again = fc
        .run(&["release", "remove", "--keep-latest", "1", "--yes"])
        .await
        .ok();
    assert!(again.starts_with("nothing to remove\n"), "{again}");

    platform.stop().await;
    let store = SledStore::open(&data_dir.join("db")).unwrap();
    for r in &ids[..2] {
        assert_eq!(store.release(r).unwrap(), None);
        assert_eq!(store.targets_of(r).unwrap(), []);
    }
    store.flush().unwrap();
}

/// Admin ops run one at a time (`admin::run` takes the next request once the last is done, a
/// removal's batched deletes included), and `release_remove` relies on it: no publish can
/// bring a release back between the assessment that let it go and its last delete. A publish
/// of it sent right behind its removal (on the same connection, so in that order) waits for
/// the removal and finds the release gone. Run beside the removal, the publish read the release
/// before the last delete and wrote a notice and target records, which the last delete took
/// away or which brought the release back: a notice in force for a removed release.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_sent_behind_a_removal_waits_for_it_and_finds_the_release_gone() {
    let url = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    // Enough machines for the removal to delete in three transactions.
    let n = 2 * TARGETS_PER_TRANSACTION + 1;
    let ids: Vec<MachineId> = (0..n).map(|i| m(&format!("vm-{i:05}"))).collect();
    provision_all(&admin, &ids, &[g("g1")]).await;
    upload_versions(&admin, dir.path(), &["1.0", "2.0", "3.0"], 2000).await;
    let r1 = to_group(&admin, "1.0").await;
    to_group(&admin, "2.0").await;
    to_group(&admin, "3.0").await;
    assert_eq!(kept(&admin, &r1).await, None, "r3 took over the group");

    let again = calls::ReleasePublish {
        release: r1.clone(),
        machines: vec![],
        groups: vec![g("g1")],
        allow_empty: false,
        waves: None,
    };
    let named = [&r1];
    let (removed, published) = tokio::join!(remove(&admin, &named), admin.call(again));
    assert_eq!(removed.unwrap()[0].targets as usize, n);
    let refused = published
        .expect_err("published a removed release")
        .to_string();
    assert!(refused.contains("unknown release r-000001"), "{refused}");

    platform.stop().await;
    let store = SledStore::open(&data_dir.join("db")).unwrap();
    assert_eq!(store.release(&r1).unwrap(), None);
    assert_eq!(store.targets_of(&r1).unwrap(), []);
    assert!(store.all_desired().unwrap().iter().all(|n| n.release != r1));
}
