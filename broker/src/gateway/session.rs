//! One client connection through the gateway: CONNECT checked and answered here, then an
//! in-process link to rumqttd's router (no second socket) with two pumps in one task: client ->
//! router framed, checked and parsed packet by packet; router -> client encoded in batches,
//! with the chunk frames the gateway delivers itself ([`fanout`]) in between.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fleetcast_proto::acl::Principal;
use fleetcast_proto::text::shown;
use fleetcast_proto::Route;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, LastWill};
use rumqttc::mqttbytes::PacketType;
use rumqttd::local::LinkRx;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fanout;
use super::feeder::ToRouter;
use super::frames::{self, FrameError};
use super::limit::Cost;
use super::logs::peer_key;
use super::places::{Place, SESSIONS_PER_USER};
use super::registry::{ClientClaim, SharedLimiter};
use super::relay;
use super::Shared;
use crate::client::MAX_PACKET;

/// Room made for each read from a client; a bigger packet grows the buffer as it arrives.
const CLIENT_READ: usize = 4 * 1024;
/// A read or write buffer above this is given back once everything in it was handed on, so
/// what an idle session holds stays small: a packet cut by a read doubles the read buffer when
/// its start is not yet free to reuse, and a batch of deliveries grows the write buffer. At
/// 64 KiB, 10,000 sessions could keep 1.3 GB of buffers between messages; at 16 KiB, a quarter.
const KEEP: usize = 16 * 1024;
/// The gateway's own answers, the messages it serves itself (notices, commands, the key
/// chain: see `relay`) and a machine's status acks and chunk error frames, queued for a
/// client. A client that pings or subscribes faster than it reads waits for room; one that
/// leaves served messages unread this long is closed (acks and error frames that do not fit
/// are dropped: the machine sends the event, or the request, again).
const CONTROL_QUEUE: usize = 64;
/// Bytes of encoded router output gathered before they are written to the client.
const WRITE_BATCH: usize = 64 * 1024;

/// How a session ended (for the log, and whether the client's will is published).
#[derive(Debug, thiserror::Error)]
enum End {
    /// The client closed the connection, or the gateway shut down / kicked the session.
    #[error("closed: {0}")]
    Closed(&'static str),
    /// A newer connection with the same client id took the session over: no will.
    #[error("taken over by a newer connection with the same client id")]
    TakenOver,
    /// The client said DISCONNECT: no will.
    #[error("client disconnected")]
    Disconnected,
    /// The router ended the session. The gateway keeps clients from giving it a reason (it
    /// handles take-overs itself and closes a client that acknowledges what it was not sent),
    /// so this is the broker stopping. Nothing more goes to the router on this link.
    #[error("ended by the broker")]
    Dropped,
    #[error("no packet within 1.5 x the keep-alive of {0} s")]
    KeepAlive(u16),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(FrameError),
    /// The principal published or subscribed where it may not.
    #[error("{what} on {topic:?} not allowed")]
    Violation { what: &'static str, topic: String },
}

/// Serves one accepted client stream (TLS already done) until either side closes, a rule is
/// broken, the session is kicked, or `shutdown`. `deadline` bounds the wait for CONNECT, and
/// `opening` holds the connection's place among its address's opening ones until then.
pub(super) async fn serve<S>(
    shared: Arc<Shared>,
    (client, socket): (S, Option<fanout::Socket>),
    peer: SocketAddr,
    (deadline, opening): (Instant, Place),
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let connect = tokio::select! {
        _ = shutdown.cancelled() => return,
        // Newer connections from its address needed the place (it had sent nothing yet, or
        // began more than `places::BEGUN_KEPT` ago).
        _ = opening.closed.cancelled() => {
            tracing::debug!(%peer, "no CONNECT yet, and newer connections from its address need the place: closed");
            return;
        }
        c = tokio::time::timeout_at(deadline, read_connect(&mut client_rd, &mut buf)) => c,
    };
    drop(opening);
    let connect = match connect {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time: closed");
            return;
        }
        // MQTT 3.1.1 §3.1.2.2: another protocol level is answered with CONNACK 1 (MQTT 3.1 and
        // MQTT 5 clients report that, not a network error).
        Ok(Err(End::Frame(FrameError::Protocol { name, level }))) => {
            shared.registry.refused();
            if let Some(quiet_before) = should_log(&shared, &peer_key(peer)) {
                tracing::info!(%peer, protocol = %shown(&name), level, quiet_before,
                    "gateway refused a CONNECT of another protocol version than MQTT 3.1.1 (CONNACK 1)");
            }
            return refuse(&mut client_wr, ConnectReturnCode::RefusedProtocolVersion).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "bad first packet: closed");
            return;
        }
        Ok(Ok(c)) => c,
    };
    let client_id = connect.client_id.clone();
    let kicks_before = shared.registry.kicks();
    let principal = match admit(&shared, &connect, peer).await {
        Ok(p) => p,
        Err(code) => {
            shared.registry.refused();
            return refuse(&mut client_wr, code).await;
        }
    };
    // The principal's buckets, shared with its other and later connections; a CONNECT over
    // its connect rate is refused.
    let limiter = match shared.limits.for_principal(&principal) {
        None => None,
        Some(limit) => match shared.registry.limiter(&principal.username(), limit) {
            Some(l) => Some(l),
            None => {
                shared.registry.refused();
                if let Some(quiet_before) = should_log(&shared, &principal.username()) {
                    tracing::info!(%peer, client = %shown(&client_id), quiet_before, "connecting too often: refused (server unavailable)");
                }
                return refuse(&mut client_wr, ConnectReturnCode::ServiceUnavailable).await;
            }
        },
    };
    // An operator's or integrator's sessions are bounded (a machine has one: its client id is
    // its name); the place is held until the session ends.
    let _session_place = match &principal {
        Principal::Operator { .. } | Principal::Integrator { .. } => {
            let user = principal.username();
            match shared.sessions.enter(&user, SESSIONS_PER_USER) {
                Some(place) => Some(place),
                None => {
                    shared.registry.refused();
                    if let Some(quiet_before) = should_log(&shared, &user) {
                        tracing::info!(%peer, client = %shown(&client_id), quiet_before, limit = SESSIONS_PER_USER,
                            "too many sessions of this operator or integrator: refused (server unavailable)");
                    }
                    return refuse(&mut client_wr, ConnectReturnCode::ServiceUnavailable).await;
                }
            }
        }
        Principal::Machine { .. } | Principal::Platform => None,
    };
    // A connection with a client id that is live takes it over: the old session ends first.
    let Some(claim) = shared
        .registry
        .claim(
            &client_id,
            !matches!(principal, Principal::Machine { .. }),
            shared.connect_timeout,
        )
        .await
    else {
        if let Some(quiet_before) = should_log(&shared, &peer_key(peer)) {
            tracing::info!(%peer, client = %shown(&client_id), quiet_before, "client id still held or taken again: closed");
        }
        return refuse(&mut client_wr, ConnectReturnCode::ServiceUnavailable).await;
    };
    let Some((mut to_router, link_rx, claim)) = open_link(&shared, &client_id, claim).await else {
        return refuse(&mut client_wr, ConnectReturnCode::ServiceUnavailable).await;
    };
    // Every session through the gateway is clean: it ends with the connection.
    if let Err(e) = async {
        client_wr.write_all(&frames::accepted()).await?;
        client_wr.flush().await
    }
    .await
    {
        tracing::debug!(%peer, client = %shown(&client_id), error = %e, "client gone before CONNACK");
        to_router.close_after(vec![disconnect()]).await;
        return;
    }
    let username = principal.username();
    let stop = shutdown.child_token();
    let registered = shared.registry.register(&username, stop.clone());
    if shared.registry.kicks() != kicks_before
        && !still_admitted(&shared, &connect, &principal).await
    {
        tracing::info!(%peer, client = %shown(&client_id), "credentials revoked while the session opened: closed");
        to_router.close_after(vec![disconnect()]).await;
        return;
    }
    tracing::debug!(%peer, client = %shown(&client_id), "gateway session open");
    let (inject, injected) = mpsc::channel(fanout::SESSION_QUEUE);
    let queued = Arc::new(fanout::QueuedKeys::new(socket));
    // Dropped before `client_rd` and `client_wr` (declared after them), so before the socket
    // closes: nothing asks its descriptor afterwards.
    let _socket_closing = ForgetSocket(&queued);
    // The gateway's own answers (PINGRESP, local SUBACK), what the relay serves (notices,
    // commands, the key chain) and a machine's acks: never queued behind chunk frames.
    let (control, controls) = mpsc::channel(CONTROL_QUEUE);
    let unacked = Unacked::default();
    let unsubacks = Unsubacks::default();
    let session = Session {
        shared: &shared,
        principal: &principal,
        client_id: &client_id,
        id: registered.id(),
        inject: fanout::Queue::Bulk(inject, queued.clone()),
        control,
        stop: stop.clone(),
        unacked: &unacked,
        unsubacks: &unsubacks,
        broker_filters: Default::default(),
        refused_now: Default::default(),
        limiter,
    };
    let (mut ended_by, _watcher) = watch_for_end(&stop, &claim);
    let mut counted = Counted {
        inner: &mut client_wr,
        keys: &queued,
    };
    let end = tokio::select! {
        e = &mut ended_by => e.unwrap_or(End::Closed("session ending")),
        e = session.client_to_router(&mut client_rd, &mut to_router, buf, keep_alive(connect.keep_alive, shared.max_keep_alive)) => e,
        e = router_to_client(link_rx, &mut counted, (injected, &queued), controls, (&unacked, &unsubacks)) => e,
    };
    match &end {
        End::Disconnected | End::Dropped => to_router.close_after(vec![]).await,
        // A newer connection of the same client is live: no will, only the end.
        End::TakenOver => to_router.close_after(vec![disconnect()]).await,
        _ => {
            // Like a broker that saw the connection drop: the will (e.g. a machine's
            // `online = false`), then the end of the router's session.
            let mut last = Vec::with_capacity(2);
            // A machine's will on its `online` goes where its `online` went while it lived.
            let will = match connect.last_will {
                Some(will) if will_is_a_report(&shared, &principal, &will) => {
                    let qos = match will.qos {
                        rumqttc::mqttbytes::QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
                        _ => rumqttc::QoS::AtLeastOnce,
                    };
                    let report =
                        rumqttc::Publish::from_bytes(&will.topic, qos, will.message.clone());
                    (!shared.registry.report(report).await).then_some(will)
                }
                will => will,
            };
            match will.map(will_publish) {
                Some(Ok(will)) => last.push(will),
                Some(Err(e)) => {
                    tracing::warn!(client = %shown(&client_id), error = %e, "cannot publish the will")
                }
                None => {}
            }
            last.push(disconnect());
            to_router.close_after(last).await;
        }
    }
    match end {
        End::Violation { what, topic } => {
            shared.registry.violation();
            if let Some(quiet_before) = should_log(&shared, &username) {
                tracing::warn!(%peer, client = %shown(&client_id), user = %shown(&username), what, topic = %shown(&topic),
                    quiet_before, "gateway closed a session: not allowed for this principal");
            }
        }
        // A packet over the size limit or one that does not parse: no honest client sends
        // either, so it counts and shows as a violation (it used to end the session silently).
        End::Frame(e) => {
            shared.registry.violation();
            if let Some(quiet_before) = should_log(&shared, &username) {
                tracing::warn!(%peer, client = %shown(&client_id), user = %shown(&username), error = %e,
                    quiet_before, "gateway closed a session: malformed or oversized packet");
            }
        }
        other => {
            tracing::debug!(%peer, client = %shown(&client_id), end = %other, "gateway session ended")
        }
    }
}

