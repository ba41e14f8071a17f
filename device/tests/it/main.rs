//! Device integration tests: a real rumqttd on a free loopback port, a real agent, and the
//! platform's side of the protocol played here with proto types only.

mod config;
mod faults;
mod package;
mod real;
mod sale_lock;
mod status;
mod trust;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetcast_broker::client::{self, BrokerUrl, MqttEvent};
use fleetcast_broker::embedded::start_on_free_port;
use fleetcast_device::store::OutboxEntry;
use fleetcast_device::{AgentOptions, MachineConfig, StateRepeats};
use fleetcast_proto::auth::{PlatformKey, PlatformPublicKey, Purpose, Secret};
use fleetcast_proto::chunk::{
    encode_frame, ChunkRequest, FrameHeader, FrameType, Layout, ManifestBuilder,
};
use fleetcast_proto::command::{Command, CommandAction};
use fleetcast_proto::release::ArtifactRef;
use fleetcast_proto::status::status_envelopes;
use fleetcast_proto::{
    ArtifactId, InstallPolicy, Kind, MachineId, MachineState, Phase, ReleaseId, ReleaseNotice,
    Route, StatusAck, StatusEvent, Target, Topics,
};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CHUNK: u32 = 16 * 1024;

struct Artifact {
    bytes: Vec<u8>,
    layout: Layout,
    manifest: Vec<u8>,
    id: ArtifactId,
}

impl Artifact {
    fn new(len: usize, seed: u8) -> Self {
        let bytes: Vec<u8> = (0..len)
            .map(|i| ((i * 7 + seed as usize * 13) % 251) as u8 ^ seed)
            .collect();
        let layout = Layout::new(len as u64, CHUNK).unwrap();
        let mut mb = ManifestBuilder::new(layout);
        for i in 0..layout.chunks {
            let s = layout.offset(i) as usize;
            mb.push_chunk(&bytes[s..s + layout.chunk_len(i)]);
        }
        Self {
            id: ArtifactId::of(&bytes),
            manifest: mb.finish(),
            bytes,
            layout,
        }
    }
    fn reference(&self) -> ArtifactRef {
        ArtifactRef {
            id: self.id,
            size: self.layout.size,
            chunk_size: CHUNK,
            name: "app.bin".into(),
        }
    }
}

/// What the fake platform's chunk server does.
#[derive(Default)]
struct ServeControl {
    /// Chunk indices requested, in order.
    requested: Mutex<Vec<u32>>,
    /// Every chunk request: whether it asked for the manifest, and its chunk indices.
    requests: Mutex<Vec<(bool, Vec<u32>)>>,
    /// Chunk indices served, in order.
    served: Mutex<Vec<u32>>,
    /// Serve at most this many chunks (u32::MAX: all).
    limit: AtomicU32,
    /// Corrupt this chunk index the first time it is served (u32::MAX: none).
    corrupt_once: AtomicU32,
    /// Corrupt this many manifests (a bad part the chunk CVs do not merge to the id).
    corrupt_manifests: AtomicU32,
    /// Receive status events but do not acknowledge them (a platform that has not stored them).
    hold_acks: AtomicBool,
    /// Status messages received (a batch counts once).
    status_messages: AtomicUsize,
}

struct Platform {
    key: PlatformKey,
    /// The machine's secret: status acks are MAC'd with it.
    secret: Secret,
    topics: Topics,
    client: AsyncClient,
    statuses: mpsc::UnboundedReceiver<StatusEvent>,
    /// The machine's latest state message.
    state: Arc<Mutex<Option<MachineState>>>,
    control: Arc<ServeControl>,
    artifacts: Arc<Mutex<HashMap<ArtifactId, Arc<Artifact>>>>,
    stop: CancellationToken,
    seq: u64,
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn machine() -> MachineId {
    MachineId::new("vm-001").unwrap()
}

fn app() -> Kind {
    Kind::new("app").unwrap()
}

async fn platform(url: &BrokerUrl, secret: Secret) -> Platform {
    platform_with_key(url, secret, rand::random()).await
}

/// An MQTT client as `id`, connected (CONNACK received); cancel the token to stop it.
async fn connect_peer(
    url: &BrokerUrl,
    id: &str,
) -> (AsyncClient, mpsc::Receiver<MqttEvent>, CancellationToken) {
    let stop = CancellationToken::new();
    let (client, el) = client::connect(client::options(url, id, None), 4096);
    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(client::drive(el, tx, stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(MqttEvent::Connected { .. })) => break,
            Ok(Some(_)) => {}
            other => panic!("{id} did not connect: {other:?}"),
        }
    }
    (client, rx, stop)
}

/// Subscribes to `filters` and waits until the broker confirmed every one (SUBACK).
async fn subscribe_all(
    client: &AsyncClient,
    rx: &mut mpsc::Receiver<MqttEvent>,
    filters: &[(String, QoS)],
) {
    for (filter, qos) in filters {
        client.subscribe(filter, *qos).await.unwrap();
    }
    let mut acked = 0;
    while acked < filters.len() {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(MqttEvent::SubAck(_))) => acked += 1,
            Ok(Some(_)) => {}
            other => panic!("no SUBACK for {filters:?}: {other:?}"),
        }
    }
}

/// Polls `done` every 20 ms; fails with `what` if it does not hold within `within`.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {}",
            what()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fake platform, signing with the key from `seed`. Like the real one, it acknowledges every
