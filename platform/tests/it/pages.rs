//! Admin replies that stay bounded however large the fleet: `release_status` comes in pages
//! with its aggregates over every target, and a reply too large for one packet is answered
//! with an error instead of taking the platform's connection down.

use fleetcast_platform::cli::release::status_all;
use fleetcast_proto::admin::MachineSpec;

use super::*;

/// One page of `release_status`.
async fn status_page(
    admin: &AdminClient,
    release: &ReleaseId,
    after: Option<&str>,
    limit: Option<u32>,
) -> ReleaseStatus {
    admin
        .call(calls::ReleaseStatus {
            release: release.clone(),
            after: after.map(m),
            limit,
        })
        .await
        .unwrap()
}

fn ids(s: &ReleaseStatus) -> Vec<&str> {
    s.targets.iter().map(|t| t.machine.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_status_comes_in_pages_each_with_the_aggregates_of_every_target() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir: _data_dir,
        platform,
        admin,
    } = env(&url).await;
    upload(&admin, dir.path(), "a.bin", &data(3000, 4), "2.0")
        .await
        .unwrap();
    // Provisioned in reverse: pages follow machine ids, not the order of anything else.
    provisioned(&admin, "vm-003", &[]).await;
    let mut vm2 = provision(&admin, &url, "vm-002", &[]).await;
    let mut vm1 = provision(&admin, &url, "vm-001", &[]).await;
    let r = release(&admin, "2.0", &["vm-003", "vm-002", "vm-001"], &[])
        .await
        .release
        .id;
    vm1.report_recorded(&admin, &r, "2.0", Phase::Installed)
        .await;
    let mut downloading = vm2.status(Some(&r), "2.0", Phase::Downloading);
    downloading.progress = Some(Progress {
        bytes: 1024,
        total: 3000,
    });
    vm2.send_status(&downloading).await;
    wait_status(&admin, &r, |s| phase_of(s, "vm-002") == Phase::Downloading).await;

    // vm-001 has the whole artifact, vm-002 1 KiB of it, vm-003 (pending) nothing: on every page.
    let every_target = |s: &ReleaseStatus| {
        assert_eq!(s.progress.total, 3, "{s:#?}");
        assert_eq!(s.progress.finished, 1, "{s:#?}");
        assert_eq!(
            s.progress.phases,
            BTreeMap::from([
                (Phase::Pending, 1),
                (Phase::Downloading, 1),
                (Phase::Installed, 1)
            ])
        );
        assert_eq!((s.bytes_done, s.bytes_total), (3000 + 1024, 3 * 3000));
    };
    let first = status_page(&admin, &r, None, Some(2)).await;
    assert_eq!(ids(&first), ["vm-001", "vm-002"]);
    assert_eq!(
        (first.next.as_ref(), first.more),
        (Some(&m("vm-002")), true)
    );
    every_target(&first);
    let second = status_page(&admin, &r, Some("vm-002"), Some(2)).await;
    assert_eq!(ids(&second), ["vm-003"]);
    assert_eq!(
        (second.next.as_ref(), second.more),
        (Some(&m("vm-003")), false)
    );
    every_target(&second);
    // `limit: 0` (what `release watch` asks): the aggregates alone.
    let counts = status_page(&admin, &r, None, Some(0)).await;
    assert!(counts.targets.is_empty());
    assert!(counts.more);
    every_target(&counts);
    // No page asked for (a request from before paging): everything, in one page.
    let whole = status_page(&admin, &r, None, None).await;
    assert_eq!(ids(&whole), ["vm-001", "vm-002", "vm-003"]);
    assert_eq!(
        (whole.next.as_ref(), whole.more),
        (Some(&m("vm-003")), false)
    );
    // The CLI joins pages into one status, as if it had come whole.
    let joined = status_all(&admin, r.clone(), Some(2)).await.unwrap();
    assert_eq!(joined.targets, whole.targets);
    assert_eq!((joined.next.as_ref(), joined.more), (None, false));
    every_target(&joined);
    // An unknown release is refused, paged or not.
    let unknown = admin
        .call(calls::ReleaseStatus {
            release: ReleaseId::new("r-999999").unwrap(),
            after: None,
            limit: Some(0),
        })
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("unknown release"), "{unknown}");

    admin.close().await;
    platform.stop().await;
}

/// Machines in this test: with ten 64-character groups each, a machine record is about 770
/// bytes of JSON, so the unpaged `machines` reply of 2,400 is 2.5 MB once sealed.
const MACHINES: usize = 2400;
/// Per `machine_provision_batch`: about 150 KB of request, within the 256 KiB a request may be.
const BATCH: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_the_packet_limit_is_an_error_and_the_platform_stays_connected() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir: _data_dir,
        platform,
        admin,
    } = env(&url).await;
    let groups: Vec<GroupId> = (0..10)
        .map(|i| g(&format!("group-{i}-{}", "x".repeat(56))))
        .collect();
    let specs: Vec<MachineSpec> = (0..MACHINES)
        .map(|i| MachineSpec {
            machine: m(&format!("vm-{i:05}")),
            groups: groups.clone(),
        })
        .collect();
    for batch in specs.chunks(BATCH) {
        admin
            .call(calls::MachineProvisionBatch {
                machines: batch.to_vec(),
                rotate: false,
            })
            .await
            .unwrap();
    }
    // A published release, so that a reconnect of the platform would show: it re-publishes
    // every release's progress, retained, each time it connects.
    upload(&admin, dir.path(), "a.bin", &data(100, 1), "1.0")
        .await
        .unwrap();
    let r = release(&admin, "1.0", &["vm-00000"], &[]).await.release.id;
    let mut observer = peer(&url, "observer").await;
    observer.subscribe("fleet/rollouts/+/progress").await;
    let retained = observer
        .next(|p| p.topic == format!("fleet/rollouts/{r}/progress"))
        .await;
    assert!(retained.retain, "{retained:?}");

    let started = std::time::Instant::now();
    let refused = admin
        .request_with_timeout(AdminOp::Machines, Duration::from_secs(5))
        .await
        .unwrap_err();
    let AdminError::Refused(text) = &refused else {
        panic!("expected the platform's error, got {refused}")
    };
    assert!(
        text.starts_with("reply of ")
            && text.contains("bytes to machines is over the 2 MiB packet limit; ask for pages"),
        "{text}"
    );
    let bytes: usize = text["reply of ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes > 2 * 1024 * 1024, "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The next request is answered, and the paged listing of the same machines works.
    let mut listed = 0;
    let mut after = None;
    loop {
        let page = admin
            .call(calls::MachineQuery {
                filter: Default::default(),
                after: after.take(),
                limit: None,
            })
            .await
            .unwrap();
        listed += page.items.len();
        match page.next {
            Some(next) if page.more => after = Some(next),
            _ => break,
        }
    }
    assert_eq!(listed, MACHINES);
    // The platform's connection stayed up: it did not connect again (and re-publish).
    let again = observer
        .next_within(Duration::from_secs(1), |p| {
            p.topic.starts_with("fleet/rollouts/")
        })
        .await;
    assert!(again.is_none(), "the platform reconnected: {again:?}");

    admin.close().await;
    platform.stop().await;
}
