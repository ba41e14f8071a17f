//! The live sessions by username, so one call can end every session of a revoked principal, and
//! the gateway's counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::limit::{Limiter, RateLimit};

/// How long after its last connect a principal's buckets are surely full again (the longest
/// refill, reports': a burst of 200 at 50 a second, 4 s) and may be forgotten.
const REST: std::time::Duration = std::time::Duration::from_secs(60);

/// What the gateway has seen since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Sessions that passed authentication and were connected to the broker.
    pub connections: u64,
    /// Sessions open now.
    pub active: usize,
    /// CONNECTs refused (bad credentials, a client id or will the principal may not use).
    pub refused: u64,
    /// Sessions closed for a publish or subscribe the principal may not make (or a will at
    /// CONNECT, which is also counted as refused).
    pub violations: u64,
    /// Filters refused in a SUBACK (failure 0x80) with the session kept: a machine's
    /// subscription to a group it is not in on the platform.
    pub subscriptions_refused: u64,
    /// Chunk frames the gateway delivered itself (one per receiving session), and those it
    /// dropped because a session's queue was full.
    pub fanout_delivered: u64,
    pub fanout_dropped: u64,
    /// Chunk frames not queued again for a session that had the same frame queued and not
    /// yet written (its machine asked again before it had read them).
    pub fanout_already_queued: u64,
    /// Of `fanout_delivered`, the chunk server's frames (chunks and manifest parts): against
    /// machines x frames of the artifact, how well a rollout's broadcast worked.
    pub fanout_chunk_frames: u64,
    /// Chunk frames not queued again for a session that was written the same frame moments
    /// before (`fanout::RECENTLY_WRITTEN`) or whose socket still holds it: it was on its way
    /// when its machine asked.
    pub fanout_recently_written: u64,
    /// Of `fanout_chunk_frames`, frames queued for a session when it subscribed (broadcast on
    /// the filter moments before).
    pub fanout_caught_up: u64,
    /// Release notices, commands, key chains and operators' replies the gateway delivered itself (one per
    /// receiving session; see `relay`), and sessions it closed because they did not read them.
    pub served: u64,
    pub closed_unread: u64,
    /// Chunk requests dropped because the platform's in-process queue was gone
    /// ([`GatewayHandle::take_chunk_requests`]); the agents ask again.
    pub chunk_requests_dropped: u64,
}

#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<String, HashMap<u64, CancellationToken>>>,
    next_id: AtomicU64,
    connections: AtomicU64,
    /// The live session of each client id (see [`Registry::claim`]).
    client_ids: Mutex<HashMap<String, Claimed>>,
    /// Names of the router sessions of clients whose id is not bounded by the fleet (see
    /// [`RouterName`]).
    router_names: Mutex<NamePool>,
    refused: AtomicU64,
    violations: AtomicU64,
    subscriptions_refused: AtomicU64,
    pub(crate) fanout: super::fanout::Fanout,
    /// Where machines' chunk requests go in process, if the platform took them
    /// ([`GatewayHandle::take_chunk_requests`]).
    chunk_requests: std::sync::OnceLock<ChunkRequestSink>,
    /// Chunk requests dropped because that queue was gone (the platform stopped).
    chunk_requests_dropped: AtomicU64,
    /// Where machines' reports (status events, state, `online`) go in process, if the
    /// platform took them ([`GatewayHandle::take_reports`]).
    reports: std::sync::OnceLock<ReportSink>,
    /// Where operators' admin requests and upload parts and integrators' requests for events
    /// go in process, if the platform took them ([`GatewayHandle::take_admin`]).
    admin: std::sync::OnceLock<AdminSink>,
    /// Each rate-limited principal's buckets, kept across its connections.
    limiters: Mutex<Limiters>,
    /// How many kicks there have been: a connection that authenticated before a kick and
    /// registered its session after it was not there to be closed (see [`Registry::kicks`]).
    kicks: AtomicU64,
}

#[derive(Default)]
struct Limiters {
    by_user: HashMap<String, (SharedLimiter, Instant)>,
    /// Forget rested limiters once there are this many (doubles when all are in use).
    prune_at: usize,
}

/// A principal's buckets, shared by its sessions.
pub(crate) type SharedLimiter = Arc<Mutex<Limiter>>;

