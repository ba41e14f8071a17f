//! The embedded rumqttd broker, configured in code with every field set.
//!
//! rumqttd facts this works around (0.20): `RouterConfig::default()` is all zeros (refuses every
//! client, and segments under 1 KiB panic); `Broker::start()` blocks forever with no shutdown, so
//! it runs on its own thread for the life of the process; it cannot report the port it bound, so
//! callers pass a concrete address (tests pick a free one first); a publish larger than
//! `max_payload_size` silently drops the connection; every distinct subscription filter keeps an
//! in-memory log of up to `max_segment_size * max_segment_count` bytes that is never freed.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Per-filter log for ordinary topics.
    pub segment_size: usize,
    pub segment_count: usize,
    /// Filters (wildcards allowed) that carry bulk chunk frames, with their own log size.
    pub bulk_filters: Vec<String>,
    pub bulk_segment_size: usize,
    pub bulk_segment_count: usize,
    /// None accepts anyone (a broker on loopback for tests and demos).
    pub auth: Option<AuthFn>,
}

impl BrokerSettings {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            max_connections: 10_000,
            max_payload: MAX_PACKET,
            segment_size: 1024 * 1024,
            segment_count: 4,
            bulk_filters: Vec::new(),
            bulk_segment_size: 4 * 1024 * 1024,
            bulk_segment_count: 2,
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
        let custom_segment = self
            .bulk_filters
            .iter()
            .map(|f| {
                let seg = SegmentConfig {
                    max_segment_size: self.bulk_segment_size,
                    max_segment_count: self.bulk_segment_count,
                };
                (f.clone(), seg)
            })
            .collect::<HashMap<_, _>>();
        let router = RouterConfig {
            max_connections: self.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: self.segment_size.max(self.max_payload + 1024),
            max_segment_count: self.segment_count.max(1),
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
            connections.set_auth_handler(move |client: String, user: String, pass: String| {
                let ok = auth(&client, &user, &pass);
                if !ok {
                    tracing::warn!(client = %client, "broker refused a client: bad credentials");
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
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS listener: {0}")]
    Tls(String),
}

/// A running embedded broker. It lives until the process exits (rumqttd has no shutdown).
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on its own thread and returns once its port accepts connections.
    pub fn start(settings: BrokerSettings) -> Result<Self, BrokerError> {
        let addr = settings.listen;
        // rumqttd would log a bind failure on its thread and never listen: check first.
        if addr.port() != 0 {
            TcpListener::bind(addr).map_err(|_| BrokerError::AddrInUse { addr })?;
        }
        let config = settings.rumqttd_config();
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Self { addr });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(BrokerError::NotListening { addr, secs: 10 })
    }

    pub fn url(&self) -> crate::client::BrokerUrl {
        crate::client::BrokerUrl::mqtt(self.addr.ip().to_string(), self.addr.port())
    }
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