/// status event it receives with a `StatusAck` MAC'd with the machine's secret, so the
/// machine's outbox moves on.
async fn platform_with_key(url: &BrokerUrl, secret: Secret, seed: [u8; 32]) -> Platform {
    let (client, mut rx, stop) = connect_peer(url, "platform-test").await;
    let topics = Topics::default();
    subscribe_all(
        &client,
        &mut rx,
        &[
            (topics.platform_status_filter(), QoS::AtLeastOnce),
            (topics.platform_chunk_request_filter(), QoS::AtMostOnce),
            (topics.platform_state_filter(), QoS::AtMostOnce),
        ],
    )
    .await;
    let control = Arc::new(ServeControl::default());
    control.limit.store(u32::MAX, Ordering::SeqCst);
    control.corrupt_once.store(u32::MAX, Ordering::SeqCst);
    let artifacts: Arc<Mutex<HashMap<ArtifactId, Arc<Artifact>>>> = Arc::default();
    let (status_tx, statuses) = mpsc::unbounded_channel();
    let (c, t, ctl, arts) = (
        client.clone(),
        topics.clone(),
        control.clone(),
        artifacts.clone(),
    );
    let state: Arc<Mutex<Option<MachineState>>> = Arc::default();
    let (secret_task, state_task) = (secret.clone(), state.clone());
    let mut seen_ctrs = std::collections::HashSet::new();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let MqttEvent::Publish(p) = ev else { continue };
            match t.parse(&p.topic) {
                Some(Route::Status(m)) => {
                    // One event, or a batch of them (the agent's backlog).
                    let events: Vec<StatusEvent> = status_envelopes(&p.payload)
                        .expect("a status message")
                        .iter()
                        .map(|env| {
                            secret_task
                                .open_envelope(Purpose::Status, env)
                                .expect("status MAC verifies")
                        })
                        .collect();
                    ctl.status_messages.fetch_add(1, Ordering::SeqCst);
                    // The ack goes out before the test sees the events: a test that holds acks
                    // once it has seen an event holds only later ones.
                    if !ctl.hold_acks.load(Ordering::SeqCst) {
                        let ack = StatusAck {
                            machine: m.clone(),
                            ctr: events.last().expect("at least one").ctr,
                        };
                        let _ = c.try_publish(
                            t.status_ack(&m),
                            QoS::AtMostOnce,
                            false,
                            secret_task.seal(Purpose::StatusAck, &ack),
                        );
                    }
                    for ev in events {
                        if seen_ctrs.insert(ev.ctr) {
                            let _ = status_tx.send(ev);
                        }
                    }
                }
                Some(Route::ChunkRequest(m)) => {
                    let req: ChunkRequest = secret_task
                        .open(Purpose::ChunkRequest, &p.payload)
                        .expect("request MAC verifies");
                    ctl.requests
                        .lock()
                        .unwrap()
                        .push((req.manifest, req.indices().collect()));
                    let art = arts.lock().unwrap().get(&req.artifact).cloned();
                    let Some(art) = art else {
                        let h = FrameHeader {
                            frame_type: FrameType::Error,
                            artifact: req.artifact,
                            index: 0,
                            total: 0,
                        };
                        let _ = c.try_publish(
                            t.machine_chunks(&m),
                            QoS::AtMostOnce,
                            false,
                            fleetcast_proto::chunk::encode_error_frame(
                                &secret_task,
                                &h,
                                b"unknown artifact",
                            ),
                        );
                        continue;
                    };
                    let mut out = Vec::new();
                    if req.manifest {
                        let parts = art.layout.manifest_parts();
                        for part in 0..parts {
                            let h = FrameHeader {
                                frame_type: FrameType::Manifest,
                                artifact: art.id,
                                index: part,
                                total: parts,
                            };
                            let mut bytes =
                                art.manifest[art.layout.manifest_part_range(part)].to_vec();
                            if ctl
                                .corrupt_manifests
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok()
                            {
                                bytes[0] ^= 0xff;
                            }
                            out.push(encode_frame(&h, &bytes));
                        }
                    }
                    for i in req.indices() {
                        ctl.requested.lock().unwrap().push(i);
                        {
                            let mut served = ctl.served.lock().unwrap();
                            if served.len() as u32 >= ctl.limit.load(Ordering::SeqCst) {
                                continue;
                            }
                            served.push(i);
                        }
                        let s = art.layout.offset(i) as usize;
                        let mut data = art.bytes[s..s + art.layout.chunk_len(i)].to_vec();
                        if ctl
                            .corrupt_once
                            .compare_exchange(i, u32::MAX, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                        {
                            data[0] ^= 0xff;
                        }
                        let h = FrameHeader {
                            frame_type: FrameType::Chunk,
                            artifact: art.id,
                            index: i,
                            total: art.layout.chunks,
                        };
                        out.push(encode_frame(&h, &data));
                    }
                    for frame in out {
                        c.publish(t.machine_chunks(&m), QoS::AtMostOnce, false, frame)
                            .await
                            .unwrap();
                    }
                }
                Some(Route::State(_)) => {
                    let st: MachineState = secret_task
                        .open(Purpose::State, &p.payload)
                        .expect("state MAC verifies");
                    *state_task.lock().unwrap() = Some(st);
                }
                _ => {}
            }
        }
    });
    Platform {
        key: PlatformKey::from_seed(seed),
        secret,
        topics,
        client,
        statuses,
        state,
        control,
        artifacts,
        stop,
        seq: 0,
    }
}

impl Platform {
    fn add(&self, art: Artifact) -> Arc<Artifact> {
        let art = Arc::new(art);
        self.artifacts.lock().unwrap().insert(art.id, art.clone());
        art
    }

    fn notice(
        &mut self,
        release: &str,
        version: &str,
        art: &Artifact,
        policy: InstallPolicy,
    ) -> ReleaseNotice {
        self.seq += 1;
        ReleaseNotice {
            release: ReleaseId::new(release).unwrap(),
            seq: self.seq,
            target: Target::Machine(machine()),
            kind: app(),
            version: version.into(),
            artifact: art.reference(),
            policy,
            rollback: false,
            issued_at_ms: 0,
        }
    }

    /// Publishes `notice` signed with `key`, retained, on its target's release topic.
    async fn publish_signed(&self, notice: &ReleaseNotice, key: &PlatformKey) {
        let topic = match &notice.target {
            Target::Machine(m) => self.topics.machine_release(m, &notice.kind),
            Target::Group(g) => self.topics.group_release(g, &notice.kind),
        };
        let payload = key.sign(Purpose::Release, notice);
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
    }

    async fn publish(&self, notice: &ReleaseNotice) {
        self.publish_signed(notice, &self.key).await;
    }

    /// A new notice for this machine, published.
    async fn announce(
        &mut self,
        release: &str,
        version: &str,
        art: &Artifact,
        policy: InstallPolicy,
    ) -> ReleaseNotice {
        let n = self.notice(release, version, art, policy);
        self.publish(&n).await;
        n
    }

