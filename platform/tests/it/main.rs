//! Platform integration tests: a real embedded broker on a free loopback port, `serve` on a
//! temp data dir, the real `AdminClient`, and machines played with proto types.
//!
//! The helpers here serve every module of this test binary (`cli`, `compaction`, `crash`, `e2e`, `gateway`,
//! `inventory`, `package`, `pages`, `reconcile`, `removal`, `security`, `staged`).

mod bounded;
mod cli;
mod compaction;
mod crash;
mod e2e;
mod full_disk;
mod gateway;
mod inventory;
mod package;
mod pages;
mod python_agent;
mod reconcile;
mod regroup;
mod removal;
mod security;
mod staged;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcast_broker::admin::{AdminClient, AdminError};
use fleetcast_broker::client::{self, MqttEvent};
use fleetcast_broker::embedded::start_on_free_port;
use fleetcast_broker::BrokerUrl;
use fleetcast_platform::{admin_secret_path, public_key_path, serve, ServeOptions};
use fleetcast_proto::admin::{
    AdminOp, ArtifactInfo, FleetEvent, MachineInfo, ProvisionedMachine, PublishPlan, ReleaseInfo,
    ReleaseStatus, RolloutProgress,
};
use fleetcast_proto::auth::{PlatformPublicKey, Purpose, Secret};
use fleetcast_proto::calls;
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

/// The machine clock of the first status a test machine reports: 2026-11-25 12:00:00 UTC.
const T0_MS: u64 = 1_795_608_000_000;

fn m(s: &str) -> MachineId {
    MachineId::new(s).unwrap()
}

fn g(s: &str) -> GroupId {
    GroupId::new(s).unwrap()
}

fn app() -> Kind {
    Kind::new("app").unwrap()
}

/// Polls `probe` every 20 ms until `done` holds for its value; returns that value, or fails
/// with `what` and the last value after `within`.
async fn poll_until<T: Debug, F: Future<Output = T>>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let value = probe().await;
        if done(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}; last {value:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops a `fleetcast serve` child as Ctrl-C does (SIGINT) and waits until it has ended.
async fn interrupt(platform: &mut std::process::Child) {
    std::process::Command::new("kill")
        .args(["-INT", &platform.id().to_string()])
        .status()
        .unwrap();
    poll_until(
        Duration::from_secs(20),
        "platform stops on SIGINT",
        || std::future::ready(platform.try_wait().unwrap()),
        Option::is_some,
    )
    .await;
}

/// The platform service running in this process; stop() waits for it to end.
struct Platform {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), fleetcast_platform::PlatformError>>,
}

fn start_platform(broker: &BrokerUrl, data: &Path) -> Platform {
    start_platform_with(broker, data, Default::default())
}

/// The platform with these per-machine limits.
fn start_platform_with(
    broker: &BrokerUrl,
    data: &Path,
    limits: fleetcast_platform::limits::MachineLimits,
) -> Platform {
    let shutdown = CancellationToken::new();
    let opts = ServeOptions {
        data_dir: data.to_owned(),
        broker: broker.clone(),
        embedded_listen: None,
        tls: None,
        topic_prefix: "fleet".into(),
        limits,
        compaction: Default::default(),
    };
    let task = tokio::spawn(serve(opts, shutdown.clone()));
    Platform { shutdown, task }
}

impl Platform {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("serve stops in time")
            .expect("serve task joined")
            .expect("serve returned Ok");
    }
}

/// Waits for a task that was told to stop: it ends within 10 s and returns Ok.
async fn joined<E: Debug>(task: JoinHandle<Result<(), E>>, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap_or_else(|_| panic!("{what} did not stop within 10 s"))
        .unwrap_or_else(|e| panic!("{what} panicked: {e}"))
        .unwrap_or_else(|e| panic!("{what} failed: {e:?}"));
}

fn admin_secret(data: &Path) -> Secret {
    fleetcast_broker::admin::load_secret(None, &admin_secret_path(data)).unwrap()
}