/// A machine's chunk request (its id, from its authenticated session, and the sealed body).
pub type ChunkRequestSink = tokio::sync::mpsc::Sender<(fleetcast_proto::MachineId, bytes::Bytes)>;

/// A machine's report (a status event, its state or `online`), as the platform's ingest
/// connection would have received it over MQTT (topic, QoS and payload as the machine sent
/// them; never flagged retained: it is the live message).
pub type ReportSink = tokio::sync::mpsc::Sender<crate::MqttEvent>;

/// An operator's admin request or upload part, or an integrator's request for events, as the
/// platform's serve connection would have received it over MQTT.
pub type AdminSink = tokio::sync::mpsc::Sender<crate::MqttEvent>;

impl Registry {
    /// The buckets of `username` (new ones at `limit` the first time), if a connection of it
    /// may be accepted now; `None`: over its connect rate, refuse it. Once 1,024 principals'
    /// limiters are kept (or twice as many as were in use at the last pruning), those no
    /// session holds and last handed out over a minute ago are forgotten: by then as full as
    /// new ones would be.
    pub(crate) fn limiter(&self, username: &str, limit: RateLimit) -> Option<SharedLimiter> {
        let now = Instant::now();
        let mut l = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        if !l.by_user.contains_key(username) && l.by_user.len() >= l.prune_at.max(1024) {
            l.by_user.retain(|_, (limiter, at)| {
                Arc::strong_count(limiter) > 1 || now.duration_since(*at) < REST
            });
            l.prune_at = l.by_user.len() * 2;
        }
        let (limiter, at) = l
            .by_user
            .entry(username.to_owned())
            .or_insert_with(|| (Arc::new(Mutex::new(Limiter::new(limit, now))), now));
        *at = now;
        let accepted = limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connect(now);
        accepted.then(|| limiter.clone())
    }

