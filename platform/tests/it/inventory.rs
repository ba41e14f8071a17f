//! Inventory and history against a real platform: machines reporting state and status over
//! the broker, then `machine_query` filters and pages, `versions` counts and compliance, and
//! `history` reads a machine's records through the platform's index.

use fleetcast_proto::admin::{MachineFilter, TargetRecord, VersionReport};
use fleetcast_proto::calls::Call;
use fleetcast_proto::status::KindState;

use super::*;

impl Machine {
    /// Publishes a MAC'd state in `groups` running app `version` (None: no app installed).
    async fn report_app(&mut self, groups: &[&str], version: Option<&str>) {
        let app_state = KindState {
            version: version.map(Into::into),
            ..Default::default()
        };
        self.publish_state(groups, app_state).await;
    }
}

/// One page of `machine_query`: the ids, the cursor, and whether more follow.
async fn query_page(
    admin: &AdminClient,
    filter: MachineFilter,
    after: Option<&str>,
    limit: Option<u32>,
) -> (Vec<String>, Option<String>, bool) {
    let page = admin
        .call(calls::MachineQuery {
            filter,
            after: after.map(m),
            limit,
        })
        .await
        .unwrap();
    let ids = page.items.iter().map(|x| x.id.to_string()).collect();
    (ids, page.next.map(|n| n.to_string()), page.more)
}

async fn query(admin: &AdminClient, filter: MachineFilter) -> Vec<String> {
    let (ids, _, more) = query_page(admin, filter, None, None).await;
    assert!(!more);
    ids
}

async fn versions(admin: &AdminClient, release: Option<&ReleaseId>) -> VersionReport {
    admin
        .call(calls::Versions {
            kind: app(),
            release: release.cloned(),
        })
        .await
        .unwrap()
}

async fn history(
    admin: &AdminClient,
    machine: &str,
    kind: Option<Kind>,
    before: Option<&ReleaseId>,
    limit: Option<u32>,
) -> (Vec<TargetRecord>, Option<ReleaseId>, bool) {
    let h = admin
        .call(calls::History {
            machine: m(machine),
            kind,
            before: before.cloned(),
            limit,
        })
        .await
        .unwrap();
    assert_eq!(h.machine.as_str(), machine);
    (h.page.items, h.page.next, h.page.more)
}

