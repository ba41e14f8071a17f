//! `fleetcast serve`: opens the data dir, optionally starts the embedded broker, and runs the
//! service's tasks until shutdown:
//! - the serve connection (`fleetcast-platform-serve`, clean session) and its dispatcher, which
//!   routes chunk requests to [`crate::chunks`] and admin input to [`crate::admin`] without
//!   ever blocking (a full queue drops the message: machines and the CLI retry);
//! - the ingest connection (`fleetcast-platform-ingest`, persistent session) and
//!   [`crate::ingest`].
//!
//! Every task is owned by a `JoinSet`; the first task to fail stops the others. The sled
//! database is flushed and dropped before `serve` returns, so a new `serve` can open it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fleetcast_broker::client::{self, BrokerUrl, MqttEvent};
use fleetcast_broker::gateway::TlsListen;
use fleetcast_broker::{start_secured, SecureBrokerSettings};
use fleetcast_proto::text::{shown, Admit, LogGate};
use fleetcast_proto::{Route, Topics};
use rumqttc::{AsyncClient, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminInput};
use crate::artifacts::ArtifactStore;
use crate::broker_auth::{AuthStore, StoreAuth};
use crate::context::{Ctx, NoSessionControl, SessionControl};
use crate::error::PlatformError;
use crate::identities;
use crate::keys::{load_or_create_keys, Keys};
use crate::limits::{self, MachineLimits, MachineRates};
use crate::store::{SledStore, Store};
use crate::{chunks, ingest, retention};
use fleetcast_proto::acl::PLATFORM_USER;

pub const INGEST_CLIENT_ID: &str = "fleetcast-platform.ingest";
pub const SERVE_CLIENT_ID: &str = "fleetcast-platform.serve";
/// How often freed heap memory is handed back to the system
/// (`fleetcast_broker::memory::return_freed_memory`).
const TRIM_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub broker: BrokerUrl,
    /// Some: start the embedded broker (rumqttd behind fleetcast's authorizing gateway) with a
    /// plain MQTT listener on this address. Keep it on loopback in production; use `tls`.
    pub embedded_listen: Option<SocketAddr>,
    /// Some: the embedded broker also (or only) serves MQTT over TLS.
    pub tls: Option<TlsListen>,
    pub topic_prefix: String,
    /// What each machine may take (chunk rate, stored events).
    pub limits: MachineLimits,
    /// When the database is compacted while the platform runs.
    pub compaction: AutoCompaction,
}

/// When `serve` compacts its database while it runs ([`crate::disk::watch_database`]).
#[derive(Debug, Clone, Copy)]
pub struct AutoCompaction {
    /// `never`: only say in the log that a compaction is due; otherwise compact when it is.
    pub policy: crate::store::compact::Policy,
    /// How often the database's size is read.
    pub check_every: Duration,
    /// The smallest file compacted ([`crate::store::compact::DUE_MIN_BYTES`]; less in tests).
    pub min_bytes: u64,
}

impl Default for AutoCompaction {
    fn default() -> Self {
        AutoCompaction {
            policy: crate::store::compact::Policy::Auto,
            check_every: crate::disk::DATABASE_CHECK_EVERY,
            min_bytes: crate::store::compact::DUE_MIN_BYTES,
        }
    }
}

/// Everything `run` needs, opened by `serve`.
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub files: Arc<ArtifactStore>,
    pub keys: Arc<Keys>,
    pub topics: Topics,
    pub broker: BrokerUrl,
    /// The (username, password) each platform client connects with, by client id.
    pub login: Login,
    pub data_dir: PathBuf,
    pub sessions: Arc<dyn SessionControl>,
    pub limits: MachineLimits,
    pub compaction: AutoCompaction,
}

/// The (username, password) a platform client with this client id connects with.
pub type Login = Arc<dyn Fn(&str) -> (String, String) + Send + Sync>;

/// Revocation on the embedded broker: the gateway closes the sessions at once.
struct GatewaySessions(fleetcast_broker::GatewayHandle);

impl SessionControl for GatewaySessions {
    fn close_sessions(&self, username: &str) -> usize {
        self.0.kick(username)
    }

    fn deliver(
        &self,
        topic: &str,
        payload: &[u8],
        only: Option<&[&str]>,
        key: Option<u64>,
    ) -> Option<usize> {
        Some(self.0.deliver_keyed(topic, payload, only, key))
    }

    fn subscribed(&self, topic: &str) -> Option<bool> {
        Some(self.0.subscribed(topic))
    }