/// Reads until the first whole packet, which must be a CONNECT.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Connect, End> {
    loop {
        if let Some(c) = frames::take_connect(buf).map_err(End::Frame)? {
            return Ok(c);
        }
        buf.reserve(8 * 1024);
        if rd.read_buf(buf).await? == 0 {
            return Err(End::Closed("before CONNECT"));
        }
    }
}

/// Decides on a CONNECT: the principal, or the CONNACK code that refuses it.
async fn admit(
    shared: &Shared,
    connect: &Connect,
    peer: SocketAddr,
) -> Result<Principal, ConnectReturnCode> {
    let client_id = &connect.client_id;
    // `frames::take_connect` has refused every protocol but MQTT 3.1.1.
    debug_assert_eq!(connect.protocol, rumqttc::mqttbytes::Protocol::V4);
    let Some(login) = connect.login.clone() else {
        if let Some(quiet_before) = should_log(shared, &peer_key(peer)) {
            tracing::info!(%peer, client = %shown(client_id), quiet_before, "gateway refused a CONNECT without credentials");
        }
        return Err(ConnectReturnCode::NotAuthorized);
    };
    let username = login.username.clone();
    let Some(principal) = authenticate(shared, login).await else {
        if let Some(quiet_before) = should_log(shared, &peer_key(peer)) {
            tracing::info!(%peer, client = %shown(client_id), user = %shown(&username), quiet_before, "gateway refused bad credentials");
        }
        return Err(ConnectReturnCode::BadUserNamePassword);
    };
    if !principal.accepts_client_id(client_id) {
        if let Some(quiet_before) = should_log(shared, &username) {
            tracing::warn!(%peer, client = %shown(client_id), user = %shown(&username),
                quiet_before, "gateway refused a client id this principal may not use");
        }
        return Err(ConnectReturnCode::NotAuthorized);
    }
    if let Some(will) = &connect.last_will {
        if !principal.may_publish(&shared.topics, client_id, &will.topic) {
            shared.registry.violation();
            if let Some(quiet_before) = should_log(shared, &username) {
                tracing::warn!(%peer, client = %shown(client_id), user = %shown(&username), topic = %shown(&will.topic),
                    quiet_before, "gateway refused a will on a topic this principal may not publish");
            }
            return Err(ConnectReturnCode::NotAuthorized);
        }
        // Only a machine's `online` has a use for a will, and it goes to the platform in
        // process. Any other (a machine's state, status or chunk request; an operator's
        // request) went into rumqttd with the client's retain flag, past the per-machine
        // report limits, and could stay retained there for every later subscriber.
        if !will_is_a_report(shared, &principal, will) {
            shared.registry.violation();
            if let Some(quiet_before) = should_log(shared, &username) {
                tracing::warn!(%peer, client = %shown(client_id), user = %shown(&username), topic = %shown(&will.topic),
                    quiet_before, "gateway refused a will on a topic other than the machine's online");
            }
            return Err(ConnectReturnCode::NotAuthorized);
        }
    }
    Ok(principal)
}

