//! The embedded rumqttd broker, configured in code with every field set.
//!
//! rumqttd facts this works around (0.20): `RouterConfig::default()` is all zeros (refuses every
//! client, and segments under 1 KiB panic); `Broker::start()` blocks forever with no shutdown and
//! cannot hand out in-process links while it runs, so fleetcast starts rumqttd's router and TCP
//! server itself, each on its own thread for the life of the process; it cannot report the port it bound, so
//! callers pass a concrete address (tests pick a free one first); a publish larger than
//! `max_payload_size` silently drops the connection; every distinct subscription filter keeps an
//! in-memory log of up to `max_segment_size * max_segment_count` bytes that is never freed, and
//! a log drops its oldest segment when full even if a subscriber has not read it (so each log
//! must hold what its slowest reader may lag behind; see `BrokerSettings`).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcast_proto::text::{shown, Admit};
use fleetcast_proto::Topics;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::Packet;
use rumqttd::{Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};

use crate::client::MAX_PACKET;

/// Decides whether `(client_id, username, password)` may connect.
pub type AuthFn = Arc<dyn Fn(&str, &str, &str) -> bool + Send + Sync>;

/// How to run the embedded broker.
#[derive(Clone)]
pub struct BrokerSettings {
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Largest accepted publish payload. Bigger publishes drop the sender's connection.
    pub max_payload: usize,
    /// Per-filter log for ordinary topics: a machine's own topics, read by one subscriber
    /// as they come, so small. rumqttd never frees a log, so this is kept per machine.
    pub segment_size: usize,
    pub segment_count: usize,
    /// Filters (wildcards allowed) that carry bulk chunk frames, with their own log size
    /// (default: fleetcast's chunk topics under the default prefix).
    pub bulk_filters: Vec<String>,
    pub bulk_segment_size: usize,
    pub bulk_segment_count: usize,
    /// The platform's wildcard filters, which gather what every machine sends when it goes
    /// through rumqttd: behind the gateway, only until `serve` takes reports, chunk requests
    /// and admin traffic in process at its start (`GatewayHandle::take_reports` and the
    /// like), so these logs stay nearly empty there. Their log must
    /// hold whatever the platform has not read yet, and no more: a log is allocated as it fills
    /// and never given back (with 32 x 256 KiB for all of them `serve` grew 37 MB more over ten
    /// 1,000-machine rollouts, one recorded run against another, as status events and chunk
    /// requests filled theirs). What a full
    /// log drops is sent again (outbox, the state's repeats, chunk re-requests).
    pub inbound_filters: Vec<String>,
    pub inbound_segment_size: usize,
    pub inbound_segment_count: usize,
    /// Inbound filters that take a whole fleet's message at once: every machine's state and
    /// `online` when a fleet (re)connects together. The platform falls behind by more than
    /// 1 MiB of states then (rumqttd hands its connection a few publishes per router pass, and
    /// the router is busy with the connects): at 4 x 256 KiB a 10,000-machine onboarding lost
    /// 3,900-4,600 first states in one "jumping to head". A state is 300-500 bytes (a simulated
    /// machine's, in its envelope); the default of 16 x 256 KiB holds 8,000 or more unread, and
    /// the state's repeats heal the rest.
    pub burst_filters: Vec<String>,
    pub burst_segment_size: usize,
    pub burst_segment_count: usize,
    /// Publishes handed to one connection per router pass (QoS 0 reads). rumqttd writes what a
    /// connection has queued (up to 200 publishes, fixed) through one buffer that keeps its
    /// largest size; smaller passes keep that queue shorter when the link keeps up, but do not
    /// bound it, which is why bulk frames bypass rumqttd (gateway `fanout`).
    pub max_outgoing_packets: usize,
    /// None accepts anyone (a broker on loopback for tests and demos).
    pub auth: Option<AuthFn>,
}

