//! The machine agent: a thin async loop around the [`Updater`] state machine.
//!
//! One task owns the MQTT event loop (`client::drive`); this loop verifies what arrives, feeds
//! the updater, and carries out its actions: status events through the persisted outbox (one
//! in flight, removed on the platform's MAC'd `StatusAck`), the retained state, download and
//! install tasks. It also follows the platform's key chain ([`crate::trust`]): a newer key is
//! persisted before anything is checked with it. Every install runs under the exclusive sale
//! lock ([`crate::sale_lock`]), so it never overlaps a sale.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use fleetcast_broker::client::{self, BrokerUrl, MqttEvent};
use fleetcast_proto::auth::{Purpose, Secret, SignedEnvelope, MAX_JSON_MESSAGE};
use fleetcast_proto::chunk::{decode_frame, FrameType};
use fleetcast_proto::command::Command;
use fleetcast_proto::status::{MachineState, MAX_STATUS_BATCH};
use fleetcast_proto::{
    ArtifactId, GroupId, Kind, MachineId, ReleaseId, ReleaseNotice, Route, StatusAck, StatusEvent,
    Topics,
};
use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::MachineConfig;
use crate::download::{self, artifact_path, DownloadContext, Tuning};
use crate::fsutil::now_ms;
use crate::install::{InstallError, Installer};
use crate::machine::{Action, Input, InstallOutcome, StatusReport, UnverifiedNotice, Updater};
use crate::resend::ResendTimer;
use crate::sale_lock::{InstallGuard, SaleLock};
use crate::store::{Contact, Outbox, OutboxEntry, Store, StoreError};
use crate::trust::{ChainStep, Checked, FollowedKey, TrustedKey};

/// MQTT events waiting for the agent loop. Mostly chunk frames (64 KiB each) while the loop
/// waits for the disk, which the driver drops once fewer than `client::SHED_HEADROOM` places
/// are free; when full, the driver holds up to `client::HELD_WHILE_BUSY` other events and
/// reads the socket on (so the connection's pings go on), and only then stops reading. 256
/// let a simulator of 1,000 machines hold gigabytes of frames during a rollout.
const MQTT_EVENTS_QUEUED: usize = 32;
/// Chunk frames waiting for a download: twice its window. On the shared artifact topic most
/// frames are other machines' (a chunk this one has, or is about to get); one dropped when the
/// queue is full is asked for again.
const FRAMES_QUEUED: usize = 32;
/// Places in a download's frame queue that chunk frames leave free for its manifest parts: no
/// chunk is of use before the manifest. At 10,000 machines on one host the agents dropped
/// 200-300 manifest parts per rollout (23-34 shed by the MQTT reader, the rest on full
/// download queues); the reader sheds none now, and with this headroom 220 were still dropped
/// in one run (a download that does not read its queue at all fills these places too), so its
/// own effect is not measured. What ended first attempts was mostly the platform's order of
/// sending (docs/capacity-notes.md, "What the 10,000-machine rollout found").
const MANIFEST_HEADROOM: usize = 4;

/// Queues `frame` for a download unless its queue is full, or, for a chunk frame, has no more
/// than [`MANIFEST_HEADROOM`] places free; whether it was queued.
fn offer_frame(queue: &mpsc::Sender<Bytes>, frame: &Bytes, manifest: bool) -> bool {
    if !manifest && queue.capacity() <= MANIFEST_HEADROOM {
        return false;
    }
    queue.try_send(frame.clone()).is_ok()
}

/// Whether `payload` is a chunk server frame carrying a manifest part.
fn is_manifest(payload: &[u8]) -> bool {
    decode_frame(payload).is_ok_and(|(h, _)| h.frame_type == FrameType::Manifest)
}

/// A batch of status events is at most this large (the platform takes up to 256 KiB).
const STATUS_BATCH_BYTES: usize = 64 * 1024;

/// `contact.json` is written at most this often (and when the agent stops).
const CONTACT_SAVED_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("machine {machine}: invalid config: {reason}")]
    Config { machine: String, reason: String },
    #[error("machine {machine}: cannot create {path}: {error}")]
    DataDir {
        machine: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("machine {machine}: {error}")]
    Store { machine: String, error: StoreError },
    #[error("machine {machine}: cannot create the sale lock: {error}")]
    SaleLock {
        machine: String,
        error: std::io::Error,
    },
}

/// Extra knobs for tests and the simulator.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Simulated health check: these versions fail it (overrides `health_cmd`).
    pub fail_health: Option<Vec<String>>,
    pub tuning: Tuning,
    pub state_repeats: StateRepeats,
    /// Failed connects are logged at debug only (the simulator: thousands of agents in one
    /// process, whose broker being away is one fact, not thousands).
    pub quiet_connect_failures: bool,
}

/// How long a stopping agent waits for its tasks to end by themselves (a download saving
/// its progress) before it aborts them.
const TASKS_FINISH: Duration = Duration::from_secs(5);

/// Failed connects since the last connection, and when one was last logged as a warning: the
/// first failure warns (a machine that cannot reach its broker must say so where its operator
/// looks, at the default log level), then at most every [`ConnectFailures::WARN_EVERY`], with
/// the count, while the client keeps retrying with its backoff.
#[derive(Debug, Default)]
struct ConnectFailures {
    count: u32,
    warned_at: Option<Instant>,
}

impl ConnectFailures {
    const WARN_EVERY: Duration = Duration::from_secs(5 * 60);

    /// Counts a failure; the count so far if this one is to be a warning.
    fn failed(&mut self, now: Instant) -> Option<u32> {
        self.count = self.count.saturating_add(1);
        let due = self
            .warned_at
            .is_none_or(|at| now.duration_since(at) >= Self::WARN_EVERY);
        due.then(|| {
            self.warned_at = Some(now);
            self.count
        })
    }

    /// A connection came up: the failures before it, if any were logged as a warning.
    fn connected(&mut self) -> Option<u32> {
        let warned = self.warned_at.take().map(|_| self.count);
        self.count = 0;
        warned
    }
}

/// When the agent sends its state again although nothing changed. The state is a retained QoS 0
/// message with no acknowledgement, and a broker may drop one the platform has not read yet
/// (rumqttd drops the oldest part of a full log: a 10,000-machine onboarding once lost 4,600
/// first states). Each repeat is a fresh state (new `ctr`), so the platform takes it; a random
/// delay in each range keeps machines that connected together from repeating together.
#[derive(Debug, Clone)]
pub struct StateRepeats {
    /// After the first state of a connection (connects come in storms: a broker restart, a
    /// fleet switched on).
    pub first: (Duration, Duration),
    /// After every later state.
    pub every: (Duration, Duration),
}