    /// Publishes a probe notice with `seq` and asserts that the machine reported nothing for
    /// `ignored` (published before it) by the time it reports the probe as notified.
    async fn assert_ignored(&mut self, ignored: &str, art: &Artifact, seq: u64) {
        let probe = ReleaseNotice {
            seq,
            ..self.notice("r-probe", "9.0.0", art, InstallPolicy::Immediate)
        };
        self.publish(&probe).await;
        let seen = self.wait_for("r-probe", Phase::Notified).await;
        assert!(
            seen.iter()
                .all(|e| e.release.as_ref().map(|r| r.as_str()) != Some(ignored)),
            "{ignored} produced a status: {seen:?}"
        );
    }

    /// Asserts that the machine reports nothing for `quiet`.
    async fn assert_quiet(&mut self, quiet: Duration, why: &str) {
        let got = tokio::time::timeout(quiet, self.statuses.recv()).await;
        assert!(got.is_err(), "{why}: {got:?}");
    }

    async fn command(&mut self, action: CommandAction) {
        self.seq += 1;
        let cmd = Command {
            machine: machine(),
            seq: self.seq,
            issued_at_ms: 0,
            action,
        };
        let payload = self.key.sign(Purpose::Command, &cmd);
        self.client
            .publish(
                self.topics.command(&machine()),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    /// Acknowledges every status event up to `ctr` (the platform stored them).
    fn ack(&self, ctr: u64) {
        self.ack_as(ctr, &self.secret.clone());
    }

    /// An ack for the machine up to `ctr`, MAC'd with `secret` (another machine's: a forgery).
    fn ack_as(&self, ctr: u64, secret: &Secret) {
        let ack = StatusAck {
            machine: machine(),
            ctr,
        };
        self.client
            .try_publish(
                self.topics.status_ack(&machine()),
                QoS::AtMostOnce,
                false,
                secret.seal(Purpose::StatusAck, &ack),
            )
            .unwrap();
    }

    /// Status events up to and including the first of `release` that is `until`.
    async fn wait_for(&mut self, release: &str, until: Phase) -> Vec<StatusEvent> {
        self.statuses_until(release, &until.to_string(), |e| e.phase == until)
            .await
    }

    /// Status events up to and including the first final phase of `release`.
    async fn wait_final(&mut self, release: &str) -> Vec<StatusEvent> {
        self.statuses_until(release, "final phase", |e| e.phase.is_final())
            .await
    }

    /// Status events up to and including the first of `release` for which `last` holds.
    async fn statuses_until(
        &mut self,
        release: &str,
        what: &str,
        last: impl Fn(&StatusEvent) -> bool,
    ) -> Vec<StatusEvent> {
        self.events_until(&format!("{what} for {release}"), |e| {
            e.release.as_ref().is_some_and(|r| r.as_str() == release) && last(e)
        })
        .await
    }

    /// Status events up to and including the first for which `last` holds.
    async fn events_until(
        &mut self,
        what: &str,
        last: impl Fn(&StatusEvent) -> bool,
    ) -> Vec<StatusEvent> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.statuses.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} within 30 s; saw {seen:?}"))
                .expect("status channel open");
            let done = last(&ev);
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }

    /// Waits until the chunk server has seen at least `n` chunk requests.
    async fn wait_requested(&self, n: usize) {
        eventually(
            Duration::from_secs(20),
            || self.control.requested.lock().unwrap().len() >= n,
            || format!("{n} chunk requests"),
        )
        .await;
    }
}

fn phases(events: &[StatusEvent]) -> Vec<Phase> {
    let mut out: Vec<Phase> = Vec::new();
    for e in events {
        if out.last() != Some(&e.phase) {
            out.push(e.phase);
        }
    }
    out
}

struct Machine {
    config: MachineConfig,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// vm-001 with app 1.0.0, trusting `key`, its data in `dir`.
fn config(url: &BrokerUrl, key: &PlatformPublicKey, secret: &Secret, dir: &Path) -> MachineConfig {
    let text = format!(
        "machine = \"vm-001\"\nsecret = \"{}\"\nplatform_key = \"{}\"\nbroker = \"{url}\"\ndata_dir = {:?}\n[initial_versions]\napp = \"1.0.0\"\n",
        secret.to_hex(),
        key.to_hex(),
        dir.display().to_string()
    );
    let path = dir.join("machine.toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&path, text).unwrap();
    MachineConfig::load(&path).unwrap()
}

fn start(config: MachineConfig, options: AgentOptions) -> Machine {
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        fleetcast_device::run_with(config.clone(), options, stop.clone()).then_unwrap(),
    );
    Machine { config, stop, task }
}

trait ThenUnwrap {
    fn then_unwrap(self) -> impl std::future::Future<Output = ()> + Send;
}
impl<F: std::future::Future<Output = Result<(), fleetcast_device::AgentError>> + Send> ThenUnwrap
    for F
{
    async fn then_unwrap(self) {
        self.await.expect("agent runs cleanly");
    }
}

impl Machine {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("agent stops within 10 s")
            .unwrap();
    }
    fn slot_root(&self) -> PathBuf {
        self.config.data_dir.join("slots/app")
    }

    /// The bytes in the active slot.
    fn installed(&self) -> Vec<u8> {
        std::fs::read(self.slot_root().join("current/artifact")).unwrap()
    }

