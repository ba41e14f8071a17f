//! The ingest connection (`fleetcast-platform-ingest`): a persistent session for what machines
//! report on `machines/+/status`, `/state` and `/online`.
//!
//! Each batch (everything available, up to [`MAX_BATCH`] messages or [`BATCH_WINDOW`]) is
//! verified, applied and written to sled, and flushed once; only then does each machine get its
//! `StatusAck` (one per machine per batch, MAC'd with the machine's own secret), which is what
//! lets it drop the event from its outbox. The broker's PUBACK goes out on receipt and promises
//! nothing: an event lost between it and the flush (a crash) was never acknowledged to the
//! machine, which sends it again. On
//! the embedded broker, status events, states and `online` come from the gateway in process
//! instead ([`crate::context::SessionControl::take_reports`]), into the same queue.
//! Invalid messages (bad MAC, unknown machine, malformed, oversized, replayed) are logged and
//! change nothing. Integrator messages (`fleet/events`, rollout progress) and reconciler
//! re-publishes go out after the flush.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcast_broker::MqttEvent;
use fleetcast_proto::admin::{FleetEvent, MachineInfo, TargetRecord};
use fleetcast_proto::auth::{AuthError, MacEnvelope, Purpose, Secret};
use fleetcast_proto::command::CommandAction;
use fleetcast_proto::release::validate_version;
use fleetcast_proto::status::status_envelopes;
use fleetcast_proto::text::shown;
use fleetcast_proto::{
    GroupId, Kind, MachineId, MachineState, Phase, ReleaseId, Route, StatusEvent,
};
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::Ctx;
use crate::domain::target;
use crate::error::PlatformError;
use crate::limits::{self, MachineRates};
use crate::publish;
use crate::store::{DesiredNotice, Records, Store, StoreError};
use crate::{now_ms, staged};

pub const MAX_BATCH: usize = 1024;
pub const BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Rollout progress of one release is published at most this often, and its last change within
/// this (the periodic tick). Progress reads every target of the release: publishing it on each
/// final phase, as this once did, cost a full scan per machine of a rollout.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// ... and at most once per this many times as long as its last publish took: reading every
/// target grows with the release (about 25 ms at 10,000 machines, 7 % of `serve`'s CPU in such
/// a rollout at every 500 ms, 2026-11-28), so a larger release is published less often and its
/// progress costs at most about 1/40 of a core, whatever its size (1 s apart at 10,000).
pub const PROGRESS_COST_RATIO: u32 = 40;
/// A desired notice that machines report being behind on is re-published at most this often,
/// per topic: a group's notice goes to every machine of the group, so re-publishing it once per
/// machine behind it (as this once did) sent a 10,000-machine group N x N notices right after
/// the publish, when every state in flight still showed the old release, and the gateway
/// closed every session that could not read them. The first machine seen behind on a notice
/// starts the clock instead of re-publishing: the platform has just published it (at the
/// publish, and again each time its broker connection comes up), and a machine gets it again
/// whenever it subscribes.
///
/// Each time the same notice goes out again on its topic, the wait before the next doubles, up
/// to [`REPUBLISH_MAX_DOUBLINGS`] times (30 s, 1, 2, 4 ... 64 min): a machine whose states
/// keep saying it is behind (a stolen config can say so for ever) made every machine of its
/// group receive every notice of the group again every 30 s (a red-team pass, 2026-11-30: 21
/// notices, 42 messages a minute, about 30 MB a day per machine). A machine that is really
/// behind gets the notice again whenever it subscribes (at each reconnect) as well.
pub const REPUBLISH_INTERVAL: Duration = Duration::from_secs(30);
/// How many times the wait between re-sends of one notice (or of the key chain) doubles.
pub const REPUBLISH_MAX_DOUBLINGS: u32 = 7;
/// How long the platform remembers how often a notice went out again, from its last re-send
/// (or from the first state behind on it): a day. Forgotten after four times its wait, as
/// first done, a stolen config that fell silent for a few minutes between bursts of states
/// found the wait back at 30 s (a re-test, 2026-11-30: about 13 re-sends an hour instead of
/// one). A newer notice on the topic starts it over.
pub const REPUBLISH_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// The wait after a notice went out again `sent` times: `every`, doubled `sent` times, at most
/// [`REPUBLISH_MAX_DOUBLINGS`].
fn republish_wait(every: Duration, sent: u32) -> Duration {
    every.saturating_mul(1 << sent.min(REPUBLISH_MAX_DOUBLINGS))
}
/// Kinds one state may name, and kinds one machine keeps a version history of. A vending
/// machine has a handful (application, firmware, configuration, ...); without a bound one
/// machine's credentials grew the store by 165 MiB in six seconds with states naming thousands
/// of new kinds each, and slowed everyone's acknowledgements to seconds.
pub const MAX_KINDS: usize = 32;
/// A status event's `error` and `detail` are kept to this many bytes (the rest is cut, and the
/// cut says how much): one machine's 250 KB details filled the event log 14 MiB per 40 events.
pub const MAX_TEXT: usize = 4 * 1024;

/// Highest `attempt` a status event may carry. The reference agent makes at most 5 attempts
/// per job; an event with 4,294,967,295 made a stolen config's false final record outlive the
/// machine's rotation (a final record changes only with a higher attempt).
pub const MAX_ATTEMPT: u32 = 100;

/// Work that waits for the batch's flush.
enum After {
    /// Tell the machine its status events up to `ctr` are stored (after the flush), MAC'd with
    /// `secret`, the one its event was MAC'd with.
    StatusAck {
        machine: MachineId,
        ctr: u64,
        secret: Secret,
    },
    /// A message's events, in order: stored by [`store_events`] (which gives them their ids)
    /// before the flush, then sent to the integrators.
    Events(Vec<FleetEvent>),
    Progress {
        release: ReleaseId,
    },
    Republish(DesiredNotice),
    /// A signed command for one machine (its seq taken before the flush).
    Command {
        topic: String,
        payload: Vec<u8>,
    },
    /// A machine trusts an older platform key: send the key chain again.
    KeyChain,
    /// What a machine sent was kept only in part, or not applied: logged after the batch (not
    /// in the transaction, which may run more than once), through the per-machine log gate.
    Warn {
        machine: MachineId,
        what: String,
    },
}

/// One ack per machine per batch: an ack says "every event up to `ctr` is stored", so the
/// highest one (with the secret of the event it names) covers the rest. It goes where that
/// machine's first ack was, so acks keep their order relative to other work.
fn coalesce_acks(after: Vec<After>) -> Vec<After> {
    let mut highest: HashMap<MachineId, (u64, Secret)> = HashMap::new();
    for a in &after {
        if let After::StatusAck {
            machine,
            ctr,
            secret,
        } = a
        {
            let h = highest
                .entry(machine.clone())
                .or_insert_with(|| (*ctr, secret.clone()));
            if *ctr > h.0 {
                *h = (*ctr, secret.clone());
            }
        }
    }
    after
        .into_iter()
        .filter_map(|a| match a {
            After::StatusAck { machine, .. } => {
                highest
                    .remove(&machine)
                    .map(|(ctr, secret)| After::StatusAck {
                        machine,
                        ctr,
                        secret,
                    })
            }
            other => Some(other),
        })
        .collect()
}

/// Stores the events of every message of a batch together, in the order they came, before
/// the batch's flush: the store writes them in blocks (sled: one write per 16 events, where one
/// per event was most of what storing a status cost), and a batch of single-event messages from
/// many machines fills blocks as well as one machine's backlog does. Leaves them, with their
/// ids, as one [`After::Events`] at the end.
fn store_events(store: &dyn Store, after: &mut Vec<After>) -> Result<(), StoreError> {
    let mut events = Vec::new();
    after.retain_mut(|a| match a {
        After::Events(e) => {
            events.append(e);
            false
        }
        _ => true,
    });
    store.append_events(&mut events)?;
    if !events.is_empty() {
        after.push(After::Events(events));
    }
    Ok(())
}

fn warn(machine: &MachineId, what: String) -> After {
    After::Warn {
        machine: machine.clone(),
        what,
    }
}

/// The sender and counter of a MAC'd body, for the replay check.
trait Sent {
    fn sender(&self) -> (&MachineId, u64);
}

impl Sent for MachineState {
    fn sender(&self) -> (&MachineId, u64) {
        (&self.machine, self.ctr)
    }
}

/// A MAC-valid body newer than what was accepted before, or a replay.
enum Opened<T> {
    Fresh(T),
    Replay,
}

/// Why a message was dropped.
struct Reject {
    machine: String,
    reason: String,
    /// Replays of retained messages are expected after a reconnect: logged quietly.
    quiet: bool,
}

struct Ingest {
    ctx: Arc<Ctx>,
    /// Each flushed batch's integrator events, to [`send_signed`].
    signed: mpsc::Sender<ToSign>,
    /// Each flushed batch's acks an external broker carries, to [`publish_acks`].
    acks: mpsc::Sender<Vec<(String, Vec<u8>)>>,
    /// When each release's progress may be published again.
    progress_next: HashMap<ReleaseId, Instant>,
    progress_dirty: HashSet<ReleaseId>,
    /// Per notice topic: which notice (seq) was last sent there, when (or when a machine was
    /// first seen behind on it), and how many times it went out again.
    republished: HashMap<String, Resent>,
    /// When the key chain was last re-published for a machine behind it (one retained message
    /// serves every machine, so once per interval is enough; the interval doubles as for
    /// notices), for which key generation, and how many times.
    chain_sent: Option<(u32, Resent)>,
    /// Per machine: the groups it was last told it is in (a `groups` command), and when.
    groups_told: HashMap<MachineId, (Vec<GroupId>, Instant)>,
    /// Releases whose records changed since their staged rollout (if any) was last evaluated,
    /// and when each was (at most once per [`PROGRESS_INTERVAL`]; all every `staged::SWEEP`).
    rollouts_dirty: HashSet<ReleaseId>,
    rollouts_checked: HashMap<ReleaseId, Instant>,
    rollouts_swept: Instant,
}

/// A flushed batch's events for integrators, to be signed. An Ed25519 signature (about 22 µs)
/// was, with the one each ack had before acks were MAC'd, half of the ingest loop's time
/// (verifying and storing an event takes about 35 µs, 26 of them its sled transaction; perf
/// over the ingest bench), so [`send_signed`] signs them on a blocking thread while the loop
/// verifies and stores the next batch.
#[derive(Default)]
struct ToSign {
    events: Vec<FleetEvent>,
}

/// Sends each machine's ack, MAC'd with its secret (about 1 µs: the ingest loop does it itself,
/// right after the flush). Ed25519-signed acks cost `serve` a signature per acknowledged event
/// and each machine a verification (about 40 µs here: the ingest bench's clients went from 73
/// to 30-44 µs of CPU per event), to prove what the machine's own secret proves as well: only
/// the platform and that machine hold it, and another machine's credentials can neither forge
/// it nor make one verify for this machine.
///
/// The embedded broker's gateway takes them at once. What it does not take (an external
/// broker) is returned, as (topic, payload), for [`publish_acks`].
fn send_acks(ctx: &Ctx, acks: Vec<(fleetcast_proto::StatusAck, Secret)>) -> Vec<(String, Vec<u8>)> {
    let mut rest = Vec::new();
    for (ack, secret) in acks {
        let payload = secret.seal(Purpose::StatusAck, &ack);
        let topic = ctx.topics.status_ack(&ack.machine);
        // The embedded broker's gateway delivers each machine's acks itself (a filter per
        // machine in rumqttd would cost its topic matching the size of the fleet).
        if ctx.sessions.deliver(&topic, &payload, None, None).is_none() {
            rest.push((topic, payload));
        }
    }
    rest
}

