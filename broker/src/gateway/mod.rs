//! The authorizing MQTT gateway: the only public door to the embedded rumqttd.
//!
//! Why it exists (rumqttd 0.20 facts): rumqttd has no per-topic authorization; its auth hook
//! sees `(client_id, username, password)` once at CONNECT and nothing after, so any client it
//! admits may subscribe to `#` and publish anywhere. It also never sets TCP_NODELAY on the
//! sockets it accepts (a 44 ms Nagle + delayed-ACK stall per request/response round trip), it
//! has no usable TLS on the rustls line the rest of fleetcast uses, and it cannot report a port
//! it bound. So rumqttd listens on loopback only and this gateway sits in front of it.
//!
//! What it enforces, per client connection:
//! - **CONNECT first, within 10 s**, MQTT 3.1.1 only: any other protocol name or level
//!   (MQTT 3.1, MQTT 5) gets CONNACK 1, read before the rest of the CONNECT. The [`Authenticator`] maps
//!   `(username, password)` to a [`Principal`]; unknown credentials get CONNACK 4, a client id
//!   the principal may not use ([`Principal::accepts_client_id`]: a machine only its own id, so
//!   nobody takes over another machine's session) or a will on a topic it may not publish
//!   (e.g. another machine's `online`) get CONNACK 5. Then the socket closes. (rumqttd alone
//!   answers a refusal by dropping the socket, which clients report as a network error.)
//! - **Every PUBLISH** is checked with [`Principal::may_publish`] and **every SUBSCRIBE filter**
//!   with [`Principal::may_subscribe`] and then [`Authenticator::may_subscribe`] (dynamic rules).
//!   MQTT 3.1.1 cannot refuse a publish, and a SUBACK failure code is easy to ignore, so a
//!   violation closes the connection (logged with client and topic): the attack fails visibly
//!   and nothing of it reaches the broker. So does a machine's SUBSCRIBE of more than
//!   [`MAX_SUBSCRIBE_FILTERS`] filters, and a packet MQTT 3.1.1 forbids a client (wrong
//!   fixed-header flags, a SUBSCRIBE or UNSUBSCRIBE with packet id 0 or without a filter, a
//!   PINGREQ with a body, a server-to-client packet). Everything else is handed on unchanged,
//!   except that an UNSUBSCRIBE reaches rumqttd naming only the filters the session holds
//!   there, and is answered by the gateway if that is none: exactly one UNSUBACK each
//!   (`session::Unsubacks`).
//! - **Sessions are in-process links** to rumqttd's router (`embedded::Links`): no second
//!   socket and no second MQTT encoding per client. The gateway answers CONNECT itself, hands
//!   each allowed packet to the router parsed, and encodes what the router delivers (only what
//!   the checked subscriptions match, so nothing on the way out is checked). It enforces the
//!   keep-alive (1.5 x, at most [`MAX_KEEP_ALIVE`]) and publishes the client's will when the
//!   connection ends without DISCONNECT. One descriptor per client instead of three (client
//!   socket, gateway -> rumqttd socket, rumqttd's end of it): 10,000 machines fit under a
//!   20,000 open-file limit.
//! - **Inbound rate limits** per principal kind ([`InboundLimits`]): over the limit the gateway
//!   delays forwarding and stops reading (TCP backpressure), it never disconnects. Machines,
//!   integrators and operators are limited by default (operators generously: they upload
//!   artifacts through the gateway); the platform is not.
//! - **TCP_NODELAY** on every accepted socket.
//! - **Kick**: [`GatewayHandle::kick`] ends every live session of a username at once (machine
//!   revocation).
//!
//! Nobody can bypass it by dialing rumqttd directly: rumqttd's own TCP listener is on loopback
//! and admits a client only when `password == internal_token(client_id)`, a keyed blake3 hash
//! under a key drawn at random per process and never written anywhere. Only the platform's
//! own clients dial it ([`SecuredBroker::internal_url`], [`SecuredBroker::internal_password`]).
//!
//! Every session through the gateway is clean (CONNACK session-present is always 0): a client
//! asking for a persistent session gets a fresh one on every CONNECT and must subscribe again.
//! This also closes what persistent sessions left open before: subscriptions checked once and
//! kept across reconnects after a rule narrowed (a machine leaving a group).
//!
//! Layout: `fanout` (what the gateway delivers itself, by exact filter: chunk frames, acks,
//! events, and what the relay serves), `feeder` (one thread hands packets to rumqttd's router,
//! whose channel blocks while full), `frames` (raw packet bytes), `limit` (token buckets),
//! `logs` (how much it logs about clients, and about failed accepts), `registry` (sessions, kick, counters), `relay` (one session of its own on rumqttd takes
//! release notices, commands and the key chain for every machine), `session` (one
//! connection: CONNECT, its link, its pumps), `tls` (server config).