impl Default for StateRepeats {
    fn default() -> Self {
        Self {
            first: (Duration::from_secs(20), Duration::from_secs(40)),
            every: (Duration::from_secs(5 * 60), Duration::from_secs(10 * 60)),
        }
    }
}

impl StateRepeats {
    /// The delay before the next repeat, after the `sent`th state of this connection.
    fn next(&self, sent: u32) -> Duration {
        let (lo, hi) = if sent <= 1 { self.first } else { self.every };
        if hi <= lo {
            return lo;
        }
        lo + (hi - lo).mul_f64(rand::random::<f64>())
    }
}

/// Runs the agent until `shutdown`. Survives broker restarts (reconnects with backoff).
pub async fn run(config: MachineConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_with(config, AgentOptions::default(), shutdown).await
}

struct JobHandle {
    release: ReleaseId,
    artifact: ArtifactId,
    cancel: CancellationToken,
    frames: mpsc::Sender<Bytes>,
}

struct Agent {
    /// What waits in the loop's MQTT queue ([`download::Unread`]).
    unread: download::Unread,
    config: MachineConfig,
    options: AgentOptions,
    topics: Topics,
    client: AsyncClient,
    store: Store,
    outbox: Outbox,
    updater: Updater,
    /// The platform key everything signed is checked with: the config's, or a newer one
    /// reached along the key chain (and persisted).
    trust: TrustedKey,
    connected: bool,
    /// When the outbox head was last sent. It leaves the outbox only on the platform's MAC'd
    /// `StatusAck` (after the platform flushed it to disk), not on the broker's PUBACK: a broker
    /// that accepted an event and died before delivering it does not lose it. Without an ack
    /// the head is sent again after `resend.wait()` (a duplicate carries the same `ctr`; the
    /// platform stores it once and acknowledges it again).
    head_sent_at: Option<Instant>,
    /// Whether the head was sent and not acknowledged (a send of it now is a resend), and
    /// whether the last wait for its ack ran out.
    head_unacked: bool,
    head_timed_out: bool,
    resend: ResendTimer,
    connect_failures: ConnectFailures,
    state_dirty: bool,
    /// States sent since the connection came up, and when to send it again unchanged
    /// ([`StateRepeats`]).
    states_sent: u32,
    state_repeat_at: Option<Instant>,
    downloads: HashMap<Kind, JobHandle>,
    /// Sales and installs exclude each other through this lock ([`crate::sale_lock`]).
    sale_lock: SaleLock,
    /// The exclusive lock, taken on a tick for an `idle` job about to start: that install
    /// begins with the lock already held, so no sale can begin between the look and the install.
    preheld: Option<InstallGuard>,
    /// The deprecated `{data_dir}/busy` file was seen (warned about once).
    busy_file_seen: bool,
    /// When the sale lock was last looked at (`on_tick`).
    sale_looked_at: Option<std::time::Instant>,
    /// When the platform and the broker were last reached, as `contact.json` will say.
    contact: Contact,
    contact_dirty: bool,
    contact_saved_at: Option<Instant>,
    /// The platform was heard from since the agent started (the first time is written at once).
    heard_since_start: bool,
    /// A SUBSCRIBE could not be queued (the client's request queue was full): the next tick
    /// subscribes to everything again.
    subscriptions_owed: bool,
    /// Every artifact in use since the data dir was last cleaned without an error (files of any
    /// other artifact were gone then); `None` when that is not known.
    in_use_since_cleaning: Option<std::collections::HashSet<ArtifactId>>,
    tasks: JoinSet<()>,
    inputs: mpsc::Sender<Input>,
    shutdown: CancellationToken,
}

pub async fn run_with(
    config: MachineConfig,
    options: AgentOptions,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let machine = config.machine.to_string();
    let bad = |reason: String| AgentError::Config {
        machine: machine.clone(),
        reason,
    };
    config.validate().map_err(bad)?;
    let url: BrokerUrl = config.broker_url().map_err(bad)?;
    let (store, outbox, contact) =
        open_data_dir(&machine, config.data_dir.clone(), config.secret.clone()).await?;
    let sale_lock = SaleLock::new(config.sale_lock_path());
    let lock = sale_lock.clone();
    tokio::task::spawn_blocking(move || lock.create())
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|error| AgentError::SaleLock {
            machine: machine.clone(),
            error,
        })?;
    let updater = Updater::new(
        config.machine.clone(),
        config.groups.clone(),
        config.utc_offset_minutes,
        store.ledger(),
        &config.initial_versions,
    );
    let trust = TrustedKey::starting_point(config.configured_key(), store.platform_key());
    let topics = Topics::new(&config.topic_prefix);
    let (client, eventloop) = client::connect_machine(mqtt_options(&config, &url, &topics), 1024);
    let (mqtt_tx, mut mqtt_rx) = mpsc::channel(MQTT_EVENTS_QUEUED);
    let unread = download::Unread::of(&mqtt_tx);
    let driver_stop = CancellationToken::new();
    // Chunk frames beyond what the agent keeps up with are dropped by the driver and asked for
    // again, rather than stopping it from reading the socket; acks and notices always find room.
    let frames = topics.clone();
    // Manifest parts are never shed (see `MANIFEST_HEADROOM`): when the agent is that far
    // behind, the driver waits for room for one.
    let sheddable = move |p: &rumqttc::Publish| {
        matches!(
            frames.parse(&p.topic),
            Some(fleetcast_proto::Route::ArtifactChunks(_))
        ) && !is_manifest(&p.payload)
    };
    let driver = tokio::spawn(client::drive_with(
        eventloop,
        mqtt_tx,
        driver_stop.clone(),
        client::Overload::Shed(std::sync::Arc::new(sheddable)),
    ));
    let (inputs, mut input_rx) = mpsc::channel(256);
    let mut agent = Agent {
        unread,
        config,
        options,
        topics,
        client,
        store,
        outbox,
        updater,
        trust,
        connected: false,
        head_sent_at: None,
        head_unacked: false,
        head_timed_out: false,
        resend: ResendTimer::default(),
        connect_failures: ConnectFailures::default(),
        state_dirty: true,
        states_sent: 0,
        state_repeat_at: None,
        downloads: HashMap::new(),
        sale_lock,
        preheld: None,
        busy_file_seen: false,
        sale_looked_at: None,
        contact,
        contact_dirty: false,
        contact_saved_at: None,
        heard_since_start: false,
        subscriptions_owed: false,
        in_use_since_cleaning: None,
        tasks: JoinSet::new(),
        inputs,
        shutdown: shutdown.child_token(),
    };
    tracing::info!(machine = %agent.config.machine, broker = %url, key_gen = agent.trust.generation, "agent starting");
    agent.handle(Input::Resume).await;
    agent.remove_unused_files().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            event = mqtt_rx.recv() => match event {
                Some(event) => agent.on_mqtt(event).await,
                None => break,
            },
            Some(input) = input_rx.recv() => agent.on_task_result(input).await,
            _ = tick.tick() => {
                // What came while the agent was busy (an ack among the frames) is taken before
                // the tick decides that an ack is missing and sends the event again.
                for _ in 0..MQTT_EVENTS_QUEUED {
                    let Ok(event) = mqtt_rx.try_recv() else { break };
                    agent.on_mqtt(event).await;
                }
                agent.on_tick().await
            }
            Some(_) = agent.tasks.join_next(), if !agent.tasks.is_empty() => {
                agent.remove_unused_files().await;
            }
        }
    }
    // Say goodbye (a clean DISCONNECT suppresses the last will, so publish `false` ourselves).
    agent.shutdown.cancel();
    if agent.connected {
        let _ = agent.client.try_publish(
            agent.topics.online(&agent.config.machine),
            QoS::AtMostOnce,
            true,
            "false",
        );
        let _ = agent.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Some(ev) = mqtt_rx.recv().await {
                if matches!(ev, MqttEvent::Disconnected(_)) {
                    break;
                }
            }
        })
        .await;
    }
    driver_stop.cancel();
    let _ = driver.await;
    // The tasks saw `shutdown` cancelled: a download saves what it has on its way out, so a
    // restart resumes from there. Aborted at once, a save still waiting for its fsync was cut
    // (on a loaded host a restarted agent fetched 112 of 128 chunks again where 84 at most
    // were due). What still runs after `TASKS_FINISH` is aborted.
    let _ = tokio::time::timeout(TASKS_FINISH, async {
        while agent.tasks.join_next().await.is_some() {}
    })
    .await;
    agent.tasks.shutdown().await;
    agent.save_contact(true).await;
    tracing::info!(machine = %agent.config.machine, "agent stopped");
    Ok(())
}