    fn lacking<'a>(&self, topic: &str, names: &[&'a str], key: u64) -> Option<Vec<&'a str>> {
        Some(self.0.lacking(topic, names, key))
    }

    fn take_chunk_requests(&self, sink: fleetcast_broker::ChunkRequestSink) -> bool {
        self.0.take_chunk_requests(sink)
    }

    fn take_reports(&self, sink: fleetcast_broker::ReportSink) -> bool {
        self.0.take_reports(sink)
    }

    fn take_admin(&self, sink: fleetcast_broker::AdminSink) -> bool {
        self.0.take_admin(sink)
    }

    fn reply(&self, topic: &str, payload: &[u8]) -> bool {
        self.0.reply(topic, payload)
    }

    fn gateway_counters(&self) -> Option<fleetcast_proto::admin::GatewayCounters> {
        let s = self.0.stats();
        Some(fleetcast_proto::admin::GatewayCounters {
            connections: s.connections,
            active: s.active as u64,
            refused: s.refused,
            violations: s.violations,
            subscriptions_refused: s.subscriptions_refused,
            frames_delivered: s.fanout_delivered,
            frames_dropped: s.fanout_dropped,
            frames_already_queued: s.fanout_already_queued,
            chunk_frames_delivered: s.fanout_chunk_frames,
            frames_recently_written: s.fanout_recently_written,
            frames_caught_up: s.fanout_caught_up,
            served: s.served,
            closed_unread: s.closed_unread,
        })
    }
}

/// Runs the platform until `shutdown` is cancelled or a task fails.
pub async fn serve(opts: ServeOptions, shutdown: CancellationToken) -> Result<(), PlatformError> {
    let keys = load_or_create_keys(&opts.data_dir)?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&opts.data_dir.join("db"))?);
    let files =
        Arc::new(
            ArtifactStore::open(&opts.data_dir).map_err(|e| PlatformError::BadFile {
                path: opts.data_dir.clone(),
                reason: e.to_string(),
            })?,
        );
    identities::ensure_bootstrap_admin(&*store, &keys)?;
    // Notice and command seqs from here on are above the clock in milliseconds: a database
    // restored from a backup (or copied back after an upgrade) has an older seq than machines
    // accepted since, and they ignore a notice whose seq is not higher (protocol.md §4). Any
    // seq handed out before this start is below it, unless more than one a millisecond was
    // handed out on average since (an `activate` of 10,000 machines takes a seq each).
    store.raise_seq(crate::now_ms())?;
    crate::ops::artifacts::sweep_removed(&*store, &files);
    let topics = Topics::new(&opts.topic_prefix);
    let auth: AuthStore = Arc::new(RwLock::new(Some(store.clone())));
    let broker_stop = CancellationToken::new();
    let platform_password = keys.platform_mqtt_password();
    let (broker, login, sessions): (BrokerUrl, Login, Arc<dyn SessionControl>) =
        if opts.embedded_listen.is_some() || opts.tls.is_some() {
            let mut settings = SecureBrokerSettings::new(topics.clone());
            settings.plain = opts.embedded_listen;
            settings.tls = opts.tls.clone();
            let check = Arc::new(StoreAuth {
                store: auth.clone(),
                platform_password,
            });
            let secured = Arc::new(start_secured(settings, check, broker_stop.clone()).await?);
            if let Some(a) = secured.plain_addr() {
                tracing::info!(listen = %a, "embedded broker: plain MQTT");
            }
            if let Some(a) = secured.tls_addr() {
                tracing::info!(listen = %a, "embedded broker: MQTT over TLS");
            }
            let internal = secured.clone();
            (
                secured.internal_url(),
                Arc::new(move |client: &str| {
                    (client.to_owned(), internal.internal_password(client))
                }),
                Arc::new(GatewaySessions(secured.handle())),
            )
        } else {
            (
                opts.broker.clone(),
                Arc::new(move |_: &str| (PLATFORM_USER.to_owned(), platform_password.clone())),
                Arc::new(NoSessionControl),
            )
        };
    let deps = Deps {
        store,
        files,
        keys: Arc::new(keys),
        topics,
        broker,
        login,
        data_dir: opts.data_dir.clone(),
        sessions,
        limits: opts.limits,
        compaction: opts.compaction,
    };
    let result = run(deps, shutdown).await;
    broker_stop.cancel();
    *auth.write().unwrap_or_else(|p| p.into_inner()) = None;
    result
}