/// Publishes the acks an external broker carries, on the ingest's own connection, waiting for
/// room rather than dropping them: on the platform's main connection they queued behind chunk
/// frames, and a full queue dropped them (Mosquitto, 1,000 machines: 150 acks over three
/// rollouts, two of which took 11 s instead of 2.8 s while machines waited 10 s to send
/// again). A task of its own, because the connection's queue drains only while its driver
/// polls, and the driver waits while the ingest loop's queue of incoming reports is full: a
/// loop waiting here for room could wait on itself.
async fn publish_acks(client: AsyncClient, mut batches: mpsc::Receiver<Vec<(String, Vec<u8>)>>) {
    while let Some(batch) = batches.recv().await {
        for (topic, payload) in batch {
            if let Err(err) = client.publish(topic, QoS::AtMostOnce, false, payload).await {
                tracing::debug!(error = %err, "status ack not queued");
            }
        }
    }
}

/// Flushed batches of acks waiting for [`publish_acks`]; past this (the ingest connection is
/// down or stuck) a batch's acks are dropped, and its machines send their events again.
const ACK_BATCHES_QUEUED: usize = 16;

/// Signs and sends each batch's events, in the order the batches were flushed.
async fn send_signed(ctx: Arc<Ctx>, mut batches: mpsc::Receiver<ToSign>) {
    while let Some(batch) = batches.recv().await {
        let ctx = ctx.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || sign_and_send(&ctx, batch)).await {
            tracing::error!(error = %e, "fleet events not published");
        }
    }
}

fn sign_and_send(ctx: &Ctx, batch: ToSign) {
    let keys = ctx.keys();
    let topic = ctx.topics.events();
    // The embedded broker's gateway delivers events itself: through rumqttd, a topic nobody
    // subscribes to is matched against every filter on each publish (its match cache keeps only
    // topics that matched something), which made ingest pay for the size of the fleet on every
    // stored event. It also knows whether anyone listens: with no integrator subscribed, no
    // event is signed. `fleet/events` is live and best effort.
    if ctx.sessions.subscribed(&topic) == Some(false) {
        return;
    }
    for e in batch.events {
        let payload = keys.platform.sign(Purpose::Event, &e);
        if ctx.sessions.deliver(&topic, &payload, None, None).is_none() {
            if let Err(err) = ctx
                .mqtt
                .try_publish(&topic, QoS::AtMostOnce, false, payload)
            {
                tracing::debug!(error = %err, "fleet event not published");
            }
        }
    }
}

/// Runs the ingest loop until shutdown. A store error stops the service before any of the
/// batch is acknowledged to its machines (they send it again).
pub async fn run(
    ctx: Arc<Ctx>,
    client: AsyncClient,
    events: mpsc::Receiver<MqttEvent>,
    shutdown: CancellationToken,
) -> Result<(), PlatformError> {
    let (signed, to_sign) = mpsc::channel(1);
    let sender = tokio::spawn(send_signed(ctx.clone(), to_sign));
    let (acks, to_publish) = mpsc::channel(ACK_BATCHES_QUEUED);
    let publisher = tokio::spawn(publish_acks(client.clone(), to_publish));
    // One batch opened and waiting while the loop stores another, and the gatherer at work on
    // a third at most.
    let (opened, batches) = mpsc::channel(1);
    let gatherer = tokio::spawn(gather(ctx.clone(), client, events, opened));
    let mut ingest = Ingest::new(ctx, signed, acks);
    let result = ingest.run(batches, shutdown).await;
    // What was flushed is still acknowledged; the sender ends once the loop's handle is gone.
    drop(ingest);
    gatherer.abort();
    if let Err(e) = sender.await {
        tracing::error!(error = %e, "fleet events not sent");
    }
    // The acks of what was flushed, briefly (a connection that is down takes none).
    if tokio::time::timeout(Duration::from_secs(2), publisher)
        .await
        .is_err()
    {
        tracing::warn!(
            "status acks not all published before shutdown; machines will send those events again"
        );
    }
    result
}

/// A message for the ingest loop; a status message comes opened ([`OpenedStatus`]).
type Incoming = (Publish, Option<OpenedStatus>);

/// A status message opened: parsed, and each event's MAC checked with the machine's secret
/// and its body read. That is a sixth of the ingest loop's time with batched events (perf over
/// the ingest bench); [`gather`] does it for the next batch, on a blocking thread, while the
/// loop stores the one before. The loop uses it only if the machine's secret is still the one
/// it was opened with ([`Ingest::status`]).
struct OpenedStatus {
    /// The machine's secret it was opened with (`None`: not provisioned, nothing opened).
    secret: Option<Secret>,
    /// The number of events in the message and each opened, in order, up to and including
    /// the first that did not open; or why the message does not parse.
    events: Result<(usize, Vec<Result<StatusEvent, Unopened>>), String>,
}

/// A status event that did not open: why, and, when its MAC held but its body is not a
/// status event (a `kind` that is no id, say), the machine and counter the body names, so
/// that the counter is spent as a field-refused event's is and the machine's resend is
/// acknowledged as a replay. Without that, an event the platform can never take would hold
/// the machine's outbox for ever (protocol.md §6.1).
struct Unopened {
    reason: String,
    sender: Option<(String, u64)>,
}

impl Unopened {
    fn of(env: &MacEnvelope, e: AuthError) -> Self {
        let sender = match &e {
            AuthError::Body(_) => serde_json::from_str::<serde_json::Value>(&env.body)
                .ok()
                .and_then(|v| Some((v["machine"].as_str()?.to_owned(), v["ctr"].as_u64()?))),
            _ => None,
        };
        Unopened {
            reason: e.to_string(),
            sender,
        }
    }
}

impl OpenedStatus {
    fn open(secret: Option<Secret>, payload: &[u8]) -> Self {
        let events = status_envelopes(payload)
            .map_err(|e| e.to_string())
            .map(|envelopes| {
                let mut opened = Vec::with_capacity(envelopes.len());
                if let Some(secret) = &secret {
                    for env in &envelopes {
                        let ev = secret.open_envelope::<StatusEvent>(Purpose::Status, env);
                        let failed = ev.is_err();
                        opened.push(ev.map_err(|e| Unopened::of(env, e)));
                        if failed {
                            break;
                        }
                    }
                }
                (envelopes.len(), opened)
            });
        OpenedStatus { secret, events }
    }

    /// `p` opened, if it is a status message and its machine's secret could be read.
    fn ahead(ctx: &Ctx, p: &Publish) -> Option<Self> {
        let Some(Route::Status(m)) = ctx.topics.parse(&p.topic) else {
            return None;
        };
        let secret = ctx.store.secret(&m).ok()?;
        Some(Self::open(secret, &p.payload))
    }
}

/// Reads the ingest connection into batches (everything available, up to [`MAX_BATCH`]
/// messages or [`BATCH_WINDOW`] after the first) and opens each batch's status messages on a
/// blocking thread before handing it to the loop, so that the next batch is read and opened
/// while the loop stores one.
async fn gather(
    ctx: Arc<Ctx>,
    client: AsyncClient,
    mut events: mpsc::Receiver<MqttEvent>,
    batches: mpsc::Sender<Vec<Incoming>>,
) {
    let mut rates = MachineRates::new(limits::EXTERNAL_REPORTS, std::time::Instant::now());
    loop {
        let Some(first) = events.recv().await else {
            return;
        };
        let mut batch = Vec::new();
        take(&ctx, &client, &mut rates, first, &mut batch);
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        while batch.len() < MAX_BATCH {
            match events.try_recv() {
                Ok(e) => take(&ctx, &client, &mut rates, e, &mut batch),
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Ok(Some(e)) => take(&ctx, &client, &mut rates, e, &mut batch),
                        _ => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let ctx = ctx.clone();
        let opened = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|p| {
                    let pre = OpenedStatus::ahead(&ctx, &p);
                    (p, pre)
                })
                .collect()
        })
        .await;
        match opened {
            Ok(opened) => {
                if batches.send(opened).await.is_err() {
                    return;
                }
            }
            // The batch is lost unacknowledged: its machines send it again.
            Err(e) => tracing::error!(error = %e, "ingest batch not opened"),
        }
    }
}

/// Puts a report into `batch`, or handles a connection event. Reports reach this connection
/// from an external broker only (the embedded one's gateway hands them over in process, after
/// its own per-machine limits), so here each machine is held to a report rate first
/// ([`limits::EXTERNAL_REPORTS`]); what is over it is dropped before anything is read or
/// stored, and the machine sends it again (its status after its resend timeout, its state when
/// it next changes or reconnects). Why: on Mosquitto nothing else holds one machine's
/// credentials sending valid reports as fast as the broker takes them, which would fill the
/// ingest's queue, and the broker's queue for the platform behind it, for every machine (found
/// by reading the code in a review with one machine's config, 2026-11-29; not measured).
fn take(
    ctx: &Ctx,
    client: &AsyncClient,
    rates: &mut MachineRates,
    event: MqttEvent,
    batch: &mut Vec<Publish>,
) {
    match event {
        MqttEvent::Publish(p) => {
            let (sender, cost) = match ctx.topics.parse(&p.topic) {
                Some(Route::Status(m)) => (m, fleetcast_proto::status::status_count(&p.payload)),
                Some(Route::State(m) | Route::Online(m)) => (m, 1),
                _ => return batch.push(p),
            };
            if rates.admit(&sender, cost, std::time::Instant::now()) {
                batch.push(p);
            } else if let Some(quiet_before) = ctx.should_log(sender.as_str()) {
                tracing::warn!(machine = %sender, quiet_before, "over its report rate: report dropped (the machine sends it again)");
            }
        }
        MqttEvent::Connected { session_present } => {
            let t = &ctx.topics;
            let filters = [
                t.platform_status_filter(),
                t.platform_state_filter(),
                t.platform_online_filter(),
            ]
            .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
            if let Err(e) = client.try_subscribe_many(filters) {
                tracing::warn!(error = %e, "ingest subscribe failed");
            }
            tracing::info!(session_present, "ingest connection up");
        }
        MqttEvent::Disconnected(e) => {
            tracing::warn!(error = %e, "ingest connection lost; reconnecting")
        }
        MqttEvent::PubAck(_) | MqttEvent::Sent(_) | MqttEvent::SubAck(_) => {}
    }
}

impl Ingest {
    fn new(
        ctx: Arc<Ctx>,
        signed: mpsc::Sender<ToSign>,
        acks: mpsc::Sender<Vec<(String, Vec<u8>)>>,
    ) -> Self {
        Ingest {
            ctx,
            signed,
            acks,
            progress_next: HashMap::new(),
            progress_dirty: HashSet::new(),
            republished: HashMap::new(),
            chain_sent: None,
            groups_told: HashMap::new(),
            rollouts_dirty: HashSet::new(),
            rollouts_checked: HashMap::new(),
            rollouts_swept: Instant::now(),
        }
    }

