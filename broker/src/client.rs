//! Shared rumqttc plumbing: broker addresses, client options with the limits fleetcast needs,
//! and the one task that owns an event loop.
//!
//! Facts this encodes (see docs/architecture.md): rumqttc leaves TCP_NODELAY off, which costs
//! ~40 ms per request/response round trip (Nagle + delayed ACK); its default max packet size is
//! 10 KiB; `poll()` reconnects immediately, so the driver backs off; publishes must never be
//! awaited from the task that polls.
//!
//! TLS (`mqtts://`): the rustls `ClientConfig` is built here with the aws-lc-rs provider named
//! explicitly (the provider rumqttc's rustls 0.23 is built with), so no process-wide default
//! provider has to be installed and a second provider in the build cannot make it ambiguous.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish, TlsConfiguration,
    Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest MQTT packet fleetcast clients send or accept: a 1 MiB chunk plus headers.
pub const MAX_PACKET: usize = 2 * 1024 * 1024;
/// Default broker address of the embedded broker.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";
/// Default port of `mqtts://` URLs.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// `mqtt://host:port` (port defaults to 1883) or `mqtts://host:port` (TLS, port defaults to
/// 8883). A TLS URL trusts the operating system's roots unless a CA is pinned with
/// [`BrokerUrl::with_ca`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// Some: connect with TLS, trusting this.
    pub tls: Option<TlsTrust>,
}

/// Which server certificates a TLS client accepts.
#[derive(Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// The operating system's root certificates (`rustls-native-certs`). When none can be
    /// loaded the client still starts, logs a warning, and every handshake fails with an
    /// unknown-issuer error: a clear failure, never an unverified connection.
    NativeRoots,
    /// Only certificates that chain to these CA certificates (PEM).
    Pinned(Arc<Vec<u8>>),
}

impl fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsTrust::NativeRoots => f.write_str("NativeRoots"),
            TlsTrust::Pinned(pem) => write!(f, "Pinned({} bytes of PEM)", pem.len()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad broker address {input:?}: {why} (expected mqtt://host:port or mqtts://host:port)")]
pub struct BrokerUrlError {
    pub input: String,
    pub why: &'static str,
}

impl BrokerUrl {
    /// Plain MQTT.
    pub fn mqtt(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            tls: None,
        }
    }

    /// MQTT over TLS, trusting the operating system's roots (pin a CA with [`Self::with_ca`]).
    pub fn mqtts(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            tls: Some(TlsTrust::NativeRoots),
        }
    }

    /// Switches to TLS that trusts only the CA certificates in `ca_pem`. Fails when the PEM
    /// holds no certificate.
    pub fn with_ca(mut self, ca_pem: Vec<u8>) -> Result<Self, BrokerUrlError> {
        if pem_certificates(&ca_pem).is_empty() {
            return Err(BrokerUrlError {
                input: self.to_string(),
                why: "the CA file holds no PEM certificate",
            });
        }
        self.tls = Some(TlsTrust::Pinned(Arc::new(ca_pem)));
        Ok(self)
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;
    fn from_str(input: &str) -> Result<Self, BrokerUrlError> {
        let err = |why| BrokerUrlError {
            input: input.to_owned(),
            why,
        };
        let (rest, tls) = match input.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (rest, false),
            Some(("mqtts" | "ssl", rest)) => (rest, true),
            Some(_) => return Err(err("only mqtt:// and mqtts:// are supported")),
            None => (input, false),
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { DEFAULT_TLS_PORT } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| err("port is not a number"))?),
            None => (rest, default_port),
        };
        if host.is_empty() || host.contains('/') {
            return Err(err("missing host"));
        }
        Ok(if tls {
            Self::mqtts(host, port)
        } else {
            Self::mqtt(host, port)
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.is_tls() { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// The certificates in a PEM text; unparsable sections are skipped.
pub(crate) fn pem_certificates(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_pemfile::certs(&mut &pem[..])
        .filter_map(Result::ok)
        .collect()
}

/// The one crypto provider fleetcast's TLS uses, on both ends.
pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A rustls client config that trusts `trust`.
fn tls_client_config(broker: &BrokerUrl, trust: &TlsTrust) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match trust {
        TlsTrust::NativeRoots => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "loading the system's root certificates");
            }
            roots.add_parsable_certificates(found.certs);
        }
        TlsTrust::Pinned(pem) => {
            roots.add_parsable_certificates(pem_certificates(pem));
        }
    }
    if roots.is_empty() {
        tracing::warn!(broker = %broker, trust = ?trust, "no usable CA certificate: every TLS handshake will fail");
    }
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports rustls' default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// The keep-alive every fleetcast client asks for. 30 s rather than 10: with 10,000 agents
/// in one simulator process busy with a rollout, agents whose event loop ran late took a
/// PINGRESP that was on its way as a dead connection, all reconnected at once, and the storm of
/// reconnects stalled the rollout. A dead connection still shows within 45 s (the broker
/// closes it after 1.5 x this and publishes the machine's will).
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Options for one fleetcast client: raised packet limits, keep-alive ([`KEEP_ALIVE`]),
/// credentials (`username == client_id`, as the embedded broker requires), and TLS for
/// `mqtts://` URLs (TCP_NODELAY is set below the TLS layer by [`connect`] either way).
pub fn options(broker: &BrokerUrl, client_id: &str, password: Option<&str>) -> MqttOptions {
    options_as(broker, client_id, client_id, password)
}