impl Agent {
    fn me(&self) -> &MachineId {
        &self.config.machine
    }

    /// A message from the platform verified: remember when, for `fleetcast-device status`.
    async fn heard_from_platform(&mut self, what: &str) {
        self.contact.platform_at_ms = Some(now_ms());
        self.contact.platform_message = Some(what.to_owned());
        self.contact_dirty = true;
        let first = !std::mem::replace(&mut self.heard_since_start, true);
        self.save_contact(first).await;
    }

    /// Writes `contact.json` if it changed, at most every [`CONTACT_SAVED_EVERY`] unless `now`
    /// (the first word from the platform since the start, and the stop).
    async fn save_contact(&mut self, now: bool) {
        let due = !matches!(self.contact_saved_at, Some(t) if t.elapsed() < CONTACT_SAVED_EVERY);
        if !self.contact_dirty || !(now || due) {
            return;
        }
        match self.contact.write(&self.config.data_dir).await {
            Ok(()) => {
                self.contact_dirty = false;
                self.contact_saved_at = Some(Instant::now());
            }
            Err(e) => tracing::warn!(machine = %self.me(), "cannot record the last contact: {e}"),
        }
    }

    async fn handle(&mut self, input: Input) {
        let actions = self.updater.handle(now_ms(), input);
        self.apply(actions).await;
    }

    async fn apply(&mut self, actions: Vec<Action>) {
        let mut persist = false;
        let mut follow = Vec::new();
        for action in actions {
            match action {
                Action::Report(r) => self.enqueue_status(r).await,
                Action::PublishState => self.state_dirty = true,
                Action::StartDownload { kind, notice } => self.start_download(kind, notice),
                Action::CancelDownload { kind, release } => self.stop_download(&kind, &release),
                Action::StartInstall {
                    kind,
                    notice,
                    from_previous,
                } => self.start_install(kind, notice, from_previous),
                Action::FollowGroups { joined, left } => follow.push((joined, left)),
                Action::Persist => persist = true,
            }
        }
        if persist {
            if let Err(e) = self.store.save_ledger_async(&self.updater.ledger).await {
                tracing::error!(machine = %self.me(), "cannot persist agent state: {e}");
            }
            self.remove_released_files().await;
        }
        for (joined, left) in follow {
            self.follow_groups(&joined, &left);
        }
        if self.state_dirty {
            self.publish_state().await;
        }
    }

    /// Drops staged and downloaded artifacts no job, installed version or rollback slot needs.
    /// Also run when a task ends: a cancelled download may write its staging state on the way out.
    async fn remove_unused_files(&mut self) {
        let keep = self.updater.ledger.artifacts_in_use();
        self.remove_all_but(keep).await;
    }