    async fn run(
        &mut self,
        mut batches: mpsc::Receiver<Vec<Incoming>>,
        shutdown: CancellationToken,
    ) -> Result<(), PlatformError> {
        let ingest = self;
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    ingest.flush_progress();
                    ingest.rollouts().await;
                    ingest.forget_expired(Instant::now());
                    continue
                }
                b = batches.recv() => match b { Some(b) => b, None => return Ok(()) },
            };
            ingest.process(batch).await?;
            ingest.rollouts().await;
        }
    }

    async fn process(&mut self, batch: Vec<Incoming>) -> Result<(), PlatformError> {
        let mut after = Vec::new();
        for (p, pre) in batch {
            match self.handle(&p, pre) {
                Ok(mut a) => after.append(&mut a),
                Err(Ok(reject)) => self.note_reject(&reject, &p.topic),
                Err(Err(e)) => return Err(e.into()),
            }
        }
        store_events(&*self.ctx.store, &mut after)?;
        let mut tries = 0;
        while let Err(e) = self.ctx.store.flush_async().await {
            tries += 1;
            if tries >= 3 {
                return Err(e.into());
            }
            tracing::error!(error = %e, "flush failed; retrying");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stored = after
            .iter()
            .map(|a| match a {
                After::Events(e) => e.len(),
                _ => 0,
            })
            .sum();
        self.ctx.stats.batch_flushed(stored);
        let mut to_sign = ToSign::default();
        let mut acks = Vec::new();
        for a in coalesce_acks(after) {
            self.after(a, &mut acks, &mut to_sign)?;
        }
        let rest = send_acks(&self.ctx, acks);
        if !rest.is_empty() && self.acks.try_send(rest).is_err() {
            tracing::warn!("status acks dropped: the ingest connection is not taking them (down?); machines will send those events again");
        }
        if !to_sign.events.is_empty() {
            // At most one batch waits while another is signed: the loop stores the next batch
            // meanwhile, and waits here when signing falls behind.
            if self.signed.send(to_sign).await.is_err() {
                tracing::error!("fleet event signer gone; events not published");
            }
        }
        Ok(())
    }

    /// Counts and logs a dropped message (or the rest of a batch, from the event refused).
    fn note_reject(&self, reject: &Reject, topic: &str) {
        let (machine, topic) = (shown(&reject.machine), shown(topic));
        let reason = shown(&reject.reason);
        if !reject.quiet {
            self.ctx.stats.report_dropped();
        }
        if reject.quiet {
            tracing::debug!(%machine, %topic, %reason, "message dropped");
        } else if let Some(quiet_before) = self.ctx.should_log(&reject.machine) {
            tracing::warn!(%machine, %topic, %reason, quiet_before, "message dropped");
        }
    }

    /// Does `a`; an ack goes to `acks`, what needs a signature to `to_sign`.
    fn after(
        &mut self,
        a: After,
        acks: &mut Vec<(fleetcast_proto::StatusAck, Secret)>,
        to_sign: &mut ToSign,
    ) -> Result<(), StoreError> {
        let ctx = &self.ctx;
        match a {
            After::StatusAck {
                machine,
                ctr,
                secret,
            } => acks.push((fleetcast_proto::StatusAck { machine, ctr }, secret)),
            After::Events(mut e) => to_sign.events.append(&mut e),
            After::Progress { release } => {
                self.rollouts_dirty.insert(release.clone());
                if self.progress_due(&release) {
                    self.send_progress(&release)?;
                } else {
                    self.progress_dirty.insert(release);
                }
            }
            After::KeyChain => {
                let keys = ctx.keys();
                if let Err(err) = ctx.mqtt.try_publish(
                    ctx.topics.platform_keys(),
                    QoS::AtLeastOnce,
                    true,
                    keys.chain.to_bytes(),
                ) {
                    tracing::warn!(error = %err, "key chain re-publish not queued");
                }
            }
            After::Warn { machine, what } => {
                if let Some(quiet_before) = ctx.should_log(machine.as_str()) {
                    tracing::warn!(%machine, quiet_before, "{what}");
                }
            }
            After::Command { topic, payload } => {
                if let Err(err) = ctx
                    .mqtt
                    .try_publish(topic, QoS::AtLeastOnce, false, payload)
                {
                    tracing::warn!(error = %err, "command not queued");
                }
            }
            After::Republish(n) => {
                tracing::info!(topic = %n.topic, seq = n.seq, "re-publishing desired notice to a machine behind it");
                if let Err(err) =
                    ctx.mqtt
                        .try_publish(n.topic, QoS::AtLeastOnce, true, n.payload.into_bytes())
                {
                    tracing::warn!(error = %err, "re-publish not queued");
                }
            }
        }
        Ok(())
    }

    /// Re-evaluates the staged rollouts of releases whose records changed (each at most once
    /// per [`PROGRESS_INTERVAL`]) and, every `staged::SWEEP`, every running one (wave timeouts,
    /// and rollouts a restart left mid-wave). A failure is logged and tried again later.
    async fn rollouts(&mut self) {
        if self.rollouts_swept.elapsed() >= staged::SWEEP {
            self.rollouts_swept = Instant::now();
            self.rollouts_checked
                .retain(|_, t| t.elapsed() < staged::SWEEP);
            if let Err(e) = staged::evaluate_all(&self.ctx).await {
                tracing::warn!(error = %e, "staged rollouts not evaluated");
            }
        }
        let due: Vec<ReleaseId> = self
            .rollouts_dirty
            .iter()
            .filter(|r| {
                self.rollouts_checked
                    .get(*r)
                    .is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL)
            })
            .cloned()
            .collect();
        for r in due {
            self.rollouts_dirty.remove(&r);
            self.rollouts_checked.insert(r.clone(), Instant::now());
            if let Err(e) = staged::evaluate(&self.ctx, &r).await {
                tracing::warn!(release = %r, error = %e, "staged rollout not evaluated");
            }
        }
    }

    /// Forgets what no longer changes a decision at `now`: progress times that have passed (a
    /// release's progress is due without one as well; kept, they piled up for every release
    /// ever published, removed ones too, until a restart), notices not re-published for a
    /// while, and groups told long ago.
    fn forget_expired(&mut self, now: Instant) {
        self.progress_next.retain(|_, next| *next > now);
        self.republished.retain(|_, r| r.remembered(now));
        self.groups_told
            .retain(|_, (_, t)| now.duration_since(*t) < GROUPS_RESEND);
    }

    fn flush_progress(&mut self) {
        let due: Vec<ReleaseId> = self
            .progress_dirty
            .iter()
            .filter(|r| self.progress_due(r))
            .cloned()
            .collect();
        for r in due {
            if let Err(e) = self.send_progress(&r) {
                tracing::warn!(release = %r, error = %e, "rollout progress not published");
            }
        }
    }

    /// Whether `release`'s progress may be published now.
    fn progress_due(&self, release: &ReleaseId) -> bool {
        self.progress_next
            .get(release)
            .is_none_or(|t| Instant::now() >= *t)
    }

    /// Publishes `release`'s progress, and notes when it may be published again:
    /// [`PROGRESS_INTERVAL`] from now, or [`PROGRESS_COST_RATIO`] times what this one took if
    /// that is longer. The next try is noted even when the store failed.
    fn send_progress(&mut self, release: &ReleaseId) -> Result<(), StoreError> {
        let started = Instant::now();
        let published = publish::publish_progress(&self.ctx, release);
        self.progress_next
            .insert(release.clone(), started + progress_gap(started.elapsed()));
        self.progress_dirty.remove(release);
        published
    }

    /// Ok: applied (with post-flush work). Err(Ok): rejected. Err(Err): the store failed.
    fn handle(
        &mut self,
        p: &Publish,
        pre: Option<OpenedStatus>,
    ) -> Result<Vec<After>, Result<Reject, StoreError>> {
        let reject = |machine: &str, reason: String| {
            Err(Ok(Reject {
                machine: machine.to_owned(),
                reason,
                quiet: false,
            }))
        };
        let Some(route) = self.ctx.topics.parse(&p.topic) else {
            return reject("?", "not a fleetcast topic, or an invalid id in it".into());
        };
        match route {
            Route::Status(m) => self.status(&m, p, pre),
            Route::State(m) => self.state(&m, p),
            Route::Online(m) => self.online(&m, &p.payload),
            _ => reject("?", "unexpected topic on the ingest connection".into()),
        }
    }

    /// Opens a MAC'd body sent by `m` on `channel` and checks its machine and counter, recording
    /// a fresh counter. (Status messages, which may be batches, are opened by [`Self::status`].)
    fn open<T: serde::de::DeserializeOwned + Sent>(
        &self,
        m: &MachineId,
        channel: &str,
        purpose: Purpose,
        payload: &[u8],
    ) -> Result<Opened<T>, Result<Reject, StoreError>> {
        let reject = |reason: String| {
            Err(Ok(Reject {
                machine: m.to_string(),
                reason,
                quiet: false,
            }))
        };
        let _secrets = self.ctx.secrets.read().unwrap_or_else(|p| p.into_inner());
        let Some(secret) = self.ctx.store.secret(m).map_err(Err)? else {
            return reject("unknown machine (not provisioned)".into());
        };
        let body: T = match secret.open(purpose, payload) {
            Ok(b) => b,
            Err(e) => return reject(e.to_string()),
        };
        let (sender, ctr) = body.sender();
        if sender != m {
            return reject(format!("body names machine {sender}, topic names {m}"));
        }
        let last = self.ctx.store.raise_counter(m, channel, ctr).map_err(Err)?;
        if ctr <= last {
            tracing::debug!(machine = %m, channel, ctr, last, "replayed counter");
            return Ok(Opened::Replay);
        }
        Ok(Opened::Fresh(body))
    }

    /// A status message: one event, or a batch of them (protocol.md §6.1), each taken as if it
    /// had come alone, in order. A batch stops at its first event that is refused: what came
    /// before it is kept and acknowledged, the rest is dropped (the machine sends it again
    /// after the ack, from its outbox). A batch refused whole gets no answer, as a lone event.
    /// The machine's secret and status counter are read once per message, its record and its
    /// target records once per message and written back once (a backlog of 25 events cost 25
    /// of each), and the message gets one ack, for its highest counter.
    ///
    /// `pre` is the message opened ahead of the loop ([`OpenedStatus`]); it is used only if
    /// the machine's secret is still the one it was opened with, read here under
    /// [`Ctx::secrets`] as before (else the message is opened again, here).
    fn status(
        &mut self,
        m: &MachineId,
        p: &Publish,
        pre: Option<OpenedStatus>,
    ) -> Result<Vec<After>, Result<Reject, StoreError>> {
        let reject = |reason: String| Reject {
            machine: m.to_string(),
            reason,
            quiet: false,
        };
        let _secrets = self.ctx.secrets.read().unwrap_or_else(|p| p.into_inner());
        let store = &*self.ctx.store;
        let secret = store.secret(m).map_err(Err)?;
        let OpenedStatus { secret, events } = match pre {
            Some(o) if o.secret == secret => o,
            _ => OpenedStatus::open(secret, &p.payload),
        };
        let (n, events) = events.map_err(|e| Ok(reject(e)))?;
        let Some(secret) = secret else {
            return Err(Ok(reject("unknown machine (not provisioned)".into())));
        };
        // What each event would have met alone: its MAC and sender, then its counter (a
        // replay is acknowledged and changes nothing), then its fields. The counter of an
        // event refused for its fields is spent, as it would have been alone.
        let last = store.counter(m, "status").map_err(Err)?;
        let (mut top, mut acked, mut fresh) = (last, None, Vec::new());
        let mut refused = None;
        for (i, ev) in events.into_iter().enumerate() {
            let mut ev = match ev {
                Ok(ev) if &ev.machine == m => ev,
                Ok(ev) => {
                    let other = &ev.machine;
                    refused = Some((i, format!("body names machine {other}, topic names {m}")));
                    break;
                }
                // Its MAC held, so its counter is the machine's: spent like a field-refused
                // event's below, or a replay of one.
                Err(Unopened {
                    reason,
                    sender: Some((sender, ctr)),
                }) if sender == m.as_str() => {
                    if ctr <= top {
                        self.ctx.stats.status_resent();
                        acked = acked.max(Some(ctr));
                        continue;
                    }
                    top = ctr;
                    refused = Some((i, reason));
                    break;
                }
                Err(Unopened { reason, .. }) => {
                    refused = Some((i, reason));
                    break;
                }
            };
            if ev.ctr <= top {
                // Stored before (the machine missed our ack, or the broker redelivered):
                // acknowledge it again so the machine can move on, and change nothing.
                tracing::debug!(machine = %m, ctr = ev.ctr, last = top, "replayed counter");
                self.ctx.stats.status_resent();
                acked = acked.max(Some(ev.ctr));
                continue;
            }
            top = ev.ctr;
            if let Err(reason) = check_status(&mut ev) {
                refused = Some((i, reason));
                break;
            }
            acked = Some(ev.ctr);
            fresh.push(ev);
        }
        if top > last {
            store.raise_counter(m, "status", top).map_err(Err)?;
        }
        match refused {
            Some((0, reason)) => return Err(Ok(reject(reason))),
            Some((i, reason)) => {
                let why = format!(
                    "{reason} (event {} of a batch of {n}: it and the {} after it dropped)",
                    i + 1,
                    n - i - 1
                );
                self.note_reject(&reject(why), &p.topic);
            }
            None => {}
        }
        // Every event acknowledged is stored or was before: one ack covers them all.
        let mut after: Vec<After> = acked
            .map(|ctr| After::StatusAck {
                machine: m.clone(),
                ctr,
                secret,
            })
            .into_iter()
            .collect();
        if fresh.is_empty() {
            return Ok(after);
        }
        let now = now_ms();
        let cap = self.ctx.limits.events_per_release;
        store.transaction(|tx| {
            let mut touched = Touched::default();
            for ev in &fresh {
                after.extend(apply_status(store, tx, &mut touched, m, ev, cap, now)?);
            }
            after.extend(touched.write(store, tx, m).map_err(Err)?);
            Ok(after)
        })
    }

    fn state(
        &mut self,
        m: &MachineId,
        p: &Publish,
    ) -> Result<Vec<After>, Result<Reject, StoreError>> {
        let Opened::Fresh(st) =
            self.open::<MachineState>(m, "state", Purpose::State, &p.payload)?
        else {
            return Err(Ok(Reject {
                machine: m.to_string(),
                reason: "replayed state counter".into(),
                // Retained states come back after every reconnect.
                quiet: p.retain,
            }));
        };
        if let Err(reason) = check_state(&st) {
            return Err(Ok(Reject {
                machine: m.to_string(),
                reason,
                quiet: false,
            }));
        }
        let now = now_ms();
        let (mut after, behind, groups) = self
            .ctx
            .store
            .transaction(|tx| apply_state(tx, m, &st, now))
            .map_err(Err)?;
        if let Some(groups) = groups {
            if tell_groups_now(&mut self.groups_told, m, &groups, Instant::now()) {
                let seq = self.ctx.store.next_seq().map_err(Err)?;
                // Through the machine's log gate, and counted: a state may name thousands.
                if let Some(quiet_before) = self.ctx.should_log(m.as_str()) {
                    tracing::info!(machine = %m, reported = st.groups.len(), groups = groups.len(), quiet_before,
                        "machine follows other groups than it is in: telling it its groups");
                }
                let (topic, payload) =
                    publish::signed_command(&self.ctx, m, seq, CommandAction::Groups { groups });
                after.push(After::Command { topic, payload });
            }
        }
        let generation = self.ctx.keys().generation();
        if st.key_gen < generation {
            let every = self.ctx.limits.republish_every;
            let now = Instant::now();
            let due = match &mut self.chain_sent {
                Some((g, r)) if *g == generation => r.again(now, every),
                _ => {
                    self.chain_sent = Some((generation, Resent::once(now)));
                    true
                }
            };
            if due {
                tracing::info!(machine = %m, key_gen = st.key_gen, "machine trusts an older platform key: re-publishing the key chain");
                after.push(After::KeyChain);
            }
        }
        for (_, notice) in behind {
            let every = self.ctx.limits.republish_every;
            if republish_now(&mut self.republished, &notice, Instant::now(), every) {
                after.push(After::Republish(notice));
            }
        }
        Ok(after)
    }

    fn online(
        &mut self,
        m: &MachineId,
        payload: &[u8],
    ) -> Result<Vec<After>, Result<Reject, StoreError>> {
        let online = match std::str::from_utf8(payload).map(str::trim) {
            Ok("true") => true,
            Ok("false") => false,
            _ => {
                return Err(Ok(Reject {
                    machine: m.to_string(),
                    reason: "online payload is neither true nor false".into(),
                    quiet: false,
                }))
            }
        };
        self.ctx.store.transaction(|tx| {
            let Some(mut info) = tx.machine(m).map_err(Err)? else {
                return Err(Ok(Reject {
                    machine: m.to_string(),
                    reason: "unknown machine (not provisioned)".into(),
                    quiet: true,
                }));
            };
            info.online = online;
            info.last_seen_ms = Some(now_ms());
            tx.put_machine(&info).map_err(Err)?;
            Ok(vec![])
        })
    }
}