/// Whether a line about `key` (a user name, a peer address's [`peer_key`]) is logged now:
/// `Some(n)`, n being how many were left out before it; `None`: leave it out. One client
/// cannot fill the log, nor can many together (`super::logs`).
fn should_log(shared: &Shared, key: &str) -> Option<u64> {
    shared.log_gate.admit(key)
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a session is ended from outside, `stop` (kicked, or the gateway shutting down) or a
/// newer connection taking its client id, as a oneshot; the watching task ends with the guard.
///
/// Why a task: a session's `select!` polls every branch each time any of them wakes (every
/// frame read or written), and polling a cancellation future takes two locks: the two were
/// 1.7 % of `serve`'s CPU in a 1,000-machine rollout (perf). The task is polled only when one
/// of them is cancelled, and a oneshot's poll is a few atomic operations: 0.2 % for the
/// tokens and 0.9 % for the oneshot after (perf, same rollout; each within sampling noise of
/// about 0.3 %), for a small task per session.
fn watch_for_end(
    stop: &CancellationToken,
    claim: &ClientClaim,
) -> (tokio::sync::oneshot::Receiver<End>, AbortOnDrop) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stop, taken_over) = (stop.clone().cancelled_owned(), claim.taken_over());
    let task = tokio::spawn(async move {
        let end = tokio::select! {
            _ = stop => End::Closed("kicked or shut down"),
            _ = taken_over => End::TakenOver,
        };
        let _ = tx.send(end);
    });
    (rx, AbortOnDrop(task))
}