fn public_key(data: &Path) -> PlatformPublicKey {
    std::fs::read_to_string(public_key_path(data))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Connects the admin client once the platform in `data` made its keys, and waits until the
/// platform answers.
async fn admin(broker: &BrokerUrl, data: &Path) -> AdminClient {
    let secret = admin_secret_path(data);
    poll_until(
        Duration::from_secs(20),
        "platform created its admin secret",
        || std::future::ready(secret.exists()),
        |&exists| exists,
    )
    .await;
    // The secret is written before the platform's listeners are up: a refused connection
    // right after it is the platform still starting (it failed under a loaded test run).
    let deadline = tokio::time::Instant::now() + WAIT;
    let c = loop {
        match AdminClient::connect(broker, Topics::default(), admin_secret(data), WAIT).await {
            Ok(c) => break c,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("admin client: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the admin client cannot connect: {e}"),
        }
    };
    let deadline = tokio::time::Instant::now() + WAIT;
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
    c
}

/// A temp dir and a platform on `broker` with its data in `<dir>/data`, answering `admin`.
/// Keep `dir` bound while the platform runs: dropping it deletes the data.
struct Env {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    platform: Platform,
    admin: AdminClient,
}

async fn env(broker: &BrokerUrl) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let platform = start_platform(broker, &data_dir);
    let admin = admin(broker, &data_dir).await;
    Env {
        dir,
        data_dir,
        platform,
        admin,
    }
}

/// A plain MQTT client with its events.
struct Peer {
    client: AsyncClient,
    rx: mpsc::Receiver<MqttEvent>,
    /// Publishes received while waiting for an acknowledgement, not yet taken by `next`.
    stashed: VecDeque<Publish>,
    _stop: tokio_util::sync::DropGuard,
}

async fn peer(broker: &BrokerUrl, id: &str) -> Peer {
    peer_with(broker, id, None).await
}

/// An MQTT client as `id` (with `password`), connected (CONNACK received).
async fn peer_with(broker: &BrokerUrl, id: &str, password: Option<&str>) -> Peer {
    let stop = CancellationToken::new();
    let (client, el) = client::connect(client::options(broker, id, password), 256);
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
        stashed: VecDeque::new(),
        _stop: stop.drop_guard(),
    }
}

impl Peer {
    /// The next event that `take` maps to a value; publishes it passes over are stashed for
    /// `next`.
    async fn wait_event<T>(&mut self, what: &str, take: impl Fn(&MqttEvent) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = self.rx.recv().await.expect("peer open");
                if let Some(t) = take(&e) {
                    return t;
                }
                if let MqttEvent::Publish(p) = e {
                    self.stashed.push_back(p);
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
    }

    /// Subscribes (QoS 1) and waits until the broker confirmed it.
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        self.wait_event("SUBACK", |e| {
            matches!(e, MqttEvent::SubAck(_)).then_some(())
        })
        .await;
    }

    /// Publishes with QoS 1 and waits until the broker acknowledged it (PUBACK): the broker
    /// holds it for every subscriber, in order after everything acknowledged before.
    async fn publish_acked(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
        let pkid = self
            .wait_event("send", |e| match e {
                MqttEvent::Sent(id) => Some(*id),
                _ => None,
            })
            .await;
        self.wait_event("PUBACK", |e| {
            matches!(e, MqttEvent::PubAck(id) if *id == pkid).then_some(())
        })
        .await;
    }

    /// The next publish on a topic matching `pred` within `within`; others are dropped.
    async fn next_within(
        &mut self,
        within: Duration,
        pred: impl Fn(&Publish) -> bool,
    ) -> Option<Publish> {
        while let Some(p) = self.stashed.pop_front() {
            if pred(&p) {
                return Some(p);
            }
        }
        tokio::time::timeout(within, async {
            loop {
                match self.rx.recv().await {
                    Some(MqttEvent::Publish(p)) if pred(&p) => return p,
                    Some(_) => {}
                    None => panic!("peer closed"),
                }
            }
        })
        .await
        .ok()
    }

    /// The next publish on a topic matching `pred`.
    async fn next(&mut self, pred: impl Fn(&Publish) -> bool) -> Publish {
        self.next_within(WAIT, pred)
            .await
            .expect("expected publish arrived")
    }