    /// Removes the files of every artifact not in `keep`, and remembers `keep` once that worked.
    async fn remove_all_but(&mut self, keep: std::collections::HashSet<ArtifactId>) {
        let dir = self.config.data_dir.clone();
        let kept = keep.clone();
        let removed = tokio::task::spawn_blocking(move || download::remove_unused(&dir, &kept))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match removed {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(machine = %self.me(), "removed {n} unused artifact files");
                }
                self.in_use_since_cleaning = Some(keep);
            }
            Err(e) => {
                self.in_use_since_cleaning = None;
                tracing::warn!(machine = %self.me(), "cannot remove unused artifact files: {e}")
            }
        }
    }

    /// [`Agent::remove_unused_files`] after the ledger changed, only if an artifact in use
    /// since the last cleaning is no longer: a job that starts adds one and frees none, and the
    /// scan would find nothing. (In a simulator of 1,000 machines that scan waited 0.4 s for a
    /// blocking thread behind the fleet's chunk writes, with the agent's loop, and so its
    /// frames, waiting on it.) Files a task writes for an artifact no longer in use are removed
    /// when the task ends, which always cleans.
    async fn remove_released_files(&mut self) {
        let keep = self.updater.ledger.artifacts_in_use();
        if released_since_cleaning(&mut self.in_use_since_cleaning, &keep) {
            self.remove_all_but(keep).await;
        }
    }

    async fn on_mqtt(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Connected { .. } => {
                match self.connect_failures.connected() {
                    Some(failed) => tracing::warn!(machine = %self.me(),
                        "connected, after {failed} failed attempts"),
                    None => tracing::info!(machine = %self.me(), "connected"),
                }
                self.connected = true;
                self.contact.broker_at_ms = Some(now_ms());
                self.contact_dirty = true;
                self.save_contact(false).await;
                self.head_sent_at = None;
                self.states_sent = 0;
                self.subscriptions_owed = false;
                self.subscribe_all();
                self.publish(
                    self.topics.online(self.me()),
                    QoS::AtMostOnce,
                    true,
                    b"true".to_vec(),
                );
                self.publish_state().await;
                self.send_head();
            }
            MqttEvent::Disconnected(why) => {
                if self.connected {
                    tracing::warn!(machine = %self.me(), "connection lost: {why}");
                } else if self.options.quiet_connect_failures {
                    tracing::debug!(machine = %self.me(), "cannot connect: {why}");
                } else if let Some(failed) = self.connect_failures.failed(Instant::now()) {
                    let attempts = if failed == 1 { "attempt" } else { "attempts" };
                    tracing::warn!(machine = %self.me(), broker = %self.config.broker,
                        "cannot connect to the broker: {why} ({failed} failed {attempts} since \
                         the last connection; trying again with a growing pause, and saying so \
                         again in 5 min)");
                } else {
                    tracing::debug!(machine = %self.me(), "cannot connect: {why}");
                }
                self.connected = false;
                self.head_sent_at = None;
            }
            MqttEvent::Sent(_) | MqttEvent::PubAck(_) => {}
            MqttEvent::Publish(p) => self.on_publish(&p.topic, p.payload).await,
            MqttEvent::SubAck(_) => {}
        }
    }

    fn subscribe_all(&mut self) {
        let downloads = self.downloads.values().map(|d| &d.artifact);
        let filters = subscriptions(&self.topics, self.me(), self.updater.groups(), downloads);
        if !subscribe_each(&self.client, self.me(), filters) {
            self.subscriptions_owed = true;
        }
    }

    /// Leaves the release topics of `left` and subscribes to those of `joined` (a `groups`
    /// command). While disconnected nothing is sent: the next connect subscribes to the groups
    /// followed then.
    /// A subscription that cannot be queued now is owed: the next tick subscribes again (the
    /// state already names the new groups, so the platform would not send the command again).
    /// An unsubscribe that cannot be queued is not retried: that group's notices are ignored
    /// (`on_publish`), and on the embedded broker the move closed the session anyway.
    fn follow_groups(&mut self, joined: &[GroupId], left: &[GroupId]) {
        if !self.connected {
            return;
        }
        for g in left {
            let f = self.topics.group_release_filter(g);
            if let Err(e) = self.client.try_unsubscribe(f.clone()) {
                tracing::warn!(machine = %self.me(), filter = %f, "cannot unsubscribe: {e}");
            }
        }
        let filters = joined
            .iter()
            .map(|g| (self.topics.group_release_filter(g), QoS::AtLeastOnce));
        if !subscribe_each(&self.client, self.me(), filters) {
            self.subscriptions_owed = true;
        }
    }

    async fn on_publish(&mut self, topic: &str, payload: Bytes) {
        match self.topics.parse(topic) {
            Some(Route::MachineRelease(m, kind)) if &m == self.me() => {
                self.on_notice(topic, kind, &payload).await
            }
            Some(Route::GroupRelease(g, kind)) if self.updater.groups().contains(&g) => {
                self.on_notice(topic, kind, &payload).await
            }
            Some(Route::Command(m)) if &m == self.me() => {
                match self.trust.check::<Command>(Purpose::Command, &payload) {
                    Checked::Verified(cmd) => {
                        self.heard_from_platform("command").await;
                        self.handle(Input::Command(cmd)).await
                    }
                    Checked::NewerKey { gen } => {
                        tracing::debug!(machine = %self.me(), gen, trusted = self.trust.generation,
                            "command signed by a newer key than the one followed so far; ignored")
                    }
                    Checked::Refused(e) => {
                        tracing::warn!(machine = %self.me(), "command refused: {e}")
                    }
                }
            }
            Some(Route::PlatformKeys) => self.on_key_chain(&payload).await,
            Some(Route::StatusAck(m)) if &m == self.me() => self.on_status_ack(&payload).await,
            Some(Route::MachineChunks(m)) if &m == self.me() => self.route_frame(payload, false),
            Some(Route::ArtifactChunks(_)) => self.route_frame(payload, true),
            _ => tracing::debug!(machine = %self.me(), topic, "unexpected message dropped"),
        }
    }

    /// An ack is MAC'd with this machine's own secret: only the platform and this machine hold
    /// it (protocol.md §6.1).
    async fn on_status_ack(&mut self, payload: &[u8]) {
        let ack = match self
            .config
            .secret
            .open::<StatusAck>(Purpose::StatusAck, payload)
        {
            Ok(ack) if &ack.machine == self.me() => {
                self.heard_from_platform("status_ack").await;
                ack
            }
            Ok(ack) => {
                tracing::warn!(machine = %self.me(), other = %ack.machine, "status ack for another machine refused");
                return;
            }
            // The head is sent again after RESEND_AFTER, and acknowledged again.
            Err(e) => {
                tracing::warn!(machine = %self.me(), "status ack refused: {e}");
                return;
            }
        };
        match self.outbox.ack_async(ack.ctr).await {
            Ok(true) => {
                if let Some(sent) = self.head_sent_at.take() {
                    self.resend.acknowledged(sent.elapsed());
                }
                (self.head_unacked, self.head_timed_out) = (false, false);
                self.send_head();
            }
            Ok(false) => {}
            Err(e) => tracing::error!(machine = %self.me(), "cannot update the outbox: {e}"),
        }
    }

    async fn on_notice(&mut self, topic: &str, kind: Kind, payload: &[u8]) {
        if payload.is_empty() {
            tracing::debug!(machine = %self.me(), %kind, "cleared release topic; ignored");
            return;
        }
        match self.trust.check::<ReleaseNotice>(Purpose::Release, payload) {
            Checked::Verified(notice) => {
                // The platform publishes a notice only on its own target's and kind's topic. A
                // signed notice elsewhere is a copy (anyone may publish on a broker without
                // ACLs): acting on it, or remembering its seq as refused, would let the copy
                // stand in for the genuine notice. So it is treated like an unverified one.
                let home = self.topics.release(&notice.target, &notice.kind);
                if home != topic {
                    tracing::warn!(machine = %self.me(), %kind, topic, home, release = %notice.release,
                        "signed notice on another notice's topic refused");
                    self.handle(Input::Unverified(UnverifiedNotice {
                        topic: topic.to_owned(),
                        kind,
                        digest: *blake3::hash(payload).as_bytes(),
                        error: format!(
                            "notice refused: release {} belongs on {home}, not on this topic",
                            notice.release
                        ),
                        claimed: None,
                    }))
                    .await;
                    return;
                }
                self.heard_from_platform("notice").await;
                self.handle(Input::Notice(notice)).await
            }
            // Not rejected and not remembered: once the chain is followed, the platform sends
            // its desired notice again to a machine whose state is behind.
            Checked::NewerKey { gen } => {
                tracing::debug!(machine = %self.me(), %kind, gen, trusted = self.trust.generation,
                    "notice signed by a newer key than the one followed so far; ignored")
            }
            Checked::Refused(e) => {
                tracing::warn!(machine = %self.me(), %kind, topic, "notice refused: {e}");
                self.handle(Input::Unverified(UnverifiedNotice {
                    topic: topic.to_owned(),
                    kind,
                    digest: *blake3::hash(payload).as_bytes(),
                    error: format!("notice refused: {e}"),
                    claimed: claimed_release(payload),
                }))
                .await;
            }
        }
    }

    /// Follows the retained key chain. A newer key is persisted before it is trusted; a chain
    /// that does not verify from the trusted key changes nothing.
    async fn on_key_chain(&mut self, payload: &[u8]) {
        let next = match self.trust.follow(payload) {
            ChainStep::Advanced(next) => next,
            ChainStep::Unchanged => {
                tracing::debug!(machine = %self.me(), key_gen = self.trust.generation, "key chain holds no newer key");
                return;
            }
            ChainStep::Refused(e) => {
                tracing::warn!(machine = %self.me(), key_gen = self.trust.generation,
                    "key chain refused; the trusted key stays: {e}");
                return;
            }
        };
        let followed = FollowedKey {
            root: self.config.configured_key(),
            current: next,
        };
        if let Err(e) = self.store.save_platform_key_async(followed).await {
            tracing::error!(machine = %self.me(), key_gen = next.generation,
                "newer platform key not persisted, so not used yet: {e}");
            return;
        }
        tracing::info!(machine = %self.me(), from = self.trust.generation, to = next.generation,
            key = %next.key, "following the platform key chain");
        self.trust = next;
        self.heard_from_platform("key_chain").await;
        self.publish_state().await;
    }

    fn route_frame(&mut self, mut frame: Bytes, broadcast: bool) {
        let header = match decode_frame(&frame) {
            Ok((h, _)) => h,
            Err(e) => {
                tracing::warn!(machine = %self.me(), "malformed chunk frame dropped: {e}");
                return;
            }
        };
        if broadcast && header.frame_type == FrameType::Error {
            // Error frames answer one machine's request, on its own topic; one on the shared
            // topic (which any client can publish to) must not end every machine's attempt.
            tracing::debug!(machine = %self.me(), "error frame on the broadcast topic dropped");
            return;
        }
        if header.frame_type == FrameType::Error {
            // It ends the download attempt, so only one the platform MAC'd with this machine's
            // secret counts (on a broker without ACLs anyone may publish on this topic too).
            match fleetcast_proto::chunk::open_error_frame(&self.config.secret, &frame) {
                Some(plain) => frame = frame.slice_ref(plain),
                None => {
                    // At debug: whoever forges them could flood the log too.
                    tracing::debug!(machine = %self.me(), artifact = %header.artifact.short(),
                        "error frame without a valid MAC dropped (forged, or from a platform \
                         older than this agent)");
                    return;
                }
            }
        }
        let manifest = header.frame_type == FrameType::Manifest;
        for job in self.downloads.values() {
            if job.artifact == header.artifact {
                // A frame not queued is asked for again by the download.
                let _ = offer_frame(&job.frames, &frame, manifest);
            }
        }
    }

    async fn on_task_result(&mut self, input: Input) {
        if let Input::DownloadFinished { kind, release }
        | Input::DownloadFailed { kind, release, .. } = &input
        {
            let (kind, release) = (kind.clone(), release.clone());
            self.stop_download(&kind, &release);
        }
        self.handle(input).await;
    }

    async fn on_tick(&mut self) {
        // Before anything that may wait (the sale lock is looked at on a blocking thread, which
        // 10,000 simulated machines' disk writes kept busy for seconds): an ack that came
        // during such a wait must not find the head already sent again. 10,000 machines sent
        // more events again than they had stored, each ack having waited in the queue.
        if self
            .head_sent_at
            .is_some_and(|t| t.elapsed() > self.resend.wait())
        {
            self.head_sent_at = None;
            self.head_timed_out = true;
        }
        self.send_head();
        if self.connected && self.subscriptions_owed {
            self.subscriptions_owed = false;
            self.subscribe_all();
        }
        let now = std::time::Instant::now();
        let due = self
            .sale_lock
            .look_due(self.updater.waits_for_idle(), self.sale_looked_at, now);
        let busy = if due {
            self.sale_looked_at = Some(now);
            self.look_for_sale().await
        } else {
            self.updater.busy()
        };
        if busy != self.updater.busy() {
            self.handle(Input::Busy(busy)).await;
        }
        self.handle(Input::Tick).await;
        // Taken for an idle job that did not start after all (e.g. cancelled): let go.
        self.preheld = None;
        // A new event of this tick goes now.
        self.send_head();
        if self.connected && self.state_repeat_at.is_some_and(|t| t <= Instant::now()) {
            self.state_dirty = true;
        }
        if self.state_dirty {
            self.publish_state().await;
        }
        self.save_contact(false).await;
    }

    /// Whether the machine is serving a customer: a shared holder of the sale lock (or, the
    /// deprecated way, a `{data_dir}/busy` file). When it is not and an `idle` job waits, the
    /// exclusive lock is taken now, into `preheld`, for the install this tick starts.
    async fn look_for_sale(&mut self) -> bool {
        let lock = self.sale_lock.clone();
        let busy_file = self.config.data_dir.join("busy");
        let wants_lock = self.updater.waits_for_idle();
        let last = self.updater.busy();
        let looked = tokio::task::spawn_blocking(move || {
            let file = busy_file.try_exists().unwrap_or(false);
            let sale = lock.sale_in_progress();
            let busy = file || matches!(sale, Ok(Some(true)));
            let known = file || matches!(sale, Ok(Some(_)));
            let guard = if wants_lock && known && !busy {
                Some(lock.try_exclusive())
            } else {
                None
            };
            (file, sale, guard)
        })
        .await;
        let Ok((file, sale, guard)) = looked else {
            return last;
        };
        if file && !self.busy_file_seen {
            tracing::warn!(machine = %self.me(), path = %self.config.data_dir.join("busy").display(),
                lock = %self.sale_lock.path().display(),
                "the busy file is deprecated and leaves a window between its check and an install: hold a shared flock on the sale lock instead (docs/device.md)");
        }
        self.busy_file_seen |= file;
        let mut busy = match sale {
            Ok(Some(sale)) => sale || file,
            // Cannot tell (an install of ours holds the lock): keep the last answer.
            Ok(None) => last || file,
            Err(e) => {
                tracing::warn!(machine = %self.me(), "cannot look at the sale lock: {e}");
                last || file
            }
        };
        match guard {
            Some(Ok(Some(guard))) => self.preheld = Some(guard),
            // A sale began between the look and the try.
            Some(Ok(None)) => busy = true,
            Some(Err(e)) => tracing::warn!(machine = %self.me(), "cannot take the sale lock: {e}"),
            None => {}
        }
        busy
    }

    /// Queues a publish without waiting. State and `online` go at QoS 0 (the next one
    /// supersedes a lost one, and the platform re-asks with `report`); only status events,
    /// acknowledged end to end, go at QoS 1.
    fn publish(&mut self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(machine = %self.me(), "publish not queued: {e}");
                false
            }
        }
    }

    async fn enqueue_status(&mut self, r: StatusReport) {
        let ctr = match self.store.next_ctr_async().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(machine = %self.me(), "status {} not sent: {e}", r.phase);
                return;
            }
        };
        tracing::info!(machine = %self.me(), kind = %r.kind, release = ?r.release.as_ref().map(|r| r.to_string()), phase = %r.phase, "status");
        let event = StatusEvent {
            machine: self.me().clone(),
            ctr,
            at_ms: now_ms(),
            release: r.release,
            kind: r.kind,
            version: r.version,
            phase: r.phase,
            progress: r.progress,
            attempt: r.attempt,
            error: r.error,
            detail: r.detail,
        };
        let payload = self.config.secret.seal(Purpose::Status, &event);
        let entry = OutboxEntry {
            ctr,
            payload: String::from_utf8(payload).expect("a JSON envelope is UTF-8"),
        };
        if let Err(e) = self.outbox.push_async(entry).await {
            tracing::error!(machine = %self.me(), "status {} not persisted: {e}", event.phase);
            return;
        }
        self.send_head();
    }

    /// Sends the oldest unacknowledged status event, if none is in flight.
    fn send_head(&mut self) {
        if !self.connected || self.head_sent_at.is_some() {
            return;
        }
        let Some((payload, events)) = self
            .outbox
            .head_message(MAX_STATUS_BATCH, STATUS_BATCH_BYTES)
        else {
            return;
        };
        tracing::trace!(machine = %self.me(), events, "sending status");
        let topic = self.topics.status(self.me());
        if self.publish(topic, QoS::AtLeastOnce, false, payload) {
            self.head_sent_at = Some(Instant::now());
            if std::mem::replace(&mut self.head_unacked, true) {
                self.resend
                    .sending_again(std::mem::take(&mut self.head_timed_out));
            } else {
                self.resend.sent_first();
            }
        }
    }

    async fn publish_state(&mut self) {
        if !self.connected {
            self.state_dirty = true;
            return;
        }
        let ctr = match self.store.next_ctr_async().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(machine = %self.me(), "state not sent: {e}");
                return;
            }
        };
        let state = MachineState {
            machine: self.me().clone(),
            ctr,
            at_ms: now_ms(),
            agent_version: fleetcast_proto::VERSION.to_owned(),
            groups: self.updater.groups().to_vec(),
            busy: self.updater.busy(),
            kinds: self.updater.kind_states(),
            key_gen: self.trust.generation,
        };
        let payload = self.config.secret.seal(Purpose::State, &state);
        let topic = self.topics.state(self.me());
        self.state_dirty = !self.publish(topic, QoS::AtMostOnce, true, payload);
        if !self.state_dirty {
            self.states_sent = self.states_sent.saturating_add(1);
            let after = self.options.state_repeats.next(self.states_sent);
            self.state_repeat_at = Some(Instant::now() + after);
        }
    }

    fn download_context(&self) -> DownloadContext {
        DownloadContext {
            unread: self.unread.clone(),
            machine: self.me().clone(),
            topics: self.topics.clone(),
            client: self.client.clone(),
            secret: self.config.secret.clone(),
            store: self.store.clone(),
            data_dir: self.config.data_dir.clone(),
            tuning: self.options.tuning.clone(),
        }
    }

    fn start_download(&mut self, kind: Kind, notice: ReleaseNotice) {
        if let Some(old) = self.downloads.remove(&kind) {
            old.cancel.cancel();
            self.unsubscribe_if_unused(&old.artifact);
        }
        let (frames_tx, frames_rx) = mpsc::channel(FRAMES_QUEUED);
        let cancel = self.shutdown.child_token();
        let artifact = notice.artifact.id;
        if self.connected {
            let _ = self
                .client
                .try_subscribe(self.topics.artifact_chunks(&artifact), QoS::AtMostOnce);
        }
        self.downloads.insert(
            kind.clone(),
            JobHandle {
                release: notice.release.clone(),
                artifact,
                cancel: cancel.clone(),
                frames: frames_tx,
            },
        );
        let ctx = self.download_context();
        let inputs = self.inputs.clone();
        self.tasks.spawn(async move {
            let progress_inputs = inputs.clone();
            let (k, r) = (kind.clone(), notice.release.clone());
            let result = download::download(
                &ctx,
                &notice.artifact,
                frames_rx,
                cancel.clone(),
                |progress, attempt| {
                    let _ = progress_inputs.try_send(Input::DownloadProgress {
                        kind: k.clone(),
                        release: r.clone(),
                        progress,
                        attempt,
                    });
                },
            )
            .await;
            if cancel.is_cancelled() {
                return;
            }
            let input = match result {
                Ok(_) => Input::DownloadFinished {
                    kind,
                    release: notice.release,
                },
                Err((e, attempts)) => Input::DownloadFailed {
                    kind,
                    release: notice.release,
                    error: e.to_string(),
                    attempts,
                },
            };
            let _ = inputs.send(input).await;
        });
    }

    fn stop_download(&mut self, kind: &Kind, release: &ReleaseId) {
        if self
            .downloads
            .get(kind)
            .is_some_and(|d| &d.release == release)
        {
            let job = self.downloads.remove(kind).expect("checked");
            job.cancel.cancel();
            self.unsubscribe_if_unused(&job.artifact);
        }
    }

    fn unsubscribe_if_unused(&self, artifact: &ArtifactId) {
        if self.connected && !self.downloads.values().any(|d| &d.artifact == artifact) {
            let _ = self
                .client
                .try_unsubscribe(self.topics.artifact_chunks(artifact));
        }
    }

    /// Installs under the exclusive sale lock, whatever the policy: taken already for an `idle`
    /// job (`preheld`), otherwise waited for, so an `immediate` or `window` install (and an
    /// install resumed after a restart) starts once the current sale has ended.
    fn start_install(&mut self, kind: Kind, notice: ReleaseNotice, from_previous: bool) {
        let installer = Installer::from_config(
            &self.config.installer_for(&kind),
            &self.config.data_dir,
            &kind,
            self.options.fail_health.as_deref(),
        );
        let path = artifact_path(&self.config.data_dir, &notice.artifact.id);
        let inputs = self.inputs.clone();
        let (held, lock, stop) = (
            self.preheld.take(),
            self.sale_lock.clone(),
            self.shutdown.clone(),
        );
        tracing::info!(machine = %self.me(), %kind, version = %notice.version, from_previous, "installing");
        self.tasks.spawn(async move {
            let guard = match held {
                Some(guard) => Ok(guard),
                None => lock.exclusive(&stop).await.transpose().unwrap_or_else(|| {
                    // Shutting down: the step stays `installing` on disk and re-runs at start.
                    Err(std::io::Error::other("shutting down"))
                }),
            };
            let outcome = match guard {
                Err(_) if stop.is_cancelled() => return,
                Err(e) => InstallOutcome::Failed(format!(
                    "not installed: cannot take the sale lock {}: {e}",
                    lock.path().display()
                )),
                Ok(guard) => {
                    let result = installer
                        .install(&notice.version, notice.artifact.id, &path)
                        .await;
                    drop(guard);
                    match result {
                        Ok(()) => InstallOutcome::Installed,
                        Err(e @ InstallError::Unhealthy { .. }) => {
                            InstallOutcome::RolledBack(e.to_string())
                        }
                        Err(e) => InstallOutcome::Failed(e.to_string()),
                    }
                }
            };
            let _ = inputs
                .send(Input::InstallFinished {
                    kind,
                    release: notice.release,
                    outcome,
                })
                .await;
        });
    }
}