mod fanout;
mod feeder;
mod frames;
mod limit;
mod logs;
mod places;
mod registry;
mod relay;
mod session;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetcast_proto::acl::{Principal, Role};
use fleetcast_proto::Topics;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use limit::{Rate, RateLimit};
pub use logs::CLIENT_LINES_PER_MINUTE;
pub use places::{OPENING_PER_ADDRESS, SESSIONS_PER_USER};
pub use registry::{AdminSink, ChunkRequestSink, GatewayHandle, GatewayStats, ReportSink};

use crate::client::BrokerUrl;
use crate::embedded::{start_on_free_port, BrokerError, BrokerSettings, EmbeddedBroker};
use registry::Registry;

/// Filters one SUBSCRIBE of a machine may name (copies of one filter count); over it the
/// connection is closed (a violation). The reference agent names one filter per SUBSCRIBE;
/// everything a machine subscribes to is the key chain and its four own filters, one per group
/// and one per artifact it downloads (one download per kind), so an agent naming them all at
/// once stays far below this unless it is in over 200 groups. Why a cap: a SUBSCRIBE is
/// checked, registered and answered filter by filter while the session reads nothing else,
/// and one packet (up to 2 MiB) could name tens of thousands of filters.
pub const MAX_SUBSCRIBE_FILTERS: usize = 256;

/// Decides who a client is. The platform implements it over its store.
///
/// Both methods run on tokio's blocking pool (`spawn_blocking`): a quick store read is fine.
/// `authenticate` runs once per CONNECT, `may_subscribe` once per SUBSCRIBE packet that the
/// static policy allowed.
pub trait Authenticator: Send + Sync + 'static {
    /// Checks credentials; the principal, or None to refuse.
    fn authenticate(&self, username: &str, password: &[u8]) -> Option<Principal>;
    /// A dynamic check after the static policy allowed a subscription (e.g. only artifacts that
    /// a release targets this machine with). Default: true.
    fn may_subscribe(&self, _principal: &Principal, _filter: &str) -> bool {
        true
    }
    /// [`Self::may_subscribe`] for each filter of one SUBSCRIBE, one answer per filter, in
    /// order. An implementation that reads a store for a check should read it once here: one
    /// SUBSCRIBE may name thousands of filters. Default: `may_subscribe` for each.
    fn may_subscribe_each(&self, principal: &Principal, filters: &[String]) -> Vec<bool> {
        filters
            .iter()
            .map(|f| self.may_subscribe(principal, f))
            .collect()
    }
}

/// A TLS listener: address and the server's certificate chain (leaf first) and key, as PEM.
#[derive(Clone)]
pub struct TlsListen {
    pub addr: SocketAddr,
    pub cert_chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListen")
            .field("addr", &self.addr)
            .field("key_pem", &"..")
            .finish_non_exhaustive()
    }
}

/// Inbound rate limits by principal kind. The platform is never limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundLimits {
    pub machine: Option<RateLimit>,
    pub integrator: Option<RateLimit>,
    /// Operators who may upload (role operator or admin).
    pub operator: Option<RateLimit>,
    /// Viewers: they send admin requests and upload nothing ([`RateLimit::VIEWER`]).
    pub viewer: Option<RateLimit>,
}

impl Default for InboundLimits {
    fn default() -> Self {
        Self {
            machine: Some(RateLimit::MACHINE),
            integrator: Some(RateLimit::INTEGRATOR),
            operator: Some(RateLimit::OPERATOR),
            viewer: Some(RateLimit::VIEWER),
        }
    }
}