fn releases(targets: &[TargetRecord]) -> Vec<String> {
    targets.iter().map(|t| t.release.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_counts_and_history_come_from_what_machines_reported() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir: _data_dir,
        platform,
        admin,
    } = env(&url).await;
    upload(&admin, dir.path(), "a2.bin", &data(1500, 2), "2.0")
        .await
        .unwrap();
    upload(&admin, dir.path(), "a3.bin", &data(1500, 3), "3.0")
        .await
        .unwrap();
    // vm-001..003 and vm-005 connect; vm-004 never does; vm-006 is revoked.
    let mut vm1 = provision(&admin, &url, "vm-001", &["g1"]).await;
    let mut vm2 = provision(&admin, &url, "vm-002", &["g1"]).await;
    let mut vm3 = provision(&admin, &url, "vm-003", &["g2"]).await;
    provisioned(&admin, "vm-004", &["g1"]).await;
    let mut vm5 = provision(&admin, &url, "vm-005", &["g2"]).await;
    provisioned(&admin, "vm-006", &[]).await;
    revoke(&admin, "vm-006").await;
    vm2.report_app(&["g1"], Some("1.0")).await;
    vm5.report_app(&["g2"], Some("1.0")).await;
    poll_until(
        WAIT,
        "vm-002 and vm-005 report app 1.0",
        || machines(&admin),
        |ms| {
            ms.iter()
                .filter(|x| x.kinds.get(&app()).and_then(|k| k.version.as_deref()) == Some("1.0"))
                .count()
                == 2
        },
    )
    .await;

    // r1 (app 2.0) reaches g1 (vm-001, vm-002, vm-004) and vm-003.
    let r1 = release(&admin, "2.0", &["vm-003"], &["g1"])
        .await
        .release
        .id;
    vm1.report(Some(&r1), "2.0", Phase::Notified).await;
    vm1.report(Some(&r1), "2.0", Phase::Downloaded).await;
    vm1.report_recorded(&admin, &r1, "2.0", Phase::Installed)
        .await;
    vm2.report_recorded(&admin, &r1, "2.0", Phase::Downloading)
        .await;
    let mut failed = vm3.status(Some(&r1), "2.0", Phase::DownloadFailed);
    failed.error = Some("disk full".into());
    vm3.send_status(&failed).await;
    wait_status(&admin, &r1, |s| {
        phase_of(s, "vm-003") == Phase::DownloadFailed
    })
    .await;

    // Filters, alone and combined.
    let all = query(&admin, MachineFilter::default()).await;
    assert_eq!(
        all,
        ["vm-001", "vm-002", "vm-003", "vm-004", "vm-005", "vm-006"]
    );
    let f = |change: fn(&mut MachineFilter)| {
        let mut f = MachineFilter::default();
        change(&mut f);
        f
    };
    assert_eq!(
        query(&admin, f(|f| f.group = Some(g("g1")))).await,
        ["vm-001", "vm-002", "vm-004"]
    );
    assert_eq!(
        query(&admin, f(|f| f.online = Some(false))).await,
        ["vm-004", "vm-006"]
    );
    assert_eq!(
        query(&admin, f(|f| f.version = Some("1.0".into()))).await,
        ["vm-002", "vm-005"]
    );
    // A kind: machines reporting it (vm-002, vm-005), or that a release of it reached.
    assert_eq!(
        query(&admin, f(|f| f.kind = Some(app()))).await,
        ["vm-001", "vm-002", "vm-003", "vm-004", "vm-005"]
    );
    let phase = |p: Phase| MachineFilter {
        kind: Some(app()),
        phase: Some(p),
        ..MachineFilter::default()
    };
    assert_eq!(query(&admin, phase(Phase::Installed)).await, ["vm-001"]);
    assert_eq!(query(&admin, phase(Phase::Downloading)).await, ["vm-002"]);
    assert_eq!(
        query(&admin, phase(Phase::DownloadFailed)).await,
        ["vm-003"]
    );
    assert_eq!(query(&admin, phase(Phase::Pending)).await, ["vm-004"]);
    let combined = MachineFilter {
        group: Some(g("g1")),
        online: Some(true),
        version: Some("1.0".into()),
        ..phase(Phase::Downloading)
    };
    assert_eq!(query(&admin, combined.clone()).await, ["vm-002"]);
    let none = MachineFilter {
        group: Some(g("g2")),
        ..combined
    };
    assert!(query(&admin, none).await.is_empty());
    let err = admin
        .call(calls::MachineQuery {
            filter: MachineFilter {
                phase: Some(Phase::Pending),
                ..MachineFilter::default()
            },
            after: None,
            limit: None,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs a kind"), "{err}");

    // Pages: each continues after the last id of the one before, and the last says so.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let (ids, next, more) =
            query_page(&admin, MachineFilter::default(), after.as_deref(), Some(4)).await;
        pages += 1;
        assert!(ids.len() <= 4);
        paged.extend(ids);
        if !more {
            break;
        }
        after = next;
    }
    assert_eq!((paged, pages), (all.clone(), 2));

    // Versions and compliance with r1, the newest published app release.
    let report = versions(&admin, None).await;
    let counts: Vec<(&str, u32)> = report
        .versions
        .iter()
        .map(|v| (v.version.as_str(), v.machines))
        .collect();
    assert_eq!(counts, [("1.0", 2), ("2.0", 1)]);
    assert_eq!((report.machines, report.without, report.revoked), (5, 2, 1));
    let c = report.compliance.clone().unwrap();
    assert_eq!((c.release.clone(), c.version.as_str()), (r1.clone(), "2.0"));
    assert_eq!(
        (
            c.on_target,
            c.in_progress,
            c.offline,
            c.failed,
            c.replaced,
            c.not_targeted
        ),
        (1, 1, 1, 1, 0, 1)
    );

    // r2 (app 3.0) reaches vm-001 and is installed there.
    let r2 = release(&admin, "3.0", &["vm-001"], &[]).await.release.id;
    vm1.report_recorded(&admin, &r2, "3.0", Phase::Installed)
        .await;
    let c = versions(&admin, None).await.compliance.unwrap();
    assert_eq!(c.release, r2);
    assert_eq!((c.on_target, c.not_targeted), (1, 4));
    // Against r1, vm-001 has moved on.
    let c = versions(&admin, Some(&r1)).await.compliance.unwrap();
    assert_eq!((c.on_target, c.replaced, c.in_progress), (0, 1, 1));

    // History: newest release first, with r1's times; paged; by kind.
    let (targets, _, more) = history(&admin, "vm-001", None, None, None).await;
    assert!(!more);
    assert_eq!(releases(&targets), [r2.to_string(), r1.to_string()]);
    let first = &targets[1];
    assert_eq!(
        (first.phase, first.version.as_str()),
        (Phase::Installed, "2.0")
    );
    assert!(first.notified_at_ms.is_some());
    assert!(first.download.as_ref().is_some_and(|d| d.ok));
    assert!(first.upgrade.as_ref().is_some_and(|u| u.ok));
    let (page1, next, more) = history(&admin, "vm-001", None, None, Some(1)).await;
    assert_eq!((releases(&page1), more), (vec![r2.to_string()], true));
    let (page2, _, more) = history(&admin, "vm-001", None, next.as_ref(), Some(1)).await;
    assert_eq!((releases(&page2), more), (vec![r1.to_string()], false));
    let (failed, _, _) = history(&admin, "vm-003", Some(app()), None, None).await;
    assert_eq!(failed[0].error.as_deref(), Some("disk full"));
    let (other_kind, _, _) = history(
        &admin,
        "vm-001",
        Some(Kind::new("firmware").unwrap()),
        None,
        None,
    )
    .await;
    assert!(other_kind.is_empty());
    let (nothing, _, _) = history(&admin, "vm-005", None, None, None).await;
    assert!(nothing.is_empty());
    let err = admin
        .call(calls::History {
            machine: m("vm-404"),
            kind: None,
            before: None,
            limit: None,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown machine vm-404"), "{err}");

    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_may_ask_for_inventory_and_history() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir: _dir,
        data_dir: _data_dir,
        platform,
        admin,
    } = env(&url).await;
    provisioned(&admin, "vm-001", &["g1"]).await;
    let operator = add_operator(&admin, "val", fleetcast_proto::acl::Role::Viewer).await;
    let viewer = AdminClient::connect_as(&url, Topics::default(), "val", operator.secret, WAIT)
        .await
        .unwrap();
    /// `call` is answered for the viewer.
    async fn answered<C: Call>(viewer: &AdminClient, call: C) {
        if let Err(e) = viewer.call(call).await {
            panic!("{}: {e}", C::OP);
        }
    }
    let machine_query = calls::MachineQuery {
        filter: MachineFilter::default(),
        after: None,
        limit: None,
    };
    answered(&viewer, machine_query).await;
    let versions = calls::Versions {
        kind: app(),
        release: None,
    };
    answered(&viewer, versions).await;
    let history = calls::History {
        machine: m("vm-001"),
        kind: None,
        before: None,
        limit: None,
    };
    answered(&viewer, history).await;
    viewer.close().await;
    admin.close().await;
    platform.stop().await;
}

/// The plan shown before publishing counts the targets that report a newer version of the
/// kind (they would reject the release as a downgrade), by the protocol's version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_counts_the_targets_that_run_a_newer_version() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir: _data_dir,
        platform,
        admin,
    } = env(&url).await;
    upload(&admin, dir.path(), "a.bin", &data(1500, 2), "2.9.1")
        .await
        .unwrap();
    let mut vm1 = provision(&admin, &url, "vm-001", &["g1"]).await;
    let mut vm2 = provision(&admin, &url, "vm-002", &["g1"]).await;
    let mut vm3 = provision(&admin, &url, "vm-003", &["g1"]).await;
    provisioned(&admin, "vm-004", &["g1"]).await;
    // 2.10.0 is above 2.9.1 (numeric parts); 2.9.1 is the same; 1.0 below; vm-004 reported
    // nothing.
    vm1.report_app(&["g1"], Some("2.10.0")).await;
    vm2.report_app(&["g1"], Some("2.9.1")).await;
    vm3.report_app(&["g1"], Some("1.0")).await;
    poll_until(
        WAIT,
        "three machines report their app",
        || machines(&admin),
        |ms| ms.iter().filter(|x| x.kinds.contains_key(&app())).count() == 3,
    )
    .await;
    let release = create_release(&admin, &app(), "2.9.1", InstallPolicy::Immediate).await;
    let plan = |limit| calls::ReleasePlan {
        release: release.id.clone(),
        machines: vec![],
        groups: vec![g("g1")],
        allow_empty: false,
        after: None,
        limit,
    };
    for limit in [None, Some(2)] {
        let report = admin.call(plan(limit)).await.unwrap();
        assert_eq!(report.target_count(), 4);
        assert_eq!(report.newer_installed, Some(1), "limit {limit:?}");
    }
    // Counted in the first page only: the pages after it do not read every target again.
    let first = admin.call(plan(Some(2))).await.unwrap();
    let second = admin
        .call(calls::ReleasePlan {
            after: first.next.clone(),
            ..plan(Some(2))
        })
        .await
        .unwrap();
    assert_eq!(second.plan.targets.len(), 2);
    assert_eq!(second.newer_installed, None);
    let text = fleetcast_platform::cli::release::plan_text(
        &admin.call(plan(None)).await.unwrap(),
        &[g("g1")],
        false,
    );
    assert!(
        text.contains("warning: 1 of them report a newer app than 2.9.1"),
        "{text}"
    );
    admin.close().await;
    platform.stop().await;
}