impl BrokerSettings {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            max_connections: 100_000,
            max_payload: MAX_PACKET,
            segment_size: 8 * 1024,
            segment_count: 2,
            bulk_filters: Topics::default().bulk_filters(),
            bulk_segment_size: 1024 * 1024,
            bulk_segment_count: 4,
            inbound_filters: Topics::default().platform_inbound_filters(),
            inbound_segment_size: 256 * 1024,
            inbound_segment_count: 4,
            burst_filters: Topics::default().platform_burst_filters(),
            burst_segment_size: 256 * 1024,
            burst_segment_count: 16,
            max_outgoing_packets: 16,
            auth: None,
        }
    }

    /// Requires `client_id == username` and `check(client_id, password)`.
    pub fn with_auth(mut self, check: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> Self {
        self.auth = Some(Arc::new(move |client, user, pass| {
            client == user && check(client, pass)
        }));
        self
    }

    fn rumqttd_config(&self) -> Config {
        // rumqttd panics on segments under 1 KiB.
        let segment = |size: usize, count: usize| SegmentConfig {
            max_segment_size: size.max(1024),
            max_segment_count: count.max(1),
        };
        let bulk = segment(self.bulk_segment_size, self.bulk_segment_count);
        let inbound = segment(self.inbound_segment_size, self.inbound_segment_count);
        let burst = segment(self.burst_segment_size, self.burst_segment_count);
        let custom_segment = self
            .bulk_filters
            .iter()
            .map(|f| (f.clone(), bulk.clone()))
            .chain(
                self.inbound_filters
                    .iter()
                    .map(|f| (f.clone(), inbound.clone())),
            )
            // After the inbound filters: a burst filter is one of them, with its own size.
            .chain(
                self.burst_filters
                    .iter()
                    .map(|f| (f.clone(), burst.clone())),
            )
            .collect::<HashMap<_, _>>();
        let ordinary = segment(self.segment_size, self.segment_count);
        let router = RouterConfig {
            max_connections: self.max_connections,
            max_outgoing_packet_count: self.max_outgoing_packets.max(1) as u64,
            max_segment_size: ordinary.max_segment_size,
            max_segment_count: ordinary.max_segment_count,
            custom_segment: (!custom_segment.is_empty()).then_some(custom_segment),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let mut connections = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: self.max_payload,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        if let Some(auth) = self.auth.clone() {
            // One gate for every refusal: the client id is the client's own text (a new one
            // per attempt would pass a gate per id), and behind the gateway only the
            // platform's own clients are ever let in, so any refusal is worth a few lines.
            let log_gate = fleetcast_proto::text::LogGate::per_minute();
            connections.set_auth_handler(move |client: String, user: String, pass: String| {
                let ok = auth(&client, &user, &pass);
                if !ok {
                    if let Admit::Log { quiet_before } = log_gate.admit("refused") {
                        tracing::warn!(client = %shown(&client), quiet_before, "broker refused a client: bad credentials");
                    }
                }
                std::future::ready(ok)
            });
        }
        let server = ServerSettings {
            name: "fleetcast-v4".into(),
            listen: self.listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        Config {
            id: 0,
            router,
            v4: Some(HashMap::from([("1".to_owned(), server)])),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("address {addr} is already in use")]
    AddrInUse { addr: SocketAddr },
    #[error("broker on {addr} did not accept connections within {secs} s")]
    NotListening { addr: SocketAddr, secs: u64 },
    #[error("could not start the broker thread: {0}")]
    Thread(std::io::Error),
    /// `error` is in the message, so it is not also a `source` (printed twice in a chain).
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS listener: {0}")]
    Tls(String),
}

/// A running embedded broker. It lives until the process exits (rumqttd has no shutdown).
#[derive(Clone)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
    links: Links,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Opens sessions on the broker's router in-process: no socket, no second MQTT encoding. The
/// gateway gives each client one (see `gateway::link`).
///
/// Why not `rumqttd::Broker::link`: `Broker::start` takes `&mut self` and blocks forever, so a
/// running broker cannot be asked for links. fleetcast therefore assembles the same parts
/// itself: the router on its thread, the loopback TCP server on another, and this handle to
/// the router's channel (whose type rumqttd does not export, hence the closure).
#[derive(Clone)]
pub struct Links {
    open: Arc<OpenLink>,
    queued: Arc<dyn Fn() -> usize + Send + Sync>,
}

type OpenLink = dyn Fn(&str) -> Result<(LinkTx, LinkRx), LinkRefused> + Send + Sync;

/// The router did not take a new session (e.g. its connection limit), with rumqttd's reason.
#[derive(Debug, thiserror::Error)]
#[error("the broker refused a session: {0}")]
pub struct LinkRefused(String);

impl Links {
    /// A clean session for `client_id`. A live session with the same id is dropped by the
    /// router (the gateway ends it first: see `gateway::registry`). Blocks until the router
    /// answers, which is at its next pass (run it off the async workers).
    pub fn open(&self, client_id: &str) -> Result<(LinkTx, LinkRx), LinkRefused> {
        (self.open)(client_id)
    }

    /// Events waiting in the channel to the router (it holds [`ROUTER_QUEUE`]; sending to a
    /// full one blocks the sending thread).
    pub fn router_queue(&self) -> usize {
        (self.queued)()
    }
}

impl EmbeddedBroker {
    /// Starts rumqttd (router and loopback TCP server, each on its own thread) and returns once
    /// its port accepts connections.
    pub fn start(settings: BrokerSettings) -> Result<Self, BrokerError> {
        let addr = settings.listen;
        // rumqttd would log a bind failure on its thread and never listen: check first.
        if addr.port() != 0 {
            TcpListener::bind(addr).map_err(|_| BrokerError::AddrInUse { addr })?;
        }
        let config = settings.rumqttd_config();
        let router_tx = rumqttd::Router::new(config.id, config.router.clone()).spawn();
        let links = {
            let router_tx = router_tx.clone();
            let probe = router_tx.clone();
            let queued = Arc::new(move || probe.len());
            let open = Arc::new(move |client_id: &str| {
                let (tx, rx, _connack) = LinkBuilder::new(client_id, router_tx.clone())
                    .clean_session(true)
                    // Like the TCP server's sessions: a publish on a topic nobody subscribed
                    // to is taken (and kept in a log of its own) rather than refused.
                    .dynamic_filters(true)
                    .build()
                    .map_err(|e| LinkRefused(e.to_string()))?;
                Ok((tx, rx))
            });
            Links { open, queued }
        };
        start_ticker(&links)?;
        for (_, server) in config.v4.clone().unwrap_or_default() {
            let mut server = rumqttd::Server::new(server, router_tx.clone(), V4);
            std::thread::Builder::new()
                .name("rumqttd".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let result = match runtime {
                        Ok(rt) => rt
                            .block_on(server.start(rumqttd::LinkType::Remote))
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = result {
                        tracing::error!(error = %e, "embedded broker stopped");
                    }
                })
                .map_err(BrokerError::Thread)?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Self { addr, links });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(BrokerError::NotListening { addr, secs: 10 })
    }

    pub fn url(&self) -> crate::client::BrokerUrl {
        crate::client::BrokerUrl::mqtt(self.addr.ip().to_string(), self.addr.port())
    }

    /// In-process sessions on this broker's router.
    pub fn links(&self) -> Links {
        self.links.clone()
    }
}

/// Events rumqttd's channel to its router holds (`Router::new`: `bounded(1000)`).
pub const ROUTER_QUEUE: usize = 1000;

/// How often the ticker wakes the router.
const TICK: Duration = Duration::from_millis(10);

/// Wakes rumqttd's router every [`TICK`] with a PINGREQ of a session of its own.
///
/// Why (rumqttd 0.20, `Router::run_inner`): the router serves its queue of ready sessions and
/// blocks for the next event as soon as `consume()` answers None, which it also does when the
/// session at the front of the queue has disconnected (`Scheduler::poll` finds no tracker).
/// The sessions behind it then wait for whatever event comes next. Over TCP, pings and traffic
/// keep coming; an in-process session opening (`LinkBuilder::build`, which blocks until its
/// CONNACK is served from that queue) sends none. With 10,000 machines connecting and
/// reconnecting, the gateway's opens stalled for good (seen: 512 blocked, no event left to
/// come). The ticker bounds such a stall to one tick, for about 100 small events a second.
/// (A bare "ready" event would be cheaper, but the router asserts, in debug builds, that only a
/// session it paused as busy sends one.)
fn start_ticker(links: &Links) -> Result<(), BrokerError> {
    // ':' is in no machine, operator or integrator id: no client can take this session over.
    const ID: &str = "fleetcast:router-ticker";
    let first = links
        .open(ID)
        .map_err(|e| BrokerError::Thread(std::io::Error::other(e)))?;
    let links = links.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(BrokerError::Thread)?;
    std::thread::Builder::new()
        .name("rumqttd-ticker".into())
        .spawn(move || {
            let mut link = Some(first);
            loop {
                if let Some((tx, rx)) = &mut link {
                    loop {
                        let ping = Packet::PingReq(rumqttd::protocol::PingReq);
                        if runtime.block_on(tx.send(ping)).is_err() {
                            break;
                        }
                        // Takes the answers (its PINGRESPs) until the next tick is due.
                        let next = Instant::now() + TICK;
                        while rx.recv_deadline(next).is_ok() {}
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                }
                // The router stopped taking events: try again, slowly.
                std::thread::sleep(Duration::from_secs(1));
                link = links.open(ID).ok();
            }
        })
        .map_err(BrokerError::Thread)?;
    Ok(())
}

/// A loopback port that was free a moment ago. rumqttd cannot report the port it bound, so tests
/// pick one first; a rare clash shows up as [`BrokerError::AddrInUse`] and the caller retries.
pub use crate::client::free_loopback_port;

/// Starts a broker on a free loopback port, retrying on the rare port clash.
pub fn start_on_free_port(
    configure: impl Fn(BrokerSettings) -> BrokerSettings,
) -> Result<EmbeddedBroker, BrokerError> {
    let mut last = None;
    for _ in 0..5 {
        let port = free_loopback_port().map_err(BrokerError::Thread)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match EmbeddedBroker::start(configure(BrokerSettings::new(addr))) {
            Err(e @ BrokerError::AddrInUse { .. }) => last = Some(e),
            other => return other,
        }
    }
    Err(last.expect("loop ran"))
}