/// One machine's record, the target records and stored-event counts of its events, read once
/// for a message's events, and what they store, written once at its end ([`Touched::write`]).
#[derive(Default)]
struct Touched {
    /// `None`: not read yet.
    machine: Option<Option<MachineInfo>>,
    machine_changed: bool,
    targets: HashMap<ReleaseId, Option<TargetRecord>>,
    targets_changed: HashSet<ReleaseId>,
    /// Per release (`None`: events without one): (stored count before, counted since).
    counts: HashMap<Option<ReleaseId>, (u64, u64)>,
    /// Events to store, in order (their ids are given at the end).
    events: Vec<FleetEvent>,
}

impl Touched {
    fn target(
        &mut self,
        tx: &dyn Records,
        release: &ReleaseId,
        m: &MachineId,
    ) -> Result<Option<&mut TargetRecord>, StoreError> {
        if !self.targets.contains_key(release) {
            let rec = tx.target(release, m)?;
            self.targets.insert(release.clone(), rec);
        }
        Ok(self.targets.get_mut(release).and_then(Option::as_mut))
    }

    /// Gives `m` its record of `release` if it has none and `release` is the group release
    /// desired for one of the groups `m` was provisioned in: a machine that joined the group
    /// after the publish reports on the group's notice, and its events may come before the
    /// state that would have given it the record (`publish::ensure_group_targets`, as a state
    /// does). Without this they were dropped, and its record stayed `pending` for good.
    fn join_group_release(
        &mut self,
        tx: &dyn Records,
        m: &MachineId,
        release: &ReleaseId,
        now: u64,
    ) -> Result<(), StoreError> {
        if self.target(tx, release, m)?.is_some() {
            return Ok(());
        }
        let groups = match self.machine(tx, m)? {
            Some(info) if !info.groups.is_empty() => info.groups.clone(),
            _ => return Ok(()),
        };
        let desired = publish::desired_for_machine(tx, m, &groups)?;
        let joins = desired.values().any(|n| {
            &n.release == release && matches!(n.target, fleetcast_proto::Target::Group(_))
        });
        if joins && !publish::ensure_group_targets(tx, m, &desired, now)?.is_empty() {
            // Read again: the record is in the store now, and one it superseded may be among
            // those read for this message; an event of the message applied to it later starts
            // from the stored record. (One this message changed already keeps its change, as
            // when a state and events cross.)
            self.targets.retain(|r, _| self.targets_changed.contains(r));
        }
        Ok(())
    }

    fn machine(
        &mut self,
        tx: &dyn Records,
        m: &MachineId,
    ) -> Result<Option<&mut MachineInfo>, StoreError> {
        if self.machine.is_none() {
            self.machine = Some(tx.machine(m)?);
        }
        Ok(self.machine.as_mut().and_then(Option::as_mut))
    }

    /// Counts one more event of `m` for `release`; the count with it.
    fn count_event(
        &mut self,
        store: &dyn Store,
        m: &MachineId,
        release: Option<&ReleaseId>,
    ) -> Result<u64, StoreError> {
        let key = release.cloned();
        if !self.counts.contains_key(&key) {
            let before = store.event_count(m, release)?;
            self.counts.insert(key.clone(), (before, 0));
        }
        let (before, since) = self.counts.get_mut(&key).expect("inserted above");
        *since += 1;
        Ok(*before + *since)
    }

    /// Writes what changed; the events go to the batch's [`store_events`] as they are.
    fn write(
        self,
        store: &dyn Store,
        tx: &dyn Records,
        m: &MachineId,
    ) -> Result<Vec<After>, StoreError> {
        if let (true, Some(Some(info))) = (self.machine_changed, &self.machine) {
            tx.put_machine(info)?;
        }
        for release in &self.targets_changed {
            if let Some(Some(rec)) = self.targets.get(release) {
                tx.put_target(rec)?;
            }
        }
        for (release, (_, since)) in &self.counts {
            store.bump_event_count(m, release.as_ref(), *since)?;
        }
        let events = self.events;
        let mut after: Vec<After> = (self.targets_changed.into_iter())
            .map(|release| After::Progress { release })
            .collect();
        if !events.is_empty() {
            after.push(After::Events(events));
        }
        Ok(after)
    }
}