    /// The version in the active slot.
    fn installed_version(&self) -> String {
        std::fs::read_to_string(self.slot_root().join("current/version")).unwrap()
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    url: BrokerUrl,
    secret: Secret,
    platform: Platform,
    machine_dir: PathBuf,
}

async fn setup() -> Setup {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let secret = Secret::from_bytes(rand::random());
    let platform = platform(&url, secret.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let machine_dir = dir.path().join("vm-001");
    Setup {
        _dir: dir,
        url,
        secret,
        platform,
        machine_dir,
    }
}

impl Setup {
    fn config(&self) -> MachineConfig {
        config(
            &self.url,
            &self.platform.key.public(),
            &self.secret,
            &self.machine_dir,
        )
    }

    fn machine(&self, options: AgentOptions) -> Machine {
        start(self.config(), options)
    }
}

/// One download attempt that re-requests chunks after `stall`.
fn one_attempt(stall: Duration) -> AgentOptions {
    AgentOptions {
        tuning: fleetcast_device::download::Tuning {
            attempts: 1,
            stall,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A state is a retained QoS 0 message that a broker may drop before the platform reads it
/// (rumqttd drops the oldest part of a full log): the agent sends it again, unchanged but with
/// a fresh counter, soon after it connects and then now and then.
#[tokio::test]
async fn the_state_is_sent_again_without_a_change_so_a_dropped_one_heals() {
    let s = setup().await;
    let ms = Duration::from_millis;
    let m = s.machine(AgentOptions {
        state_repeats: StateRepeats {
            first: (ms(300), ms(400)),
            every: (ms(700), ms(800)),
        },
        ..Default::default()
    });
    let ctr = || s.platform.state.lock().unwrap().as_ref().map(|st| st.ctr);
    eventually(
        Duration::from_secs(10),
        || ctr().is_some(),
        || "no state".into(),
    )
    .await;
    let first = ctr().unwrap();
    let first_state = s.platform.state.lock().unwrap().clone().unwrap();
    let started = tokio::time::Instant::now();
    let mut seen = vec![first];
    while seen.len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "states seen without a change: {seen:?}"
        );
        let now = ctr().unwrap();
        if now != *seen.last().unwrap() {
            assert!(
                now > *seen.last().unwrap(),
                "a repeat reuses a counter: {seen:?}, {now}"
            );
            seen.push(now);
        }
        tokio::time::sleep(ms(20)).await;
    }
    // Three repeats: one after ~0.35 s, then one every ~0.75 s (ticks are a second apart, so
    // each waits for the next tick).
    assert!(
        started.elapsed() >= ms(1000),
        "repeats came faster than asked: {:?}",
        started.elapsed()
    );
    let last = s.platform.state.lock().unwrap().clone().unwrap();
    assert_eq!(
        (last.groups, last.kinds, last.busy, last.key_gen),
        (
            first_state.groups,
            first_state.kinds,
            first_state.busy,
            first_state.key_gen
        ),
        "a repeat says what the first said"
    );
    m.stop().await;
}

#[tokio::test]
async fn status_stays_in_the_outbox_until_the_platform_acknowledges_it() {
    let mut s = setup().await;
    s.platform.control.hold_acks.store(true, Ordering::SeqCst);
    let m = s.machine(AgentOptions::default());
    let art = s.platform.add(Artifact::new(100 * 1024, 3));
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    let first = tokio::time::timeout(Duration::from_secs(10), s.platform.statuses.recv())
        .await
        .expect("the first status arrives")
        .unwrap();
    assert_eq!(first.phase, Phase::Notified);
    // The broker acknowledged it, the platform did not: the machine sends nothing newer, and
    // keeps it on disk.
    s.platform
        .assert_quiet(
            Duration::from_millis(1500),
            "a newer status was sent before the platform acknowledged the first",
        )
        .await;
    let outbox: Vec<OutboxEntry> =
        serde_json::from_slice(&std::fs::read(s.machine_dir.join("outbox.json")).unwrap()).unwrap();
    assert!(
        outbox.iter().any(|e| e.ctr == first.ctr),
        "the unacknowledged status left the outbox: {outbox:?}"
    );
    // Acks MAC'd with another machine's secret, or signed with the platform's key instead of
    // MAC'd, move nothing: only the platform and this machine hold its secret.
    s.platform
        .ack_as(first.ctr, &Secret::from_bytes(rand::random()));
    s.platform
        .client
        .try_publish(
            s.platform.topics.status_ack(&machine()),
            QoS::AtMostOnce,
            false,
            s.platform.key.sign(
                Purpose::StatusAck,
                &StatusAck {
                    machine: machine(),
                    ctr: first.ctr,
                },
            ),
        )
        .unwrap();
    s.platform
        .assert_quiet(
            Duration::from_millis(1500),
            "a forged ack moved the outbox on",
        )
        .await;
    // The machine goes on meanwhile: its events wait in the outbox.
    let read_outbox = || -> Vec<OutboxEntry> {
        serde_json::from_slice(&std::fs::read(s.machine_dir.join("outbox.json")).unwrap()).unwrap()
    };
    let t0 = Instant::now();
    while read_outbox().len() < 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the install did not finish: {:?}",
            read_outbox()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once the platform acknowledges, the rest follows in order, as one batch.
    let before = s.platform.control.status_messages.load(Ordering::SeqCst);
    s.platform.control.hold_acks.store(false, Ordering::SeqCst);
    s.platform.ack(first.ctr);
    let rest = s.platform.wait_for("r-1", Phase::Installed).await;
    assert_eq!(rest.first().map(|e| e.phase), Some(Phase::Downloading));
    assert!(rest.iter().all(|e| e.ctr > first.ctr));
    assert!(rest.windows(2).all(|w| w[0].ctr < w[1].ctr), "in order");
    let messages = s.platform.control.status_messages.load(Ordering::SeqCst) - before;
    assert_eq!(messages, 1, "{} events in {messages} messages", rest.len());
    m.stop().await;
}

#[tokio::test]
async fn an_immediate_release_downloads_installs_into_a_slot_and_reports_every_phase() {
    let mut s = setup().await;
    let m = s.machine(AgentOptions::default());
    let art = s.platform.add(Artifact::new(300 * 1024 + 5, 1));
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    let seen = s.platform.wait_for("r-1", Phase::Installed).await;
    assert_eq!(
        phases(&seen),
        vec![
            Phase::Notified,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Installing,
            Phase::Installed
        ]
    );
    let downloading = seen
        .iter()
        .filter(|e| e.phase == Phase::Downloading)
        .count();
    assert!(
        (1..=12).contains(&downloading),
        "progress roughly every 10 %, not per chunk: {downloading}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].ctr < w[1].ctr),
        "ctr strictly increases"
    );
    assert_eq!(m.installed(), art.bytes);
    assert_eq!(m.installed_version(), "1.1.0");
    m.stop().await;
}

#[tokio::test]
async fn a_fresh_download_of_one_window_needs_one_request_for_the_manifest_and_its_chunks() {
    let mut s = setup().await;
    // No re-request within the test: every request is the agent's first choice.
    let m = s.machine(one_attempt(Duration::from_secs(60)));
    let art = s.platform.add(Artifact::new(200 * 1024, 11));
    assert!(art.layout.chunks > 1 && art.layout.chunks <= 16);
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-1", Phase::Installed).await;
    assert_eq!(
        *s.platform.control.requests.lock().unwrap(),
        [(true, (0..art.layout.chunks).collect::<Vec<_>>())]
    );
    assert_eq!(m.installed(), art.bytes);
    m.stop().await;
}

/// A one-attempt agent asked to install release r-1 (a 200 KiB artifact) that has asked for
/// chunks the platform holds back (so it is subscribed to the broadcast topic by now), and the
/// header of an error frame for that artifact.
async fn a_download_held_back(s: &mut Setup) -> (Machine, Arc<Artifact>, FrameHeader) {
    s.platform.control.limit.store(0, Ordering::SeqCst);
    let m = s.machine(one_attempt(Duration::from_millis(200)));
    let art = s.platform.add(Artifact::new(200 * 1024, 3));
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    s.platform.wait_requested(1).await;
    let error = FrameHeader {
        frame_type: FrameType::Error,
        artifact: art.id,
        index: 0,
        total: 0,
    };
    (m, art, error)
}

#[tokio::test]
async fn an_error_frame_on_the_broadcast_topic_does_not_end_the_download() {
    let mut s = setup().await;
    let (m, art, error) = a_download_held_back(&mut s).await;
    // Anyone can publish there; the protocol gives error frames meaning only on the
    // machine's own chunk topic. A real chunk after it on the same topic proves the error
    // frame was delivered first.
    let broadcast = s.platform.topics.artifact_chunks(&art.id);
    let chunk = FrameHeader {
        frame_type: FrameType::Chunk,
        artifact: art.id,
        index: 0,
        total: art.layout.chunks,
    };
    for frame in [
        encode_frame(&error, b"unknown artifact"),
        encode_frame(&chunk, &art.bytes[..CHUNK as usize]),
    ] {
        s.platform
            .client
            .publish(broadcast.clone(), QoS::AtMostOnce, false, frame)
            .await
            .unwrap();
    }
    s.platform.control.limit.store(u32::MAX, Ordering::SeqCst);
    let seen = s.platform.wait_final("r-1").await;
    assert_eq!(
        seen.last().unwrap().phase,
        Phase::Installed,
        "{:?}",
        seen.last()
    );
    m.stop().await;
}

/// An error frame ends the attempt it answers, so on the machine's own topic only one MAC'd
/// with the machine's secret counts. Found by a docs-only agent author: on a broker without
/// ACLs five forged error frames there failed a download for good. A forged one (no MAC,
/// another secret's MAC) is dropped and the download installs; the platform's own (MAC'd)
/// still ends a one-attempt download as failed, with its reason.
#[tokio::test]
async fn only_an_error_frame_macd_for_the_machine_ends_its_download() {
    let mut s = setup().await;
    let (m, _art, error) = a_download_held_back(&mut s).await;
    let own = s.platform.topics.machine_chunks(&m.config.machine);
    let other = fleetcast_proto::auth::Secret::from_bytes([9; 32]);
    for frame in [
        encode_frame(&error, b"unknown artifact"),
        fleetcast_proto::chunk::encode_error_frame(&other, &error, b"unknown artifact"),
    ] {
        s.platform
            .client
            .publish(own.clone(), QoS::AtMostOnce, false, frame)
            .await
            .unwrap();
    }
    s.platform.control.limit.store(u32::MAX, Ordering::SeqCst);
    let seen = s.platform.wait_final("r-1").await;
    assert_eq!(seen.last().unwrap().phase, Phase::Installed, "{seen:?}");

    // The platform's own error frame ends the attempt.
    let art2 = s.platform.add(Artifact::new(200 * 1024, 4));
    s.platform.control.limit.store(0, Ordering::SeqCst);
    s.platform
        .announce("r-2", "1.2.0", &art2, InstallPolicy::Immediate)
        .await;
    s.platform.wait_requested(2).await;
    let genuine = FrameHeader {
        artifact: art2.id,
        ..error
    };
    s.platform
        .client
        .publish(
            own.clone(),
            QoS::AtMostOnce,
            false,
            fleetcast_proto::chunk::encode_error_frame(
                &m.config.secret,
                &genuine,
                b"unknown artifact",
            ),
        )
        .await
        .unwrap();
    let seen = s.platform.wait_final("r-2").await;
    let last = seen.last().unwrap();
    assert_eq!(last.phase, Phase::DownloadFailed, "{last:?}");
    assert!(
        last.error
            .as_deref()
            .is_some_and(|e| e.contains("unknown artifact")),
        "{last:?}"
    );
    m.stop().await;
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn a_superseded_download_leaves_no_staging_files_behind() {
    let mut s = setup().await;
    let old = s.platform.add(Artifact::new(1024 * 1024, 4));
    let new = s.platform.add(Artifact::new(100 * 1024, 5));
    s.platform.control.limit.store(3, Ordering::SeqCst);
    let m = s.machine(AgentOptions::default());
    s.platform
        .announce("r-1", "1.1.0", &old, InstallPolicy::Immediate)
        .await;
    s.platform.wait_requested(1).await;
    let staging = m.config.data_dir.join("staging");
    assert!(
        file_names(&staging).contains(&format!("{}.part", old.id.to_hex())),
        "{:?}",
        file_names(&staging)
    );
    s.platform.control.limit.store(u32::MAX, Ordering::SeqCst);
    s.platform
        .announce("r-2", "1.2.0", &new, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-2", Phase::Installed).await;
    let artifacts = m.config.data_dir.join("artifacts");
    m.stop().await;
    assert_eq!(file_names(&staging), Vec::<String>::new());
    assert_eq!(file_names(&artifacts), vec![new.id.to_hex()]);
}

#[tokio::test]
async fn a_bad_manifest_is_fetched_again_within_the_same_attempt() {
    let mut s = setup().await;
    s.platform
        .control
        .corrupt_manifests
        .store(1, Ordering::SeqCst);
    let m = s.machine(one_attempt(Duration::from_millis(200)));
    let art = s.platform.add(Artifact::new(200 * 1024, 6));
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    let seen = s.platform.wait_final("r-1").await;
    assert_eq!(
        seen.last().unwrap().phase,
        Phase::Installed,
        "{:?}",
        seen.last()
    );
    assert_eq!(
        s.platform.control.corrupt_manifests.load(Ordering::SeqCst),
        0
    );
    m.stop().await;
}

#[tokio::test]
async fn a_manifest_that_never_verifies_still_ends_the_attempt() {
    let mut s = setup().await;
    let mut options = one_attempt(Duration::from_millis(100));
    options.tuning.attempt_timeout = Duration::from_secs(1);
    s.platform
        .control
        .corrupt_manifests
        .store(u32::MAX, Ordering::SeqCst);
    let m = s.machine(options);
    let art = s.platform.add(Artifact::new(200 * 1024, 7));
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    let seen = s.platform.wait_final("r-1").await;
    let last = seen.last().unwrap();
    assert_eq!(last.phase, Phase::DownloadFailed, "{last:?}");
    assert!(
        last.error.as_deref().unwrap().contains("no progress"),
        "{last:?}"
    );
    let served = u32::MAX - s.platform.control.corrupt_manifests.load(Ordering::SeqCst);
    assert!(served >= 2, "the manifest was asked for again: {served}");
    m.stop().await;
}

#[tokio::test]
async fn a_corrupted_chunk_is_fetched_again_and_the_install_still_succeeds() {
    let mut s = setup().await;
    s.platform.control.corrupt_once.store(3, Ordering::SeqCst);
    let m = s.machine(AgentOptions::default());
    let art = s.platform.add(Artifact::new(200 * 1024, 2));
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-1", Phase::Installed).await;
    let requested = s.platform.control.requested.lock().unwrap().clone();
    assert!(
        requested.iter().filter(|&&i| i == 3).count() >= 2,
        "chunk 3 was requested again: {requested:?}"
    );
    assert_eq!(m.installed(), art.bytes);
    m.stop().await;
}

#[tokio::test]
async fn a_notice_with_a_stale_seq_is_ignored() {
    let mut s = setup().await;
    let m = s.machine(AgentOptions::default());
    let art = s.platform.add(Artifact::new(40 * 1024, 4));
    let newer = ReleaseNotice {
        seq: 10,
        ..s.platform
            .notice("r-new", "1.1.0", &art, InstallPolicy::Immediate)
    };
    let stale = ReleaseNotice {
        seq: 1,
        ..s.platform
            .notice("r-stale", "1.2.0", &art, InstallPolicy::Immediate)
    };
    s.platform.publish(&newer).await;
    s.platform.wait_for("r-new", Phase::Installed).await;
    s.platform.publish(&stale).await;
    s.platform.assert_ignored("r-stale", &art, 11).await;
    m.stop().await;
}

#[tokio::test]
async fn a_failed_health_check_rolls_back_to_the_old_slot() {
    let mut s = setup().await;
    let m = s.machine(AgentOptions {
        fail_health: Some(vec!["2.0.0".into()]),
        ..Default::default()
    });
    let good = s.platform.add(Artifact::new(40 * 1024, 5));
    let bad = s.platform.add(Artifact::new(40 * 1024, 6));
    s.platform
        .announce("r-good", "1.5.0", &good, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-good", Phase::Installed).await;
    let old_slot = std::fs::read_link(m.slot_root().join("current")).unwrap();
    s.platform
        .announce("r-bad", "2.0.0", &bad, InstallPolicy::Immediate)
        .await;
    let seen = s.platform.wait_for("r-bad", Phase::RolledBack).await;
    assert!(seen
        .last()
        .unwrap()
        .error
        .as_deref()
        .unwrap_or("")
        .contains("health"));
    let current = std::fs::read_link(m.slot_root().join("current")).unwrap();
    assert_eq!(current, old_slot, "current points back to the old slot");
    assert_eq!(m.installed(), good.bytes);
    m.stop().await;
}

#[tokio::test]
async fn a_download_only_release_installs_only_after_activate() {
    let mut s = setup().await;
    let m = s.machine(AgentOptions::default());
    let art = s.platform.add(Artifact::new(40 * 1024, 7));
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::DownloadOnly)
        .await;
    let seen = s.platform.wait_for("r-1", Phase::Deferred).await;
    assert_eq!(
        seen.last().unwrap().detail.as_deref(),
        Some("waiting for activate")
    );
    // Nothing happens by itself.
    s.platform
        .assert_quiet(Duration::from_millis(1500), "unexpected status")
        .await;
    assert!(!m.slot_root().join("current").exists());
    s.platform
        .command(CommandAction::Activate {
            release: ReleaseId::new("r-1").unwrap(),
        })
        .await;
    let seen = s.platform.wait_for("r-1", Phase::Installed).await;
    assert_eq!(phases(&seen), vec![Phase::Installing, Phase::Installed]);
    assert_eq!(m.installed(), art.bytes);
    m.stop().await;
}

#[tokio::test]
async fn a_restarted_agent_resumes_its_download_where_it_stopped() {
    // Failed once in a full run (the second run fetched every chunk) and never since: the
    // agent's log is shown with a failure, to tell a dropped state from a whole-file mismatch.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,fleetcast_device::download=debug")
        .with_test_writer()
        .try_init();
    let mut s = setup().await;
    let options = AgentOptions {
        tuning: fleetcast_device::download::Tuning {
            persist_every: 64 * 1024,
            ..Default::default()
        },
        ..Default::default()
    };
    let art = s.platform.add(Artifact::new(2 * 1024 * 1024, 8));
    let chunks = art.layout.chunks;
    s.platform.control.limit.store(60, Ordering::SeqCst);
    let m = s.machine(options.clone());
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    // Every chunk served is written to the staging file before the agent stops (it persists
    // what it has on the way out).
    let part = m
        .config
        .data_dir
        .join("staging")
        .join(format!("{}.part", art.id.to_hex()));
    let on_disk = |served: &[u32]| {
        let file = std::fs::read(&part).unwrap_or_default();
        served.iter().all(|&i| {
            let range = art.layout.offset(i) as usize
                ..art.layout.offset(i) as usize + art.layout.chunk_len(i);
            file.get(range.clone()) == Some(&art.bytes[range])
        })
    };
    eventually(
        Duration::from_secs(20),
        || {
            let served = s.platform.control.served.lock().unwrap();
            served.len() >= 60 && on_disk(&served)
        },
        || "first run got 60 chunks onto disk".into(),
    )
    .await;
    m.stop().await;

    s.platform.control.requested.lock().unwrap().clear();
    s.platform.control.limit.store(u32::MAX, Ordering::SeqCst);
    let m = s.machine(options);
    s.platform.wait_for("r-1", Phase::Installed).await;
    let mut second: Vec<u32> = s.platform.control.requested.lock().unwrap().clone();
    second.sort_unstable();
    second.dedup();
    // At least 60 chunks were on disk when the first run stopped; those it had counted are in
    // its saved bitmap. A window of chunks may have been written but not yet counted when the
    // stop came (writes go in batches of up to a window), and those are fetched again.
    let window = fleetcast_device::download::Tuning::default().window as u32;
    assert!(
        !second.is_empty() && (second.len() as u32) <= chunks - 60 + window,
        "second run fetched {} distinct chunks of {chunks}",
        second.len()
    );
    assert_eq!(m.installed(), art.bytes);
    m.stop().await;
}

#[tokio::test]
async fn a_rollback_notice_switches_back_to_the_previous_slot_without_downloading() {
    let mut s = setup().await;
    let m = s.machine(AgentOptions::default());
    let v1 = s.platform.add(Artifact::new(40 * 1024, 9));
    let v2 = s.platform.add(Artifact::new(40 * 1024, 10));
    s.platform
        .announce("r-1", "1.1.0", &v1, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-1", Phase::Installed).await;
    s.platform
        .announce("r-2", "1.2.0", &v2, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-2", Phase::Installed).await;
    s.platform.control.requested.lock().unwrap().clear();
    let back = ReleaseNotice {
        rollback: true,
        ..s.platform
            .notice("r-back", "1.1.0", &v1, InstallPolicy::Immediate)
    };
    s.platform.publish(&back).await;
    let seen = s.platform.wait_for("r-back", Phase::Installed).await;
    assert!(
        !phases(&seen).contains(&Phase::Downloading),
        "{:?}",
        phases(&seen)
    );
    assert!(
        s.platform.control.requested.lock().unwrap().is_empty(),
        "no chunk fetched"
    );
    assert_eq!(m.installed_version(), "1.1.0");
    assert_eq!(m.installed(), v1.bytes);
    m.stop().await;
}

#[tokio::test]
async fn a_group_notice_older_than_the_machine_notice_is_ignored() {
    let mut s = setup().await;
    let g1 = fleetcast_proto::GroupId::new("g1").unwrap();
    let mut cfg = s.config();
    cfg.groups = vec![g1.clone()];
    let m = start(cfg, AgentOptions::default());
    let art = s.platform.add(Artifact::new(40 * 1024, 11));
    // Group notices reach the machine at all.
    let first = ReleaseNotice {
        target: Target::Group(g1.clone()),
        ..s.platform
            .notice("r-group-1", "1.0.5", &art, InstallPolicy::Immediate)
    };
    s.platform.publish(&first).await;
    s.platform.wait_for("r-group-1", Phase::Installed).await;
    let machine_notice = ReleaseNotice {
        seq: 20,
        ..s.platform
            .notice("r-machine", "1.1.0", &art, InstallPolicy::Immediate)
    };
    s.platform.publish(&machine_notice).await;
    s.platform.wait_for("r-machine", Phase::Installed).await;
    let group_notice = ReleaseNotice {
        seq: 19,
        target: Target::Group(g1),
        ..s.platform
            .notice("r-group", "1.5.0", &art, InstallPolicy::Immediate)
    };
    s.platform.publish(&group_notice).await;
    s.platform.assert_ignored("r-group", &art, 21).await;
    m.stop().await;
}

/// A stand-in for the platform's provisioning: it knows `existing` machines (a real one) and,
/// like the platform, refuses to provision a known id again without `rotate`.
async fn fake_provisioning(
    url: &BrokerUrl,
    admin_secret: Secret,
    existing: &[&str],
) -> (Arc<Mutex<HashMap<String, String>>>, CancellationToken) {
    use fleetcast_proto::admin::{
        AdminOp, AdminReply, AdminRequest, AdminResponse, MachineSpec, ProvisionedMachine,
        ResponseEnvelope,
    };
    let platform_key = PlatformKey::from_seed(rand::random()).public();
    let (c, mut rx, stop) = connect_peer(url, "fake-platform").await;
    let topics = Topics::default();
    subscribe_all(
        &c,
        &mut rx,
        &[
            (topics.platform_admin_request_filter(), QoS::AtLeastOnce),
            (topics.platform_online_filter(), QoS::AtLeastOnce),
        ],
    )
    .await;
    let online: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut known: std::collections::HashSet<MachineId> = existing
        .iter()
        .map(|m| MachineId::new(*m).unwrap())
        .collect();
    let online_task = online.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let MqttEvent::Publish(p) = ev else { continue };
            match topics.parse(&p.topic) {
                Some(Route::AdminRequest(client)) => {
                    let req: AdminRequest = admin_secret
                        .open(Purpose::Admin, &p.payload)
                        .expect("admin MAC");
                    let AdminOp::MachineProvisionBatch { machines, rotate } = req.op else {
                        continue;
                    };
                    let taken: Vec<String> = machines
                        .iter()
                        .filter(|s| known.contains(&s.machine))
                        .map(|s| s.machine.to_string())
                        .collect();
                    let resp = if !rotate && !taken.is_empty() {
                        AdminResponse::error(
                            req.id,
                            req.ctr,
                            format!(
                                "{} provisioned already; nothing in this batch was changed",
                                taken.join(", ")
                            ),
                        )
                    } else {
                        let provisioned = machines
                            .into_iter()
                            .map(|MachineSpec { machine, groups }| {
                                known.insert(machine.clone());
                                ProvisionedMachine {
                                    machine,
                                    groups,
                                    secret: Secret::from_bytes(rand::random()),
                                    platform_key,
                                    platform_key_gen: 0,
                                    topic_prefix: "fleet".into(),
                                }
                            })
                            .collect();
                        AdminResponse::ok(
                            req.id,
                            req.ctr,
                            AdminReply::ProvisionedBatch {
                                machines: provisioned,
                            },
                        )
                    };
                    let env = ResponseEnvelope {
                        id: req.id,
                        sealed: Some(admin_secret.seal_box(Purpose::AdminResponse, &client, &resp)),
                        unverified_error: None,
                    };
                    c.publish(
                        topics.admin_response(&client),
                        QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&env).unwrap(),
                    )
                    .await
                    .unwrap();
                }
                Some(Route::Online(m)) => {
                    online_task.lock().unwrap().insert(
                        m.to_string(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    );
                }
                _ => {}
            }
        }
    });
    (online, stop)
}

#[tokio::test]
async fn the_simulator_provisions_each_machine_and_runs_its_agent() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let admin_secret = Secret::from_bytes(rand::random());
    // vm-004 is a real machine, provisioned by an operator.
    let (online, stop) = fake_provisioning(&url, admin_secret.clone(), &["vm-004"]).await;
    let dir = tempfile::tempdir().unwrap();
    let g = |s: &str| fleetcast_proto::GroupId::new(s).unwrap();
    let opts = |data: &Path, count: usize, start_index: usize| fleetcast_device::SimulateOptions {
        count,
        groups: vec![g("a"), g("b")],
        prefix: "vm-".into(),
        data_dir: data.to_owned(),
        broker: url.to_string(),
        machine_broker: url.to_string(),
        topic_prefix: "fleet".into(),
        admin_secret: admin_secret.clone(),
        initial_versions: [(app(), "1.0.0".to_owned())].into(),
        start_index,
        fail_health: vec![],
        ca_file: None,
        keep_alive_secs: None,
    };
    let run_until_online = |opts: fleetcast_device::SimulateOptions| {
        let online = online.clone();
        async move {
            online.lock().unwrap().clear();
            let count = opts.count;
            let sim_stop = CancellationToken::new();
            let sim = tokio::spawn(fleetcast_device::simulate::run(opts, sim_stop.clone()));
            eventually(
                Duration::from_secs(15),
                || {
                    online
                        .lock()
                        .unwrap()
                        .values()
                        .filter(|v| *v == "true")
                        .count()
                        == count
                },
                || format!("machines online: {:?}", online.lock().unwrap()),
            )
            .await;
            sim_stop.cancel();
            tokio::time::timeout(Duration::from_secs(10), sim)
                .await
                .expect("simulator stops")
                .unwrap()
                .unwrap();
        }
    };
    let secret_of = |name: &str| {
        MachineConfig::load(dir.path().join(name).join("machine.toml"))
            .unwrap()
            .secret
    };
    let records = || std::fs::read_to_string(dir.path().join("simulated.json")).unwrap();

    run_until_online(opts(dir.path(), 3, 1)).await;
    for (name, group) in [("vm-001", "a"), ("vm-002", "b"), ("vm-003", "a")] {
        let cfg = MachineConfig::load(dir.path().join(name).join("machine.toml")).unwrap();
        assert_eq!(cfg.groups, vec![g(group)], "{name}");
        assert_eq!(cfg.data_dir, dir.path().join(name));
        assert_eq!(cfg.initial_versions[&app()], "1.0.0");
        assert_eq!(cfg.keep_alive_secs, 30, "{name}: the default keep-alive");
        assert!(
            records().contains(name),
            "{name} is recorded: {}",
            records()
        );
    }
    // Started again on its own data dir, it takes its machines back (with new secrets), here
    // as a fleet on slow links.
    let before = secret_of("vm-001");
    run_until_online(fleetcast_device::SimulateOptions {
        keep_alive_secs: Some(120),
        ..opts(dir.path(), 3, 1)
    })
    .await;
    assert_ne!(secret_of("vm-001"), before, "provisioned again with rotate");
    let cfg = MachineConfig::load(dir.path().join("vm-002").join("machine.toml")).unwrap();
    assert_eq!(cfg.keep_alive_secs, 120);

    // It never takes over a machine it did not create: a real one...
    let kept = secret_of("vm-001");
    let err = fleetcast_device::simulate::run(opts(dir.path(), 2, 4), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("vm-004 provisioned already"), "{err}");
    assert!(
        err.contains("simulated.json") && err.contains("--prefix"),
        "{err}"
    );
    assert!(
        !records().contains("vm-005"),
        "nothing of a refused batch is recorded"
    );
    assert!(!dir.path().join("vm-005").exists());
    // ...or another simulator's.
    let other = tempfile::tempdir().unwrap();
    let err = fleetcast_device::simulate::run(opts(other.path(), 3, 1), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vm-001, vm-002, vm-003 provisioned already"),
        "{err}"
    );
    assert!(!other.path().join("vm-001").exists());
    assert_eq!(secret_of("vm-001"), kept, "refused runs touch no machine");
    stop.cancel();
}

#[tokio::test]
async fn an_agent_started_before_its_broker_connects_once_the_broker_is_up() {
    use fleetcast_broker::embedded::{BrokerSettings, EmbeddedBroker};
    // Hold the port while the agent starts: its first connection attempt is accepted here and
    // dropped, so it has certainly tried (and failed) before the broker exists.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let url = BrokerUrl::mqtt("127.0.0.1", addr.port());
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::from_bytes(rand::random());
    // The platform key must be known before the platform connects: build it from a fixed seed.
    let seed: [u8; 32] = rand::random();
    let key = PlatformKey::from_seed(seed);
    let m = start(
        config(&url, &key.public(), &secret, dir.path()),
        AgentOptions::default(),
    );
    let (attempt, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the agent tries to connect")
        .unwrap();
    drop((attempt, listener));
    let _broker =
        tokio::task::spawn_blocking(move || EmbeddedBroker::start(BrokerSettings::new(addr)))
            .await
            .unwrap()
            .expect("broker starts on the port the agent waits for");
    let mut p = platform_with_key(&url, secret.clone(), seed).await;
    let art = p.add(Artifact::new(40 * 1024, 12));
    p.announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    p.wait_for("r-1", Phase::Installed).await;
    m.stop().await;
}

#[test]
fn the_agents_log_has_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("machine.toml");
    let port = client::free_loopback_port().unwrap();
    std::fs::write(
        &config,
        format!(
            "machine = \"vm-log\"\nsecret = \"{}\"\nplatform_key = \"{}\"\n\
             broker = \"mqtt://127.0.0.1:{port}\"\ndata_dir = \"{}\"\n",
            "11".repeat(32),
            PlatformKey::from_seed([5; 32]).public().to_hex(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    // Nothing listens on the port: the agent logs its connection attempts (debug) until killed.
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast-device"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    agent.kill().unwrap();
    let out = agent.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("DEBUG"), "the agent logged: {log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a pipe: {log:?}");
}