/// Answers with a refusing CONNACK and closes.
async fn refuse<W: AsyncWrite + Unpin>(client: &mut W, code: ConnectReturnCode) {
    let _ = client.write_all(&frames::refusal(code)).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

/// Opens the client's session on the router, waiting at most the connect timeout. The router
/// answers at its next pass, which a fleet connecting all at once can delay; a client refused
/// here (CONNACK 3) retries with its backoff instead of piling up waiting connections. A link
/// that opens after the wait was given up is ended at once, and the client id stays claimed
/// until then (so a newer connection's session cannot meet it at the router).
async fn open_link(
    shared: &Shared,
    client_id: &str,
    claim: ClientClaim,
) -> Option<(ToRouter, LinkRx, ClientClaim)> {
    // Under the claim's name for the router, which for operators and integrators is not their
    // client id (`registry::RouterName`).
    let (links, id) = (shared.links.clone(), claim.router_name().to_owned());
    let mut opening = tokio::task::spawn_blocking(move || links.open(&id));
    match tokio::time::timeout(shared.connect_timeout, &mut opening).await {
        Ok(Ok(Ok((tx, rx)))) => Some((shared.feeder.attach(tx).await, rx, claim)),
        Ok(Ok(Err(e))) => {
            tracing::warn!(client = %shown(client_id), error = %e, "the broker refused a session");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(client = %shown(client_id), error = %e, "opening a broker session failed");
            None
        }
        Err(_) => {
            tracing::warn!(client = %shown(client_id), "the broker did not open a session in time");
            let feeder = shared.feeder.clone();
            tokio::spawn(async move {
                if let Ok(Ok((tx, _rx))) = opening.await {
                    feeder
                        .attach(tx)
                        .await
                        .close_after(vec![disconnect()])
                        .await;
                }
                drop(claim);
            });
            None
        }
    }
}

/// Whether `will` is a machine's own report (its `online`), which the platform may take in
/// process ([`super::GatewayHandle::take_reports`]). `admit` has already held the will's topic
/// to what the principal may publish.
fn will_is_a_report(shared: &Shared, principal: &Principal, will: &LastWill) -> bool {
    matches!(
        (shared.topics.parse(&will.topic), principal),
        (Some(fleetcast_proto::Route::Online(m)), Principal::Machine { id, .. }) if m == *id
    )
}

/// The will as the PUBLISH the broker would make of it, with its QoS (rumqttd's `Publish`
/// builds only QoS 0, so the packet is encoded and parsed back; a QoS 1/2 publish needs an id).
fn will_publish(will: LastWill) -> Result<Packet, FrameError> {
    // At most QoS 1, as every publish through the gateway: a QoS 2 flow would start with a
    // session that is ending.
    let qos = match will.qos {
        rumqttc::mqttbytes::QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        q => q,
    };
    let mut publish = rumqttc::mqttbytes::v4::Publish::from_bytes(will.topic, qos, will.message);
    publish.retain = will.retain;
    if qos != rumqttc::mqttbytes::QoS::AtMostOnce {
        publish.pkid = 1;
    }
    let mut wire = BytesMut::new();
    publish
        .write(&mut wire)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    V4.read_mut(&mut wire, MAX_PACKET)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// The keep-alive a session is held to: the client's, or `max` when it asks for none (0, which
/// MQTT 3.1.1 §3.1.2.10 allows) or for more; never 0 (a session closed at its first read).
fn keep_alive(asked: u16, max: u16) -> u16 {
    let max = max.max(1);
    if asked == 0 {
        max
    } else {
        asked.min(max)
    }
}

fn disconnect() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

struct Session<'a> {
    shared: &'a Shared,
    principal: &'a Principal,
    client_id: &'a str,
    /// The registry's id of this session (fan-out subscriptions are keyed by it).
    id: u64,
    /// Where fanned-out chunk frames for this session are queued.
    inject: fanout::Queue,
    /// Where the gateway's own answers to this client are queued (written first), what it
    /// serves itself (`relay`), and the machine's acks and error frames ([`Self::queue_for`]).
    control: mpsc::Sender<bytes::Bytes>,
    /// Ends the session (a served message it did not read in time).
    stop: CancellationToken,
    /// What the router sent at QoS 1 and the client has not acknowledged.
    unacked: &'a Unacked,
    /// The UNSUBACKs the router owes for the UNSUBSCRIBEs handed to it.
    unsubacks: &'a Unsubacks,
    /// The filters this session holds on rumqttd's router: those of every SUBSCRIBE handed to
    /// it, until an UNSUBSCRIBE names them. An UNSUBSCRIBE goes to the router with these only
    /// (see [`Unsubacks`]).
    broker_filters: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Filters of the SUBSCRIBE being handled that the platform's dynamic check refused: its
    /// SUBACK answers them with a failure.
    refused_now: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The principal's rate limits (none for the platform and operators).
    limiter: Option<SharedLimiter>,
}

/// Whether `connect`'s credentials still authenticate as `principal` (a kick, e.g. a machine
/// revoked, came while its session was being opened).
async fn still_admitted(shared: &Shared, connect: &Connect, principal: &Principal) -> bool {
    match connect.login.clone() {
        Some(login) => authenticate(shared, login).await.as_ref() == Some(principal),
        None => false,
    }
}

/// The principal `login` authenticates as. The platform's authenticator reads its store: kept
/// off the async workers.
async fn authenticate(shared: &Shared, login: rumqttc::mqttbytes::v4::Login) -> Option<Principal> {
    let auth = shared.auth.clone();
    tokio::task::spawn_blocking(move || {
        auth.authenticate(&login.username, login.password.as_bytes())
    })
    .await
    .ok()
    .flatten()
}

/// What a publish for the platform is, for [`Session::to_platform`].
enum Inbound {
    /// A machine's status event, state or `online`, on that machine's topic.
    Report(fleetcast_proto::MachineId),
    /// An operator's admin request or upload part, or an integrator's request for events.
    Admin,
}

/// QoS 1 flows between the client and the router that are not finished.
///
/// Deliveries to the client: their packet ids, in the order they were written. rumqttd's
/// router takes acknowledgements only in that order and drops a session that acknowledges any
/// other id (`register_ack`), and a router that drops a session itself can crash on that
/// session's next event (see `Registry::claim`), so the gateway refuses an acknowledgement of
/// anything but the oldest before the router sees it.
///
/// Publishes from the client: how many the router has not acknowledged yet. The router queues
/// a PUBACK for each, with no bound, and hands them over only as the session's writer takes
/// them; a client that sends QoS 1 and never reads had them pile up in the router for as long
/// as it stayed connected. Past [`ROUTER_ACKS_OWED`] the gateway stops reading the client.
#[derive(Default)]
struct Unacked {
    ids: std::sync::Mutex<std::collections::VecDeque<u16>>,
    owed: std::sync::atomic::AtomicUsize,
    paid: tokio::sync::Notify,
}

/// The UNSUBACKs rumqttd's router owes the session, per UNSUBSCRIBE handed to it, in order.
///
/// MQTT 3.1.1 §3.10.4 asks for exactly one UNSUBACK per UNSUBSCRIBE, whatever it names. The
/// router answers one per filter it removed: none for an UNSUBSCRIBE of filters the session
/// does not hold there (`#`, a filter the gateway serves, one already left), which left the
/// client waiting for ever, and two for one naming two of its filters. So an UNSUBSCRIBE goes
/// to the router naming only the filters the session holds there, each once
/// ([`Session::broker_filters`]), and only if it names any: the router then answers one
/// UNSUBACK per filter, and the session's writer passes on the last of them and drops the
/// others. One that names none is answered by the gateway, like a SUBSCRIBE of filters the
/// gateway serves ([`Session::local_answer`]), on the queue of its other answers (so, like its
/// SUBACKs and PINGRESPs, ahead of what the router has not handed over yet; MQTT 3.1.1 orders
/// only publishes and their acknowledgements, §4.6).
#[derive(Default)]
struct Unsubacks {
    owed: std::sync::Mutex<std::collections::VecDeque<usize>>,
}

impl Unsubacks {
    /// An UNSUBSCRIBE naming `filters` filters the session holds goes to the router.
    fn expect(&self, filters: usize) {
        if filters > 0 {
            self.owed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(filters);
        }
    }

    /// The router sent an UNSUBACK: whether it goes on to the client (the last one the router
    /// sends for its UNSUBSCRIBE).
    fn pass(&self) -> bool {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        match owed.front_mut() {
            Some(1) => {
                owed.pop_front();
                true
            }
            Some(n) => {
                *n -= 1;
                false
            }
            // Not one the gateway counted on: passed on rather than lost.
            None => true,
        }
    }
}

/// PUBACKs the router may owe one client before the gateway stops reading it.
const ROUTER_ACKS_OWED: usize = 64;

/// How long the gateway waits for the router's PUBACKs before it reads one more packet anyway
/// (the router acknowledges every QoS 1 publish; if one were ever lost, the session would
/// slow to one packet per wait instead of stopping).
const ROUTER_ACKS_WAIT: Duration = Duration::from_secs(5);

impl Unacked {
    fn ids(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<u16>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the acknowledgement of `pkid` if it is the oldest delivery not yet acknowledged.
    fn acknowledge(&self, pkid: u16) -> bool {
        let mut ids = self.ids();
        if ids.front() == Some(&pkid) {
            ids.pop_front();
            true
        } else {
            false
        }
    }

    /// A QoS 1 publish went to the router: it owes a PUBACK. Whether it owes too many.
    fn owe(&self) -> bool {
        self.owed.fetch_add(1, Ordering::Relaxed) + 1 >= ROUTER_ACKS_OWED
    }

    /// The router handed over a PUBACK.
    fn paid(&self) {
        let _ = self
            .owed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        self.paid.notify_waiters();
    }

    /// Until the router owes fewer than [`ROUTER_ACKS_OWED`], or [`ROUTER_ACKS_WAIT`].
    async fn room(&self) {
        let _ = tokio::time::timeout(ROUTER_ACKS_WAIT, async {
            loop {
                let paid = self.paid.notified();
                tokio::pin!(paid);
                paid.as_mut().enable();
                if self.owed.load(Ordering::Relaxed) < ROUTER_ACKS_OWED {
                    return;
                }
                paid.await;
            }
        })
        .await;
    }
}

impl Session<'_> {
    /// Client -> router: frames the stream, checks each packet, parses every allowed one and
    /// hands them to the router (one wake-up per read), stops at the first violation. A rate
    /// limit delays forwarding, and so reading. No packet for 1.5 x the keep-alive ends it.
    async fn client_to_router<R>(
        &self,
        rd: &mut R,
        link: &mut ToRouter,
        mut buf: BytesMut,
        keep_alive: u16,
    ) -> End
    where
        R: AsyncRead + Unpin,
    {
        let idle = Duration::from_millis(u64::from(keep_alive) * 1500);
        let mut packets = Vec::new();
        loop {
            while let Some(frame) = match frames::next_frame(&buf) {
                Ok(f) => f,
                Err(e) => return End::Frame(e),
            } {
                if let Err(violation) = self.check(frame.kind, &buf[..frame.len]).await {
                    // Hand on what was allowed before it, then close.
                    link.send(packets).await;
                    return violation;
                }
                let qos_pkid = (frame.kind == PacketType::Publish)
                    .then(|| frames::publish_qos_pkid(&buf[..frame.len]).ok())
                    .flatten();
                // A packet of its own: the router keeps publishes in its logs, and a slice would
                // keep this whole read buffer alive with them.
                let mut one = BytesMut::from(&buf[..frame.len]);
                buf.advance(frame.len);
                let packet = match V4.read_mut(&mut one, MAX_PACKET) {
                    Ok(p) => p,
                    Err(e) => return End::Frame(FrameError::Malformed(e.to_string())),
                };
                let mut packet = packet;
                if let Packet::Subscribe(subscribe, _) = &mut packet {
                    // Granted at most QoS 1 (SUBACK says so), so the router never starts a
                    // QoS 2 flow with the client.
                    for f in &mut subscribe.filters {
                        if f.qos == rumqttd::protocol::QoS::ExactlyOnce {
                            f.qos = rumqttd::protocol::QoS::AtLeastOnce;
                        }
                    }
                }
                if let Packet::Unsubscribe(unsubscribe, _) = &mut packet {
                    // Only what the router holds for the session, each once: the router
                    // answers one UNSUBACK per filter it removes (`Unsubacks`). None left:
                    // the gateway answers it (`local_answer`).
                    unsubscribe.filters = self.held_by_broker(&unsubscribe.filters);
                }
                // Where a publish goes, parsed once: it decides its cost and whether the
                // platform takes it in process.
                let route = match &packet {
                    Packet::Publish(p, _) => std::str::from_utf8(&p.topic)
                        .ok()
                        .and_then(|t| self.shared.topics.parse(t)),
                    _ => None,
                };
                let cost = match (&packet, &route) {
                    // A batch of status events costs one report per event: a stolen credential
                    // sending batches stays held to the rate of single events.
                    (Packet::Publish(p, _), Some(Route::Status(_))) => {
                        Cost::Reports(fleetcast_proto::status::status_count(&p.payload) as u64)
                    }
                    (_, Some(Route::Status(_) | Route::State(_) | Route::Online(_))) => {
                        Cost::Reports(1)
                    }
                    // A SUBSCRIBE of served filters queues what is kept for them (notices, the
                    // key chain) again, as MQTT asks: each kept message queued costs a report.
                    // Why: charged as one message, each of the 2,000 SUBSCRIBEs a second the
                    // message rate lets one machine's credentials send got every notice and the
                    // key chain again (600 sent at once drew 600 copies of the key chain:
                    // `re_subscribing_again_and_again_is_held_to_the_report_rate`), an egress
                    // no budget saw (a review with one machine's config,
                    // 2026-11-29). An honest agent subscribes once per connection, to its own
                    // and its groups' notices per kind and the key chain; one with more kept
                    // messages than the burst (200) is slowed, not refused.
                    (Packet::Subscribe(subscribe, _), _) => {
                        let fanout = &self.shared.registry.fanout;
                        let mut named = std::collections::HashSet::new();
                        let kept: usize = subscribe
                            .filters
                            .iter()
                            .filter(|f| named.insert(f.path.as_str()))
                            .filter(|f| relay::is_served(&self.shared.topics, &f.path))
                            .map(|f| fanout.kept_for(&f.path))
                            .sum();
                        match kept {
                            0 => Cost::Message,
                            n => Cost::Reports(n as u64),
                        }
                    }
                    // A PINGREQ is answered by the broker as a publish is: charged the same. Why:
                    // one machine's credentials sent 0.5-0.95 million a second, each answered,
                    // and `serve` spent 80 % of a core on them (2026-11-28, red-team test). An
                    // honest client pings once per keep-alive.
                    (Packet::Publish(..) | Packet::Unsubscribe(..) | Packet::PingReq(_), _) => {
                        Cost::Message
                    }
                    _ => Cost::Bytes,
                };
                // `None`: a chunk request handed to the platform in process; it still counts
                // against the session's rate limit below.
                let packet = match route {
                    Some(Route::ChunkRequest(machine)) => {
                        match self.chunk_request(packet, machine, qos_pkid).await {
                            Ok(packet) => packet,
                            Err(end) => return end,
                        }
                    }
                    Some(
                        Route::Status(machine) | Route::State(machine) | Route::Online(machine),
                    ) => match self
                        .to_platform(packet, Inbound::Report(machine), qos_pkid)
                        .await
                    {
                        Ok(packet) => packet,
                        Err(end) => return end,
                    },
                    Some(
                        Route::AdminRequest(_)
                        | Route::AdminUpload(_)
                        | Route::IntegratorEventsGet(_),
                    ) => match self.to_platform(packet, Inbound::Admin, qos_pkid).await {
                        Ok(packet) => packet,
                        Err(end) => return end,
                    },
                    _ => Some(packet),
                };
                if let Some(answer) = packet.as_ref().and_then(|p| self.local_answer(p)) {
                    if self.control.send(answer).await.is_err() {
                        return End::Closed("session ending");
                    }
                } else if let Some(packet) = packet {
                    if let Packet::Unsubscribe(unsubscribe, _) = &packet {
                        self.unsubacks.expect(unsubscribe.filters.len());
                    }
                    let disconnect = matches!(packet, Packet::Disconnect(..));
                    let owes_ack =
                        matches!(packet, Packet::Publish(..)) && matches!(qos_pkid, Some((1, _)));
                    packets.push(packet);
                    if disconnect {
                        link.send(packets).await;
                        return End::Disconnected;
                    }
                    if owes_ack && self.unacked.owe() {
                        if !link.send(std::mem::take(&mut packets)).await {
                            return End::Dropped;
                        }
                        self.unacked.room().await;
                    }
                }
                if let Some(limiter) = &self.limiter {
                    let wait = limiter.lock().unwrap_or_else(|p| p.into_inner()).take(
                        frame.len,
                        cost,
                        Instant::now(),
                    );
                    if !wait.is_zero() {
                        if !link.send(std::mem::take(&mut packets)).await {
                            return End::Dropped;
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            if !link.send(std::mem::take(&mut packets)).await {
                return End::Dropped;
            }
            // Reuses the allocation once everything in it was handed on; a large packet (an
            // upload part) or a packet cut by reads grows it, and it is given back once empty.
            // `capacity` counts only the room after what was read, so the check comes after the
            // reserve, which moves an empty buffer back to its start once that room runs short:
            // then it sees the whole allocation.
            buf.reserve(CLIENT_READ);
            if buf.is_empty() && buf.capacity() > KEEP {
                buf = BytesMut::with_capacity(CLIENT_READ);
            }
            let read = match tokio::time::timeout(idle, rd.read_buf(&mut buf)).await {
                Ok(read) => read,
                Err(_) => return End::KeepAlive(keep_alive),
            };
            match read {
                Ok(0) => return End::Closed("client closed"),
                Ok(_) => {}
                Err(e) => return e.into(),
            }
        }
    }

    /// Which of `named` (an UNSUBSCRIBE's filters) the session holds on the router, each once;
    /// they are forgotten here, as the router forgets them on the UNSUBSCRIBE.
    fn held_by_broker(&self, named: &[String]) -> Vec<String> {
        let mut held = self
            .broker_filters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        named.iter().filter(|f| held.remove(*f)).cloned().collect()
    }

    /// Whether the gateway delivers bulk frames published on `filter` itself (an artifact's
    /// chunk topic, named exactly, a machine's acks and error frames, and the integrators' live
    /// event topic).
    fn is_fanned_out(&self, filter: &str) -> bool {
        use fleetcast_proto::Route;
        matches!(
            self.shared.topics.parse(filter),
            Some(
                Route::ArtifactChunks(_)
                    | Route::Events
                    | Route::StatusAck(_)
                    | Route::MachineChunks(_)
            )
        )
    }

    /// The queue a fanned-out subscription delivers into. A machine's status acks and chunk
    /// error frames are small, rare, and costly to lose (a lost ack holds the machine's outbox
    /// for 10 s until it sends the event again; a lost error frame, its request timeout), so
    /// they go with the gateway's own answers, written first; chunk frames and integrators'
    /// events go to the bulk queue, whose frames a slow reader loses while it is full (a machine
    /// asks for missing chunks again). Each queue keeps its own order.
    fn queue_for(&self, filter: &str) -> fanout::Queue {
        use fleetcast_proto::Route;
        match self.shared.topics.parse(filter) {
            Some(Route::StatusAck(_) | Route::MachineChunks(_)) => {
                fanout::Queue::Control(self.control.clone())
            }
            _ => self.inject.clone(),
        }
    }

    /// Whether a subscription to `filter` lives in the gateway only, never on rumqttd: a
    /// machine's own status acknowledgements and error frames and an artifact's chunk topic
    /// (only the platform sends on them, through the gateway), and what the relay serves
    /// (release notices, commands, the key chain, operators' replies). Each machine's own
    /// would be a filter of its own per machine, which rumqttd matches against every topic it
    /// has seen (and every later topic against it), so a fleet's onboarding would cost rumqttd
    /// the square of its size; and rumqttd answers every SUBSCRIBE by matching the filter
    /// against every retained message (each machine's `online` and `state`), so a rollout's
    /// 10,000 subscriptions to its artifact's topic cost it 200 million matches, with the
    /// platform's own sessions waiting behind them until their keep-alive ran out.
    fn is_gateway_only(&self, filter: &str) -> bool {
        use fleetcast_proto::Route;
        relay::is_served(&self.shared.topics, filter)
            || matches!(
                self.shared.topics.parse(filter),
                Some(Route::StatusAck(_) | Route::MachineChunks(_) | Route::ArtifactChunks(_))
            )
    }

    /// The gateway's own answer to a PINGREQ (the keep-alive is between client and gateway:
    /// a router busy with a fleet coming online answered pings late, and clients that waited
    /// too long reconnected, which made it busier), to a SUBSCRIBE whose filters are all
    /// gateway-only (QoS 0 granted: that is how it delivers), or to an UNSUBSCRIBE naming no
    /// filter the session holds on the router (already narrowed by [`Self::held_by_broker`]).
    /// None: hand the packet to rumqttd.
    fn local_answer(&self, packet: &Packet) -> Option<Bytes> {
        use rumqttc::mqttbytes::v4::{PingResp, SubAck, SubscribeReasonCode, UnsubAck};
        let mut out = BytesMut::new();
        match packet {
            Packet::PingReq(_) => {
                PingResp.write(&mut out).ok()?;
            }
            Packet::Subscribe(sub, _)
                if !sub.filters.is_empty()
                    && sub.filters.iter().all(|f| self.is_gateway_only(&f.path)) =>
            {
                let mut refused = self.refused_now.lock().unwrap_or_else(|p| p.into_inner());
                let codes = sub
                    .filters
                    .iter()
                    .map(|f| {
                        if refused.contains(&f.path) {
                            SubscribeReasonCode::Failure
                        } else {
                            SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtMostOnce)
                        }
                    })
                    .collect();
                // Every copy of a refused filter in this SUBSCRIBE is refused; then forgotten.
                refused.clear();
                drop(refused);
                SubAck::new(sub.pkid, codes).write(&mut out).ok()?;
            }
            // Left with no filter the router holds for the session (`held_by_broker`).
            Packet::Unsubscribe(unsub, _) if unsub.filters.is_empty() => {
                UnsubAck::new(unsub.pkid).write(&mut out).ok()?;
            }
            _ => return None,
        }
        Some(out.freeze())
    }

    /// A chunk request (`packet`, on `machine`'s request topic) goes to the platform in process
    /// if it is the machine's own and the platform took them
    /// ([`super::GatewayHandle::take_chunk_requests`]); `Ok(None)` then. Otherwise it comes
    /// back, for the broker. [`Self::check`] has already held the topic to this session's principal.
    async fn chunk_request(
        &self,
        packet: Packet,
        machine: fleetcast_proto::MachineId,
        qos_pkid: Option<(u8, Option<u16>)>,
    ) -> Result<Option<Packet>, End> {
        let Packet::Publish(publish, _) = &packet else {
            return Ok(Some(packet));
        };
        if !matches!(self.principal, fleetcast_proto::acl::Principal::Machine { id, .. } if *id == machine)
        {
            return Ok(Some(packet));
        }
        let body = publish.payload.clone();
        if !self.shared.registry.chunk_request(machine, body).await {
            return Ok(Some(packet));
        }
        // A QoS 1 request (the protocol asks for QoS 0) is acknowledged here, on the queue the
        // session's writer drains: a client that sends them and never reads stops being read
        // once that queue is full. Handed to the router, each one's PUBACK waited in the
        // router's memory for as long as the session lived.
        if let Some((1, Some(pkid))) = qos_pkid {
            if self.control.send(frames::puback(pkid)).await.is_err() {
                return Err(End::Closed("session ending"));
            }
        }
        Ok(None)
    }

    /// A publish for the platform (`packet`: a machine's report, an operator's admin request
    /// or upload part, an integrator's request for events) goes to the platform in process if
    /// the sender is who the topic says and the platform took such messages
    /// ([`super::GatewayHandle::take_reports`], [`super::GatewayHandle::take_admin`]), and the
    /// gateway answers a QoS 1 one with its PUBACK once it is queued there; `Ok(None)` then.
    /// Otherwise it comes back, for the broker. [`Self::check`] has already held the topic to
    /// this session's principal (an operator's or integrator's to its own client id).
    async fn to_platform(
        &self,
        packet: Packet,
        inbound: Inbound,
        qos_pkid: Option<(u8, Option<u16>)>,
    ) -> Result<Option<Packet>, End> {
        let Packet::Publish(publish, _) = &packet else {
            return Ok(Some(packet));
        };
        let sender_is_owner = match (&inbound, self.principal) {
            (Inbound::Report(machine), Principal::Machine { id, .. }) => id == machine,
            (Inbound::Admin, Principal::Operator { .. } | Principal::Integrator { .. }) => true,
            _ => false,
        };
        if !sender_is_owner {
            return Ok(Some(packet));
        }
        let (qos, pkid) = match qos_pkid {
            Some((0, _)) => (rumqttc::QoS::AtMostOnce, None),
            Some((1, Some(pkid))) => (rumqttc::QoS::AtLeastOnce, Some(pkid)),
            // QoS 2 is refused by `check`.
            _ => return Ok(Some(packet)),
        };
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Ok(Some(packet));
        };
        let message = rumqttc::Publish::from_bytes(topic, qos, publish.payload.clone());
        let taken = match inbound {
            Inbound::Report(_) => self.shared.registry.report(message).await,
            Inbound::Admin => self.shared.registry.admin(message).await,
        };
        if !taken {
            return Ok(Some(packet));
        }
        if let Some(pkid) = pkid {
            if self.control.send(frames::puback(pkid)).await.is_err() {
                return Err(End::Closed("session ending"));
            }
        }
        Ok(None)
    }

    /// Whether one whole packet may pass.
    async fn check(&self, kind: PacketType, frame: &[u8]) -> Result<(), End> {
        let (shared, principal, client_id) = (self.shared, self.principal, self.client_id);
        // Flags, packet ids and packet types MQTT 3.1.1 forbids a client: closed as malformed.
        frames::check_client_packet(kind, frame).map_err(End::Frame)?;
        match kind {
            PacketType::Publish => {
                let topic = frames::publish_topic(frame).map_err(End::Frame)?;
                if !principal.may_publish(&shared.topics, client_id, topic) {
                    return Err(End::Violation {
                        what: "publish",
                        topic: topic.to_owned(),
                    });
                }
                // fleetcast uses QoS 0 and 1; QoS 2 would need flows the gateway does not
                // check (see `Unacked`).
                if frames::publish_qos_pkid(frame).map_err(End::Frame)?.0 > 1 {
                    return Err(End::Violation {
                        what: "QoS 2 publish",
                        topic: topic.to_owned(),
                    });
                }
            }
            PacketType::PubAck => {
                // MQTT 3.1.1 §3.4: a remaining length of 2, the packet id. A longer encoding
                // of that length would put the id elsewhere for the router than here.
                let pkid = match frame {
                    [_, 2, hi, lo] => u16::from_be_bytes([*hi, *lo]),
                    _ => {
                        return Err(End::Frame(FrameError::Malformed(
                            "PUBACK that is not 4 bytes".into(),
                        )))
                    }
                };
                if !self.unacked.acknowledge(pkid) {
                    return Err(End::Violation {
                        what: "PUBACK of a packet id never sent or out of order",
                        topic: pkid.to_string(),
                    });
                }
            }
            PacketType::PubRec | PacketType::PubRel | PacketType::PubComp => {
                return Err(End::Violation {
                    what: "QoS 2 acknowledgement",
                    topic: String::new(),
                });
            }
            PacketType::Subscribe => {
                let filters = frames::subscribe_filters(frame).map_err(End::Frame)?;
                if matches!(principal, Principal::Machine { .. })
                    && filters.len() > super::MAX_SUBSCRIBE_FILTERS
                {
                    return Err(End::Violation {
                        what: "a SUBSCRIBE of too many filters",
                        topic: format!(
                            "{} filters (at most {})",
                            filters.len(),
                            super::MAX_SUBSCRIBE_FILTERS
                        ),
                    });
                }
                // A group the machine is not in (any more): refused in the SUBACK, not by
                // closing the connection. An agent subscribes to the groups its config names,
                // and one the platform removed it from (`fleetcast machine groups --remove`)
                // closed its connection at every connect until the config was edited, which
                // cut it off from its own notices and reports too. Nothing of that group
                // reaches it either way.
                let (foreign, mut filters): (Vec<String>, Vec<String>) = filters
                    .into_iter()
                    .partition(|f| principal.foreign_group_filter(&shared.topics, f).is_some());
                if let Some(f) = foreign.first() {
                    shared.registry.subscriptions_refused(foreign.len());
                    let username = self.principal.username();
                    if let Some(quiet_before) = should_log(shared, &username) {
                        tracing::warn!(client = %shown(client_id), filter = %shown(f),
                            refused = foreign.len(), quiet_before,
                            "machine subscribed to a group it is not in on the platform (its config lists groups the platform removed?): SUBACK failure");
                    }
                }
                if let Some(f) = filters
                    .iter()
                    .find(|f| !principal.may_subscribe(&shared.topics, client_id, f))
                {
                    return Err(End::Violation {
                        what: "subscribe",
                        topic: f.clone(),
                    });
                }
                // Each filter once, however often the SUBSCRIBE names it: registering a served
                // filter queues its kept messages, and a SUBSCRIBE naming one 100 times queued
                // them 100 times (its SUBACK still answers every copy).
                let mut named = std::collections::HashSet::new();
                filters.retain(|f| named.insert(f.clone()));
                let auth = shared.auth.clone();
                let who = principal.clone();
                // The dynamic check may read the platform's store, like `authenticate`.
                let checked = tokio::task::spawn_blocking(move || {
                    let answers = auth.may_subscribe_each(&who, &filters);
                    let (allowed, refused): (Vec<_>, Vec<_>) = filters
                        .into_iter()
                        .zip(answers.into_iter().chain(std::iter::repeat(false)))
                        .partition(|(_, ok)| *ok);
                    let names = |v: Vec<(String, bool)>| {
                        v.into_iter().map(|(f, _)| f).collect::<Vec<String>>()
                    };
                    (names(allowed), names(refused))
                })
                .await;
                let Ok((filters, mut refused)) = checked else {
                    return Err(End::Violation {
                        what: "subscribe (dynamic check)",
                        topic: "(authenticator panicked)".to_owned(),
                    });
                };
                let foreign_count = foreign.len();
                refused.extend(foreign);
                // Served filters in a SUBSCRIBE that also names others go to rumqttd with
                // them (it answers the whole SUBACK), and rumqttd delivers them.
                let local = filters
                    .iter()
                    .chain(&refused)
                    .all(|f| self.is_gateway_only(f));
                if let Some(f) = refused.first() {
                    if !local {
                        return Err(End::Violation {
                            what: "subscribe (dynamic check)",
                            topic: f.clone(),
                        });
                    }
                    // Allowed by the policy, not now by the platform: e.g. the chunk topic of
                    // an artifact no longer (or not yet) assigned to this machine, which an
                    // agent resuming an old download asks for. A refusal in the SUBACK, not a
                    // closed connection: closing it made such an agent reconnect and ask again
                    // for ever, and its other reports never got through.
                    let username = self.principal.username();
                    let dynamic = refused.len() - foreign_count;
                    if let Some(quiet_before) = (dynamic > 0)
                        .then(|| should_log(shared, &username))
                        .flatten()
                    {
                        // Counted, not listed: one SUBSCRIBE may name thousands.
                        tracing::info!(client = %shown(client_id), refused = refused.len(), first = %shown(f),
                            quiet_before, "subscription refused by the platform (not assigned now): SUBACK failure");
                    }
                    self.refused_now
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(refused);
                }
                if !local {
                    // The router holds them all now, the served ones too: an UNSUBSCRIBE of
                    // any of them goes to it (`Unsubacks`).
                    self.broker_filters
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(filters.iter().cloned());
                }
                let username = self.principal.username();
                let fanout = &shared.registry.fanout;
                for f in filters {
                    if local && relay::is_served(&shared.topics, &f) {
                        // Room for what is kept for it first, waiting for the writer to make
                        // it: a SUBSCRIBE naming many filters (a machine's own notices, its
                        // groups', the key chain) keeps more than the queue holds at once, and
                        // queueing it all in one go closed the session before its SUBACK.
                        let kept = fanout.kept_for(&f).min(CONTROL_QUEUE);
                        let Ok(room) = self.control.reserve_many(kept).await else {
                            return Err(End::Closed("session ending"));
                        };
                        fanout.subscribe_served(
                            &f,
                            self.id,
                            &username,
                            (&self.control, room),
                            &self.stop,
                        );
                    } else if self.is_fanned_out(&f) {
                        fanout.subscribe(&f, self.id, &username, self.queue_for(&f));
                    }
                }
            }
            PacketType::Unsubscribe => {
                let filters = frames::unsubscribe_filters(frame).map_err(End::Frame)?;
                // MQTT 3.1.1 §3.10.3: at least one filter.
                if filters.is_empty() {
                    return Err(End::Frame(FrameError::Malformed(
                        "UNSUBSCRIBE without a filter".to_owned(),
                    )));
                }
                for f in filters {
                    if self.is_fanned_out(&f) || relay::is_served(&shared.topics, &f) {
                        shared.registry.fanout.unsubscribe(&f, self.id);
                    }
                }
            }
            PacketType::Connect => {
                return Err(End::Frame(FrameError::Malformed(
                    "a second CONNECT".to_owned(),
                )))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Router -> client: what the router hands the session (deliveries of the checked
/// subscriptions, acks), encoded in batches of up to [`WRITE_BATCH`] bytes, with the chunk
/// frames the gateway delivers itself written between them as they come.
async fn router_to_client<W>(
    mut link: LinkRx,
    wr: &mut W,
    (mut injected, queued): (mpsc::Receiver<fanout::Queued>, &fanout::QueuedKeys),
    mut controls: mpsc::Receiver<Bytes>,
    (unacked, unsubacks): (&Unacked, &Unsubacks),
) -> End
where
    W: AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    loop {
        // The router paused this session until it has written what it was given.
        let mut unscheduled = false;
        tokio::select! {
            biased;
            Some(answer) = controls.recv() => {
                if let Err(e) = write_frames(wr, answer, &mut controls).await {
                    return e.into();
                }
            }
            next = link.next() => {
                let mut next = next;
                loop {
                    match next {
                        Err(_) => return End::Dropped,
                        Ok(Some(notification)) => {
                            match Option::<Packet>::from(notification) {
                                // One UNSUBACK per UNSUBSCRIBE, not one per filter.
                                Some(Packet::UnsubAck(..)) if !unsubacks.pass() => {}
                                Some(packet) => {
                                    if matches!(packet, Packet::PubAck(..)) {
                                        unacked.paid();
                                    }
                                    let publish = matches!(packet, Packet::Publish(..));
                                    let at = out.len();
                                    if let Err(e) = V4.write(packet, &mut out) {
                                        return End::Frame(FrameError::Malformed(e.to_string()));
                                    }
                                    if publish {
                                        if let Ok((_, Some(pkid))) = frames::publish_qos_pkid(&out[at..]) {
                                            unacked.ids().push_back(pkid);
                                        }
                                    }
                                }
                                None => unscheduled = true,
                            }
                        }
                        Ok(None) => {}
                    }
                    if out.len() >= WRITE_BATCH {
                        break;
                    }
                    // More only if it is already there (the router hands over batches).
                    next = tokio::select! {
                        biased;
                        n = link.next() => n,
                        _ = std::future::ready(()) => break,
                    };
                }
            }
            // One frame at a time, then the answers again: written together, a full queue of
            // frames (4 MiB) kept refilling while it drained, and a PINGRESP or status ack
            // queued meanwhile waited until the machine had read all of it (a minute for a
            // machine reading at 70 KB/s: it resent its events and took its connection for
            // dead).
            Some(frame) = injected.recv() => {
                if let Err(e) = wr.write_all(&frame.packet).await {
                    return e.into();
                }
                queued.written(&frame);
            }
        }
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                return e.into();
            }
            out.clear();
            if out.capacity() > KEEP {
                out = BytesMut::new();
            }
        }
        // flush: TLS keeps records in its buffer until flushed; plain TCP ignores it.
        if let Err(e) = wr.flush().await {
            return e.into();
        }
        if unscheduled && link.wake().await.is_err() {
            return End::Dropped;
        }
    }
}

/// Forgets the session's socket in its [`fanout::QueuedKeys`] when dropped.
struct ForgetSocket<'a>(&'a fanout::QueuedKeys);

impl Drop for ForgetSocket<'_> {
    fn drop(&mut self) {
        self.0.forget_socket();
    }
}

/// A writer that counts what it writes into the session's [`fanout::QueuedKeys`], which tells
/// with the socket's send queue which frames have not reached the machine yet.
struct Counted<'a, W> {
    inner: &'a mut W,
    keys: &'a fanout::QueuedKeys,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.keys.count_sent(*n);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Writes `first` and whatever else is queued for the session now (answers: small).
async fn write_frames<W: AsyncWrite + Unpin>(
    wr: &mut W,
    first: Bytes,
    queue: &mut mpsc::Receiver<Bytes>,
) -> std::io::Result<()> {
    wr.write_all(&first).await?;
    while let Ok(frame) = queue.try_recv() {
        wr.write_all(&frame).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_unsuback_passes_per_unsubscribe_handed_to_the_router() {
        let owed = Unsubacks::default();
        owed.expect(0);
        owed.expect(3);
        owed.expect(1);
        let passed: Vec<bool> = (0..5).map(|_| owed.pass()).collect();
        assert_eq!(passed, [false, false, true, true, true]);
    }

    #[test]
    fn a_keep_alive_of_none_or_above_the_bound_is_held_to_the_bound() {
        assert_eq!(keep_alive(30, 1200), 30);
        assert_eq!(keep_alive(1200, 1200), 1200);
        assert_eq!(keep_alive(1201, 1200), 1200);
        assert_eq!(keep_alive(u16::MAX, 1200), 1200);
        assert_eq!(keep_alive(0, 1200), 1200, "0 asks for no keep-alive at all");
        assert_eq!(
            keep_alive(0, 0),
            1,
            "a bound of 0 would close every session at once"
        );
    }
}
