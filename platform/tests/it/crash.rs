//! kill -9 recovery: the real `fleetcast serve` binary is killed with SIGKILL while a machine
//! streams status events; after a restart on the same data dir every event is in sled exactly
//! once. Acknowledged events were flushed before their PUBACK; unacknowledged ones are
//! redelivered by the broker to the persistent ingest session; redeliveries of events that were
//! flushed but not yet acked are dropped by the counter check.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetcast_broker::admin::AdminClient;
use fleetcast_broker::client::{self, MqttEvent};
use fleetcast_broker::BrokerUrl;
use fleetcast_platform::store::Store;
use fleetcast_proto::admin::{AdminOp, AdminReply};
use fleetcast_proto::auth::{Purpose, Secret};
use fleetcast_proto::status::Progress;
use fleetcast_proto::{InstallPolicy, Kind, MachineId, Phase, StatusEvent, Topics};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const EVENTS: u64 = 400;

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

async fn admin(data: &Path, broker: &BrokerUrl) -> AdminClient {
    let path = fleetcast_platform::admin_secret_path(data);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "platform created no admin secret"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secret: Secret = std::fs::read_to_string(&path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    AdminClient::connect(broker, Topics::default(), secret, Duration::from_secs(10))
        .await
        .unwrap()
}

async fn progress_bytes(admin: &AdminClient, release: &fleetcast_proto::ReleaseId) -> u64 {
    match admin
        .request(AdminOp::ReleaseStatus {
            release: release.clone(),
        })
        .await
        .unwrap()
    {
        AdminReply::ReleaseStatus { status } => {
            status.targets[0].progress.map(|p| p.bytes).unwrap_or(0)
        }
        other => panic!("unexpected {other:?}"),
    }
}

async fn kill9_loses_nothing(broker: BrokerUrl) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let mut platform = spawn_platform(&data, &broker);
    let adm = admin(&data, &broker).await;
    let vm = MachineId::new("vm-crash").unwrap();
    let secret = match adm
        .request(AdminOp::MachineProvision {
            machine: vm.clone(),
            groups: vec![],
        })
        .await
        .unwrap()
    {
        AdminReply::Provisioned { machine } => machine.secret,
        other => panic!("unexpected {other:?}"),
    };
    let file = dir.path().join("a.bin");
    std::fs::write(&file, vec![7u8; 5000]).unwrap();
    let app = Kind::new("app").unwrap();
    adm.upload(&file, app.clone(), "1.0".into(), None, 65536, |_, _| {})
        .await
        .unwrap();
    let release = match adm
        .request(AdminOp::ReleaseCreate {
            kind: app.clone(),
            version: "1.0".into(),
            policy: InstallPolicy::Immediate,
            notes: None,
        })
        .await
        .unwrap()
    {
        AdminReply::Release { release } => release.id,
        other => panic!("unexpected {other:?}"),
    };
    adm.request(AdminOp::ReleasePublish {
        release: release.clone(),
        machines: vec![vm.clone()],
        groups: vec![],
    })
    .await
    .unwrap();

    // The machine: QoS 1 status events with growing progress, paced so the kill lands mid-stream.
    let stop = CancellationToken::new();
    let (mc, el) = client::connect(
        client::options(&broker, vm.as_str(), Some(&secret.mqtt_password())),
        1024,
    );
    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(client::drive(el, tx, stop.clone()));
    loop {
        if let Some(MqttEvent::Connected { .. }) = rx.recv().await {
            break;
        }
    }
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let topic = Topics::default().status(&vm);
    let publisher = {
        let (release, app) = (release.clone(), app.clone());
        tokio::spawn(async move {
            for i in 1..=EVENTS {
                let ev = StatusEvent {
                    machine: vm.clone(),
                    ctr: i,
                    at_ms: fleetcast_platform::now_ms(),
                    release: Some(release.clone()),
                    kind: app.clone(),
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
                mc.publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    secret.seal(Purpose::Status, &ev),
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            mc
        })
    };

    // Kill -9 once the platform has processed some of the stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let bytes = progress_bytes(&adm, &release).await;
        if bytes >= EVENTS / 5 {
            assert!(
                bytes < EVENTS,
                "the stream finished before the kill; slow the publisher down"
            );
            break;
        }
        assert!(Instant::now() < deadline, "platform processed nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    platform.kill().expect("SIGKILL");
    platform.wait().unwrap();
    adm.close().await;
    let _mc = publisher.await.unwrap();

    // Restart on the same data dir; the broker redelivers what was not acknowledged.
    let mut platform = spawn_platform(&data, &broker);
    let adm = admin(&data, &broker).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress_bytes(&adm, &release).await < EVENTS {
        assert!(
            Instant::now() < deadline,
            "events sent while the platform was dead never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    adm.close().await;
    // Stop it gracefully (SIGINT) so the database can be opened here.
    Command::new("kill")
        .args(["-INT", &platform.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while platform.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "platform did not stop on SIGINT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();

    let store = Store::open(&data.join("db")).unwrap();
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
    let broker = fleetcast_broker::embedded::start_on_free_port(|s| s).unwrap();
    kill9_loses_nothing(broker.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_platform_loses_no_status_on_mosquitto() {
    let mosq = fleetcast_broker::testing::Mosquitto::start("")
        .expect("mosquitto (apt-get install mosquitto)");
    kill9_loses_nothing(mosq.url.clone()).await;
}