    /// Everything that arrives within `d`.
    async fn drain(&mut self, d: Duration) -> Vec<Publish> {
        let mut out: Vec<Publish> = self.stashed.drain(..).collect();
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

/// Provisions `id` in `groups`.
async fn provisioned(admin: &AdminClient, id: &str, groups: &[&str]) -> ProvisionedMachine {
    provisioned_with(admin, id, groups, false).await
}

/// Provisions `id` in `groups`, with `rotate` (a new secret for a machine that exists).
async fn provisioned_with(
    admin: &AdminClient,
    id: &str,
    groups: &[&str],
    rotate: bool,
) -> ProvisionedMachine {
    admin
        .call(calls::MachineProvision {
            machine: m(id),
            groups: groups.iter().map(|x| g(x)).collect(),
            rotate,
        })
        .await
        .unwrap()
}

/// Provisions `id` and connects it; returns once the platform has taken in its `online`
/// report, so the platform is listening to what it reports.
async fn provision(admin: &AdminClient, broker: &BrokerUrl, id: &str, groups: &[&str]) -> Machine {
    connected(admin, broker, provisioned(admin, id, groups).await).await
}

/// The provisioned machine `p`, connected; returns once the platform has taken in its `online`
/// report.
async fn connected(admin: &AdminClient, broker: &BrokerUrl, p: ProvisionedMachine) -> Machine {
    let ProvisionedMachine {
        machine: mid,
        secret,
        ..
    } = p;
    let id = mid.to_string();
    let id = id.as_str();
    let mut vm = Machine {
        peer: peer_with(broker, id, Some(&secret.mqtt_password())).await,
        id: mid,
        secret,
        ctr: 0,
    };
    vm.send_raw("online", b"true".to_vec()).await;
    poll_until(
        WAIT,
        &format!("{id} online"),
        || machines(admin),
        |ms| ms.iter().any(|x| x.id.as_str() == id && x.online),
    )
    .await;
    vm
}

impl Machine {
    /// The same machine connected again with `secret` (after a rotation), its counter kept.
    async fn reconnect(self, broker: &BrokerUrl, secret: Secret) -> Machine {
        let peer = peer_with(broker, self.id.as_str(), Some(&secret.mqtt_password())).await;
        Machine {
            peer,
            secret,
            ..self
        }
    }

    fn status(&mut self, release: Option<&ReleaseId>, version: &str, phase: Phase) -> StatusEvent {
        self.ctr += 1;
        StatusEvent {
            machine: self.id.clone(),
            ctr: self.ctr,
            at_ms: T0_MS + (self.ctr % 1_000_000) * 1000,
            release: release.cloned(),
            kind: app(),
            version: version.into(),
            phase,
            progress: None,
            attempt: 1,
            error: None,
            detail: None,
        }
    }

    /// Publishes on the machine's `channel` and waits for the broker's PUBACK.
    async fn send_raw(&mut self, channel: &str, payload: Vec<u8>) {
        let topic = format!("fleet/machines/{}/{channel}", self.id);
        self.peer.publish_acked(&topic, false, payload).await;
    }

    /// Sends a MAC'd status event.
    async fn send_status(&mut self, ev: &StatusEvent) {
        let sealed = self.secret.seal(Purpose::Status, ev);
        self.send_raw("status", sealed).await;
    }

    /// Reports `phase`; returns the event sent.
    async fn report(
        &mut self,
        release: Option<&ReleaseId>,
        version: &str,
        phase: Phase,
    ) -> StatusEvent {
        let ev = self.status(release, version, phase);
        self.send_status(&ev).await;
        ev
    }

    /// Waits for the platform's ack of every status event up to counter `ctr` (the machine
    /// subscribed to its `status/ack` topic before sending them).
    async fn acked_up_to(&mut self, ctr: u64) {
        let acks = format!("fleet/machines/{}/status/ack", self.id);
        loop {
            let p = self.peer.next(|p| p.topic == acks).await;
            let ack: fleetcast_proto::StatusAck =
                self.secret.open(Purpose::StatusAck, &p.payload).unwrap();
            if ack.ctr >= ctr {
                return;
            }
        }
    }

    /// Reports `phase` of `release` and waits until the platform shows it for this machine.
    async fn report_recorded(
        &mut self,
        admin: &AdminClient,
        release: &ReleaseId,
        version: &str,
        phase: Phase,
    ) -> ReleaseStatus {
        self.report(Some(release), version, phase).await;
        let me = self.id.to_string();
        wait_status(admin, release, |s| phase_of(s, &me) == phase).await
    }

    /// Publishes a MAC'd state claiming `groups` and, for kind `app`, the highest accepted `seq`.
    async fn report_state(&mut self, groups: &[&str], seq: u64) {
        let app_state = fleetcast_proto::status::KindState {
            seq,
            ..Default::default()
        };
        self.publish_state(groups, app_state).await;
    }

    /// Publishes a MAC'd state claiming `groups` with `app_state` for kind `app`, retained.
    async fn publish_state(
        &mut self,
        groups: &[&str],
        app_state: fleetcast_proto::status::KindState,
    ) {
        self.ctr += 1;
        let kinds = std::collections::BTreeMap::from([(app(), app_state)]);
        let st = fleetcast_proto::MachineState {
            machine: self.id.clone(),
            ctr: self.ctr,
            at_ms: T0_MS + (self.ctr % 1_000_000) * 1000,
            agent_version: "test".into(),
            groups: groups.iter().map(|x| g(x)).collect(),
            busy: false,
            kinds,
            key_gen: 0,
        };
        let topic = format!("fleet/machines/{}/state", self.id);
        let sealed = self.secret.seal(Purpose::State, &st);
        self.peer.publish_acked(&topic, true, sealed).await;
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
            manifest_parts: None,
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

/// Uploads the file at `path` as `kind` `version`.
async fn upload_file(
    admin: &AdminClient,
    path: &Path,
    kind: &Kind,
    version: &str,
    chunk_size: u32,
) -> Result<ArtifactInfo, AdminError> {
    admin
        .upload(
            path,
            kind.clone(),
            version.into(),
            None,
            chunk_size,
            |_, _| {},
        )
        .await
}

/// Writes `bytes` to `dir/name` and uploads them as app `version` in 1 KiB chunks.
async fn upload(
    admin: &AdminClient,
    dir: &Path,
    name: &str,
    bytes: &[u8],
    version: &str,
) -> Result<ArtifactInfo, AdminError> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    upload_file(admin, &path, &app(), version, 1024).await
}

async fn create_release(
    admin: &AdminClient,
    kind: &Kind,
    version: &str,
    policy: InstallPolicy,
) -> ReleaseInfo {
    admin
        .call(calls::ReleaseCreate {
            kind: kind.clone(),
            version: version.into(),
            policy,
            notes: None,
        })
        .await
        .unwrap()
}

async fn publish(
    admin: &AdminClient,
    release: &ReleaseId,
    machines: &[&str],
    groups: &[&str],
) -> PublishPlan {
    publish_with(admin, release, machines, groups, None).await
}

/// Publishes `release` at once, or with `waves` as a staged rollout: the plan (its first page of
/// targets).
async fn publish_with(
    admin: &AdminClient,
    release: &ReleaseId,
    machines: &[&str],
    groups: &[&str],
    waves: Option<fleetcast_proto::rollout::WavePlan>,
) -> PublishPlan {
    admin
        .call(calls::ReleasePublish {
            release: release.clone(),
            machines: machines.iter().map(|x| m(x)).collect(),
            groups: groups.iter().map(|x| g(x)).collect(),
            allow_empty: false,
            waves,
        })
        .await
        .unwrap()
        .plan
}

/// Creates an immediate app release of `version` and publishes it; the plan carries the
/// published release (with its seq).
async fn release(
    admin: &AdminClient,
    version: &str,
    machines: &[&str],
    groups: &[&str],
) -> PublishPlan {
    let created = create_release(admin, &app(), version, InstallPolicy::Immediate).await;
    publish(admin, &created.id, machines, groups).await
}

/// Rolls `target` back to `to` (or the previous version); the plan of the rollback release.
async fn rollback(
    admin: &AdminClient,
    target: Target,
    kind: &Kind,
    to: Option<&str>,
) -> PublishPlan {
    admin
        .call(calls::Rollback {
            target,
            kind: kind.clone(),
            to: to.map(Into::into),
            allow_empty: false,
        })
        .await
        .unwrap()
        .plan
}

/// The release's status with every target, joined from its pages (as the CLI does).
async fn status(admin: &AdminClient, release: &ReleaseId) -> ReleaseStatus {
    fleetcast_platform::cli::release::status_all(admin, release.clone(), None)
        .await
        .unwrap()
}

async fn machines(admin: &AdminClient) -> Vec<MachineInfo> {
    admin.call(calls::Machines {}).await.unwrap()
}

/// Every stored event, read in pages by event id as an integrator catching up reads them.
async fn all_events(admin: &AdminClient) -> Vec<FleetEvent> {
    let mut all = Vec::new();
    let mut since = 0;
    loop {
        let page = admin
            .call(calls::EventsSince { since, limit: None })
            .await
            .unwrap();
        all.extend(page.items);
        since = page.next;
        if !page.more {
            return all;
        }
    }
}

/// Revokes machine `id`.
async fn revoke(admin: &AdminClient, id: &str) {
    admin
        .call(calls::MachineRevoke { machine: m(id) })
        .await
        .unwrap();
}

/// Adds operator `name` with `role`; its profile carries its secret.
async fn add_operator(
    admin: &AdminClient,
    name: &str,
    role: fleetcast_proto::acl::Role,
) -> fleetcast_proto::admin::OperatorProfile {
    admin
        .call(calls::OperatorAdd {
            name: name.into(),
            role,
        })
        .await
        .unwrap()
}

/// The audit log's first page (up to 500 entries).
async fn audit(admin: &AdminClient) -> Vec<fleetcast_proto::admin::AuditEntry> {
    let page = admin
        .call(calls::Audit {
            since: 0,
            limit: None,
        })
        .await
        .unwrap();
    page.items
}

/// Polls release status until `pred` holds, for at most `within`.
async fn wait_status_within(
    admin: &AdminClient,
    release: &ReleaseId,
    within: Duration,
    pred: impl Fn(&ReleaseStatus) -> bool,
) -> ReleaseStatus {
    poll_until(
        within,
        &format!("status of {release}"),
        || status(admin, release),
        pred,
    )
    .await
}

/// Polls release status until `pred` holds.
async fn wait_status(
    admin: &AdminClient,
    release: &ReleaseId,
    pred: impl Fn(&ReleaseStatus) -> bool,
) -> ReleaseStatus {
    wait_status_within(admin, release, WAIT, pred).await
}

fn target<'a>(s: &'a ReleaseStatus, m: &str) -> &'a fleetcast_proto::admin::TargetRecord {
    s.targets
        .iter()
        .find(|t| t.machine.as_str() == m)
        .unwrap_or_else(|| panic!("{m} not a target"))
}

fn phase_of(s: &ReleaseStatus, m: &str) -> Phase {
    target(s, m).phase
}

/// Rollouts through real agents (the simulator) move real artifacts: allow more than `WAIT`.
const E2E_WAIT: Duration = Duration::from_secs(90);

/// `count` simulated machines (vm-001...) running app 1.0.0, provisioned with the platform in `data`.
fn simulated(
    data: &Path,
    sim: &Path,
    broker: &BrokerUrl,
    count: usize,
    groups: &[&str],
) -> fleetcast_device::simulate::SimulateOptions {
    fleetcast_device::simulate::SimulateOptions {
        count,
        groups: groups.iter().map(|x| g(x)).collect(),
        prefix: "vm-".into(),
        data_dir: sim.to_owned(),
        broker: broker.to_string(),
        machine_broker: broker.to_string(),
        topic_prefix: "fleet".into(),
        admin_secret: admin_secret(data),
        initial_versions: BTreeMap::from([(app(), "1.0.0".to_owned())]),
        start_index: 1,
        fail_health: vec![],
        ca_file: None,
        keep_alive_secs: None,
    }
}

/// Writes `size` bytes (see [`data`]) to `dir/name`.
fn artifact_file(dir: &Path, name: &str, size: usize, seed: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data(size, seed)).unwrap();
    path
}