/// The service proper: connections and tasks over already opened dependencies.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), PlatformError> {
    let tasks_stop = shutdown.child_token();
    let mut tasks: JoinSet<(&'static str, Result<(), PlatformError>)> = JoinSet::new();

    let (user, password) = (deps.login)(SERVE_CLIENT_ID);
    let mut serve_opts = client::options_as(&deps.broker, SERVE_CLIENT_ID, &user, Some(&password));
    serve_opts.set_clean_session(true);
    let (serve_client, serve_loop) = client::connect(serve_opts, 512);
    let (serve_tx, serve_rx) = mpsc::channel(1024);
    {
        let stop = tasks_stop.clone();
        tasks.spawn(async move {
            client::drive(serve_loop, serve_tx, stop).await;
            ("serve connection", Ok(()))
        });
    }

    let (user, password) = (deps.login)(INGEST_CLIENT_ID);
    let mut ingest_opts =
        client::options_as(&deps.broker, INGEST_CLIENT_ID, &user, Some(&password));
    // Persistent, so the broker keeps what machines report while the platform restarts. The
    // broker's PUBACK goes out on receipt: what a machine relies on is the StatusAck (MAC'd) the
    // ingest sends after its flush (protocol.md §6.1), and rumqttd lets at most 100 deliveries
    // per connection wait for a PUBACK, which capped every ingest batch at 100 events.
    ingest_opts.set_clean_session(false);
    let (ingest_client, ingest_loop) = client::connect(ingest_opts, 1024);
    let (ingest_tx, ingest_rx) = mpsc::channel(1024);
    // On the embedded broker, what machines report (status events, state, `online` and the
    // will on it) comes from the gateway in process; the ingest connection still gets what
    // reached rumqttd before this (in the moment between the gateway's first accept and this
    // line: retained there, so states and `online` are not lost) and all that an external
    // broker delivers.
    deps.sessions.take_reports(ingest_tx.clone());
    {
        let stop = tasks_stop.clone();
        tasks.spawn(async move {
            client::drive(ingest_loop, ingest_tx, stop).await;
            ("ingest connection", Ok(()))
        });
    }

    let compaction = deps.compaction;
    let ctx = Arc::new(Ctx {
        store: deps.store.clone(),
        files: deps.files,
        keys: std::sync::RwLock::new(deps.keys),
        topics: deps.topics,
        mqtt: serve_client.clone(),
        sessions: deps.sessions,
        data_dir: deps.data_dir,
        limits: deps.limits,
        stats: Default::default(),
        log_gate: fleetcast_proto::text::LogGate::per_minute(),
        secrets: Default::default(),
    });
    let (chunk_tx, chunk_rx) = mpsc::channel(1024);
    // On the embedded broker, chunk requests come straight from the gateway; the MQTT
    // subscription below stays for any other broker.
    if ctx.sessions.take_chunk_requests(chunk_tx.clone()) {
        tracing::debug!("chunk requests taken in process from the gateway");
    }
    let (admin_tx, admin_rx) = mpsc::channel(8192);
    // On the embedded broker, operators' requests and upload parts and integrators' requests
    // come from the gateway in process, and wait for room in the admin queue (over MQTT a full
    // queue drops them: `dispatch` must not wait).
    let (gateway_admin_tx, mut gateway_admin_rx) = mpsc::channel::<MqttEvent>(64);
    if ctx.sessions.take_admin(gateway_admin_tx) {
        let (topics, admin, stop) = (ctx.topics.clone(), admin_tx.clone(), tasks_stop.clone());
        tasks.spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    e = gateway_admin_rx.recv() => match e { Some(e) => e, None => break },
                };
                let MqttEvent::Publish(p) = event else {
                    continue;
                };
                if let Some(input) = admin_input(&topics, p) {
                    if admin.send(input).await.is_err() {
                        break;
                    }
                }
            }
            ("admin from the gateway", Ok(()))
        });
    }
    tasks.spawn({
        let (ctx, stop) = (ctx.clone(), tasks_stop.clone());
        async move {
            (
                "ingest",
                ingest::run(ctx, ingest_client.clone(), ingest_rx, stop).await,
            )
        }
    });
    tasks.spawn({
        let (ctx, stop) = (ctx.clone(), tasks_stop.clone());
        async move { ("chunk server", chunks::run(ctx, chunk_rx, stop).await) }
    });
    tasks.spawn({
        let (ctx, stop) = (ctx.clone(), tasks_stop.clone());
        async move { ("admin", admin::run(ctx, admin_rx, stop).await) }
    });
    tasks.spawn({
        let (store, kept, stop) = (
            ctx.store.clone(),
            ctx.limits.events_kept,
            tasks_stop.clone(),
        );
        async move { ("event retention", retention::run(store, kept, stop).await) }
    });
    tasks.spawn({
        let (topics, client, stop) = (ctx.topics.clone(), serve_client.clone(), tasks_stop.clone());
        async move {
            (
                "dispatcher",
                dispatch(topics, client, serve_rx, chunk_tx, admin_tx, stop).await,
            )
        }
    });
    tasks.spawn({
        let stop = tasks_stop.clone();
        async move {
            fleetcast_broker::memory::return_freed_memory(TRIM_EVERY, stop).await;
            ("memory trim", Ok(()))
        }
    });
    tasks.spawn({
        let (dir, stop) = (ctx.data_dir.clone(), tasks_stop.clone());
        async move {
            crate::disk::watch(dir, stop).await;
            ("disk space watch", Ok(()))
        }
    });
    tasks.spawn({
        let (store, stop) = (ctx.store.clone(), tasks_stop.clone());
        async move {
            crate::disk::watch_database(store, compaction, stop).await;
            ("database size watch", Ok(()))
        }
    });
    drop(ctx);

    let mut result = Ok(());
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        Some(joined) = tasks.join_next() => {
            result = match joined {
                // Tasks see the shutdown too, and may end before this select notices it.
                _ if shutdown.is_cancelled() => Ok(()),
                Ok((task, Ok(()))) => Err(PlatformError::Task { task, reason: "ended unexpectedly".into() }),
                Ok((task, Err(e))) => Err(PlatformError::Task { task, reason: format!("{e}") }),
                Err(e) => Err(PlatformError::Task { task: "?", reason: e.to_string() }),
            };
        }
    }
    tasks_stop.cancel();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((task, Err(e))) = joined {
            tracing::warn!(task, error = %e, "task failed while stopping");
        }
    }
    let flushed = deps.store.flush();
    drop(deps.store);
    tracing::info!("platform stopped");
    result.and(flushed.map_err(Into::into))
}