/// Whether an artifact in use since the last cleaning (`seen`, `None` when not known) is not
/// in `keep`, the artifacts in use now; adds `keep` to `seen`.
fn released_since_cleaning(
    seen: &mut Option<std::collections::HashSet<ArtifactId>>,
    keep: &std::collections::HashSet<ArtifactId>,
) -> bool {
    let Some(seen) = seen else { return true };
    let released = !seen.is_subset(keep);
    seen.extend(keep.iter().copied());
    released
}

/// Creates the data dir and reads `agent.json`, `outbox.json` and `contact.json`, off the
/// runtime's threads.
async fn open_data_dir(
    machine: &str,
    dir: PathBuf,
    secret: Secret,
) -> Result<(Store, Outbox, Contact), AgentError> {
    let (m, path) = (machine.to_owned(), dir.clone());
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|error| AgentError::DataDir {
            machine: m.clone(),
            path: dir.clone(),
            error,
        })?;
        let store_err = |error| AgentError::Store {
            machine: m.clone(),
            error,
        };
        let store = Store::open(&dir).map_err(store_err)?;
        let mut outbox = Outbox::open(&dir).map_err(store_err)?;
        let resealed = outbox.reseal(&secret).map_err(store_err)?;
        if resealed > 0 {
            tracing::warn!(
                machine = %m,
                "{resealed} queued status event(s) were MAC'd with another secret (a rotated or corrected config): MAC'd again with this one"
            );
        }
        // Only for people: a damaged file is started afresh.
        let contact = Contact::read(&dir).unwrap_or_else(|e| {
            tracing::warn!(machine = %m, "{e}; the last contact starts afresh");
            Contact::default()
        });
        Ok((store, outbox, contact))
    })
    .await
    .unwrap_or_else(|e| {
        Err(AgentError::DataDir {
            machine: machine.to_owned(),
            path,
            error: std::io::Error::other(e),
        })
    })
}