    /// Hands a chunk request to the platform in process; `false` if nobody took them (the
    /// request goes to the broker). A full queue holds the session up (it stops reading its
    /// socket, as a slow broker would) rather than drop the request: a dropped one cost its
    /// machine a 2 s stall, and a rollout to 1,000 machines asks 1,000 at once. Dropped only
    /// once the platform is gone.
    pub(crate) async fn chunk_request(
        &self,
        machine: fleetcast_proto::MachineId,
        body: bytes::Bytes,
    ) -> bool {
        let Some(sink) = self.chunk_requests.get() else {
            return false;
        };
        if sink.send((machine, body)).await.is_err() {
            self.chunk_requests_dropped.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Hands a machine's report to the platform in process, waiting while its queue is full;
    /// `false` if the platform did not take reports or has stopped (the report goes through
    /// the broker then).
    pub(crate) async fn report(&self, publish: rumqttc::Publish) -> bool {
        Self::hand_on(self.reports.get(), publish).await
    }

    /// As [`Self::report`], for an operator's or integrator's message to the platform.
    pub(crate) async fn admin(&self, publish: rumqttc::Publish) -> bool {
        Self::hand_on(self.admin.get(), publish).await
    }

    async fn hand_on(
        sink: Option<&tokio::sync::mpsc::Sender<crate::MqttEvent>>,
        publish: rumqttc::Publish,
    ) -> bool {
        match sink {
            Some(sink) => sink.send(crate::MqttEvent::Publish(publish)).await.is_ok(),
            None => false,
        }
    }

    fn sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u64, CancellationToken>>> {
        // The map stays consistent even if a holder panicked: every change is one insert/remove.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session of `username`; it is dropped from the registry with the guard.
    pub(crate) fn register(
        self: &Arc<Self>,
        username: &str,
        stop: CancellationToken,
    ) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sessions()
            .entry(username.to_owned())
            .or_default()
            .insert(id, stop);
        self.connections.fetch_add(1, Ordering::Relaxed);
        SessionGuard {
            registry: self.clone(),
            username: username.to_owned(),
            id,
        }
    }

    fn client_ids(&self) -> std::sync::MutexGuard<'_, HashMap<String, Claimed>> {
        self.client_ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn router_names(&self) -> std::sync::MutexGuard<'_, NamePool> {
        self.router_names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many router names the pool has handed out at most at once ([`RouterName`]).
    #[cfg(test)]
    pub(crate) fn router_names_made(&self) -> u32 {
        self.router_names().next
    }

    /// Takes `client_id` for a new connection: the session that holds it now is told it was
    /// taken over, and this waits until it has ended (its last packets handed to the broker)
    /// for at most `wait`. None if that did not happen in time, or if a still newer connection
    /// took the id meanwhile.
    ///
    /// Why the gateway does this rather than leave it to rumqttd's router: a router that drops
    /// a session itself races with that session's next "ready" event, and rumqttd 0.20 panics
    /// (`Scheduler::reschedule` unwraps) on a ready event for a session it no longer has,
    /// which stops the broker for everyone. Ending the old session first, and opening the new
    /// one only after, keeps every event of the old one ahead of the new one's CONNECT.
    ///
    /// `pooled`: the session opens on the router under a name of the gateway's pool rather than
    /// `client_id` ([`RouterName`]).
    pub(crate) async fn claim(
        self: &Arc<Self>,
        client_id: &str,
        pooled: bool,
        wait: std::time::Duration,
    ) -> Option<ClientClaim> {
        let session = self.next_id.fetch_add(1, Ordering::Relaxed);
        let takeover = CancellationToken::new();
        let (previous, ended) = {
            let mut ids = self.client_ids();
            let ended = ids
                .get(client_id)
                .map(|c| c.ended.clone())
                .unwrap_or_default();
            let previous = ids.insert(
                client_id.to_owned(),
                Claimed {
                    session,
                    takeover: takeover.clone(),
                    ended: ended.clone(),
                },
            );
            (previous, ended)
        };
        let router_name = if pooled {
            RouterName::pooled(self)
        } else {
            RouterName::Own(client_id.to_owned())
        };
        let mut claim = ClientClaim {
            registry: self.clone(),
            client_id: client_id.to_owned(),
            session,
            takeover,
            router_name,
            _ended: None,
        };
        if let Some(previous) = previous {
            previous.takeover.cancel();
        }
        let held = tokio::select! {
            _ = claim.takeover.cancelled() => return None,
            held = tokio::time::timeout(wait, ended.lock_owned()) => held.ok()?,
        };
        claim._ended = Some(held);
        Some(claim)
    }

    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn violation(&self) {
        self.violations.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn subscriptions_refused(&self, n: usize) {
        self.subscriptions_refused
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// How many kicks there have been. A connection reads it before it authenticates and
    /// again once its session is registered: if it moved, a kick may have come between (and
    /// missed the session), and the connection authenticates again.
    pub(crate) fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::SeqCst)
    }

    /// Ends every live session of `username`; how many there were.
    pub(crate) fn kick(&self, username: &str) -> usize {
        // Before the sessions are taken: a session registered after this is seen by its
        // connection's second reading of `kicks`.
        self.kicks.fetch_add(1, Ordering::SeqCst);
        let sessions = self.sessions().remove(username).unwrap_or_default();
        for stop in sessions.values() {
            stop.cancel();
        }
        sessions.len()
    }

    pub(crate) fn stats(&self) -> GatewayStats {
        let fanout = self.fanout.counts();
        GatewayStats {
            connections: self.connections.load(Ordering::Relaxed),
            active: self.sessions().values().map(HashMap::len).sum(),
            refused: self.refused.load(Ordering::Relaxed),
            violations: self.violations.load(Ordering::Relaxed),
            subscriptions_refused: self.subscriptions_refused.load(Ordering::Relaxed),
            fanout_delivered: fanout.delivered,
            fanout_dropped: fanout.dropped,
            fanout_already_queued: fanout.already_queued,
            fanout_chunk_frames: fanout.keyed_delivered,
            fanout_recently_written: fanout.recently_written,
            fanout_caught_up: fanout.caught_up,
            served: fanout.served,
            closed_unread: fanout.closed_full,
            chunk_requests_dropped: self.chunk_requests_dropped.load(Ordering::Relaxed),
        }
    }
}

/// The live session of one client id.
struct Claimed {
    session: u64,
    /// Cancelled when a newer connection takes the client id.
    takeover: CancellationToken,
    /// Held by the live session until it has ended.
    ended: Arc<tokio::sync::Mutex<()>>,
}

/// A session's hold on its client id, released when dropped.
pub(crate) struct ClientClaim {
    registry: Arc<Registry>,
    client_id: String,
    session: u64,
    takeover: CancellationToken,
    /// Dropped with the claim, so after the session's end has reached the router.
    router_name: RouterName,
    _ended: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl ClientClaim {
    /// The name the client's session has on the router.
    pub(crate) fn router_name(&self) -> &str {
        self.router_name.as_str()
    }

    /// Resolves once a newer connection takes the client id (owns what it waits on, so it can
    /// be moved to a task of its own).
    pub(crate) fn taken_over(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.takeover.clone().cancelled_owned()
    }
}

impl Drop for ClientClaim {
    fn drop(&mut self) {
        let mut ids = self.registry.client_ids();
        if ids.get(&self.client_id).map(|c| c.session) == Some(self.session) {
            ids.remove(&self.client_id);
        }
    }
}

/// The client id a session has on rumqttd's router. rumqttd 0.20 remembers every client id it
/// has seen, also of clean sessions (its "graveyard" keeps each one's last connection events),
/// and forgets one only when the same id connects again. Machines connect as their own id,
/// so what it keeps grows with the fleet; operators and integrators connect as
/// `{user}.{random}`, a new id per CLI call, and each call left 0.8 KiB of `serve`'s memory for
/// good (a script calling `fleetcast stats` every 10 s: some 7 MB a day; 0.06 KiB per call with
/// the pool, docs/benchmarks.md). Their sessions
/// therefore open on the router under a name from a pool (`~0`, `~1`, ...: `~` is in no client
/// id the gateway accepts), taken while the session lives and given back after its end has
/// reached the router, so the router knows at most as many of them as were ever live at once.
/// Nothing on the router depends on the name: the gateway checks every client's topics and
/// publishes wills itself.
enum RouterName {
    Own(String),
    Pooled {
        registry: Arc<Registry>,
        slot: u32,
        name: String,
    },
}

/// Free slots of [`RouterName`]s: the lowest free one is taken first, so the names in use
/// stay as few as the most sessions live at once.
#[derive(Default)]
struct NamePool {
    free: std::collections::BTreeSet<u32>,
    next: u32,
}

impl RouterName {
    fn pooled(registry: &Arc<Registry>) -> Self {
        let slot = {
            let mut pool = registry.router_names();
            match pool.free.pop_first() {
                Some(slot) => slot,
                None => {
                    pool.next += 1;
                    pool.next - 1
                }
            }
        };
        RouterName::Pooled {
            registry: registry.clone(),
            slot,
            name: format!("~{slot}"),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            RouterName::Own(name) | RouterName::Pooled { name, .. } => name,
        }
    }
}

impl Drop for RouterName {
    fn drop(&mut self) {
        if let RouterName::Pooled { registry, slot, .. } = self {
            registry.router_names().free.insert(*slot);
        }
    }
}

/// Removes its session from the registry when the session ends.
pub(crate) struct SessionGuard {
    registry: Arc<Registry>,
    username: String,
    id: u64,
}

impl SessionGuard {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry.fanout.remove_session(self.id);
        let mut sessions = self.registry.sessions();
        if let Some(mine) = sessions.get_mut(&self.username) {
            mine.remove(&self.id);
            if mine.is_empty() {
                sessions.remove(&self.username);
            }
        }
    }
}

/// Controls a running gateway: cheap to clone.
#[derive(Clone)]
pub struct GatewayHandle {
    pub(crate) registry: Arc<Registry>,
}

impl GatewayHandle {
    /// Closes every live session of `username` now (both sockets; the broker publishes the
    /// client's will) and returns how many were closed. Revoke the credentials first, or the
    /// client simply reconnects.
    pub fn kick(&self, username: &str) -> usize {
        let n = self.registry.kick(username);
        if n > 0 {
            tracing::info!(
                username,
                sessions = n,
                "gateway closed the sessions of a kicked user"
            );
        }
        n
    }

    pub fn stats(&self) -> GatewayStats {
        self.registry.stats()
    }

    /// From now on, machines' chunk requests (`machines/{m}/chunks/get`, QoS 0, from the
    /// session of machine `m`: the gateway's ACL already holds each to its own topic) go to
    /// `sink` instead of through rumqttd. Through rumqttd each took a router pass and the
    /// platform's own connection on its way, most of a single machine's round trip for a window
    /// of chunks. Once only; `false` if they were already taken.
    pub fn take_chunk_requests(&self, sink: ChunkRequestSink) -> bool {
        self.registry.chunk_requests.set(sink).is_ok()
    }

    /// From now on, machines' reports (`machines/{m}/status`, `/state` and `/online`, from
    /// the session of machine `m`, and a machine's will on its `online`) go to `sink`, and the
    /// gateway sends a status event's PUBACK once the event is queued there, instead of
    /// through rumqttd's router and the platform's ingest connection (for each report a router
    /// pass, a loopback TCP hop both ways and a second MQTT parse; and for state and `online`,
    /// which a whole fleet sends at once when it connects, a log per filter in rumqttd that
    /// drops what the platform has not read yet once it is full and is never given back). The
    /// PUBACK promises nothing more than rumqttd's did: the StatusAck after the flush is the
    /// promise. Nobody else may read these topics (`Principal::may_subscribe`), so nothing is
    /// lost by their not being retained on rumqttd. Once only; `false` if they were already
    /// taken.
    pub fn take_reports(&self, sink: ReportSink) -> bool {
        self.registry.reports.set(sink).is_ok()
    }

    /// From now on, operators' admin requests and upload parts (`admin/{client}/request` and
    /// `/upload`) and integrators' requests for events (`integrators/{client}/events/get`),
    /// each from the session of that client, go to `sink`, and the gateway sends a QoS 1
    /// one's PUBACK once it is queued there, instead of through rumqttd and the platform's
    /// serve connection. Through rumqttd every upload part was copied into a log of 4 MiB for
    /// the upload filter, kept for ever once filled, and a full queue on the platform's side
    /// dropped parts the operator then had to send again; a full `sink` holds the sender up
    /// instead (it stops reading its socket). Once only; `false` if they were already taken.
    pub fn take_admin(&self, sink: AdminSink) -> bool {
        self.registry.admin.set(sink).is_ok()
    }

    /// Hands the platform's answer `payload` on an operator's reply topic or an integrator's
    /// event topic (`topic`, which must be one: the gateway serves these by exact filter) to
    /// the session subscribed to it through the gateway, as the relay hands on what the
    /// platform publishes there through rumqttd (QoS 0, not kept). Through rumqttd an answer
    /// of a few hundred KiB (a page of targets, of events) grew the read buffer of the
    /// platform's connection in rumqttd to its size, and every small retained message read
    /// into that buffer after it (a rollout's progress: one topic per rollout, kept for ever)
    /// kept the whole buffer alive: about 0.6 MB more per 1,000-machine rollout (heaptrack,
    /// rollouts 10 to 30). `false` if no session took it here, so the caller publishes it
    /// through rumqttd: nobody is subscribed (it is dropped there too), or the subscriber named
    /// the topic in a SUBSCRIBE together with filters rumqttd serves (the documented Python
    /// integrator does), which the gateway hands to rumqttd whole, or it cannot be encoded.
    pub fn reply(&self, topic: &str, payload: &[u8]) -> bool {
        match super::frames::publish_packet(topic, payload, false) {
            Ok(live) => {
                self.registry
                    .fanout
                    .serve(topic, topic, super::fanout::Keep::Nothing, &live)
                    > 0
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot encode an answer for delivery");
                false
            }
        }
    }

    /// Delivers `payload` as a QoS 0 PUBLISH on `topic` to every session whose subscription
    /// to it the gateway accepted (artifact chunk topics and `fleet/events`; see `fanout`). How
    /// many took it.
    pub fn deliver(&self, topic: &str, payload: &[u8]) -> usize {
        self.deliver_to(topic, payload, None)
    }

    /// Whether any session is subscribed to fanned-out topic `topic` now (what is built only to
    /// be delivered need not be built for nobody).
    pub fn subscribed(&self, topic: &str) -> bool {
        self.registry.fanout.subscribed(topic)
    }

    /// Which of `names` (usernames) a frame of `key` on fanned-out topic `topic` would be
    /// queued for now: they have a session subscribed to it, and none of that key queued or
    /// written to it moments ago (see [`GatewayHandle::deliver_keyed`]).
    pub fn lacking<'a>(&self, topic: &str, names: &[&'a str], key: u64) -> Vec<&'a str> {
        self.registry.fanout.lacking(topic, names, key)
    }

    /// [`GatewayHandle::deliver`] to the subscribed sessions of these usernames only (`None`:
    /// every subscriber).
    pub fn deliver_to(&self, topic: &str, payload: &[u8], only: Option<&[&str]>) -> usize {
        self.deliver_keyed(topic, payload, only, None)
    }

    /// [`GatewayHandle::deliver_to`] for a frame with a key (e.g. one chunk of one artifact): a
    /// session that has a frame of this key queued and not yet written is counted as having
    /// taken it, and it is not queued for it again.
    pub fn deliver_keyed(
        &self,
        topic: &str,
        payload: &[u8],
        only: Option<&[&str]>,
        key: Option<u64>,
    ) -> usize {
        match super::frames::qos0_publish(topic, payload) {
            Ok(packet) => self.registry.fanout.deliver(topic, &packet, only, key),
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot encode a frame for delivery");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_cancels_every_session_of_the_user_and_only_those() {
        let r = Arc::new(Registry::default());
        let (a1, a2, b) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let _g1 = r.register("vm-a", a1.clone());
        let _g2 = r.register("vm-a", a2.clone());
        let _g3 = r.register("vm-b", b.clone());
        assert_eq!(r.stats().active, 3);
        assert_eq!(r.kick("vm-a"), 2);
        assert!(a1.is_cancelled() && a2.is_cancelled() && !b.is_cancelled());
        assert_eq!(r.kick("vm-a"), 0);
        assert_eq!(r.stats().active, 1);
        assert_eq!(r.stats().connections, 3);
    }

    /// Limiters are kept across connections, and do not pile up: once 1,024 are kept, those
    /// no session holds and not handed out for a minute go.
    #[tokio::test(start_paused = true)]
    async fn principals_limiters_are_kept_across_connections_and_rested_ones_forgotten() {
        let r = Registry::default();
        let limit = super::super::RateLimit::MACHINE;
        let held = r.limiter("vm-held", limit).unwrap();
        for i in 0..1023 {
            drop(r.limiter(&format!("vm-{i}"), limit).unwrap());
        }
        let kept = || r.limiters.lock().unwrap().by_user.len();
        // The same machine gets its own buckets back.
        assert_eq!(kept(), 1024);
        let again = r.limiter("vm-held", limit).unwrap();
        assert!(Arc::ptr_eq(&held, &again));
        drop(again);
        tokio::time::advance(std::time::Duration::from_secs(61)).await;
        drop(r.limiter("vm-new", limit).unwrap());
        // At 1,024 kept, a new one prunes: the held one and the new one stay, the rested
        // 1,023 go.
        assert_eq!(kept(), 2);
    }

    /// Operators' and integrators' sessions open on the router under names from a pool, the
    /// lowest free first, given back when the claim goes: a new client id per CLI call does not
    /// make a new name on the router. A machine's session keeps its own id.
    #[tokio::test]
    async fn sessions_of_clients_with_unbounded_ids_share_a_few_router_names() {
        let r = Arc::new(Registry::default());
        let wait = std::time::Duration::from_secs(1);
        let a = r.claim("fleetcast-op-alice.x1", true, wait).await.unwrap();
        let b = r.claim("fleetcast-op-alice.x2", true, wait).await.unwrap();
        let m = r.claim("vm-1", false, wait).await.unwrap();
        assert_eq!((a.router_name(), b.router_name()), ("~0", "~1"));
        assert_eq!(m.router_name(), "vm-1");
        drop(a);
        for i in 0..100 {
            let c = r
                .claim(&format!("fleetcast-op-alice.y{i}"), true, wait)
                .await
                .unwrap();
            assert_eq!(c.router_name(), "~0");
        }
        assert_eq!(r.router_names_made(), 2);
        // A take-over: the newer connection of the same client id gets a name of its own,
        // while the old session may still be ending on the router under its name.
        let c = r.claim("fleetcast-op-alice.x2", true, wait);
        let (c, ()) = tokio::join!(c, async { drop(b) });
        assert_eq!(c.unwrap().router_name(), "~0");
    }

    #[test]
    fn an_ended_session_leaves_the_registry() {
        let r = Arc::new(Registry::default());
        let stop = CancellationToken::new();
        let guard = r.register("vm-a", stop.clone());
        drop(guard);
        assert_eq!(r.stats().active, 0);
        assert_eq!(r.kick("vm-a"), 0);
        assert!(!stop.is_cancelled());
    }
}
