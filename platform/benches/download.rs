//! Benchmark: one machine downloads a large artifact through the embedded broker, against raw
//! rumqttc publish/subscribe of the same bytes through the same broker, in the same run.
//!
//! Run with `scripts/bench.sh` (release build). Prints a markdown table row set; the script
//! records it in docs/benchmarks.md.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleetcast_broker::admin::AdminClient;
use fleetcast_broker::client::{self, MqttEvent};
use fleetcast_broker::BrokerUrl;
use fleetcast_proto::admin::FleetEvent;
use fleetcast_proto::auth::{PlatformPublicKey, Purpose};
use fleetcast_proto::calls;
use fleetcast_proto::{GroupId, InstallPolicy, Kind, Phase, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const CHUNK: usize = 64 * 1024;

/// How long setup steps (connect, subscribe, platform start, machine online) may take.
const SETUP: Duration = Duration::from_secs(30);

/// A client as `id`, connected (CONNACK received), driven until `shutdown`.
async fn connected(
    broker: &BrokerUrl,
    id: &str,
    capacity: usize,
    shutdown: &CancellationToken,
) -> (AsyncClient, mpsc::Receiver<MqttEvent>) {
    let (c, el) = client::connect(client::options(broker, id, None), capacity);
    let (tx, mut rx) = mpsc::channel(capacity);
    tokio::spawn(client::drive(el, tx, shutdown.clone()));
    tokio::time::timeout(SETUP, async {
        while !matches!(rx.recv().await, Some(MqttEvent::Connected { .. })) {}
    })
    .await
    .unwrap_or_else(|_| panic!("{id} did not connect"));
    (c, rx)
}

/// Subscribes with QoS 1 and waits until the broker confirmed it.
async fn subscribe(c: &AsyncClient, rx: &mut mpsc::Receiver<MqttEvent>, filter: &str) {
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(SETUP, async {
        while !matches!(rx.recv().await, Some(MqttEvent::SubAck(_))) {}
    })
    .await
    .unwrap_or_else(|_| panic!("no SUBACK for {filter}"));
}

fn size_mb() -> usize {
    std::env::var("BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// Raw rumqttc: one publisher streams `total` bytes in 64 KiB QoS 1 messages, one subscriber
/// receives them; time from the first publish to the last byte received.
async fn raw_pubsub(broker: &BrokerUrl, total: usize) -> Duration {
    let shutdown = CancellationToken::new();
    let (sub, mut sub_rx) = connected(broker, "bench-raw-sub", 1024, &shutdown).await;
    subscribe(&sub, &mut sub_rx, "bench/raw").await;
    let (publ, mut pub_rx) = connected(broker, "bench-raw-pub", 1024, &shutdown).await;
    tokio::spawn(async move { while pub_rx.recv().await.is_some() {} });
    let payload = vec![0x5au8; CHUNK];
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let n = CHUNK.min(total - sent);
            publ.publish("bench/raw", QoS::AtLeastOnce, false, payload[..n].to_vec())
                .await
                .unwrap();
            sent += n;
        }
    });
    let mut received = 0;
    while received < total {
        match tokio::time::timeout(Duration::from_secs(60), sub_rx.recv()).await {
            Ok(Some(MqttEvent::Publish(p))) => received += p.payload.len(),
            Ok(Some(_)) => {}
            _ => panic!("raw pub/sub stalled at {received} of {total} bytes"),
        }
    }
    let elapsed = started.elapsed();
    sender.await.unwrap();
    shutdown.cancel();
    elapsed
}

