//! Admin replies that stay bounded however large the fleet: a reply too large for one packet
//! is answered with an error instead of taking the platform's connection down.

use fleetcast_proto::admin::MachineSpec;

use super::*;

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
