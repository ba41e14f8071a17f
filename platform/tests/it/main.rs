//! Platform integration tests: a real embedded broker on a free loopback port, `serve` on a
//! temp data dir, the real `AdminClient`, and machines played with proto types.

mod crash;
mod e2e;
mod reconcile;

use std::path::Path;
use std::time::Duration;

use fleetcast_broker::admin::{AdminClient, AdminError};
use fleetcast_broker::client::{self, MqttEvent};
use fleetcast_broker::embedded::start_on_free_port;
use fleetcast_broker::{BrokerUrl, EmbeddedBroker};
use fleetcast_platform::{admin_secret_path, public_key_path, serve, ServeOptions};
use fleetcast_proto::admin::{
    AdminOp, AdminReply, ArtifactInfo, FleetEvent, ProvisionedMachine, ReleaseInfo, ReleaseStatus,
    RolloutProgress,
};
use fleetcast_proto::auth::{PlatformPublicKey, Purpose, Secret};
use fleetcast_proto::chunk::{decode_frame, ChunkRequest, ChunkVerifier, FrameType, Layout};
use fleetcast_proto::status::Progress;
use fleetcast_proto::{
    ArtifactId, GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId, ReleaseNotice,
    StatusEvent, Target, Topics,
};
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

struct Platform {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), fleetcast_platform::PlatformError>>,
}

fn start_platform(broker: &EmbeddedBroker, data: &Path) -> Platform {
    let shutdown = CancellationToken::new();
    let opts = ServeOptions {
        data_dir: data.to_owned(),
        broker: broker.url(),
        embedded_listen: None,
        topic_prefix: "fleet".into(),
    };
    let task = tokio::spawn(serve(opts, shutdown.clone()));
    Platform { shutdown, task }
}

impl Platform {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("serve stops in time")
            .expect("serve task joined")
            .expect("serve returned Ok");
    }
}

fn admin_secret(data: &Path) -> Secret {
    std::fs::read_to_string(admin_secret_path(data))
        .unwrap()
        .parse()
        .unwrap()
}

fn public_key(data: &Path) -> PlatformPublicKey {
    std::fs::read_to_string(public_key_path(data))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Connects the admin client and waits until the platform answers.
async fn admin(broker: &BrokerUrl, data: &Path) -> AdminClient {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !admin_secret_path(data).exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "platform created no admin secret"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = AdminClient::connect(broker, Topics::default(), admin_secret(data), WAIT)
        .await
        .unwrap();
    loop {
        match c
            .request_with_timeout(AdminOp::Machines, Duration::from_millis(500))
            .await
        {
            Ok(_) => break,
            Err(AdminError::Timeout { .. }) if tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("platform not answering: {e}"),
        }
    }
    // The ingest connection subscribes at about the same time; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c
}

/// A plain MQTT client with its events.
struct Peer {
    client: AsyncClient,
    rx: mpsc::Receiver<MqttEvent>,
    _stop: tokio_util::sync::DropGuard,
}

async fn peer(broker: &BrokerUrl, id: &str) -> Peer {
    let stop = CancellationToken::new();
    let (client, el) = client::connect(client::options(broker, id, None), 256);
    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(client::drive(el, tx, stop.clone()));
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(MqttEvent::Connected { .. }) = rx.recv().await {
                return;
            }
        }
    })
    .await
    .expect("peer connects");
    Peer {
        client,
        rx,
        _stop: stop.drop_guard(),
    }
}

impl Peer {
    async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// The next publish on a topic matching `pred`.
    async fn next(&mut self, pred: impl Fn(&Publish) -> bool) -> Publish {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.rx.recv().await {
                    Some(MqttEvent::Publish(p)) if pred(&p) => return p,
                    Some(_) => {}
                    None => panic!("peer closed"),
                }
            }
        })
        .await
        .expect("expected publish arrived")
    }

    /// Everything that arrives within `d`.
    async fn drain(&mut self, d: Duration) -> Vec<Publish> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if let MqttEvent::Publish(p) = e {
                out.push(p);
            }
        }
        out
    }
}