/// fleetcast: the platform serves a release to one simulated machine; the time from the
/// machine's first `downloading` to its `downloaded` (both on the machine clock).
async fn fleetcast_download(broker: &BrokerUrl, total: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let token = CancellationToken::new();
    let serve = tokio::spawn(fleetcast_platform::serve(
        fleetcast_platform::ServeOptions {
            data_dir: data.clone(),
            broker: broker.clone(),
            embedded_listen: None,
            tls: None,
            topic_prefix: "fleet".into(),
            // The pipeline, not the per-machine byte budget (64 MiB/s by default), is measured.
            limits: fleetcast_platform::limits::MachineLimits {
                bytes_per_sec: 1e12,
                byte_burst: 1e12,
                ..Default::default()
            },
            compaction: Default::default(),
        },
        token.clone(),
    ));
    let secret_path = fleetcast_platform::admin_secret_path(&data);
    let started = Instant::now();
    while !secret_path.exists() {
        assert!(
            started.elapsed() < SETUP,
            "the platform wrote no admin secret"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secret = fleetcast_broker::admin::load_secret(None, &secret_path).unwrap();
    let admin = AdminClient::connect(
        broker,
        Topics::default(),
        secret.clone(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let app = Kind::new("app").unwrap();
    let sim = tokio::spawn(fleetcast_device::simulate::run(
        fleetcast_device::simulate::SimulateOptions {
            count: 1,
            groups: vec![GroupId::new("bench").unwrap()],
            prefix: "vm-".into(),
            data_dir: dir.path().join("machines"),
            broker: broker.to_string(),
            machine_broker: broker.to_string(),
            topic_prefix: "fleet".into(),
            admin_secret: secret,
            initial_versions: BTreeMap::from([(app.clone(), "1.0.0".to_owned())]),
            start_index: 1,
            fail_health: vec![],
            ca_file: None,
            keep_alive_secs: None,
        },
        token.clone(),
    ));
    let file = dir.path().join("app.bin");
    let bytes: Vec<u8> = (0..total)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3])
        .collect();
    std::fs::write(&file, &bytes).unwrap();
    drop(bytes);
    admin
        .upload(
            &file,
            app.clone(),
            "2.0.0".into(),
            None,
            CHUNK as u32,
            |_, _| {},
        )
        .await
        .unwrap();

    let platform_key: PlatformPublicKey =
        std::fs::read_to_string(fleetcast_platform::public_key_path(&data))
            .unwrap()
            .parse()
            .unwrap();
    // Watch the events topic for this machine's download phases.
    let (ev, mut ev_rx) = connected(broker, "bench-events", 256, &token).await;
    subscribe(&ev, &mut ev_rx, "fleet/events").await;
    // Wait for the machine to be online before publishing.
    let started = Instant::now();
    loop {
        let machines = admin.call(calls::Machines {}).await.unwrap();
        if machines.iter().any(|m| m.online) {
            break;
        }
        assert!(started.elapsed() < SETUP, "the machine did not come online");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let release = admin
        .call(calls::ReleaseCreate {
            kind: app,
            version: "2.0.0".into(),
            policy: InstallPolicy::DownloadOnly,
            notes: None,
        })
        .await
        .unwrap()
        .id;
    admin
        .call(calls::ReleasePublish {
            release,
            machines: vec![],
            groups: vec![GroupId::new("bench").unwrap()],
            allow_empty: false,
            waves: None,
        })
        .await
        .unwrap();
    let (mut start, mut end) = (None, None);
    while end.is_none() {
        match tokio::time::timeout(Duration::from_secs(120), ev_rx.recv()).await {
            Ok(Some(MqttEvent::Publish(p))) => {
                // Events are signed by the platform.
                let Ok(e) = platform_key.verify::<FleetEvent>(Purpose::Event, &p.payload) else {
                    continue;
                };
                match e.phase {
                    Phase::Downloading if start.is_none() => start = Some(e.at_ms),
                    Phase::Downloaded => end = Some(e.at_ms),
                    Phase::DownloadFailed => panic!("download failed: {:?}", e.error),
                    _ => {}
                }
            }
            Ok(Some(_)) => {}
            _ => panic!("no download result within 120 s"),
        }
    }
    admin.close().await;
    token.cancel();
    serve.await.unwrap().expect("the platform stops cleanly");
    sim.await.unwrap().expect("the simulator stops cleanly");
    Duration::from_millis(end.unwrap() - start.expect("downloading seen before downloaded"))
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let total = size_mb() * 1_000_000;
    // rumqttd drops the oldest log segment of a filter once it is full, even for a QoS 1
    // subscriber that has not read it yet: a raw publisher that outruns its subscriber by more
    // than the log loses data. Give every bulk filter (fleetcast's and the raw one alike) a log
    // that holds the whole transfer, so the baseline measures throughput, not loss.
    let log = (total / 4 + (1 << 20)).max(8 << 20);
    let broker = fleetcast_broker::embedded::start_on_free_port(|mut s| {
        // The default bulk filters (chunk topics and operators' upload parts) and the raw one.
        s.bulk_filters.push("bench/raw".into());
        s.bulk_segment_size = log;
        s.bulk_segment_count = 5;
        s
    })
    .unwrap();
    let url = broker.url();
    let raw = raw_pubsub(&url, total).await;
    let fc = fleetcast_download(&url, total).await;
    let raw2 = raw_pubsub(&url, total).await;
    let raw_best = raw.min(raw2);
    println!(
        "| raw rumqttc pub/sub, 64 KiB QoS 1 (best of 2) | {} MB | {:.2} s | {:.1} MB/s | 1.00 |",
        size_mb(),
        raw_best.as_secs_f64(),
        mbps(total, raw_best)
    );
    println!(
        "| fleetcast download (1 machine, window 16, verified chunks, written to disk) | {} MB | {:.2} s | {:.1} MB/s | {:.2} |",
        size_mb(),
        fc.as_secs_f64(),
        mbps(total, fc),
        mbps(total, fc) / mbps(total, raw_best)
    );
}