impl InboundLimits {
    pub(crate) fn for_principal(&self, principal: &Principal) -> Option<RateLimit> {
        match principal {
            Principal::Machine { .. } => self.machine,
            Principal::Integrator { .. } => self.integrator,
            Principal::Operator {
                role: Role::Viewer, ..
            } => self.viewer,
            Principal::Operator { .. } => self.operator,
            Principal::Platform => None,
        }
    }
}

/// The longest keep-alive the gateway honours (20 minutes, the longest a machine may set): a
/// client asking for more, or for none (0, which MQTT 3.1.1 allows), is closed after 1.5 x this
/// without a packet. Without a bound, a connection whose peer vanished without a FIN (power
/// cut, NAT entry dropped) would hold its socket and session until `serve` restarted.
pub const MAX_KEEP_ALIVE: u16 = 1200;

/// How to run rumqttd behind the gateway.
#[derive(Clone)]
pub struct SecureBrokerSettings {
    /// Plain MQTT listener (port 0 picks one; see [`SecuredBroker::plain_addr`]).
    pub plain: Option<SocketAddr>,
    /// MQTT over TLS listener (port 0 picks one; see [`SecuredBroker::tls_addr`]).
    pub tls: Option<TlsListen>,
    pub topics: Topics,
    pub limits: InboundLimits,
    /// How long a new connection has for its TLS handshake and CONNECT.
    pub connect_timeout: Duration,
    /// The longest keep-alive the gateway honours, in seconds ([`MAX_KEEP_ALIVE`]): a client
    /// asking for more, or for none (0), is held to this one.
    pub max_keep_alive: u16,
    /// rumqttd's sizing. Its `listen` and `auth` are ignored: rumqttd always listens on a free
    /// loopback port and admits only the gateway's internal credentials.
    pub broker: BrokerSettings,
}

impl SecureBrokerSettings {
    /// No listener yet; rumqttd sized by [`BrokerSettings::new`] with the chunk topics of
    /// `topics` as bulk filters.
    pub fn new(topics: Topics) -> Self {
        let mut broker = BrokerSettings::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        broker.bulk_filters = topics.bulk_filters();
        // The relay's filters carry every notice and command for the whole fleet (a staged
        // wave publishes one notice per machine at once): bulk-sized logs.
        broker.bulk_filters.extend(relay::router_filters(&topics));
        broker.inbound_filters = topics.platform_inbound_filters();
        broker.burst_filters = topics.platform_burst_filters();
        Self {
            plain: None,
            tls: None,
            topics,
            limits: InboundLimits::default(),
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: MAX_KEEP_ALIVE,
            broker,
        }
    }
}

/// The per-process key behind rumqttd's internal passwords. Never printed, never stored.
struct InternalKey([u8; 32]);

impl InternalKey {
    fn random() -> Self {
        Self(rand::random())
    }

    /// The password rumqttd expects from `client_id`: 16 bytes of a keyed blake3 hash, hex.
    fn token(&self, client_id: &str) -> String {
        blake3::keyed_hash(&self.0, client_id.as_bytes()).to_hex()[..32].to_owned()
    }

    fn accepts(&self, client_id: &str, password: &str) -> bool {
        fleetcast_proto::auth::constant_time_eq(
            self.token(client_id).as_bytes(),
            password.as_bytes(),
        )
    }
}

/// What every session needs.
struct Shared {
    topics: Topics,
    auth: Arc<dyn Authenticator>,
    /// In-process sessions on rumqttd's router, one per admitted client.
    links: crate::embedded::Links,
    /// Hands every session's packets to the router from one thread.
    feeder: feeder::Feeder,
    limits: InboundLimits,
    connect_timeout: Duration,
    max_keep_alive: u16,
    registry: Arc<Registry>,
    /// Refusals and violations: a few lines per user name (or peer address) per minute, and
    /// at most [`logs::CLIENT_LINES_PER_MINUTE`] in all.
    log_gate: logs::LogLimit,
    /// Connections not yet past their CONNECT, per peer address; and the sessions of each
    /// operator and integrator.
    opening: Arc<places::Places>,
    sessions: Arc<places::Places>,
}