/// Applies a fresh status event in a transaction (`tx`): stores it (up to `cap` per machine
/// and release), and updates the machine and its target record (in `touched`, written back
/// by the caller, which also sends the message's one ack and each changed release's progress).
/// Returns what to log after the flush.
fn apply_status(
    store: &dyn Store,
    tx: &dyn Records,
    touched: &mut Touched,
    m: &MachineId,
    ev: &StatusEvent,
    cap: u64,
    now: u64,
) -> Result<Vec<After>, Result<Reject, StoreError>> {
    // Only what is consistent changes anything: an event naming a release that does not
    // target this machine is acknowledged (so the machine's outbox moves on) and dropped.
    if let Some(release) = &ev.release {
        touched
            .join_group_release(tx, m, release, now)
            .map_err(Err)?;
    }
    let release = match &ev.release {
        Some(release) => match touched.target(tx, release, m).map_err(Err)? {
            Some(rec) if rec.kind == ev.kind => Some(release),
            Some(rec) => {
                let what = format!(
                    "status for release {release} names kind {}, the release's is {}: dropped",
                    ev.kind, rec.kind
                );
                return Ok(vec![warn(m, what)]);
            }
            None => {
                let what = format!(
                    "status ({}) for release {release}, which does not target this machine: dropped",
                    ev.phase
                );
                return Ok(vec![warn(m, what)]);
            }
        },
        None => None,
    };
    let mut after = Vec::new();
    let stored = touched
        .count_event(store, m, ev.release.as_ref())
        .map_err(Err)?;
    if stored <= cap {
        // Stored, and sent to integrators, at the end of the message's events.
        touched.events.push(FleetEvent::recorded(ev, now));
    } else if stored == cap + 1 {
        let release = ev.release.as_ref().map_or("-", |r| r.as_str());
        after.push(warn(m, format!("event cap ({cap}) reached for release {release}: further events of this machine for it update its record but are not kept")));
    }
    let Some(release) = release else {
        return Ok(after);
    };
    if let Some(info) = touched.machine(tx, m).map_err(Err)? {
        info.last_seen_ms = Some(now);
        info.online = true;
        if ev.phase == Phase::Installed && !ev.version.is_empty() {
            let k = info.kinds.entry(ev.kind.clone()).or_default();
            k.version = Some(ev.version.clone());
            tx.push_history(m, &ev.kind, &ev.version).map_err(Err)?;
        }
        if let Some(k) = info.kinds.get_mut(&ev.kind) {
            k.release = ev.release.clone();
            k.phase = Some(ev.phase);
        }
        touched.machine_changed = true;
    }
    let rec = touched
        .target(tx, release, m)
        .map_err(Err)?
        .expect("read above");
    match target::apply(rec, ev, now) {
        Ok(()) => {
            if !touched.targets_changed.contains(release) {
                touched.targets_changed.insert(release.clone());
            }
        }
        Err(why) => after.push(warn(
            m,
            format!(
                "status ({}) for release {} recorded as an event but not applied: {}",
                ev.phase,
                release,
                shown(&why.to_string())
            ),
        )),
    }
    Ok(after)
}

/// How long after a progress publish that took `took` the next may go: see
/// [`PROGRESS_COST_RATIO`].
fn progress_gap(took: Duration) -> Duration {
    PROGRESS_INTERVAL.max(took.saturating_mul(PROGRESS_COST_RATIO))
}

/// Whether `notice`, which a machine reports being behind on, goes out again now: only once
/// `every` has passed on its topic since it was last sent there (or since the first machine was
/// seen behind on it); the time is noted in `sent`.
fn republish_now(
    sent: &mut HashMap<String, Resent>,
    notice: &DesiredNotice,
    now: Instant,
    every: Duration,
) -> bool {
    match sent.get_mut(&notice.topic) {
        Some(r) if r.seq == notice.seq => r.again(now, every),
        _ => {
            sent.insert(
                notice.topic.clone(),
                Resent {
                    seq: notice.seq,
                    at: now,
                    sent: 0,
                },
            );
            false
        }
    }
}

/// One message sent again to machines behind it: which (a notice's seq), when last (or when a
/// machine was first seen behind on it), and how many times.
#[derive(Debug, Clone, Copy)]
struct Resent {
    seq: u64,
    at: Instant,
    sent: u32,
}

impl Resent {
    /// Sent once now (the key chain, which nothing else re-sends).
    fn once(now: Instant) -> Self {
        Resent {
            seq: 0,
            at: now,
            sent: 1,
        }
    }

    /// Whether it is still worth keeping at `now` ([`REPUBLISH_MEMORY`]).
    fn remembered(&self, now: Instant) -> bool {
        now.duration_since(self.at) < REPUBLISH_MEMORY
    }

    /// Whether it goes out again now: once the wait after its `sent` re-sends has passed
    /// ([`republish_wait`]); then counted.
    fn again(&mut self, now: Instant, every: Duration) -> bool {
        if now.duration_since(self.at) < republish_wait(every, self.sent) {
            return false;
        }
        self.at = now;
        self.sent = self.sent.saturating_add(1);
        true
    }
}

/// Desired notices a machine is behind on, by kind.
type Behind = Vec<(Kind, DesiredNotice)>;

/// A machine's groups on the platform.
type Groups = Vec<GroupId>;

/// How soon a machine whose state still reports other groups than its own is sent the same
/// `groups` command again: an agent that does not know the command (it is newer than the
/// protocol's first version) reports the same groups at every state, every 5-10 min.
pub const GROUPS_RESEND: Duration = Duration::from_secs(60);

/// Whether machine `m`, reporting other groups than `groups` (its own), is sent a `groups`
/// command now: at once when it was not told these groups in the last [`GROUPS_RESEND`], so a
/// second move right after a first is not held back, and at most once per interval otherwise
/// (a machine reporting groups at will cannot make the platform sign a command per state).
fn tell_groups_now(
    told: &mut HashMap<MachineId, (Vec<GroupId>, Instant)>,
    m: &MachineId,
    groups: &[GroupId],
    now: Instant,
) -> bool {
    if let Some((last, at)) = told.get(m) {
        if last == groups && now.duration_since(*at) < GROUPS_RESEND {
            return false;
        }
    }
    told.insert(m.clone(), (groups.to_vec(), now));
    true
}

/// Whether a machine reporting `reported` follows other groups than `own` (order and repeats
/// aside).
/// Without allocating: it runs for every state, and `own` is a handful of groups.
fn follows_other_groups(reported: &[GroupId], own: &[GroupId]) -> bool {
    !(reported.iter().all(|g| own.contains(g)) && own.iter().all(|g| reported.contains(g)))
}

/// Applies a fresh machine state in a transaction (`tx`): updates the machine and its history,
/// gives it the target records of its groups' releases. Returns the post-flush work, the
/// desired notices the machine is behind on and has not answered (to re-publish), and the
/// machine's groups when it reports following others (to tell it, §5 `groups`).
/// What a state must be to be applied: at most [`MAX_KINDS`] kinds, versions as the protocol
/// defines them (1 to 64 printable ASCII characters), an agent version of at most 64 printable
/// ASCII characters. Operators read these in tables and terminals.
fn check_state(st: &MachineState) -> Result<(), String> {
    if st.kinds.len() > MAX_KINDS {
        return Err(format!(
            "state names {} kinds; at most {MAX_KINDS}",
            st.kinds.len()
        ));
    }
    for (kind, k) in &st.kinds {
        if let Some(v) = &k.version {
            validate_version(v).map_err(|e| format!("state, kind {kind}: {e}"))?;
        }
    }
    let agent = &st.agent_version;
    if agent.len() > 64 || !agent.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err(format!(
            "state: agent_version must be at most 64 printable ASCII characters ({} bytes given)",
            agent.len()
        ));
    }
    Ok(())
}

/// What a status event must be to be stored: a version as the protocol defines it (or `""`,
/// for a notice that did not verify); `error` and `detail` are cut to [`MAX_TEXT`] bytes.
fn check_status(ev: &mut StatusEvent) -> Result<(), String> {
    if ev.attempt > MAX_ATTEMPT {
        return Err(format!(
            "status: attempt {} over the limit of {MAX_ATTEMPT}",
            ev.attempt
        ));
    }
    if !ev.version.is_empty() {
        validate_version(&ev.version).map_err(|e| format!("status: {e}"))?;
    }
    for text in [&mut ev.error, &mut ev.detail].into_iter().flatten() {
        cut_text(text, MAX_TEXT);
    }
    Ok(())
}

/// Cuts `text` to at most `max` bytes (on a character boundary), saying how much was cut.
fn cut_text(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(" [{cut} bytes cut]"));
}