/// Like [`options`], for principals whose client id extends their username (operators and
/// integrators: `<username>.<session>`).
pub fn options_as(
    broker: &BrokerUrl,
    client_id: &str,
    username: &str,
    password: Option<&str>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    if let Some(trust) = &broker.tls {
        let config = tls_client_config(broker, trust);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_keep_alive(KEEP_ALIVE);
    if let Some(p) = password {
        o.set_credentials(username, p);
    }
    o
}

/// Creates the client and its event loop with TCP_NODELAY on. `capacity` bounds the request
/// queue between `AsyncClient` handles and the event loop.
pub fn connect(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    connect_with(options, capacity, None)
}

/// The receive buffer a machine's agent asks for ([`connect_machine`]).
///
/// Why: what a broker sends a machine waits in the machine's socket in the order it was sent,
/// and Linux lets a socket's receive buffer grow to `tcp_rmem`'s maximum (32 MiB here), so a
/// machine reading slower than chunk frames come (a slow disk; 10,000 simulated machines on two
/// cores) can have megabytes of frames in front of its PINGRESP and its status
/// acknowledgements. With a small buffer what waits stays in the gateway's queues, where acks
/// and PINGRESPs go first (gateway `session`). Measured: this alone did not change how often
/// 10,000 simulated machines reconnected for a late PINGRESP (the gateway's writer did); it
/// bounds the backlog, and cost the 200 MB loopback download nothing (1.08x raw). 512 KiB (the
/// kernel doubles it for its overhead) is a window of 8 chunk frames: enough for a link of 40
/// Mbit/s at 100 ms round trip.
pub const MACHINE_RECV_BUFFER: u32 = 512 * 1024;

/// [`connect`] for a machine's agent: a receive buffer of [`MACHINE_RECV_BUFFER`].
pub fn connect_machine(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    connect_with(options, capacity, Some(MACHINE_RECV_BUFFER))
}

fn connect_with(
    options: MqttOptions,
    capacity: usize,
    recv_buffer: Option<u32>,
) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    if let Some(size) = recv_buffer {
        net.set_tcp_recv_buffer_size(size);
    }
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// What the event-loop task reports to its owner.
#[derive(Debug)]
pub enum MqttEvent {
    /// (Re)connected: subscribe now (a broker restart forgets subscriptions). The flag is the
    /// CONNACK's session-present bit.
    Connected {
        session_present: bool,
    },
    Publish(Publish),
    /// The broker acknowledged our QoS 1 publish with this packet id.
    PubAck(u16),
    /// The broker confirmed a subscription: messages on it are delivered from now on.
    SubAck(u16),
    /// A QoS 1 publish of ours was handed to the socket with this packet id.
    Sent(u16),
    /// The connection dropped; the driver reconnects after a backoff.
    Disconnected(String),
}

/// Polls `eventloop` until `shutdown`, forwarding events to `events`. Reconnects with
/// exponential backoff and jitter (see [`Backoff`]). When `events` is full the driver waits,
/// which stops reading from the socket: backpressure reaches the broker instead of memory.
pub async fn drive(
    eventloop: EventLoop,
    events: mpsc::Sender<MqttEvent>,
    shutdown: CancellationToken,
) {
    drive_with(eventloop, events, shutdown, Overload::Wait).await
}

/// What the driver does with an incoming publish while `events` is (nearly) full.
#[derive(Clone)]
pub enum Overload {
    /// Wait for room (stops reading the socket, so the keep-alive answer waits too).
    Wait,
    /// Drop a QoS 0 publish the predicate calls sheddable (fleetcast's chunk frames, which a
    /// machine asks for again) once fewer than [`SHED_HEADROOM`] places are free, and keep
    /// polling; hold everything else, up to [`HELD_WHILE_BUSY`] events, and keep polling, so
    /// that the connection lives while the consumer is busy. So frames never fill the last
    /// places: a status acknowledgement or a notice behind a burst of frames is neither
    /// dropped (every QoS 0 publish was shed before, status acks included, and the machine
    /// resent the event after 10 s) nor makes the driver stop reading the socket (rumqttc then
    /// sends no PINGREQ and finds its PINGRESP unread when the next ping is due, and calls the
    /// connection dead; the broker, hearing nothing for 1.5 keep-alives, closes it).
    Shed(Arc<dyn Fn(&Publish) -> bool + Send + Sync>),
}

impl std::fmt::Debug for Overload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Wait => "Wait",
            Self::Shed(_) => "Shed",
        })
    }
}