/// The release id an unverified notice claims, for the operator's eyes only.
fn claimed_release(payload: &[u8]) -> Option<ReleaseId> {
    if payload.len() > MAX_JSON_MESSAGE {
        return None;
    }
    let env: SignedEnvelope = serde_json::from_slice(payload).ok()?;
    let body: serde_json::Value = serde_json::from_str(&env.body).ok()?;
    ReleaseId::new(body.get("release")?.as_str()?).ok()
}

/// What a machine subscribes to after each connect, in the order it sends the SUBSCRIBEs.
///
/// The key chain first: a notice signed by a newer key is only ignored when it arrives before
/// the chain. The release topics last: their retained notices come as soon as those are
/// granted, and the status event a notice makes must find the ack topic subscribed
/// (protocol.md §2). Chunk frames are QoS 0 (a lost one is re-requested): subscribed with
/// QoS 1, rumqttd would hand a connection its whole inflight window of 64 KiB frames at once,
/// through a write buffer it keeps at that size for the life of the connection.
fn subscriptions<'a>(
    topics: &Topics,
    me: &MachineId,
    groups: &[GroupId],
    downloading: impl Iterator<Item = &'a ArtifactId>,
) -> Vec<(String, QoS)> {
    let (reliable, chunks) = (QoS::AtLeastOnce, QoS::AtMostOnce);
    let mut filters = vec![
        (topics.platform_keys(), reliable),
        (topics.status_ack(me), reliable),
        (topics.command(me), reliable),
        (topics.machine_chunks(me), chunks),
    ];
    filters.extend(downloading.map(|a| (topics.artifact_chunks(a), chunks)));
    filters.push((topics.machine_release_filter(me), reliable));
    filters.extend(
        groups
            .iter()
            .map(|g| (topics.group_release_filter(g), reliable)),
    );
    filters
}