/// Routes what the serve connection receives. Never awaits a publish or a full queue: the
/// driver would stop polling and the publishing tasks would wait on it forever.
async fn dispatch(
    topics: Topics,
    client: AsyncClient,
    mut events: mpsc::Receiver<MqttEvent>,
    chunks: mpsc::Sender<(fleetcast_proto::MachineId, bytes::Bytes)>,
    admin: mpsc::Sender<AdminInput>,
    stop: CancellationToken,
) -> Result<(), PlatformError> {
    let mut inbound = Inbound::new(topics.clone(), chunks, admin.clone(), Instant::now());
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            e = events.recv() => match e { Some(e) => e, None => return Ok(()) },
        };
        match event {
            MqttEvent::Connected { .. } => {
                let filters = vec![
                    SubscribeFilter::new(topics.platform_chunk_request_filter(), QoS::AtMostOnce),
                    SubscribeFilter::new(topics.platform_admin_request_filter(), QoS::AtLeastOnce),
                    SubscribeFilter::new(topics.platform_admin_upload_filter(), QoS::AtLeastOnce),
                    SubscribeFilter::new(
                        topics.platform_integrator_request_filter(),
                        QoS::AtLeastOnce,
                    ),
                ];
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::warn!(error = %e, "serve subscribe failed");
                }
                if admin.try_send(AdminInput::Republish).is_err() {
                    tracing::warn!("admin queue full: re-publish after connect skipped");
                }
                tracing::info!("serve connection up");
            }
            MqttEvent::Disconnected(e) => {
                tracing::warn!(error = %e, "serve connection lost; reconnecting")
            }
            MqttEvent::Publish(p) => inbound.route(p, Instant::now()),
            MqttEvent::PubAck(_) | MqttEvent::Sent(_) | MqttEvent::SubAck(_) => {}
        }
    }
}

/// Hands what the serve connection receives to the chunk server's and the admin task's queues,
/// never waiting. Chunk requests reach this connection only from an external broker (the
/// embedded one's gateway hands them over in process, after its own per-machine limits), so
/// here each machine is held to a rate before the one queue all machines share
/// ([`limits::EXTERNAL_CHUNK_REQUESTS`]), and a full queue is logged through the log gate.
/// Why: on Mosquitto nothing else held one machine's credentials asking as fast as the broker
/// took it (about 50,000 requests a second from one client): the queue stayed full, every
/// machine's requests were dropped, each with a warning, and another machine's 8 MiB download
/// did not finish within 120 s, twice; with the rate it took 7-21 s, against 0.7-2.9 s with no
/// flood (ad hoc, debug build, 2026-11-29).
struct Inbound {
    topics: Topics,
    chunks: mpsc::Sender<(fleetcast_proto::MachineId, bytes::Bytes)>,
    admin: mpsc::Sender<AdminInput>,
    rates: MachineRates,
    log_gate: LogGate,
}