/// Uploads `path` as app `version` in 64 KiB chunks.
async fn upload_app(admin: &AdminClient, path: &Path, version: &str) -> ArtifactInfo {
    upload_file(admin, path, &app(), version, 65536)
        .await
        .unwrap_or_else(|e| panic!("upload {version}: {e}"))
}

/// Polls until `release` has `expect_targets` targets, all in a final phase.
async fn until_finished(
    admin: &AdminClient,
    release: &ReleaseId,
    expect_targets: usize,
) -> ReleaseStatus {
    wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.len() == expect_targets && s.targets.iter().all(|t| t.phase.is_final())
    })
    .await
}

/// Waits until `count` machines are online and have reported their app version.
/// Moves `machine` from group shanghai to beijing in one command; the platform's answer.
async fn move_to_beijing(admin: &AdminClient, machine: &str) -> String {
    admin
        .call(calls::MachineGroups {
            machine: m(machine),
            add: vec![g("beijing")],
            remove: vec![g("shanghai")],
        })
        .await
        .unwrap()
}

/// Uploads app `version` (60 KB of `seed`), releases it to `group`, and waits until its
/// `targets` targets have installed it.
async fn installed_by_group(
    admin: &AdminClient,
    dir: &Path,
    (version, seed): (&str, u8),
    group: &str,
    targets: usize,
) {
    let file = artifact_file(dir, &format!("app-{version}.bin"), 60_000, seed);
    upload_app(admin, &file, version).await;
    let r = release(admin, version, &[], &[group]).await.release;
    wait_status_within(admin, &r.id, E2E_WAIT, |s| {
        s.targets.len() == targets && s.targets.iter().all(|t| t.phase == Phase::Installed)
    })
    .await;
}