/// rumqttd on loopback and the gateway's listeners in front of it.
pub struct SecuredBroker {
    broker: EmbeddedBroker,
    internal: Arc<InternalKey>,
    handle: GatewayHandle,
    plain: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    listeners: Vec<JoinHandle<()>>,
}

/// Starts rumqttd on a free loopback port and the gateway's listeners. The listeners and their
/// sessions stop on `shutdown`; rumqttd itself runs until the process exits (it has no
/// shutdown), refusing everyone who lacks the internal credentials.
pub async fn start_secured(
    settings: SecureBrokerSettings,
    auth: Arc<dyn Authenticator>,
    shutdown: CancellationToken,
) -> Result<SecuredBroker, BrokerError> {
    let tls = match &settings.tls {
        Some(t) => Some((
            t.addr,
            tls::acceptor(&t.cert_chain_pem, &t.key_pem).map_err(BrokerError::Tls)?,
        )),
        None => None,
    };
    // Bind the public side first: a taken port fails before rumqttd's thread exists.
    let plain = match settings.plain {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let tls = match tls {
        Some((addr, acceptor)) => Some((bind(addr).await?, acceptor)),
        None => None,
    };
    let internal = Arc::new(InternalKey::random());
    let sizing = settings.broker.clone();
    let key = internal.clone();
    let broker = tokio::task::spawn_blocking(move || {
        start_on_free_port(|s| {
            let key = key.clone();
            let mut internal_only = sizing.clone();
            internal_only.listen = s.listen;
            internal_only.with_auth(move |client, pass| key.accepts(client, pass))
        })
    })
    .await
    .map_err(|e| BrokerError::Thread(std::io::Error::other(e)))??;

    let registry = Arc::new(Registry::default());
    relay::start(broker.links(), settings.topics.clone(), registry.clone())
        .map_err(BrokerError::Thread)?;
    let shared = Arc::new(Shared {
        topics: settings.topics,
        auth,
        links: broker.links(),
        feeder: feeder::Feeder::start(broker.links()).map_err(BrokerError::Thread)?,
        limits: settings.limits,
        connect_timeout: settings.connect_timeout,
        max_keep_alive: settings.max_keep_alive,
        registry: registry.clone(),
        log_gate: logs::LogLimit::default(),
        opening: Default::default(),
        sessions: Default::default(),
    });
    let mut listeners = Vec::new();
    let plain_addr = plain.as_ref().map(|(_, a)| *a);
    let tls_addr = tls.as_ref().map(|((_, a), _)| *a);
    if let Some((listener, addr)) = plain {
        tracing::info!(%addr, internal = %broker.addr, "gateway listening (mqtt)");
        listeners.push(tokio::spawn(accept_loop(
            listener,
            None,
            shared.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(((listener, addr), acceptor)) = tls {
        tracing::info!(%addr, internal = %broker.addr, "gateway listening (mqtts)");
        listeners.push(tokio::spawn(accept_loop(
            listener,
            Some(acceptor),
            shared.clone(),
            shutdown.clone(),
        )));
    }
    Ok(SecuredBroker {
        broker,
        internal,
        handle: GatewayHandle { registry },
        plain: plain_addr,
        tls: tls_addr,
        listeners,
    })
}

impl SecuredBroker {
    /// rumqttd's own loopback address, for the platform's trusted clients.
    pub fn internal_url(&self) -> BrokerUrl {
        self.broker.url()
    }

    /// The password rumqttd expects from a client connecting to [`Self::internal_url`] as
    /// `client_id` (its username must be `client_id` too, as `client::options` sets it).
    pub fn internal_password(&self, client_id: &str) -> String {
        self.internal.token(client_id)
    }

    pub fn handle(&self) -> GatewayHandle {
        self.handle.clone()
    }

    /// The bound plain MQTT address (the real port when 0 was asked for).
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain
    }

    /// The bound TLS address (the real port when 0 was asked for).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// Waits until the listeners and all their sessions have stopped (after `shutdown`).
    pub async fn closed(self) {
        for l in self.listeners {
            let _ = l.await;
        }
    }
}

/// Connections waiting to be accepted. A fleet reconnects all at once after a restart: with
/// the usual 1,024 the kernel falls back to SYN cookies and drops some (the kernel caps this
/// at `net.core.somaxconn`).
const ACCEPT_BACKLOG: u32 = 8192;

/// Each connection's socket send buffer (the kernel doubles it for its overhead).
///
/// Why: what the gateway writes to a socket waits there in order, and Linux lets a send buffer
/// grow to `tcp_wmem`'s maximum (4 MiB here): behind 4 MiB of chunk frames, a machine reading
/// at 70 KB/s (10,000 machines sharing one host's 700 MB/s) would get a status ack or a
/// PINGRESP a minute late. With a small buffer what waits stays in the session's queues, where
/// acks and PINGRESPs go first. Measured: this alone did not change how often 10,000
/// simulated machines reconnected (the session writer's order did, `session`); it bounds the
/// backlog. 256 KiB keeps a 100 ms link at 20 Mbit/s busy.
const SEND_BUFFER: u32 = 256 * 1024;

/// The socket counts as writable only while less than this is waiting in it unsent
/// (`TCP_NOTSENT_LOWAT`), so at most this and one frame wait there, ahead of any answer.
///
/// Why: [`SEND_BUFFER`] bounds what the kernel holds, but it is still 512 KiB (the kernel
/// doubles it), 52 s behind a 10 KB/s link: a PINGRESP written after it came later than the
/// machine's 30 s keep-alive allowed, and the machine took the connection for dead in the
/// middle of its download (scripts/slowlink.sh 10000 524288, 2026-11-29). With the unsent part
/// kept low, what waits stays in the session's queues, where answers go first.
const UNSENT_LOW: libc::c_int = 16 * 1024;

/// Whether the peer has sent bytes that wait unread on `tcp` (without reading them or waiting).
fn bytes_waiting(tcp: &TcpStream) -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let mut byte = 0u8;
        // SAFETY: recv writes at most the one byte the pointer and length give.
        let n = unsafe {
            libc::recv(
                tcp.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0
    }
    #[cfg(not(unix))]
    {
        let _ = tcp;
        false
    }
}

fn keep_unsent_low(tcp: &TcpStream) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: setsockopt reads one int through the pointer, of the size given.
        let r = unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&UNSENT_LOW as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tcp;
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BrokerError> {
    let err = |error| BrokerError::Bind { addr, error };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    // Accepted connections inherit it.
    socket.set_send_buffer_size(SEND_BUFFER).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let listener = socket.listen(ACCEPT_BACKLOG).map_err(err)?;
    let bound = listener
        .local_addr()
        .map_err(|error| BrokerError::Bind { addr, error })?;
    Ok((listener, bound))
}

/// Accepts until `shutdown`, one task per connection, owned here and awaited before returning.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut sessions = JoinSet::new();
    let mut errors = logs::AcceptErrors::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    errors.accepted(Instant::now());
                    sessions.spawn(connection(
                        shared.clone(),
                        tcp,
                        peer,
                        tls.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors, mostly: every accept fails until one is free.
                    // Wait instead of spinning (longer while it lasts), and log it once a
                    // minute, not once per failure.
                    let wait = errors.failed(&e, Instant::now());
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            },
        }
    }
    while sessions.join_next().await.is_some() {}
}

/// One accepted socket: nodelay, the TLS handshake if any, then the session.
async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let Some(opening) = shared.opening.enter_evicting(
        &logs::peer_key(peer),
        places::OPENING_PER_ADDRESS,
        std::time::Instant::now(),
    ) else {
        // Every place of its address is held by connections that began moments ago.
        if let Some(quiet_before) = shared.log_gate.admit(&logs::peer_key(peer)) {
            tracing::info!(%peer, quiet_before, "too many connections opening from this address: refused");
        }
        return;
    };
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    if let Err(e) = keep_unsent_low(&tcp) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NOTSENT_LOWAT");
    }
    let deadline = Instant::now() + shared.connect_timeout;
    // Its first bytes (a CONNECT, a TLS ClientHello) come with the connect: from then on newer
    // connections from its address do not push it out at once (`places::BEGUN_KEPT`).
    // Looked at at once first: waiting for the reactor to report it could take longer, under a
    // flood, than newer silent connections take to push this one out.
    if bytes_waiting(&tcp) {
        opening.begun();
    } else {
        let mut first = [0u8; 1];
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = opening.closed.cancelled() => {
                tracing::debug!(%peer, "nothing sent yet, and newer connections from its address need the place: closed");
                return;
            }
            r = tokio::time::timeout_at(deadline, tcp.peek(&mut first)) => match r {
                Ok(Ok(n)) if n > 0 => opening.begun(),
                _ => return,
            },
        }
    }
    #[cfg(unix)]
    let socket = Some(fanout::Socket::new(std::os::fd::AsRawFd::as_raw_fd(&tcp)));
    #[cfg(not(unix))]
    let socket = None;
    let Some(acceptor) = tls else {
        return session::serve(shared, (tcp, socket), peer, (deadline, opening), shutdown).await;
    };
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = opening.closed.cancelled() => {
            tracing::debug!(%peer, "TLS handshake not done, and newer connections from its address need the place: closed");
            return;
        }
        h = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => h,
    };
    match handshake {
        Ok(Ok(stream)) => {
            session::serve(
                shared,
                (stream, socket),
                peer,
                (deadline, opening),
                shutdown,
            )
            .await
        }
        // Anyone who can reach the port can fail a handshake: through the log gate, as every
        // other line a client can cause (one line per connection filled a public server's log
        // at the accept rate).
        Ok(Err(e)) => {
            if let Some(quiet_before) = shared.log_gate.admit(&logs::peer_key(peer)) {
                tracing::info!(%peer, error = %e, quiet_before, "gateway TLS handshake failed");
            }
        }
        Err(_) => {
            if let Some(quiet_before) = shared.log_gate.admit(&logs::peer_key(peer)) {
                tracing::info!(%peer, quiet_before, "gateway TLS handshake timed out");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An accepted socket keeps at most `UNSENT_LOW` unsent before it stops counting as
    /// writable.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn an_accepted_socket_keeps_little_unsent() {
        use std::os::fd::AsRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let read = |tcp: &TcpStream| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes through the pointer.
            let r = unsafe {
                libc::getsockopt(
                    tcp.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_NOTSENT_LOWAT,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        assert_ne!(read(&tcp), UNSENT_LOW, "not the kernel's default");
        keep_unsent_low(&tcp).unwrap();
        assert_eq!(read(&tcp), UNSENT_LOW);
    }

    #[test]
    fn internal_tokens_are_per_client_and_per_process() {
        let (a, b) = (InternalKey::random(), InternalKey::random());
        let t = a.token("vm-1");
        assert_eq!(t.len(), 32);
        assert!(a.accepts("vm-1", &t));
        assert!(!a.accepts("vm-2", &t));
        assert!(!b.accepts("vm-1", &t));
        assert!(!a.accepts("vm-1", &t[..31]));
        assert!(!a.accepts("vm-1", ""));
    }

    #[test]
    fn everyone_but_the_platform_is_rate_limited_by_default() {
        let l = InboundLimits::default();
        let machine = Principal::Machine {
            id: fleetcast_proto::MachineId::new("vm-1").unwrap(),
            groups: vec![],
        };
        assert_eq!(l.for_principal(&machine), Some(RateLimit::MACHINE));
        assert_eq!(
            l.for_principal(&Principal::Integrator { name: "erp".into() }),
            Some(RateLimit::INTEGRATOR)
        );
        assert_eq!(l.for_principal(&Principal::Platform), None);
        let op = |role| Principal::Operator {
            name: "alice".into(),
            role,
        };
        assert_eq!(l.for_principal(&op(Role::Admin)), Some(RateLimit::OPERATOR));
        assert_eq!(
            l.for_principal(&op(Role::Operator)),
            Some(RateLimit::OPERATOR)
        );
        assert_eq!(l.for_principal(&op(Role::Viewer)), Some(RateLimit::VIEWER));
    }
}