/// A machine: its id, secret and a counter.
struct Machine {
    id: MachineId,
    secret: Secret,
    ctr: u64,
    peer: Peer,
}

async fn provision(admin: &AdminClient, broker: &BrokerUrl, id: &str, groups: &[&str]) -> Machine {
    let reply = admin
        .request(AdminOp::MachineProvision {
            machine: MachineId::new(id).unwrap(),
            groups: groups.iter().map(|g| GroupId::new(*g).unwrap()).collect(),
        })
        .await
        .unwrap();
    let AdminReply::Provisioned { machine } = reply else {
        panic!("{reply:?}")
    };
    let ProvisionedMachine {
        machine: mid,
        secret,
        ..
    } = machine;
    Machine {
        id: mid,
        secret,
        ctr: 0,
        peer: peer(broker, id).await,
    }
}

impl Machine {
    fn status(&mut self, release: Option<&ReleaseId>, version: &str, phase: Phase) -> StatusEvent {
        self.ctr += 1;
        StatusEvent {
            machine: self.id.clone(),
            ctr: self.ctr,
            at_ms: 1_795_608_000_000 + self.ctr * 1000,
            release: release.cloned(),
            kind: Kind::new("app").unwrap(),
            version: version.into(),
            phase,
            progress: None,
            attempt: 1,
            error: None,
            detail: None,
        }
    }