impl Inbound {
    fn new(
        topics: Topics,
        chunks: mpsc::Sender<(fleetcast_proto::MachineId, bytes::Bytes)>,
        admin: mpsc::Sender<AdminInput>,
        now: Instant,
    ) -> Self {
        Self {
            topics,
            chunks,
            admin,
            rates: MachineRates::new(limits::EXTERNAL_CHUNK_REQUESTS, now),
            log_gate: LogGate::per_minute(),
        }
    }

    /// Hands `p` to its queue, or drops it (logged through the gate).
    fn route(&mut self, p: rumqttc::Publish, now: Instant) {
        let topic = p.topic.clone();
        let (dropped, key) = match self.topics.parse(&p.topic) {
            Some(Route::ChunkRequest(m)) => {
                if !self.rates.admit(&m, 1, now) {
                    ("over the machine's chunk request rate", m.to_string())
                } else if self.chunks.try_send((m.clone(), p.payload)).is_err() {
                    ("queue full", m.to_string())
                } else {
                    return;
                }
            }
            _ => match admin_input(&self.topics, p) {
                Some(input) => match self.admin.try_send(input) {
                    Ok(()) => return,
                    Err(_) => ("queue full", topic.clone()),
                },
                None => {
                    tracing::debug!(topic = %shown(&topic), "unexpected topic on the serve connection");
                    return;
                }
            },
        };
        if let Admit::Log { quiet_before } = self.log_gate.admit(&key) {
            tracing::warn!(topic = %shown(&topic), quiet_before, "{dropped}: message dropped (the sender retries)");
        }
    }
}

/// What the admin task makes of a publish on an operator's request or upload topic or an
/// integrator's request topic; `None` for any other topic.
fn admin_input(topics: &Topics, p: rumqttc::Publish) -> Option<AdminInput> {
    let payload = p.payload;
    Some(match topics.parse(&p.topic)? {
        Route::AdminRequest(client) => AdminInput::Request { client, payload },
        Route::IntegratorEventsGet(client) => AdminInput::IntegratorEvents { client, payload },
        Route::AdminUpload(client) => AdminInput::Upload { client, payload },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::MachineId;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    /// Counts the warnings logged.
    struct Warnings(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            if *e.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Through an external broker, one machine asking for chunks as fast as the broker takes
    /// it gets its rate and no more, the others' requests still reach the chunk server, and the
    /// drops are logged a few times, not once each.
    #[test]
    fn one_machine_flooding_chunk_requests_leaves_the_queue_to_the_others() {
        let topics = Topics::default();
        let (chunk_tx, mut chunk_rx) = mpsc::channel(1024);
        let (admin_tx, _admin_rx) = mpsc::channel(8);
        let now = Instant::now();
        let mut inbound = Inbound::new(topics.clone(), chunk_tx, admin_tx, now);
        let request = |m: &str| {
            let topic = topics.chunk_request(&MachineId::new(m).unwrap());
            rumqttc::Publish::new(topic, QoS::AtMostOnce, b"r".to_vec())
        };
        let (rate, burst) = limits::EXTERNAL_CHUNK_REQUESTS;
        let warnings = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(Warnings(warnings.clone()));
        let mut taken = Vec::new();
        let mut take = |rx: &mut mpsc::Receiver<(MachineId, bytes::Bytes)>| {
            while let Ok((m, _)) = rx.try_recv() {
                taken.push(m.to_string());
            }
        };
        tracing::subscriber::with_default(subscriber, || {
            // Its whole burst and 5,000 more at one instant, the chunk server keeping up.
            for _ in 0..burst as usize + 5_000 {
                inbound.route(request("vm-1"), now);
                take(&mut chunk_rx);
            }
            inbound.route(request("vm-2"), now);
            take(&mut chunk_rx);
            // A second later, a second's worth again.
            let later = now + Duration::from_secs(1);
            for _ in 0..rate as usize + 100 {
                inbound.route(request("vm-1"), later);
                take(&mut chunk_rx);
            }
        });
        let from = |m: &str| taken.iter().filter(|t| t.as_str() == m).count();
        assert_eq!(from("vm-1"), (burst + rate) as usize);
        assert_eq!(from("vm-2"), 1, "another machine's request was dropped");
        let logged = warnings.load(Ordering::Relaxed);
        assert!((1..=5).contains(&logged), "{logged} warnings");
    }
}