/// Places in the consumer's queue that [`Overload::Shed`] keeps for what may not be dropped.
pub const SHED_HEADROOM: usize = 8;

/// Events that may not be dropped that [`Overload::Shed`] holds while the consumer's queue is
/// full, reading the socket on; beyond them it waits for room. Why: an agent busy for longer
/// than a keep-alive (its disk slow; 10,000 simulated agents on one disk: 2,361 connections
/// lost to a late PINGRESP in one rollout, 2026-11-28) lost its connection, and with it the
/// frames on their way. What a machine is sent that may not be dropped (acks, notices,
/// commands) is small and rate-limited by the broker, so this bounds little memory.
pub const HELD_WHILE_BUSY: usize = 64;

/// [`drive`] with a choice of what to do when `events` is full.
pub async fn drive_with(
    mut eventloop: EventLoop,
    events: mpsc::Sender<MqttEvent>,
    shutdown: CancellationToken,
    overload: Overload,
) {
    let mut backoff = Backoff::default();
    // When the current connection was accepted: the backoff starts over only after a
    // connection that lasted (one closed right after its CONNACK, e.g. by a gateway refusing a
    // subscription, reconnected 12 times a second).
    let mut connected_at: Option<tokio::time::Instant> = None;
    // Whether refused credentials were logged since the last accepted connection.
    let mut warned = false;
    // Events the consumer had no room for, oldest first; handed over before any later one.
    // `Wait` holds one: the socket is not read while it waits.
    let hold = match overload {
        Overload::Wait => 1,
        Overload::Shed(_) => HELD_WHILE_BUSY,
    };
    let mut held: std::collections::VecDeque<MqttEvent> = std::collections::VecDeque::new();
    loop {
        let polled = {
            // Never dropped before it completes (but at shutdown): a poll cancelled midway
            // could lose a request it had taken from the client's queue. While `held` is full
            // it is not polled, which stops reading the socket.
            let mut poll = std::pin::pin!(eventloop.poll());
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    permit = events.reserve(), if !held.is_empty() => match permit {
                        Ok(permit) => permit.send(held.pop_front().expect("held is not empty")),
                        Err(_) => return,
                    },
                    polled = &mut poll, if held.len() < hold => break polled,
                }
            }
        };
        let event = match polled {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                connected_at = Some(tokio::time::Instant::now());
                warned = false;
                MqttEvent::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => MqttEvent::Publish(p),
            Ok(Event::Incoming(Incoming::PubAck(a))) => MqttEvent::PubAck(a.pkid),
            Ok(Event::Incoming(Incoming::SubAck(a))) => MqttEvent::SubAck(a.pkid),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => MqttEvent::Sent(pkid),
            Ok(_) => continue,
            Err(e) => {
                let refusal = Refusal::of(&e);
                if refusal == Refusal::Credentials && !warned {
                    // Said once per run of refusals: the agent's own log is where someone at
                    // the machine looks, and retrying quietly for ever hid a revoked machine.
                    tracing::warn!(
                        "the broker refused this client's credentials ({e}): not provisioned, \
                         revoked, or a wrong secret (a long-running client such as the agent \
                         tries again at most once a minute)"
                    );
                    warned = true;
                }
                // After what came before it.
                held.push_back(MqttEvent::Disconnected(e.to_string()));
                for event in held.drain(..) {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        sent = events.send(event) => if sent.is_err() { return },
                    }
                }
                if connected_at
                    .take()
                    .is_some_and(|at| at.elapsed() >= Backoff::STABLE)
                {
                    backoff = Backoff::default();
                }
                let wait = backoff.next(refusal != Refusal::None, rand::random::<f64>());
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        if let (Overload::Shed(sheddable), MqttEvent::Publish(p)) = (&overload, &event) {
            if p.qos == rumqttc::QoS::AtMostOnce
                && (!held.is_empty() || events.capacity() < SHED_HEADROOM)
                && sheddable(p)
            {
                tracing::debug!(topic = %p.topic, "QoS 0 publish dropped: consumer busy");
                continue;
            }
        }
        if !held.is_empty() {
            held.push_back(event);
            continue;
        }
        match events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => held.push_back(event),
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// Reads `events` until one matches `want`. Fails on a disconnect (a broker refusing the
/// client shows up as one), when the event loop ends, or after `timeout`.
pub async fn wait_for(
    events: &mut mpsc::Receiver<MqttEvent>,
    timeout: Duration,
    want: impl Fn(&MqttEvent) -> bool,
) -> Result<(), String> {
    let wait = async {
        loop {
            match events.recv().await {
                Some(e) if want(&e) => return Ok(()),
                Some(MqttEvent::Disconnected(e)) => return Err(e),
                Some(_) => {}
                None => return Err("event loop ended".to_owned()),
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| Err(format!("nothing within {} s", timeout.as_secs())))
}

/// A loopback port that was free a moment ago. rumqttd cannot report the port it bound, so
/// tests pick one first and retry on the rare clash.
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Why a broker refused a connection, as far as the backoff cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not refused by the broker (a network error, a closed connection).
    None,
    /// CONNACK 3, server unavailable: busy, or connecting too often.
    Busy,
    /// CONNACK 4 or 5: these credentials (or this client id, or will) are not accepted. Only
    /// an operator changes that, so trying every few seconds only costs the broker (10,000
    /// revoked machines trying every 5 s: 2,000 refused CONNECTs a second).
    Credentials,
}

impl Refusal {
    pub fn of(e: &rumqttc::ConnectionError) -> Self {
        use rumqttc::ConnectReturnCode as Code;
        match e {
            rumqttc::ConnectionError::ConnectionRefused(Code::ServiceUnavailable) => Self::Busy,
            rumqttc::ConnectionError::ConnectionRefused(
                Code::BadUserNamePassword | Code::NotAuthorized,
            ) => Self::Credentials,
            _ => Self::None,
        }
    }
}

/// How long to wait before reconnecting: doubling from 100 ms to 5 s, or to 60 s while the
/// broker answers "server unavailable" (CONNACK 3: the embedded broker's gateway says so when
/// it cannot open a session in time, i.e. when it is swamped) or refuses the credentials
/// (CONNACK 4 or 5, [`Refusal::Credentials`]), each wait drawn at random from
/// its upper half. Without the jitter a fleet that lost its broker at once comes back at once,
/// wave after wave; without the longer ceiling a swamped broker spends itself on refusals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            current: Self::FIRST,
        }
    }
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);
    pub const MAX_BUSY: Duration = Duration::from_secs(60);
    /// A connection that lasted this long starts the backoff over when it drops.
    pub const STABLE: Duration = Duration::from_secs(10);

    /// The wait before the next attempt (`unit`: a random number in [0, 1)), and the ceiling
    /// doubled for the one after.
    pub fn next(&mut self, busy: bool, unit: f64) -> Duration {
        let ceiling = if busy { Self::MAX_BUSY } else { Self::MAX };
        let upper = self.current.min(ceiling);
        self.current = (upper * 2).min(ceiling);
        upper.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn refused_credentials_back_off_like_a_busy_broker_and_network_errors_do_not() {
        use super::Refusal;
        use rumqttc::{ConnectReturnCode as Code, ConnectionError as E};
        assert_eq!(
            Refusal::of(&E::ConnectionRefused(Code::ServiceUnavailable)),
            Refusal::Busy
        );
        for code in [Code::BadUserNamePassword, Code::NotAuthorized] {
            assert_eq!(
                Refusal::of(&E::ConnectionRefused(code)),
                Refusal::Credentials
            );
        }
        assert_eq!(
            Refusal::of(&E::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset
            ))),
            Refusal::None
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_to_5_s_or_to_60_s_while_the_broker_is_busy() {
        use super::Backoff;
        use std::time::Duration;
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..8).map(|_| b.next(false, 1.0)).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(waits[1], Duration::from_millis(200));
        assert_eq!(waits[7], Duration::from_secs(5), "capped");
        let mut b = Backoff::default();
        assert_eq!(
            b.next(false, 0.0),
            Duration::from_millis(50),
            "lower half of the range"
        );
        let mut busy = Backoff::default();
        let last = (0..12).map(|_| busy.next(true, 1.0)).last().unwrap();
        assert_eq!(last, Duration::from_secs(60));
        // A busy answer after ordinary failures keeps growing past 5 s; an ordinary one after
        // busy ones comes back under 5 s.
        assert_eq!(busy.next(false, 1.0), Duration::from_secs(5));
    }

    use super::*;

    #[test]
    fn broker_urls_parse_with_and_without_scheme_and_port() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1884));
        assert!(!u.is_tls());
        let u: BrokerUrl = "broker.local".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("broker.local", 1883));
        assert_eq!(u.to_string(), "mqtt://broker.local:1883");
        let u: BrokerUrl = "mqtts://broker.local".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("broker.local", 8883));
        assert_eq!(u.tls, Some(TlsTrust::NativeRoots));
        assert_eq!(u.to_string(), "mqtts://broker.local:8883");
        for bad in [
            "http://x:1",
            "mqtt://:1883",
            "mqtt://x:port",
            "mqtt://x:99999",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pinned_ca_must_hold_a_certificate() {
        let url = BrokerUrl::mqtt("127.0.0.1", 1883);
        let err = url.clone().with_ca(b"not a pem".to_vec()).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let ca = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
        let pinned = url.with_ca(ca.cert.pem().into_bytes()).unwrap();
        assert!(matches!(pinned.tls, Some(TlsTrust::Pinned(_))));
        assert_eq!(pinned.to_string(), "mqtts://127.0.0.1:1883");
    }

    #[test]
    fn an_mqtts_url_makes_options_with_a_tls_transport() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
        let url = BrokerUrl::mqtt("127.0.0.1", 8883)
            .with_ca(ca.cert.pem().into_bytes())
            .unwrap();
        let o = options(&url, "vm-1", Some("pw"));
        assert!(matches!(o.transport(), Transport::Tls(_)));
        let o = options(&BrokerUrl::mqtt("127.0.0.1", 1883), "vm-1", None);
        assert!(matches!(o.transport(), Transport::Tcp));
    }
}