fn apply_state(
    tx: &dyn Records,
    m: &MachineId,
    st: &MachineState,
    now: u64,
) -> Result<(Vec<After>, Behind, Option<Groups>), StoreError> {
    let mut info = tx
        .machine(m)?
        .unwrap_or_else(|| MachineInfo::new(m.clone(), now));
    info.last_seen_ms = Some(now);
    info.online = true;
    info.agent_version = Some(st.agent_version.clone());
    info.busy = st.busy;
    info.key_gen = st.key_gen;
    // Group membership is the operator's (provisioning): a machine claiming a group it was
    // not given would otherwise become a target of that group's releases.
    let claimed: Vec<&GroupId> = st
        .groups
        .iter()
        .filter(|g| !info.groups.contains(g))
        .collect();
    let mut after = Vec::new();
    if let Some(first) = claimed.first() {
        // Counted, not listed: a state may name thousands.
        let what = format!(
            "machine reports {} group(s) it was not provisioned in (first: {first}): ignored",
            claimed.len()
        );
        after.push(warn(m, what));
    }
    for (kind, k) in &st.kinds {
        if let Some(v) = &k.version {
            // A kind new to the machine's history only while it has fewer than MAX_KINDS: the
            // history is kept for ever, and states name other kinds at will.
            if tx.history(m, kind)?.is_empty() && tx.history_kinds(m)? >= MAX_KINDS {
                let what = format!("machine's version history holds {MAX_KINDS} kinds already: versions of kind {kind} are not kept");
                after.push(warn(m, what));
                continue;
            }
            tx.push_history(m, kind, v)?;
        }
    }
    info.kinds = st.kinds.clone();
    tx.put_machine(&info)?;
    let desired = publish::desired_for_machine(tx, m, &info.groups)?;
    let created = publish::ensure_group_targets(tx, m, &desired, now)?;
    after.extend(
        created
            .into_iter()
            .map(|release| After::Progress { release }),
    );
    let mut behind = Vec::new();
    for (kind, notice) in desired {
        let reported = st.kinds.get(&kind).map(|k| k.seq).unwrap_or(0);
        if reported >= notice.seq {
            continue;
        }
        if let Some(rec) = tx.target(&notice.release, m)? {
            if rec.phase.is_final() {
                continue; // it answered (e.g. rejected); re-sending would not change that
            }
        }
        behind.push((kind, notice));
    }
    let groups = follows_other_groups(&st.groups, &info.groups).then_some(info.groups);
    Ok((after, behind, groups))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{g, m};
    use crate::store::{MemStore, Reads};
    use fleetcast_proto::admin::ReleaseInfo;
    use fleetcast_proto::status::KindState;
    use fleetcast_proto::Target;
    use std::collections::BTreeMap;

    fn app() -> Kind {
        Kind::new("app").unwrap()
    }

    /// A group's notice goes to every machine of the group: however many of them report being
    /// behind on it, it goes out again at most once per interval, and not at all right after
    /// it was published (the first machine behind starts the clock). A newer notice on the
    /// topic starts again.
    #[test]
    fn a_machine_following_other_groups_is_told_its_own_at_once_then_once_per_interval() {
        assert!(!follows_other_groups(
            &[g("b"), g("a"), g("a")],
            &[g("a"), g("b")]
        ));
        assert!(follows_other_groups(&[g("a")], &[g("a"), g("b")]));
        assert!(follows_other_groups(&[g("a"), g("x")], &[g("a")]));
        assert!(follows_other_groups(&[g("a")], &[]));
        let mut told = HashMap::new();
        let t0 = Instant::now();
        let (a, b) = (vec![g("a")], vec![g("b")]);
        assert!(tell_groups_now(&mut told, &m("vm-1"), &a, t0));
        assert!(!tell_groups_now(
            &mut told,
            &m("vm-1"),
            &a,
            t0 + GROUPS_RESEND / 2
        ));
        // Another machine is told at once.
        assert!(tell_groups_now(
            &mut told,
            &m("vm-2"),
            &a,
            t0 + GROUPS_RESEND / 2
        ));
        // Moved again: the new groups go out at once.
        assert!(tell_groups_now(
            &mut told,
            &m("vm-1"),
            &b,
            t0 + GROUPS_RESEND / 2
        ));
        assert!(!tell_groups_now(
            &mut told,
            &m("vm-1"),
            &b,
            t0 + GROUPS_RESEND * 3 / 4
        ));
        assert!(tell_groups_now(
            &mut told,
            &m("vm-1"),
            &b,
            t0 + GROUPS_RESEND * 3 / 2
        ));
    }

    /// Group g's desired notice of app, release r-000001, with `seq`.
    fn group_notice(seq: u64) -> DesiredNotice {
        DesiredNotice {
            topic: "fleet/groups/g/release/app".into(),
            seq,
            release: ReleaseId::new("r-000001").unwrap(),
            kind: app(),
            target: Target::Group(GroupId::new("g").unwrap()),
            payload: "{}".into(),
        }
    }

    #[test]
    fn a_notice_many_machines_are_behind_on_is_re_published_once_per_interval() {
        let notice = group_notice;
        let mut sent = HashMap::new();
        let t0 = Instant::now();
        let count = |sent: &mut HashMap<_, _>, seq, at| {
            (0..5_000)
                .filter(|_| republish_now(sent, &notice(seq), at, REPUBLISH_INTERVAL))
                .count()
        };
        let i = REPUBLISH_INTERVAL;
        assert_eq!(count(&mut sent, 1, t0), 0, "just published");
        assert_eq!(count(&mut sent, 1, t0 + i / 2), 0);
        assert_eq!(count(&mut sent, 1, t0 + i), 1);
        // Each time it goes out again, the wait doubles: 1, 2, 4 ... intervals.
        assert_eq!(count(&mut sent, 1, t0 + i * 2), 0);
        assert_eq!(count(&mut sent, 1, t0 + i * 3), 1);
        assert_eq!(count(&mut sent, 1, t0 + i * 6), 0);
        assert_eq!(count(&mut sent, 1, t0 + i * 7), 1);
        // A newer notice on the topic: the platform has just sent it, and the wait starts over.
        assert_eq!(count(&mut sent, 2, t0 + i * 7), 0);
        assert_eq!(count(&mut sent, 2, t0 + i * 8), 1);
    }

    /// What one machine's states, saying for a day that it is behind on a notice, make the
    /// platform send to its group: a re-send after 30 s, 1, 2, 4 ... minutes, then once every
    /// 64 minutes; against 2,880 (once per 30 s) before the wait doubled.
    #[test]
    fn a_machine_behind_on_a_notice_for_a_day_draws_a_few_dozen_re_sends() {
        let notice = group_notice(1);
        let mut sent = HashMap::new();
        let t0 = Instant::now();
        // A state every second, all day.
        let resent = (0..86_400u64)
            .filter(|s| {
                republish_now(
                    &mut sent,
                    &notice,
                    t0 + Duration::from_secs(*s),
                    REPUBLISH_INTERVAL,
                )
            })
            .count();
        assert!((25..=35).contains(&resent), "{resent} re-sends in a day");
        // Silent for a few minutes between bursts of states: the wait is not forgotten.
        let mut sent = HashMap::new();
        let mut resent = 0;
        for cycle in 0..12u64 {
            let start = t0 + Duration::from_secs(cycle * 290);
            for s in 0..40u64 {
                let at = start + Duration::from_secs(s);
                if republish_now(&mut sent, &notice, at, REPUBLISH_INTERVAL) {
                    resent += 1;
                }
            }
            // What the ingest's sweep forgets meanwhile.
            let quiet = start + Duration::from_secs(289);
            sent.retain(|_, r: &mut Resent| r.remembered(quiet));
        }
        assert!(resent <= 6, "{resent} re-sends in an hour of bursts");
        assert_eq!(
            republish_wait(REPUBLISH_INTERVAL, 100),
            Duration::from_secs(64 * 60)
        );
    }

    /// A store with release r-000001 (app 1.0) assigned to provisioned machine vm-1.
    fn assigned() -> (MemStore, ReleaseInfo) {
        let store = MemStore::new();
        let release = crate::fixtures::release("r-000001", "1.0");
        store
            .transaction(|tx| {
                tx.put_machine(&MachineInfo::new(m("vm-1"), 0))?;
                tx.put_release(&release)?;
                publish::assign_target(tx, &release, &m("vm-1"), None, 0)
            })
            .unwrap();
        (store, release)
    }

    fn status(machine: &str, release: &ReleaseInfo, phase: Phase, ctr: u64) -> StatusEvent {
        StatusEvent {
            machine: m(machine),
            ctr,
            at_ms: ctr,
            release: Some(release.id.clone()),
            kind: release.kind.clone(),
            version: release.version.clone(),
            phase,
            progress: None,
            attempt: 1,
            error: None,
            detail: None,
        }
    }

    /// Applies `ev` as ingest does; returns what it leaves for after the flush, by name.
    fn apply(store: &MemStore, ev: &StatusEvent, cap: u64) -> Vec<&'static str> {
        let mut after = store
            .transaction(|tx| {
                let mut touched = Touched::default();
                let mut after = apply_status(store, tx, &mut touched, &ev.machine, ev, cap, 7)?;
                after.extend(touched.write(store, tx, &ev.machine).map_err(Err)?);
                Ok::<_, Result<Reject, StoreError>>(after)
            })
            .unwrap_or_else(|_| panic!("{} refused", ev.phase));
        store_events(store, &mut after).unwrap();
        after
            .iter()
            .map(|a| match a {
                After::StatusAck { .. } => "ack",
                After::Events(_) => "event",
                After::Progress { .. } => "progress",
                After::Republish(_) => "republish",
                After::Command { .. } => "command",
                After::KeyChain => "key chain",
                After::Warn { .. } => "warn",
            })
            .collect()
    }

    #[test]
    fn a_batch_reads_and_writes_the_records_once_and_ends_as_its_events_one_by_one() {
        let (batched, r) = assigned();
        let (single, _) = assigned();
        let events = [
            status("vm-1", &r, Phase::Notified, 1),
            status("vm-1", &r, Phase::Downloaded, 2),
            // Backwards: stored as an event, not applied; what follows still is.
            status("vm-1", &r, Phase::Downloading, 3),
            status("vm-1", &r, Phase::Installed, 4),
        ];
        let mut in_batch = batched.transaction(|tx| {
            let mut touched = Touched::default();
            let mut after = Vec::new();
            for ev in &events {
                after.extend(
                    apply_status(&batched, tx, &mut touched, &m("vm-1"), ev, 1000, 7)
                        .unwrap_or_else(|_| panic!("refused")),
                );
            }
            // Nothing written before the end of the batch.
            assert_eq!(
                tx.target(&r.id, &m("vm-1")).unwrap().unwrap().phase,
                Phase::Pending
            );
            after.extend(touched.write(&batched, tx, &m("vm-1")).unwrap());
            after
        });
        assert!(
            batched.events().unwrap().is_empty(),
            "stored with the batch"
        );
        store_events(&batched, &mut in_batch).unwrap();
        let one_by_one: Vec<&str> = events
            .iter()
            .flat_map(|ev| apply(&single, ev, 1000))
            .collect();
        assert_eq!(
            one_by_one,
            ["progress", "event", "progress", "event", "warn", "event", "progress", "event"]
        );
        // The same warning; the release's progress once, and the events, in order, for the
        // integrators at the end.
        let [After::Warn { what, .. }, After::Progress { release }, After::Events(stored)] =
            &in_batch[..]
        else {
            panic!("a warning, progress and the events");
        };
        assert!(what.contains("not applied"), "{what}");
        assert_eq!(*release, r.id);
        let phases: Vec<(u64, Phase)> = stored.iter().map(|e| (e.id, e.phase)).collect();
        assert_eq!(
            phases,
            [
                (1, Phase::Notified),
                (2, Phase::Downloaded),
                (3, Phase::Downloading),
                (4, Phase::Installed)
            ]
        );
        for store in [&batched, &single] {
            let rec = store.target(&r.id, &m("vm-1")).unwrap().unwrap();
            assert_eq!((rec.phase, rec.attempts), (Phase::Installed, 1));
            let info = store.machine(&m("vm-1")).unwrap().unwrap();
            assert_eq!(info.kinds[&app()].version.as_deref(), Some("1.0"));
            assert_eq!(info.kinds[&app()].phase, Some(Phase::Installed));
            assert_eq!(store.events().unwrap().len(), 4);
        }
    }

    #[test]
    fn progress_of_a_large_release_goes_out_less_often_in_proportion_to_its_cost() {
        let ms = Duration::from_millis;
        assert_eq!(
            progress_gap(ms(2)),
            PROGRESS_INTERVAL,
            "1,000 machines: as before"
        );
        assert_eq!(progress_gap(ms(25)), ms(1000), "10,000 machines");
        assert_eq!(progress_gap(ms(250)), ms(10_000), "100,000 machines");
        assert_eq!(progress_gap(Duration::MAX), Duration::MAX, "no overflow");
    }

    #[test]
    fn a_status_moves_the_target_record_and_the_machine_and_is_logged() {
        let (store, r) = assigned();
        for (ctr, phase) in [Phase::Notified, Phase::Downloading, Phase::Installed]
            .into_iter()
            .enumerate()
        {
            let after = apply(&store, &status("vm-1", &r, phase, ctr as u64 + 1), 1000);
            assert_eq!(after, ["progress", "event"], "{phase}");
        }
        let rec = store.target(&r.id, &m("vm-1")).unwrap().unwrap();
        assert_eq!(rec.phase, Phase::Installed);
        let info = store.machine(&m("vm-1")).unwrap().unwrap();
        assert_eq!(info.kinds[&app()].version.as_deref(), Some("1.0"));
        assert_eq!((info.online, info.last_seen_ms), (true, Some(7)));
        assert_eq!(store.history(&m("vm-1"), &app()).unwrap(), ["1.0"]);
        let events = store.events().unwrap();
        assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn a_status_for_a_release_that_does_not_target_the_machine_is_acknowledged_and_dropped() {
        let (store, r) = assigned();
        store
            .transaction(|tx| tx.put_machine(&MachineInfo::new(m("vm-2"), 0)))
            .unwrap();
        assert_eq!(
            apply(&store, &status("vm-2", &r, Phase::Notified, 1), 1000),
            ["warn"]
        );
        let mut wrong_kind = status("vm-1", &r, Phase::Notified, 1);
        wrong_kind.kind = Kind::new("os").unwrap();
        assert_eq!(apply(&store, &wrong_kind, 1000), ["warn"]);
        assert_eq!(store.events().unwrap(), []);
        assert_eq!(store.target(&r.id, &m("vm-2")).unwrap(), None);
        assert_eq!(
            store.target(&r.id, &m("vm-1")).unwrap().unwrap().phase,
            Phase::Pending
        );
    }

    #[test]
    fn events_beyond_the_cap_move_the_record_but_are_not_kept() {
        let (store, r) = assigned();
        let after = apply(&store, &status("vm-1", &r, Phase::Notified, 1), 1);
        assert_eq!(after, ["progress", "event"]);
        let after = apply(&store, &status("vm-1", &r, Phase::Downloading, 2), 1);
        assert_eq!(after, ["warn", "progress"], "the cap is logged once");
        let after = apply(&store, &status("vm-1", &r, Phase::Downloaded, 3), 1);
        assert_eq!(after, ["progress"]);
        assert_eq!(store.events().unwrap().len(), 1);
        assert_eq!(
            store.target(&r.id, &m("vm-1")).unwrap().unwrap().phase,
            Phase::Downloaded
        );
    }

    fn state_with(kinds: impl IntoIterator<Item = (String, String)>) -> MachineState {
        MachineState {
            machine: m("vm-1"),
            ctr: 1,
            at_ms: 1,
            agent_version: "0.1.0".into(),
            groups: vec![],
            busy: false,
            kinds: kinds
                .into_iter()
                .map(|(k, v)| {
                    let state = KindState {
                        version: Some(v),
                        ..Default::default()
                    };
                    (Kind::new(&k).unwrap(), state)
                })
                .collect(),
            key_gen: 0,
        }
    }

    /// What one machine's credentials put in a state is bounded: kinds, versions and the agent
    /// version; an honest state passes.
    #[test]
    fn states_with_too_many_kinds_or_bad_versions_are_refused() {
        let kinds = |n: usize| (0..n).map(|i| (format!("k{i}"), "1.0".to_owned()));
        assert_eq!(check_state(&state_with(kinds(MAX_KINDS))), Ok(()));
        let too_many = check_state(&state_with(kinds(MAX_KINDS + 1))).unwrap_err();
        assert!(too_many.contains("at most 32"), "{too_many}");
        let long = "9".repeat(70_000);
        for bad in [long.as_str(), "1.0\n", "1.0\u{1b}[31m", "", "1 0"] {
            let err = check_state(&state_with([("app".to_owned(), bad.to_owned())])).unwrap_err();
            assert!(err.contains("kind app"), "{bad:?}: {err}");
        }
        let mut agent = state_with([]);
        agent.agent_version = "x\n".repeat(10);
        assert!(check_state(&agent).is_err());
        agent.agent_version = "fleetcast-device 0.1.0".into();
        assert_eq!(check_state(&agent), Ok(()));
    }

    #[test]
    fn status_texts_are_cut_and_bad_versions_and_attempts_refused() {
        let mut ev = StatusEvent {
            machine: m("vm-1"),
            ctr: 1,
            at_ms: 1,
            release: None,
            kind: app(),
            version: String::new(),
            phase: Phase::Rejected,
            progress: None,
            attempt: 1,
            error: Some("é".repeat(250_000)),
            detail: Some("short".into()),
        };
        assert_eq!(check_status(&mut ev), Ok(()));
        let error = ev.error.as_deref().unwrap();
        assert!(error.len() <= MAX_TEXT + 32, "{}", error.len());
        assert!(
            error.ends_with(" [495904 bytes cut]"),
            "{}",
            &error[error.len() - 30..]
        );
        assert_eq!(ev.detail.as_deref(), Some("short"));
        ev.attempt = MAX_ATTEMPT;
        assert_eq!(check_status(&mut ev), Ok(()));
        ev.attempt = u32::MAX;
        assert!(check_status(&mut ev).is_err(), "absurd attempt");
        ev.attempt = 1;
        ev.version = "1.0\n".into();
        assert!(check_status(&mut ev).is_err());
    }

    /// States naming new kinds, one after another, stop adding to the history once it holds
    /// MAX_KINDS kinds; the kinds it has keep their versions.
    #[test]
    fn a_machines_history_keeps_at_most_max_kinds() {
        let store = MemStore::new();
        for round in 0..3 {
            let st = state_with((0..MAX_KINDS).map(|i| (format!("k{round}-{i}"), "1.0".into())));
            store
                .transaction(|tx| apply_state(tx, &m("vm-1"), &st, 5))
                .unwrap();
        }
        assert_eq!(store.history_kinds(&m("vm-1")).unwrap(), MAX_KINDS);
        let again = state_with([("k0-0".to_owned(), "2.0".to_owned())]);
        store
            .transaction(|tx| apply_state(tx, &m("vm-1"), &again, 6))
            .unwrap();
        let k = Kind::new("k0-0").unwrap();
        assert_eq!(store.history(&m("vm-1"), &k).unwrap(), ["1.0", "2.0"]);
        assert!(store
            .history(&m("vm-1"), &Kind::new("k1-0").unwrap())
            .unwrap()
            .is_empty());
    }

    /// After `key rotate`, an operator sees who followed the chain: the machine record keeps
    /// the key generation of the machine's last state, up or down.
    #[test]
    fn a_machine_record_shows_the_key_generation_its_last_state_trusts() {
        let store = MemStore::new();
        let mut st = state_with([]);
        for (gen, now) in [(2, 5), (1, 6)] {
            st.key_gen = gen;
            store
                .transaction(|tx| apply_state(tx, &m("vm-1"), &st, now))
                .unwrap();
            assert_eq!(store.machine(&m("vm-1")).unwrap().unwrap().key_gen, gen);
        }
    }

    #[test]
    fn a_state_brings_its_groups_releases_and_names_the_notices_it_is_behind_on() {
        let store = MemStore::new();
        let mut provisioned = MachineInfo::new(m("vm-1"), 0);
        provisioned.groups = vec![g("g")];
        let mut ours = crate::fixtures::release("r-000001", "1.0");
        let mut other = crate::fixtures::release("r-000002", "2.0");
        other.kind = Kind::new("os").unwrap();
        store
            .transaction(|tx| {
                tx.put_machine(&provisioned)?;
                for (r, group) in [(&mut ours, "g"), (&mut other, "h")] {
                    r.seq = store.next_seq()?;
                    tx.put_release(r)?;
                    tx.put_desired(&DesiredNotice {
                        topic: format!("groups/{group}/{}", r.kind),
                        seq: r.seq,
                        release: r.id.clone(),
                        kind: r.kind.clone(),
                        target: Target::Group(g(group)),
                        payload: "{}".into(),
                    })?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        // The machine claims group h too: it was not provisioned in it.
        let mut st = MachineState {
            machine: m("vm-1"),
            ctr: 1,
            at_ms: 1,
            agent_version: "0.1.0".into(),
            groups: vec![g("g"), g("h")],
            busy: false,
            kinds: BTreeMap::new(),
            key_gen: 0,
        };
        let (after, behind, groups) = store
            .transaction(|tx| apply_state(tx, &m("vm-1"), &st, 5))
            .unwrap();
        assert_eq!(
            groups,
            Some(vec![g("g")]),
            "it follows a group it is not in: it is to be told its own"
        );
        // It claims `h`, which it was not provisioned in: logged, not applied.
        assert!(matches!(&after[..],
            [After::Warn { what, .. }, After::Progress { release }]
                if *release == ours.id && what.contains("1 group(s) it was not provisioned in (first: h)")));
        let rec = store.target(&ours.id, &m("vm-1")).unwrap().unwrap();
        assert_eq!((rec.phase, rec.via), (Phase::Pending, Some(g("g"))));
        assert_eq!(store.target(&other.id, &m("vm-1")).unwrap(), None);
        assert_eq!(
            behind
                .iter()
                .map(|(k, n)| (k.clone(), n.seq))
                .collect::<Vec<_>>(),
            [(app(), ours.seq)]
        );
        assert_eq!(store.machine(&m("vm-1")).unwrap().unwrap().groups, [g("g")]);
        // Once it reports the notice's seq, it is behind on nothing; its record stays.
        st.kinds.insert(
            app(),
            KindState {
                version: Some("0.9".into()),
                seq: ours.seq,
                ..Default::default()
            },
        );
        let (after, behind, _) = store
            .transaction(|tx| apply_state(tx, &m("vm-1"), &st, 6))
            .unwrap();
        assert!(matches!(&after[..], [After::Warn { .. }]) && behind.is_empty());
        assert_eq!(store.history(&m("vm-1"), &app()).unwrap(), ["0.9"]);
        let rec = store.target(&ours.id, &m("vm-1")).unwrap().unwrap();
        assert_eq!(
            rec.phase,
            Phase::Pending,
            "a state naming no release moves no record"
        );
    }

    /// A machine that joined a group after the publish and sends its events before its state:
    /// its first event for the group's release gives it its record (as its state would), so
    /// its events are applied and kept, and it does not stay `pending` for good (a staged
    /// rollout would wait on it). A release not desired for its groups gets no record.
    #[test]
    fn a_new_group_members_first_event_gives_it_the_groups_release() {
        let store = MemStore::new();
        let g = GroupId::new("g").unwrap();
        let mut provisioned = MachineInfo::new(m("vm-1"), 0);
        provisioned.groups = vec![g.clone()];
        let mut r = crate::fixtures::release("r-000001", "1.0");
        let other = crate::fixtures::release("r-000002", "2.0");
        store
            .transaction(|tx| {
                tx.put_machine(&provisioned)?;
                r.seq = store.next_seq()?;
                tx.put_release(&r)?;
                tx.put_release(&other)?;
                tx.put_desired(&DesiredNotice {
                    topic: "groups/g/app".into(),
                    seq: r.seq,
                    release: r.id.clone(),
                    kind: r.kind.clone(),
                    target: Target::Group(g.clone()),
                    payload: "{}".into(),
                })
            })
            .unwrap();
        assert_eq!(
            apply(&store, &status("vm-1", &other, Phase::Installed, 1), 1000),
            ["warn"],
            "a release not desired for its groups stays foreign"
        );
        assert_eq!(store.target(&other.id, &m("vm-1")).unwrap(), None);
        for (ctr, phase) in [Phase::Notified, Phase::Downloading, Phase::Installed]
            .into_iter()
            .enumerate()
        {
            let after = apply(&store, &status("vm-1", &r, phase, ctr as u64 + 2), 1000);
            assert_eq!(after, ["progress", "event"], "{phase}");
        }
        let rec = store.target(&r.id, &m("vm-1")).unwrap().unwrap();
        assert_eq!((rec.phase, rec.via), (Phase::Installed, Some(g)));
        assert_eq!(store.events().unwrap().len(), 3, "its events are kept");
        assert_eq!(store.current(&m("vm-1"), &app()).unwrap(), Some(r.id));
    }

    #[test]
    fn a_batch_acknowledges_each_machine_once_with_its_highest_counter() {
        let m = |s: &str| MachineId::new(s).unwrap();
        // The secret of the event an ack names is the one it is MAC'd with (a rotation may
        // fall inside a batch).
        let ack = |s: &str, ctr| After::StatusAck {
            machine: m(s),
            ctr,
            secret: Secret::from_bytes([ctr as u8; 32]),
        };
        let out = coalesce_acks(vec![
            ack("vm-1", 3),
            ack("vm-2", 9),
            After::KeyChain,
            ack("vm-1", 5),
            ack("vm-1", 4),
        ]);
        let acks: Vec<(String, u64, bool)> = out
            .iter()
            .filter_map(|a| match a {
                After::StatusAck {
                    machine,
                    ctr,
                    secret,
                } => Some((
                    machine.to_string(),
                    *ctr,
                    *secret == Secret::from_bytes([*ctr as u8; 32]),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            acks,
            vec![("vm-1".into(), 5, true), ("vm-2".into(), 9, true)]
        );
        assert_eq!(out.len(), 3, "the key chain re-publish stays");
    }

    /// A flushed batch hands the gateway every machine's ack, MAC'd with that machine's secret,
    /// and the integrators' events, signed, only while someone listens on `fleet/events`: an
    /// event no one hears is not signed.
    #[test]
    fn a_batch_macs_every_ack_and_signs_events_only_while_someone_listens() {
        struct Gateway {
            listening: bool,
            delivered: std::sync::Mutex<Vec<(String, Vec<u8>)>>,
        }
        impl crate::context::SessionControl for Gateway {
            fn close_sessions(&self, _: &str) -> usize {
                0
            }
            fn deliver(
                &self,
                topic: &str,
                payload: &[u8],
                _: Option<&[&str]>,
                _: Option<u64>,
            ) -> Option<usize> {
                let mut d = self.delivered.lock().unwrap();
                d.push((topic.to_owned(), payload.to_vec()));
                Some(1)
            }
            fn subscribed(&self, _: &str) -> Option<bool> {
                Some(self.listening)
            }
        }
        let release = crate::fixtures::release("r-000001", "1.0");
        for listening in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (mqtt, _eventloop) =
                AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 16);
            let mut ctx = Ctx::for_tests(dir.path(), mqtt);
            let gateway = Arc::new(Gateway {
                listening,
                delivered: Default::default(),
            });
            ctx.sessions = gateway.clone();
            let secret = |s: &str| Secret::from_bytes(*blake3::hash(s.as_bytes()).as_bytes());
            let rest = send_acks(
                &ctx,
                ["vm-1", "vm-2"]
                    .into_iter()
                    .zip([3, 7])
                    .map(|(machine, ctr)| {
                        let ack = fleetcast_proto::StatusAck {
                            machine: m(machine),
                            ctr,
                        };
                        (ack, secret(machine))
                    })
                    .collect(),
            );
            assert!(rest.is_empty(), "the gateway took every ack");
            let batch = ToSign {
                events: (1..=2)
                    .map(|ctr| {
                        let ev = status("vm-1", &release, Phase::Downloading, ctr);
                        FleetEvent::recorded(&ev, 0)
                    })
                    .collect(),
            };
            sign_and_send(&ctx, batch);
            let key = ctx.keys().platform.public();
            let delivered = gateway.delivered.lock().unwrap();
            let acks: Vec<(String, u64)> = delivered
                .iter()
                .filter(|(topic, _)| topic.ends_with("/status/ack"))
                .map(|(topic, payload)| {
                    let machine = topic.split('/').nth(2).unwrap();
                    let ack: fleetcast_proto::StatusAck =
                        secret(machine).open(Purpose::StatusAck, payload).unwrap();
                    assert!(
                        secret("vm-3")
                            .open::<fleetcast_proto::StatusAck>(Purpose::StatusAck, payload)
                            .is_err(),
                        "another machine's secret does not open it"
                    );
                    assert_eq!(*topic, ctx.topics.status_ack(&ack.machine));
                    (ack.machine.to_string(), ack.ctr)
                })
                .collect();
            assert_eq!(acks, vec![("vm-1".into(), 3), ("vm-2".into(), 7)]);
            let events = delivered
                .iter()
                .filter(|(topic, _)| *topic == ctx.topics.events())
                .inspect(|(_, payload)| {
                    key.verify::<FleetEvent>(Purpose::Event, payload).unwrap();
                })
                .count();
            assert_eq!(
                events,
                if listening { 2 } else { 0 },
                "listening: {listening}"
            );
        }
    }

    /// An ingest over `ctx`, for calling its message handlers directly.
    fn ingest_over(ctx: Arc<Ctx>) -> Ingest {
        let (signed, _) = mpsc::channel(1);
        let (acks, _) = mpsc::channel(1);
        Ingest::new(ctx, signed, acks)
    }

    /// A release's next progress time goes once it has passed: a removed release's stayed
    /// until a restart. Forgetting one changes nothing: without it the progress is due too.
    #[test]
    fn progress_times_are_forgotten_once_passed_removed_releases_with_them() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let (gone, kept) = (
            crate::fixtures::release("r-000001", "1.0"),
            crate::fixtures::release("r-000002", "2.0"),
        );
        ctx.store
            .transaction(|tx| {
                tx.put_release(&gone)?;
                tx.put_release(&kept)
            })
            .unwrap();
        let mut ingest = ingest_over(ctx.clone());
        ingest.send_progress(&gone.id).unwrap();
        ctx.store
            .transaction(|tx| tx.remove_release(&gone.id).map(drop))
            .unwrap();
        ingest.forget_expired(Instant::now());
        assert!(!ingest.progress_due(&gone.id), "not due yet: kept");
        let later = Instant::now() + 10 * PROGRESS_INTERVAL;
        ingest
            .progress_next
            .insert(kept.id.clone(), later + PROGRESS_INTERVAL);
        ingest.forget_expired(later);
        assert_eq!(
            ingest.progress_next.keys().collect::<Vec<_>>(),
            [&kept.id],
            "only the time still ahead"
        );
    }

    /// Through an external broker, one machine sending valid reports as fast as the broker
    /// takes them gets its report rate's burst into the ingest and no more; another machine's
    /// report still gets in. (Each call is a message read from the connection.)
    #[test]
    fn one_machine_over_its_report_rate_leaves_the_ingest_to_the_others() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let mut rates = MachineRates::new(limits::EXTERNAL_REPORTS, std::time::Instant::now());
        let report = |vm: &str| {
            let topic = ctx.topics.state(&m(vm));
            MqttEvent::Publish(Publish::new(topic, QoS::AtLeastOnce, b"{}".to_vec()))
        };
        let mut batch = Vec::new();
        let burst = limits::EXTERNAL_REPORTS.1 as usize;
        for _ in 0..burst + 1_000 {
            take(&ctx, &ctx.mqtt, &mut rates, report("vm-1"), &mut batch);
        }
        take(&ctx, &ctx.mqtt, &mut rates, report("vm-2"), &mut batch);
        let from = |vm: &str| {
            let topic = ctx.topics.state(&m(vm));
            batch.iter().filter(|p| p.topic == topic).count()
        };
        // The loop takes well under the second a token takes to come back.
        assert!(
            (burst..=burst + 1).contains(&from("vm-1")),
            "{}",
            from("vm-1")
        );
        assert_eq!(from("vm-2"), 1, "another machine's report was dropped");
    }

    /// A batch of status events costs one report per event, as at the gateway: one machine's
    /// credentials sending batches of 64 through an external broker get no more events into
    /// the ingest than the report rate's burst (until 2026-11-29 a batch cost one report, and a
    /// red-team run had 6,400 events of one machine stored within 0.1 s on Mosquitto).
    #[test]
    fn a_batch_of_status_events_costs_one_report_per_event() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let mut rates = MachineRates::new(limits::EXTERNAL_REPORTS, std::time::Instant::now());
        // Their content is not read before the rate: only how many envelopes the array holds.
        let batch_of = |n: usize| format!("[{}]", vec!["{}"; n].join(",")).into_bytes();
        let status = |payload: Vec<u8>| {
            let topic = ctx.topics.status(&m("vm-1"));
            MqttEvent::Publish(Publish::new(topic, QoS::AtLeastOnce, payload))
        };
        let mut batch = Vec::new();
        let burst = limits::EXTERNAL_REPORTS.1 as usize;
        for _ in 0..100 {
            take(
                &ctx,
                &ctx.mqtt,
                &mut rates,
                status(batch_of(64)),
                &mut batch,
            );
        }
        let events: usize = batch
            .iter()
            .map(|p| fleetcast_proto::status::status_count(&p.payload))
            .sum();
        assert!(
            events <= burst + 64 && batch.len() == burst / 64,
            "{} batches, {events} events let in (burst {burst})",
            batch.len()
        );
        // A single event still costs one: what is left of the burst lets singles in.
        take(
            &ctx,
            &ctx.mqtt,
            &mut rates,
            status(b"{}".to_vec()),
            &mut batch,
        );
        assert_eq!(
            batch.len(),
            burst / 64 + 1,
            "a single event after the batches"
        );
    }

    /// Status messages are opened ahead of the loop, with the secret their machine had then.
    /// The loop takes what was opened only while that is still the machine's secret: a message
    /// a stolen config sealed and got opened just before the machine was given a new secret is
    /// opened again with the new one, and refused; one opened before its machine had a secret
    /// is opened again once it has one. A message gets one ack, for its highest counter.
    #[test]
    fn a_status_opened_ahead_counts_only_while_its_secret_is_still_the_machines() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        let release = crate::fixtures::release("r-000001", "1.0");
        ctx.store
            .transaction(|tx| {
                tx.put_release(&release)?;
                for vm in ["vm-1", "vm-2"] {
                    tx.put_machine(&MachineInfo::new(m(vm), 0))?;
                    publish::assign_target(tx, &release, &m(vm), None, 0)?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let (old, new) = (Secret::from_bytes([1; 32]), Secret::from_bytes([2; 32]));
        let put_secret = |vm: &str, secret: &Secret| {
            ctx.store
                .transaction(|tx| tx.put_secret(&m(vm), secret))
                .unwrap()
        };
        put_secret("vm-1", &old);
        let mut ingest = ingest_over(ctx.clone());
        let sealed = |vm: &str, secret: &Secret, ctrs: &[u64]| {
            let envelopes: Vec<String> = ctrs
                .iter()
                .map(|&ctr| {
                    let ev = status(vm, &release, Phase::Notified, ctr);
                    String::from_utf8(secret.seal(Purpose::Status, &ev)).unwrap()
                })
                .collect();
            let payload = match envelopes.as_slice() {
                [one] => one.clone(),
                many => format!("[{}]", many.join(",")),
            };
            Publish::new(ctx.topics.status(&m(vm)), QoS::AtLeastOnce, payload)
        };
        let acks = |after: &[After]| -> Vec<u64> {
            after
                .iter()
                .filter_map(|a| match a {
                    After::StatusAck { ctr, .. } => Some(*ctr),
                    _ => None,
                })
                .collect()
        };
        let counter = |vm: &str| ctx.store.counter(&m(vm), "status").unwrap();

        let p = sealed("vm-1", &old, &[1]);
        let ahead = OpenedStatus::ahead(&ctx, &p).expect("a status message");
        assert!(matches!(&ahead.events, Ok((1, opened)) if opened[0].is_ok()));
        put_secret("vm-1", &new);
        assert!(
            matches!(ingest.status(&m("vm-1"), &p, Some(ahead)), Err(Ok(_))),
            "taken with a secret the machine no longer has"
        );
        assert_eq!(counter("vm-1"), 0);

        // Two fresh events and one replayed: one ack, for the highest counter.
        let p = sealed("vm-1", &new, &[1, 2]);
        let after = ingest
            .status(&m("vm-1"), &p, OpenedStatus::ahead(&ctx, &p))
            .unwrap_or_else(|_| panic!("refused"));
        assert_eq!(acks(&after), [2]);
        let p = sealed("vm-1", &new, &[2, 3, 4]);
        let after = ingest
            .status(&m("vm-1"), &p, OpenedStatus::ahead(&ctx, &p))
            .unwrap_or_else(|_| panic!("refused"));
        assert_eq!(acks(&after), [4]);
        assert_eq!(counter("vm-1"), 4);

        let s2 = Secret::from_bytes([3; 32]);
        let p = sealed("vm-2", &s2, &[1]);
        let ahead = OpenedStatus::ahead(&ctx, &p).expect("a status message");
        assert!(ahead.secret.is_none());
        put_secret("vm-2", &s2);
        let after = ingest
            .status(&m("vm-2"), &p, Some(ahead))
            .unwrap_or_else(|_| panic!("refused once provisioned"));
        assert_eq!(acks(&after), [1]);
    }
}