/// Queues a SUBSCRIBE for each of `filters`; false when one could not be queued (the client's
/// request queue is full), to be tried again.
fn subscribe_each(
    client: &AsyncClient,
    me: &MachineId,
    filters: impl IntoIterator<Item = (String, QoS)>,
) -> bool {
    let mut all = true;
    for (f, qos) in filters {
        if let Err(e) = client.try_subscribe(f.clone(), qos) {
            tracing::warn!(machine = %me, filter = %f, "cannot subscribe now; tried again at the next tick: {e}");
            all = false;
        }
    }
    all
}

/// The agent's MQTT session: its machine's credentials, a clean session, the keep-alive of its
/// config, and `online = false` as its will.
fn mqtt_options(
    config: &MachineConfig,
    url: &fleetcast_broker::BrokerUrl,
    topics: &Topics,
) -> rumqttc::MqttOptions {
    let mut mqtt = client::options(
        url,
        config.machine.as_str(),
        Some(&config.secret.mqtt_password()),
    );
    mqtt.set_clean_session(true);
    mqtt.set_keep_alive(Duration::from_secs(config.keep_alive_secs.into()));
    mqtt.set_last_will(LastWill::new(
        topics.online(&config.machine),
        "false",
        QoS::AtLeastOnce,
        true,
    ));
    mqtt
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine that cannot reach its broker says so at once, at warn (before, only at debug,
    /// so the default log showed nothing), then every 5 min with the count, not at every retry.
    #[test]
    fn failed_connects_warn_at_once_then_every_five_minutes() {
        let mut f = ConnectFailures::default();
        let t0 = Instant::now();
        assert_eq!(f.failed(t0), Some(1));
        assert_eq!(f.failed(t0 + Duration::from_secs(1)), None);
        assert_eq!(f.failed(t0 + Duration::from_secs(60)), None);
        assert_eq!(f.failed(t0 + ConnectFailures::WARN_EVERY), Some(4));
        assert_eq!(f.connected(), Some(4));
        // The next outage warns at once again, counting from one.
        assert_eq!(f.failed(t0 + ConnectFailures::WARN_EVERY), Some(1));
        let mut quiet = ConnectFailures::default();
        assert_eq!(quiet.connected(), None, "no failure, nothing to report");
    }
    use fleetcast_proto::chunk::{encode_frame, FrameHeader};
    use fleetcast_proto::ArtifactId;

    /// A SUBSCRIBE the client cannot queue (its request queue full, as during a download's
    /// burst of chunk requests) is reported, so the agent subscribes again at its next tick:
    /// after a `groups` command, nothing else would bring the new group's subscription.
    #[test]
    fn a_subscription_the_client_cannot_queue_is_reported_to_be_tried_again() {
        let opts = rumqttc::MqttOptions::new("vm-1", "127.0.0.1", 1883);
        let (client, _eventloop) = AsyncClient::new(opts, 1);
        let me = MachineId::new("vm-1").unwrap();
        let filter = |f: &str| (f.to_owned(), QoS::AtLeastOnce);
        assert!(subscribe_each(&client, &me, [filter("a")]));
        assert!(
            !subscribe_each(&client, &me, [filter("b"), filter("c")]),
            "a queue of one holds one request"
        );
    }

    /// The data dir is cleaned after a ledger change only when an artifact in use since the
    /// last cleaning no longer is: not when a job starts, but when it is superseded even if
    /// the change that started it was never cleaned after.
    #[test]
    fn cleaning_after_a_change_only_when_an_artifact_left_the_set_in_use() {
        use std::collections::HashSet;
        let [x, a, b] = [b"x", b"a", b"b"].map(|s| ArtifactId::of(s));
        let set = |ids: &[ArtifactId]| ids.iter().copied().collect::<HashSet<_>>();
        assert!(
            released_since_cleaning(&mut None, &set(&[x])),
            "not known: clean"
        );
        let mut seen = Some(set(&[x]));
        assert!(
            !released_since_cleaning(&mut seen, &set(&[x, a])),
            "a job starts"
        );
        assert!(
            !released_since_cleaning(&mut seen, &set(&[x, a])),
            "nothing changed"
        );
        assert!(
            released_since_cleaning(&mut seen, &set(&[x, b])),
            "a superseded job's artifact left"
        );
        let mut seen = Some(set(&[x]));
        assert!(
            released_since_cleaning(&mut seen, &set(&[a])),
            "the installed one left"
        );
    }

    fn frame(frame_type: FrameType) -> Bytes {
        let header = FrameHeader {
            frame_type,
            artifact: ArtifactId::of(b"artifact"),
            index: 0,
            total: 1,
        };
        Bytes::from(encode_frame(&header, b"payload"))
    }

    /// The session asks the broker for the config's keep-alive, and carries the machine's
    /// credentials and its will.
    #[test]
    fn the_session_asks_for_the_configured_keep_alive() {
        use fleetcast_proto::admin::ProvisionedMachine;
        use fleetcast_proto::auth::{PlatformKey, Secret};
        let p = ProvisionedMachine {
            machine: MachineId::new("vm-001").unwrap(),
            groups: vec![],
            secret: Secret::from_bytes([7; 32]),
            platform_key: PlatformKey::from_seed([1; 32]).public(),
            platform_key_gen: 0,
            topic_prefix: "fleet".into(),
        };
        let mut config =
            MachineConfig::from_provisioned(&p, "mqtt://127.0.0.1:1883", "/tmp/x".into());
        let url = config.broker_url().unwrap();
        let topics = Topics::new(&config.topic_prefix);
        let default = mqtt_options(&config, &url, &topics);
        assert_eq!(default.keep_alive(), Duration::from_secs(30));
        config.keep_alive_secs = 180;
        let slow = mqtt_options(&config, &url, &topics);
        assert_eq!(slow.keep_alive(), Duration::from_secs(180));
        assert_eq!(slow.client_id(), "vm-001");
        assert!(slow.clean_session());
        assert_eq!(
            slow.last_will().map(|w| w.topic),
            Some(topics.online(&config.machine))
        );
    }

    #[test]
    fn chunk_frames_leave_room_in_a_download_queue_for_its_manifest() {
        let (queue, _rx) = mpsc::channel(FRAMES_QUEUED);
        let (chunk, manifest) = (frame(FrameType::Chunk), frame(FrameType::Manifest));
        assert!(!is_manifest(&chunk) && is_manifest(&manifest));
        let taken = (0..FRAMES_QUEUED)
            .filter(|_| offer_frame(&queue, &chunk, is_manifest(&chunk)))
            .count();
        assert_eq!(taken, FRAMES_QUEUED - MANIFEST_HEADROOM);
        for _ in 0..MANIFEST_HEADROOM {
            assert!(offer_frame(&queue, &manifest, is_manifest(&manifest)));
        }
        assert!(!offer_frame(&queue, &manifest, true), "full: dropped");
    }
    #[test]
    fn the_release_topics_are_subscribed_after_the_keys_the_ack_topic_and_the_chunks() {
        let topics = Topics::new(fleetcast_proto::topics::DEFAULT_PREFIX);
        let me = MachineId::new("vm-001").unwrap();
        let groups = [
            GroupId::new("north").unwrap(),
            GroupId::new("south").unwrap(),
        ];
        let artifact = ArtifactId::of(b"artifact");
        let subs = subscriptions(&topics, &me, &groups, std::iter::once(&artifact));
        let at = |topic: String| {
            subs.iter()
                .position(|(f, _)| *f == topic)
                .unwrap_or_else(|| panic!("{topic} not subscribed: {subs:?}"))
        };
        assert_eq!(at(topics.platform_keys()), 0, "the key chain first");
        let before_notices = [
            at(topics.status_ack(&me)),
            at(topics.command(&me)),
            at(topics.machine_chunks(&me)),
            at(topics.artifact_chunks(&artifact)),
        ];
        let notices = [
            at(topics.machine_release_filter(&me)),
            at(topics.group_release_filter(&groups[0])),
            at(topics.group_release_filter(&groups[1])),
        ];
        assert_eq!(subs.len(), 1 + before_notices.len() + notices.len());
        let last_other = before_notices.iter().max().unwrap();
        assert!(
            notices.iter().all(|n| n > last_other),
            "a retained notice must not come before the ack topic is subscribed: {subs:?}"
        );
        let qos = |topic: String| subs[at(topic)].1;
        assert_eq!(qos(topics.artifact_chunks(&artifact)), QoS::AtMostOnce);
        assert_eq!(qos(topics.machine_chunks(&me)), QoS::AtMostOnce);
        assert_eq!(qos(topics.status_ack(&me)), QoS::AtLeastOnce);
        assert_eq!(qos(topics.machine_release_filter(&me)), QoS::AtLeastOnce);
    }
}