async fn wait_online(admin: &AdminClient, count: usize) {
    poll_until(
        E2E_WAIT,
        "machines online",
        || machines(admin),
        |ms| {
            ms.iter()
                .filter(|x| x.online && x.kinds.contains_key(&app()))
                .count()
                >= count
        },
    )
    .await;
}

/// Simulated machines (the device crate's simulator), running until [`Sims::stop`].
#[derive(Default)]
struct Sims {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<Result<(), fleetcast_device::simulate::SimulateError>>>,
}

impl Sims {
    /// Starts the machines `opts` describes (see [`simulated`]).
    fn start(&mut self, opts: fleetcast_device::simulate::SimulateOptions) {
        let run = fleetcast_device::simulate::run(opts, self.stop.clone());
        self.tasks.push(tokio::spawn(run));
    }

    /// Stops every machine and waits for each simulator to end without error.
    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            joined(task, "simulator").await;
        }
    }
}

/// Writes `size` bytes (seeded with `seed`) to `dir/app-{version}.bin`, uploads them as app
/// `version` and creates a release of them with `policy` (not published). Returns the file and
/// the release.
async fn app_release(
    admin: &AdminClient,
    dir: &Path,
    version: &str,
    size: usize,
    seed: u8,
    policy: InstallPolicy,
) -> (PathBuf, ReleaseInfo) {
    let file = artifact_file(dir, &format!("app-{version}.bin"), size, seed);
    upload_app(admin, &file, version).await;
    (file, create_release(admin, &app(), version, policy).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_immutable_per_kind_and_version_and_empty_files_are_refused() {
    let broker = start_on_free_port(|s| s).unwrap();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&broker.url()).await;

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
        .call(calls::UploadBegin {
            kind: app(),
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
    let artifacts = admin.call(calls::ArtifactList {}).await.unwrap();
    assert_eq!(artifacts.len(), 1);
    let stored = std::fs::read(data_dir.join("artifacts").join(info.id.to_hex())).unwrap();
    assert_eq!(stored, bytes);
    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_reaches_groups_and_machines_serves_chunks_and_records_results() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let key = public_key(&data_dir);

    let bytes = data(5 * 1024 + 7, 3);
    let info = upload(&admin, dir.path(), "app.bin", &bytes, "2.4.1")
        .await
        .unwrap();
    let mut vm1 = provision(&admin, &url, "vm-001", &["shanghai"]).await;
    let _vm2 = provision(&admin, &url, "vm-002", &["shanghai"]).await;
    let _vm3 = provision(&admin, &url, "vm-003", &[]).await;
    let release = create_release(&admin, &app(), "2.4.1", InstallPolicy::Immediate).await;

    let unknown = admin
        .call(calls::ReleasePublish {
            release: release.id.clone(),
            machines: vec![m("vm-404")],
            groups: vec![],
            allow_empty: false,
            waves: None,
        })
        .await;
    assert!(
        matches!(&unknown, Err(AdminError::Refused(t)) if t.contains("vm-404")),
        "{unknown:?}"
    );

    let plan = admin
        .call(calls::ReleasePlan {
            release: release.id.clone(),
            machines: vec![m("vm-003"), m("vm-001")],
            groups: vec![g("shanghai")],
            allow_empty: false,
            after: None,
            limit: None,
        })
        .await
        .unwrap()
        .plan;
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
                Target::Group(g("shanghai"))
            ),
            (
                "fleet/machines/vm-001/release/app".to_string(),
                Target::Machine(m("vm-001"))
            ),
            (
                "fleet/machines/vm-003/release/app".to_string(),
                Target::Machine(m("vm-003"))
            ),
        ]
    );

    // Chunks: manifest first, then every chunk, verified. Frames come on the artifact's topic
    // (subscribed before asking); errors on the machine's own.
    vm1.peer.subscribe("fleet/machines/vm-001/chunks").await;
    vm1.peer
        .subscribe(&format!("fleet/artifacts/{}/chunks", info.id))
        .await;
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
    // MAC'd with vm1's secret, so no other client can make one (protocol.md §7.2).
    let frame = fleetcast_proto::chunk::open_error_frame(&vm1.secret, &p.payload)
        .expect("an error frame MAC'd for vm1");
    assert!(
        fleetcast_proto::chunk::open_error_frame(&Secret::from_bytes([9; 32]), &p.payload)
            .is_none()
    );
    let (h, reason) = decode_frame(frame).unwrap();
    assert_eq!((h.frame_type, h.artifact), (FrameType::Error, missing));
    assert_eq!(reason, b"unknown artifact");

    // Results with their times; events and progress for integrators.
    let mut events = peer(&url, "integrator").await;
    events.subscribe("fleet/events").await;
    events.subscribe("fleet/rollouts/+/progress").await;
    let notified = vm1
        .report(Some(&release.id), "2.4.1", Phase::Notified)
        .await;
    let mut downloading = vm1.status(Some(&release.id), "2.4.1", Phase::Downloading);
    downloading.progress = Some(Progress {
        bytes: 1024,
        total: info.size,
    });
    vm1.send_status(&downloading).await;
    vm1.report(Some(&release.id), "2.4.1", Phase::Downloaded)
        .await;
    vm1.report(Some(&release.id), "2.4.1", Phase::Installing)
        .await;
    let installed = vm1
        .report(Some(&release.id), "2.4.1", Phase::Installed)
        .await;
    let s = wait_status(&admin, &release.id, |s| {
        phase_of(s, "vm-001") == Phase::Installed
    })
    .await;
    let rec = target(&s, "vm-001");
    assert_eq!(rec.notified_at_ms, Some(notified.at_ms));
    let dl = rec.download.clone().unwrap();
    let up = rec.upgrade.clone().unwrap();
    assert!(dl.ok && up.ok && dl.at_ms < up.at_ms);
    assert_eq!(up.at_ms, installed.at_ms);
    assert_eq!(
        (phase_of(&s, "vm-002"), phase_of(&s, "vm-003")),
        (Phase::Pending, Phase::Pending)
    );
    assert_eq!(
        (s.progress.total, s.progress.succeeded, s.progress.finished),
        (3, 1, 1)
    );
    // The machine clock of the results (T0_MS + a few seconds), in UTC.
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
        // What integrators read is signed by the platform.
        if p.topic == "fleet/events" {
            fleet_events.push(
                key.verify::<FleetEvent>(Purpose::Event, &p.payload)
                    .unwrap(),
            );
        } else {
            last_progress = Some(
                key.verify::<RolloutProgress>(Purpose::Progress, &p.payload)
                    .unwrap(),
            );
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
    let Env {
        dir,
        data_dir,
        platform,
        admin: admin1,
    } = env(&url).await;
    upload(&admin1, dir.path(), "a.bin", &data(2000, 5), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin1, &url, "vm-001", &["g"]).await;
    let release = release(&admin1, "1.0", &[], &["g"]).await.release;
    vm.report_recorded(&admin1, &release.id, "1.0", Phase::Downloaded)
        .await;
    admin1.close().await;

    let mut observer = peer(&url, "observer").await;
    observer.subscribe("fleet/groups/g/release/app").await;
    observer.next(|_| true).await; // the retained notice
    platform.stop().await;

    // Reported while the platform is down (the broker acknowledged it): the persistent ingest
    // session keeps it.
    vm.report(Some(&release.id), "1.0", Phase::Installing).await;

    let platform = start_platform(&url, &data_dir);
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
    vm.report_recorded(&admin2, &release.id, "1.0", Phase::Installed)
        .await;
    admin2.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_unknown_replayed_malformed_and_oversized_reports_change_nothing() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    upload(&admin, dir.path(), "a.bin", &data(2000, 7), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let release = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    let mut events = peer(&url, "integrator").await;
    events.subscribe("fleet/events").await;

    vm.report(Some(&release.id), "1.0", Phase::Downloading)
        .await;
    let replay = vm.status(Some(&release.id), "1.0", Phase::Installed);
    vm.ctr -= 1; // the next message re-uses this counter
    let genuine = vm.status(Some(&release.id), "1.0", Phase::Installed);
    assert_eq!(genuine.ctr, replay.ctr);
    vm.send_status(&genuine).await;
    wait_status(&admin, &release.id, |s| {
        phase_of(s, "vm-001") == Phase::Installed
    })
    .await;

    // Every bad report below is acknowledged by the broker before the next is sent, and the
    // platform takes them in that order: once the valid report after them is applied, all of
    // them were seen.
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
    vm.send_status(&replayed).await;
    // Signed for another purpose.
    let wrong_purpose = vm.secret.seal(Purpose::State, &bad);
    vm.send_raw("status", wrong_purpose).await;
    // Malformed and oversized.
    vm.send_raw("status", b"{not json".to_vec()).await;
    vm.send_raw("status", vec![b'x'; 300 * 1024]).await;
    // Body names another machine.
    let mut other = bad.clone();
    other.machine = m("vm-002");
    vm.send_status(&other).await;
    // Unknown machine.
    let mut ghost = peer(&url, "vm-999").await;
    let mut ghost_ev = bad.clone();
    ghost_ev.machine = m("vm-999");
    ghost
        .publish_acked(
            "fleet/machines/vm-999/status",
            false,
            vm.secret.seal(Purpose::Status, &ghost_ev),
        )
        .await;
    // A bad online payload.
    vm.send_raw("online", b"maybe".to_vec()).await;

    // Still working: a valid report after all that is applied.
    let mut ok = vm.status(Some(&release.id), "1.0", Phase::Downloading);
    ok.attempt = 2;
    vm.send_status(&ok).await;
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
            public_key(&data_dir)
                .verify::<FleetEvent>(Purpose::Event, &p.payload)
                .unwrap()
                .phase
        })
        .collect();
    assert_eq!(
        got,
        vec![Phase::Downloading, Phase::Installed, Phase::Downloading],
        "only genuine reports became events"
    );
    // The genuinely MAC'd event with a stored counter was acknowledged again and counted as
    // received again; the others as dropped.
    let stats = admin.call(calls::Stats {}).await.unwrap();
    assert_eq!(stats.status_events_resent, 1, "{stats:?}");
    assert!(stats.reports_dropped >= 5, "{stats:?}");
    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_a_signed_rollback_notice_for_the_previous_version() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    upload(&admin, dir.path(), "a1.bin", &data(1500, 1), "1.0")
        .await
        .unwrap();
    upload(&admin, dir.path(), "a2.bin", &data(1500, 2), "2.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r1 = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    vm.report_recorded(&admin, &r1.id, "1.0", Phase::Installed)
        .await;
    let r2 = release(&admin, "2.0", &["vm-001"], &[]).await.release;
    vm.report_recorded(&admin, &r2.id, "2.0", Phase::Installed)
        .await;

    let plan = rollback(&admin, Target::Machine(m("vm-001")), &app(), None).await;
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
        .call(calls::Rollback {
            target: Target::Group(g("nobody")),
            kind: app(),
            to: Some("9.9".into()),
            allow_empty: false,
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
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    let info = upload(&admin, dir.path(), "a.bin", &data(4096, 1), "1.0")
        .await
        .unwrap();
    let mut a = provision(&admin, &url, "vm-a", &[]).await;
    let mut b = provision(&admin, &url, "vm-b", &[]).await;
    // Chunks are served only for artifacts of releases that target the machine.
    release(&admin, "1.0", &["vm-a", "vm-b"], &[]).await;
    let topic = format!("fleet/artifacts/{}/chunks", info.id);
    b.peer.subscribe(&topic).await;
    // Whichever request the platform takes second finds two machines fetching, and that one
    // is answered on the broadcast topic.
    a.request_chunks(info.id, false, vec![(0, 4)]).await;
    b.request_chunks(info.id, false, vec![(0, 4)]).await;
    let p = b.peer.next(|p| p.topic == topic).await;
    let (h, _) = decode_frame(&p.payload).unwrap();
    assert_eq!((h.frame_type, h.artifact), (FrameType::Chunk, info.id));
    admin.close().await;
    platform.stop().await;
}