    async fn send_raw(&self, channel: &str, payload: Vec<u8>) {
        let topic = format!("fleet/machines/{}/{channel}", self.id);
        self.peer
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    async fn report(&mut self, release: Option<&ReleaseId>, version: &str, phase: Phase) {
        let ev = self.status(release, version, phase);
        self.send_raw("status", self.secret.seal(Purpose::Status, &ev))
            .await;
    }

    /// Publishes a MAC'd state claiming `groups` and, for kind `app`, the highest accepted `seq`.
    async fn report_state(&mut self, groups: &[&str], seq: u64) {
        self.ctr += 1;
        let mut kinds = std::collections::BTreeMap::new();
        kinds.insert(
            Kind::new("app").unwrap(),
            fleetcast_proto::status::KindState {
                seq,
                ..Default::default()
            },
        );
        let st = fleetcast_proto::MachineState {
            machine: self.id.clone(),
            ctr: self.ctr,
            at_ms: 1_795_608_000_000 + self.ctr * 1000,
            agent_version: "test".into(),
            groups: groups.iter().map(|g| GroupId::new(*g).unwrap()).collect(),
            busy: false,
            kinds,
        };
        let topic = format!("fleet/machines/{}/state", self.id);
        self.peer
            .client
            .publish(
                topic,
                QoS::AtLeastOnce,
                true,
                self.secret.seal(Purpose::State, &st),
            )
            .await
            .unwrap();
    }

    async fn request_chunks(
        &mut self,
        artifact: ArtifactId,
        manifest: bool,
        chunks: Vec<(u32, u32)>,
    ) {
        self.ctr += 1;
        let req = ChunkRequest {
            machine: self.id.clone(),
            ctr: self.ctr,
            artifact,
            manifest,
            chunks,
        };
        let topic = format!("fleet/machines/{}/chunks/get", self.id);
        self.peer
            .client
            .publish(
                topic,
                QoS::AtMostOnce,
                false,
                self.secret.seal(Purpose::ChunkRequest, &req),
            )
            .await
            .unwrap();
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn upload(
    admin: &AdminClient,
    dir: &Path,
    name: &str,
    bytes: &[u8],
    version: &str,
) -> Result<ArtifactInfo, AdminError> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    admin
        .upload(
            &path,
            Kind::new("app").unwrap(),
            version.into(),
            None,
            1024,
            |_, _| {},
        )
        .await
}

async fn create_release(admin: &AdminClient, version: &str) -> ReleaseInfo {
    let reply = admin
        .request(AdminOp::ReleaseCreate {
            kind: Kind::new("app").unwrap(),
            version: version.into(),
            policy: InstallPolicy::Immediate,
            notes: None,
        })
        .await
        .unwrap();
    let AdminReply::Release { release } = reply else {
        panic!("{reply:?}")
    };
    release
}

async fn publish(
    admin: &AdminClient,
    release: &ReleaseId,
    machines: &[&str],
    groups: &[&str],
) -> fleetcast_proto::admin::PublishPlan {
    let reply = admin
        .request(AdminOp::ReleasePublish {
            release: release.clone(),
            machines: machines
                .iter()
                .map(|m| MachineId::new(*m).unwrap())
                .collect(),
            groups: groups.iter().map(|g| GroupId::new(*g).unwrap()).collect(),
        })
        .await
        .unwrap();
    let AdminReply::Plan { plan } = reply else {
        panic!("{reply:?}")
    };
    plan
}

async fn status(admin: &AdminClient, release: &ReleaseId) -> ReleaseStatus {
    let reply = admin
        .request(AdminOp::ReleaseStatus {
            release: release.clone(),
        })
        .await
        .unwrap();
    let AdminReply::ReleaseStatus { status } = reply else {
        panic!("{reply:?}")
    };
    status
}

/// Polls release status until `pred` holds.
async fn wait_status(
    admin: &AdminClient,
    release: &ReleaseId,
    pred: impl Fn(&ReleaseStatus) -> bool,
) -> ReleaseStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = status(admin, release).await;
        if pred(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "release status never matched: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn phase_of(s: &ReleaseStatus, m: &str) -> Phase {
    s.targets
        .iter()
        .find(|t| t.machine.as_str() == m)
        .map(|t| t.phase)
        .unwrap_or_else(|| panic!("{m} not a target"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_immutable_per_kind_and_version_and_empty_files_are_refused() {
    let broker = start_on_free_port(|s| s).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let platform = start_platform(&broker, &dir.path().join("data"));
    let admin = admin(&broker.url(), &dir.path().join("data")).await;

    let bytes = data(5 * 1024 + 7, 1);
    let info = upload(&admin, dir.path(), "app.bin", &bytes, "2.4.1")
        .await
        .unwrap();
    assert_eq!(info.id, ArtifactId::of(&bytes));
    assert_eq!(
        (info.size, info.chunk_size, info.version.as_str()),
        (bytes.len() as u64, 1024, "2.4.1")
    );
    let again = upload(&admin, dir.path(), "app.bin", &bytes, "2.4.1")
        .await
        .unwrap();
    assert_eq!(again.id, info.id, "identical re-upload is accepted");
    let err = upload(&admin, dir.path(), "other.bin", &data(3000, 2), "2.4.1")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdminError::Refused(t) if t.contains("already uploaded with different bytes")),
        "{err}"
    );
    let reply = admin
        .request(AdminOp::UploadBegin {
            kind: Kind::new("app").unwrap(),
            version: "0.0.0".into(),
            name: "empty".into(),
            size: 0,
            artifact: ArtifactId::of(b""),
            chunk_size: 1024,
            notes: None,
        })
        .await;
    assert!(
        matches!(&reply, Err(AdminError::Refused(t)) if t.contains("empty")),
        "{reply:?}"
    );
    let AdminReply::Artifacts { artifacts } = admin.request(AdminOp::ArtifactList).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(artifacts.len(), 1);
    let stored = std::fs::read(dir.path().join("data/artifacts").join(info.id.to_hex())).unwrap();
    assert_eq!(stored, bytes);
    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_reaches_groups_and_machines_serves_chunks_and_records_results() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let platform = start_platform(&broker, &data_dir);
    let admin = admin(&url, &data_dir).await;
    let key = public_key(&data_dir);

    let bytes = data(5 * 1024 + 7, 3);
    let info = upload(&admin, dir.path(), "app.bin", &bytes, "2.4.1")
        .await
        .unwrap();
    let mut vm1 = provision(&admin, &url, "vm-001", &["shanghai"]).await;
    let _vm2 = provision(&admin, &url, "vm-002", &["shanghai"]).await;
    let _vm3 = provision(&admin, &url, "vm-003", &[]).await;
    let release = create_release(&admin, "2.4.1").await;

    let unknown = admin
        .request(AdminOp::ReleasePublish {
            release: release.id.clone(),
            machines: vec![MachineId::new("vm-404").unwrap()],
            groups: vec![],
        })
        .await;
    assert!(
        matches!(&unknown, Err(AdminError::Refused(t)) if t.contains("vm-404")),
        "{unknown:?}"
    );

    let AdminReply::Plan { plan } = admin
        .request(AdminOp::ReleasePlan {
            release: release.id.clone(),
            machines: vec![
                MachineId::new("vm-003").unwrap(),
                MachineId::new("vm-001").unwrap(),
            ],
            groups: vec![GroupId::new("shanghai").unwrap()],
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(plan.release.seq, 0, "a plan sends nothing");
    let published = publish(&admin, &release.id, &["vm-003", "vm-001"], &["shanghai"]).await;
    assert_eq!(published.targets, plan.targets);
    assert_eq!(
        published
            .targets
            .iter()
            .map(|(m, g)| (m.as_str(), g.as_ref().map(|g| g.as_str())))
            .collect::<Vec<_>>(),
        vec![
            ("vm-001", None),
            ("vm-002", Some("shanghai")),
            ("vm-003", None)
        ]
    );
    assert!(published.release.seq > 0);

    // Retained, signed notices on the machine and group topics.
    let mut observer = peer(&url, "observer").await;
    observer.subscribe("fleet/+/+/release/app").await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let p = observer.next(|p| p.topic.contains("/release/")).await;
        assert!(p.retain, "notice on {} is retained", p.topic);
        let n: ReleaseNotice = key
            .verify(Purpose::Release, &p.payload)
            .expect("notice signed by the platform key");
        assert_eq!(
            (n.release.clone(), n.seq, n.artifact.id),
            (release.id.clone(), published.release.seq, info.id)
        );
        seen.push((p.topic.clone(), n.target));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            (
                "fleet/groups/shanghai/release/app".to_string(),
                Target::Group(GroupId::new("shanghai").unwrap())
            ),
            (
                "fleet/machines/vm-001/release/app".to_string(),
                Target::Machine(MachineId::new("vm-001").unwrap())
            ),
            (
                "fleet/machines/vm-003/release/app".to_string(),
                Target::Machine(MachineId::new("vm-003").unwrap())
            ),
        ]
    );

    // Chunks: manifest first, then every chunk, verified.
    vm1.peer.subscribe("fleet/machines/vm-001/chunks").await;
    let layout = Layout::new(info.size, info.chunk_size).unwrap();
    vm1.request_chunks(info.id, true, vec![(0, layout.chunks)])
        .await;
    let mut manifest = vec![Vec::new(); layout.manifest_parts() as usize];
    let mut chunks = vec![None; layout.chunks as usize];
    while manifest.iter().any(Vec::is_empty) || chunks.iter().any(Option::is_none) {
        let p = vm1.peer.next(|p| p.topic.ends_with("/chunks")).await;
        let (h, payload) = decode_frame(&p.payload).unwrap();
        match h.frame_type {
            FrameType::Manifest => manifest[h.index as usize] = payload.to_vec(),
            FrameType::Chunk => chunks[h.index as usize] = Some(payload.to_vec()),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    let verifier = ChunkVerifier::from_manifest(info.id, layout, &manifest.concat()).unwrap();
    for (i, c) in chunks.iter().enumerate() {
        verifier.verify(i as u32, c.as_ref().unwrap()).unwrap();
    }
    assert_eq!(
        chunks.into_iter().flatten().collect::<Vec<_>>().concat(),
        bytes
    );

    // An unknown artifact gets one error frame.
    let missing = ArtifactId::of(b"nope");
    vm1.request_chunks(missing, true, vec![(0, 1)]).await;
    let p = vm1.peer.next(|p| p.topic.ends_with("/chunks")).await;
    let (h, reason) = decode_frame(&p.payload).unwrap();
    assert_eq!((h.frame_type, h.artifact), (FrameType::Error, missing));
    assert_eq!(reason, b"unknown artifact");

    // Results with their times; events and progress for integrators.
    let mut events = peer(&url, "integrator").await;
    events.subscribe("fleet/events").await;
    events.subscribe("fleet/rollouts/+/progress").await;
    vm1.report(Some(&release.id), "2.4.1", Phase::Notified)
        .await;
    let mut downloading = vm1.status(Some(&release.id), "2.4.1", Phase::Downloading);
    downloading.progress = Some(Progress {
        bytes: 1024,
        total: info.size,
    });
    vm1.send_raw("status", vm1.secret.seal(Purpose::Status, &downloading))
        .await;
    vm1.report(Some(&release.id), "2.4.1", Phase::Downloaded)
        .await;
    vm1.report(Some(&release.id), "2.4.1", Phase::Installing)
        .await;
    vm1.report(Some(&release.id), "2.4.1", Phase::Installed)
        .await;
    let s = wait_status(&admin, &release.id, |s| {
        phase_of(s, "vm-001") == Phase::Installed
    })
    .await;
    let rec = s
        .targets
        .iter()
        .find(|t| t.machine.as_str() == "vm-001")
        .unwrap();
    assert_eq!(
        rec.notified_at_ms,
        Some(1_795_608_000_000 + 1000 * (vm1.ctr - 4))
    );
    let dl = rec.download.clone().unwrap();
    let up = rec.upgrade.clone().unwrap();
    assert!(dl.ok && up.ok && dl.at_ms < up.at_ms);
    assert_eq!(up.at_ms, 1_795_608_000_000 + 1000 * vm1.ctr);
    assert_eq!(
        (phase_of(&s, "vm-002"), phase_of(&s, "vm-003")),
        (Phase::Pending, Phase::Pending)
    );
    assert_eq!(
        (s.progress.total, s.progress.succeeded, s.progress.finished),
        (3, 1, 1)
    );
    let text = fleetcast_platform::cli::release::status_text(&s);
    assert!(text.contains("ok 2026-11-25 12:00:0"), "{text}");

    let mut fleet_events = Vec::new();
    let mut last_progress = None;
    while fleet_events.len() < 5
        || last_progress
            .as_ref()
            .is_none_or(|p: &RolloutProgress| p.succeeded < 1)
    {
        let p = events.next(|_| true).await;
        if p.topic == "fleet/events" {
            fleet_events.push(serde_json::from_slice::<FleetEvent>(&p.payload).unwrap());
        } else {
            last_progress = Some(serde_json::from_slice::<RolloutProgress>(&p.payload).unwrap());
        }
    }
    assert_eq!(
        fleet_events.iter().map(|e| e.phase).collect::<Vec<_>>(),
        vec![
            Phase::Notified,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Installing,
            Phase::Installed
        ]
    );
    assert!(fleet_events.windows(2).all(|w| w[0].id < w[1].id));

    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_status_survives_a_restart_and_desired_notices_are_republished() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let platform = start_platform(&broker, &data_dir);
    let admin1 = admin(&url, &data_dir).await;
    upload(&admin1, dir.path(), "a.bin", &data(2000, 5), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin1, &url, "vm-001", &["g"]).await;
    let release = create_release(&admin1, "1.0").await;
    publish(&admin1, &release.id, &[], &["g"]).await;
    vm.report(Some(&release.id), "1.0", Phase::Downloaded).await;
    wait_status(&admin1, &release.id, |s| {
        phase_of(s, "vm-001") == Phase::Downloaded
    })
    .await;
    admin1.close().await;

    let mut observer = peer(&url, "observer").await;
    observer.subscribe("fleet/groups/g/release/app").await;
    observer.next(|_| true).await; // the retained notice
    platform.stop().await;

    // Reported while the platform is down: the persistent ingest session keeps it.
    vm.report(Some(&release.id), "1.0", Phase::Installing).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let platform = start_platform(&broker, &data_dir);
    let republished = observer
        .next(|p| p.topic == "fleet/groups/g/release/app")
        .await;
    let n: ReleaseNotice = public_key(&data_dir)
        .verify(Purpose::Release, &republished.payload)
        .unwrap();
    assert_eq!(n.release, release.id);
    let admin2 = admin(&url, &data_dir).await;
    let s = wait_status(&admin2, &release.id, |s| {
        phase_of(s, "vm-001") == Phase::Installing
    })
    .await;
    let rec = &s.targets[0];
    assert!(
        rec.download.as_ref().is_some_and(|d| d.ok),
        "the status acknowledged before the restart is kept"
    );
    vm.report(Some(&release.id), "1.0", Phase::Installed).await;
    wait_status(&admin2, &release.id, |s| {
        phase_of(s, "vm-001") == Phase::Installed
    })
    .await;
    admin2.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_unknown_replayed_malformed_and_oversized_reports_change_nothing() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let platform = start_platform(&broker, &data_dir);
    let admin = admin(&url, &data_dir).await;
    upload(&admin, dir.path(), "a.bin", &data(2000, 7), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let release = create_release(&admin, "1.0").await;
    publish(&admin, &release.id, &["vm-001"], &[]).await;
    let mut events = peer(&url, "integrator").await;
    events.subscribe("fleet/events").await;

    vm.report(Some(&release.id), "1.0", Phase::Downloading)
        .await;
    let replay = vm.status(Some(&release.id), "1.0", Phase::Installed);
    vm.ctr -= 1; // the next message re-uses this counter
    let genuine = vm.status(Some(&release.id), "1.0", Phase::Installed);
    assert_eq!(genuine.ctr, replay.ctr);
    vm.send_raw("status", vm.secret.seal(Purpose::Status, &genuine))
        .await;
    wait_status(&admin, &release.id, |s| {
        phase_of(s, "vm-001") == Phase::Installed
    })
    .await;

    let mut bad = vm.status(Some(&release.id), "1.0", Phase::InstallFailed);
    bad.attempt = 9;
    // Forged: another key.
    vm.send_raw(
        "status",
        Secret::from_bytes([9; 32]).seal(Purpose::Status, &bad),
    )
    .await;
    // Replayed: the same counter again, genuinely MAC'd.
    let mut replayed = bad.clone();
    replayed.ctr = genuine.ctr;
    vm.send_raw("status", vm.secret.seal(Purpose::Status, &replayed))
        .await;
    // Signed for another purpose.
    vm.send_raw("status", vm.secret.seal(Purpose::State, &bad))
        .await;
    // Malformed and oversized.
    vm.send_raw("status", b"{not json".to_vec()).await;
    vm.send_raw("status", vec![b'x'; 300 * 1024]).await;
    // Body names another machine.
    let mut other = bad.clone();
    other.machine = MachineId::new("vm-002").unwrap();
    vm.send_raw("status", vm.secret.seal(Purpose::Status, &other))
        .await;
    // Unknown machine.
    let ghost = peer(&url, "vm-999").await;
    let mut ghost_ev = bad.clone();
    ghost_ev.machine = MachineId::new("vm-999").unwrap();
    ghost
        .client
        .publish(
            "fleet/machines/vm-999/status",
            QoS::AtLeastOnce,
            false,
            vm.secret.seal(Purpose::Status, &ghost_ev),
        )
        .await
        .unwrap();
    // A bad online payload.
    vm.send_raw("online", b"maybe".to_vec()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Still working: a valid report after all that is applied.
    let mut ok = vm.status(Some(&release.id), "1.0", Phase::Downloading);
    ok.attempt = 2;
    vm.send_raw("status", vm.secret.seal(Purpose::Status, &ok))
        .await;
    let s = wait_status(&admin, &release.id, |s| {
        phase_of(s, "vm-001") == Phase::Downloading
    })
    .await;
    assert_eq!(
        s.targets[0].attempts, 2,
        "no rejected report touched the record"
    );
    assert!(s.targets[0].error.is_none());
    let got: Vec<Phase> = events
        .drain(Duration::from_millis(500))
        .await
        .iter()
        .filter(|p| p.topic == "fleet/events")
        .map(|p| {
            serde_json::from_slice::<FleetEvent>(&p.payload)
                .unwrap()
                .phase
        })
        .collect();
    assert_eq!(
        got,
        vec![Phase::Downloading, Phase::Installed, Phase::Downloading],
        "only genuine reports became events"
    );
    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_a_signed_rollback_notice_for_the_previous_version() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let platform = start_platform(&broker, &data_dir);
    let admin = admin(&url, &data_dir).await;
    upload(&admin, dir.path(), "a1.bin", &data(1500, 1), "1.0")
        .await
        .unwrap();
    upload(&admin, dir.path(), "a2.bin", &data(1500, 2), "2.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r1 = create_release(&admin, "1.0").await;
    publish(&admin, &r1.id, &["vm-001"], &[]).await;
    vm.report(Some(&r1.id), "1.0", Phase::Installed).await;
    wait_status(&admin, &r1.id, |s| {
        phase_of(s, "vm-001") == Phase::Installed
    })
    .await;
    let r2 = create_release(&admin, "2.0").await;
    publish(&admin, &r2.id, &["vm-001"], &[]).await;
    vm.report(Some(&r2.id), "2.0", Phase::Installed).await;
    wait_status(&admin, &r2.id, |s| {
        phase_of(s, "vm-001") == Phase::Installed
    })
    .await;

    let reply = admin
        .request(AdminOp::Rollback {
            target: Target::Machine(MachineId::new("vm-001").unwrap()),
            kind: Kind::new("app").unwrap(),
            to: None,
        })
        .await
        .unwrap();
    let AdminReply::Plan { plan } = reply else {
        panic!("{reply:?}")
    };
    assert!(plan.release.rollback);
    assert_eq!(plan.release.version, "1.0");
    assert_eq!(
        plan.topics,
        vec!["fleet/machines/vm-001/release/app".to_string()]
    );

    let mut observer = peer(&url, "observer").await;
    observer
        .subscribe("fleet/machines/vm-001/release/app")
        .await;
    let p = observer.next(|_| true).await;
    let n: ReleaseNotice = public_key(&data_dir)
        .verify(Purpose::Release, &p.payload)
        .unwrap();
    assert!(n.rollback);
    assert_eq!(
        (n.release, n.version.as_str(), n.policy),
        (plan.release.id.clone(), "1.0", InstallPolicy::Immediate)
    );
    assert!(n.seq > r2.seq);

    let bad = admin
        .request(AdminOp::Rollback {
            target: Target::Group(GroupId::new("nobody").unwrap()),
            kind: Kind::new("app").unwrap(),
            to: Some("9.9".into()),
        })
        .await;
    assert!(
        matches!(&bad, Err(AdminError::Refused(t)) if t.contains("9.9")),
        "{bad:?}"
    );
    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_machines_fetching_one_artifact_get_it_broadcast() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let platform = start_platform(&broker, &data_dir);
    let admin = admin(&url, &data_dir).await;
    let info = upload(&admin, dir.path(), "a.bin", &data(4096, 1), "1.0")
        .await
        .unwrap();
    let mut a = provision(&admin, &url, "vm-a", &[]).await;
    let mut b = provision(&admin, &url, "vm-b", &[]).await;
    let topic = format!("fleet/artifacts/{}/chunks", info.id);
    b.peer.subscribe(&topic).await;
    a.request_chunks(info.id, false, vec![(0, 4)]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.request_chunks(info.id, false, vec![(0, 4)]).await;
    let p = b.peer.next(|p| p.topic == topic).await;
    let (h, _) = decode_frame(&p.payload).unwrap();
    assert_eq!((h.frame_type, h.artifact), (FrameType::Chunk, info.id));
    admin.close().await;
    platform.stop().await;
}
