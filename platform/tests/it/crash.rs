//! kill -9 recovery: the real `fleetcast serve` binary is killed with SIGKILL while a machine
//! streams status events; after a restart on the same data dir every event is in sled exactly
//! once. The machine here does what protocol.md §6.1 asks of an agent: one event at a time, kept
//! until the platform's `StatusAck` (MAC'd with its secret) covers it and sent again after a timeout. The platform
//! signs that ack only after the flush, so whatever the kill caught between the broker's PUBACK
//! and the flush comes again, and replays of events stored before the kill are dropped by the
//! counter check.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fleetcast_platform::store::{Reads, SledStore};

use super::*;

const EVENTS: u64 = 200;
/// The machine's resend timeout (the reference agent waits 10 s; shorter keeps the test short).
const RESEND: Duration = Duration::from_millis(500);

fn spawn_platform(data: &Path, broker: &BrokerUrl) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["serve", "--data"])
        .arg(data)
        .args(["--broker", &broker.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fleetcast serve starts")
}

/// The download progress the platform recorded for the release's one target.
fn progress_bytes(s: &ReleaseStatus) -> u64 {
    s.targets[0].progress.map(|p| p.bytes).unwrap_or(0)
}

async fn kill9_loses_nothing(broker: BrokerUrl) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let mut platform = spawn_platform(&data, &broker);
    let adm = admin(&broker, &data).await;
    let vm = provision(&adm, &broker, "vm-crash", &[]).await;
    let file = dir.path().join("a.bin");
    std::fs::write(&file, vec![7u8; 5000]).unwrap();
    upload_file(&adm, &file, &app(), "1.0", 65536)
        .await
        .unwrap();
    let release = release(&adm, "1.0", &["vm-crash"], &[]).await.release.id;

    // The machine: QoS 1 status events with growing progress, one at a time, each until a
    // StatusAck covers it.
    let Machine {
        id: vm,
        secret,
        mut peer,
        ..
    } = vm;
    let ack_topic = Topics::default().status_ack(&vm);
    peer.subscribe(&ack_topic).await;
    let Peer {
        client: mc,
        mut rx,
        _stop: machine_connection,
        ..
    } = peer;
    let acked = Arc::new(AtomicU64::new(0));
    {
        let (acked, secret) = (acked.clone(), secret.clone());
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                let MqttEvent::Publish(p) = e else { continue };
                if p.topic == ack_topic {
                    let ack: fleetcast_proto::StatusAck = secret
                        .open(Purpose::StatusAck, &p.payload)
                        .expect("the status ack verifies");
                    acked.fetch_max(ack.ctr, Ordering::SeqCst);
                }
            }
        });
    }
    let topic = Topics::default().status(&vm);
    let publisher = {
        let (release, acked) = (release.clone(), acked.clone());
        tokio::spawn(async move {
            for i in 1..=EVENTS {
                let ev = StatusEvent {
                    machine: vm.clone(),
                    ctr: i,
                    at_ms: fleetcast_platform::now_ms(),
                    release: Some(release.clone()),
                    kind: app(),
                    version: "1.0".into(),
                    phase: Phase::Downloading,
                    progress: Some(Progress {
                        bytes: i,
                        total: EVENTS,
                    }),
                    attempt: 1,
                    error: None,
                    detail: None,
                };
                let payload = secret.seal(Purpose::Status, &ev);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
                while acked.load(Ordering::SeqCst) < i {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "event {i} never acknowledged"
                    );
                    mc.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .unwrap();
                    let sent = tokio::time::Instant::now();
                    while acked.load(Ordering::SeqCst) < i && sent.elapsed() < RESEND {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            mc
        })
    };

    // Kill -9 once the platform has processed some of the stream.
    let s = wait_status_within(&adm, &release, Duration::from_secs(30), |s| {
        progress_bytes(s) >= EVENTS / 5
    })
    .await;
    assert!(
        progress_bytes(&s) < EVENTS,
        "the stream finished before the kill; slow the publisher down"
    );
    platform.kill().expect("SIGKILL");
    platform.wait().unwrap();
    adm.close().await;

    // Restart on the same data dir; the machine goes on where its acks left it.
    let mut platform = spawn_platform(&data, &broker);
    let adm = admin(&broker, &data).await;
    // Events sent while the platform was dead arrive.
    wait_status_within(&adm, &release, Duration::from_secs(60), |s| {
        progress_bytes(s) >= EVENTS
    })
    .await;
    let _mc = publisher.await.unwrap();
    // What an integrator catching up by event id gets: every event, including those persisted
    // just before the kill and never published live.
    let mut fetched: Vec<u64> = all_events(&adm)
        .await
        .into_iter()
        .filter(|e| e.machine.as_str() == "vm-crash")
        .map(|e| e.progress.expect("progress kept").bytes)
        .collect();
    fetched.sort_unstable();
    assert_eq!(
        fetched,
        (1..=EVENTS).collect::<Vec<_>>(),
        "catching up by event id after kill -9"
    );
    adm.close().await;
    // Stop it gracefully (SIGINT) so the database can be opened here.
    interrupt(&mut platform).await;
    drop(machine_connection);

    let store = SledStore::open(&data.join("db")).unwrap();
    let mut seen: Vec<u64> = store
        .events()
        .unwrap()
        .into_iter()
        .filter(|e| e.machine.as_str() == "vm-crash")
        .map(|e| e.progress.expect("progress kept").bytes)
        .collect();
    let total = seen.len();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), total, "an event was stored twice");
    assert_eq!(
        seen,
        (1..=EVENTS).collect::<Vec<_>>(),
        "events lost over kill -9"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_platform_loses_no_status_on_the_embedded_broker() {
    let broker = start_on_free_port(|s| s).unwrap();
    kill9_loses_nothing(broker.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_platform_loses_no_status_on_mosquitto() {
    let mosq = fleetcast_broker::testing::Mosquitto::start("")
        .expect("mosquitto (apt-get install mosquitto)");
    kill9_loses_nothing(mosq.url.clone()).await;
}

/// Copies directory `from` into `to` (files and subdirectories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A database restored from a copy made before later publishes: machines have accepted
/// notices with higher seqs since then, and ignore a notice whose seq is not higher
/// (protocol.md §4). The restarted platform hands out seqs above the clock in ms, so its next
/// publish is above every seq it gave out before the restore (it was the copy's counter + 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_restored_from_an_older_copy_publishes_above_every_seq_it_gave_out() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    for (i, version) in ["1.0", "2.0", "3.0"].into_iter().enumerate() {
        upload(&admin, dir.path(), "a.bin", &data(3000, i as u8), version)
            .await
            .unwrap();
    }
    let _vm = provision(&admin, &url, "vm-001", &[]).await;
    let first = release(&admin, "1.0", &["vm-001"], &[]).await.release.seq;
    admin.close().await;
    platform.stop().await;
    let backup = dir.path().join("db-backup");
    copy_dir(&data_dir.join("db"), &backup);

    let platform = start_platform(&url, &data_dir);
    let admin = super::admin(&url, &data_dir).await;
    let later = release(&admin, "2.0", &["vm-001"], &[]).await.release.seq;
    assert!(later > first, "{later} > {first}");
    admin.close().await;
    platform.stop().await;

    std::fs::remove_dir_all(data_dir.join("db")).unwrap();
    copy_dir(&backup, &data_dir.join("db"));
    let platform = start_platform(&url, &data_dir);
    let admin = super::admin(&url, &data_dir).await;
    let after = release(&admin, "3.0", &["vm-001"], &[]).await.release.seq;
    assert!(
        after > later,
        "seq {after} after the restore is not above {later}: vm-001 would ignore the notice"
    );
    admin.close().await;
    platform.stop().await;
}
