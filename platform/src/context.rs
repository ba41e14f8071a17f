//! The context every task of the service shares: the store, artifact files, keys, the serve
//! connection's MQTT client, the broker's session control, limits and counters. Built once by
//! [`crate::serve`](mod@crate::serve); `Ctx::for_tests` builds one over an in-memory store for unit tests.

use std::sync::{Arc, RwLock};

use fleetcast_proto::Topics;
use rumqttc::AsyncClient;

use crate::artifacts::ArtifactStore;
use crate::keys::Keys;
use crate::limits::MachineLimits;
use crate::store::Store;

/// Everything the service's tasks share.
pub struct Ctx {
    pub store: Arc<dyn Store>,
    pub files: Arc<ArtifactStore>,
    /// The current keys; replaced whole by a key rotation.
    pub keys: RwLock<Arc<Keys>>,
    pub topics: Topics,
    /// Client of the serve connection; every platform publish goes through it.
    pub mqtt: AsyncClient,
    /// Closes broker sessions (revocation); a no-op on an external broker.
    pub sessions: Arc<dyn SessionControl>,
    /// The data dir (keys live there).
    pub data_dir: std::path::PathBuf,
    /// What each machine may take.
    pub limits: MachineLimits,
    pub stats: crate::stats::Stats,
    /// Warnings caused by one machine (or client): a few per key per minute are logged, the
    /// rest counted, so one machine cannot fill the log.
    pub log_gate: fleetcast_proto::text::LogGate,
    /// Held (read) from reading a machine's secret to raising its replay counter with what that
    /// secret verified; held (write) while a secret is replaced and the counters reset. Without
    /// it, a message of a stolen config verified just before a rotation could raise the counter
    /// just after the reset, and lock the machine's new secret out again.
    pub secrets: std::sync::RwLock<()>,
}

impl Ctx {
    /// The keys in force now.
    pub fn keys(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a warning caused by `key` (a machine id, a client id) is logged now: `Some(n)`,
    /// n being how many of its warnings were left out before this one; `None`: leave it out.
    /// Log the client's own text through [`fleetcast_proto::text::shown`].
    pub fn should_log(&self, key: &str) -> Option<u64> {
        match self.log_gate.admit(key) {
            fleetcast_proto::text::Admit::Log { quiet_before } => Some(quiet_before),
            fleetcast_proto::text::Admit::Quiet => None,
        }
    }
}

#[cfg(test)]
impl Ctx {
    /// A context over a fresh in-memory store, and keys and artifact files in `dir`, publishing
    /// into `mqtt` (never polled).
    pub fn for_tests(dir: &std::path::Path, mqtt: AsyncClient) -> Self {
        let store: Arc<dyn Store> = Arc::new(crate::store::MemStore::new());
        let keys = crate::keys::load_or_create_keys(dir).unwrap();
        crate::identities::ensure_bootstrap_admin(&*store, &keys).unwrap();
        Ctx {
            store,
            files: Arc::new(ArtifactStore::open(dir).unwrap()),
            keys: RwLock::new(Arc::new(keys)),
            topics: Topics::default(),
            mqtt,
            sessions: Arc::new(NoSessionControl),
            data_dir: dir.to_owned(),
            limits: MachineLimits::default(),
            stats: Default::default(),
            log_gate: fleetcast_proto::text::LogGate::per_minute(),
            secrets: Default::default(),
        }
    }

    /// [`Ctx::for_tests`] in a fresh temp dir, publishing into a client whose event loop is
    /// returned unpolled: keep both while the context is used (dropping the event loop closes
    /// the client's queue, dropping the dir deletes the files).
    pub fn for_tests_in_temp_dir() -> (tempfile::TempDir, rumqttc::EventLoop, Arc<Ctx>) {
        let dir = tempfile::tempdir().unwrap();
        let (mqtt, eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 4096);
        let ctx = Arc::new(Ctx::for_tests(dir.path(), mqtt));
        (dir, eventloop, ctx)
    }
}

/// What the embedded broker's gateway does for the platform beyond MQTT: close a username's
/// live sessions (an external broker cannot be told; its own tools or a restart do it), and
/// deliver what is published on the topics it fans out itself (artifact chunk topics,
/// `fleet/events`, and each machine's `status/ack` and `chunks`) to the sessions subscribed to
/// them.
pub trait SessionControl: Send + Sync {
    /// Closes every session of `username`; returns how many were closed.
    fn close_sessions(&self, username: &str) -> usize;
    /// Delivers `payload` on fanned-out topic `topic` to its subscribers (or only to those of
    /// the machines in `only`), if this broker can (`None`: publish it over MQTT instead, to all).
    /// A `key` names what the payload is (one chunk of one artifact): a session that has a
    /// payload of that key queued and not yet written does not get it queued again.
    fn deliver(
        &self,
        _topic: &str,
        _payload: &[u8],
        _only: Option<&[&str]>,
        _key: Option<u64>,
    ) -> Option<usize> {
        None
    }
    /// Whether anyone is subscribed to fanned-out topic `topic` now, if this broker can tell
    /// (`None`: an external broker; publish anyway).
    fn subscribed(&self, _topic: &str) -> Option<bool> {
        None
    }
    /// Which of the machines `names` a payload of `key` on fanned-out topic `topic` would be
    /// queued for now by [`Self::deliver`] (subscribed, and none of that key queued or written
    /// to them moments ago), if this broker can tell (`None`: an external broker; send to all).
    fn lacking<'a>(&self, _topic: &str, _names: &[&'a str], _key: u64) -> Option<Vec<&'a str>> {
        None
    }
    /// Has machines' chunk requests handed to `sink` in process, if this broker can (`false`:
    /// they arrive over MQTT).
    fn take_chunk_requests(&self, _sink: fleetcast_broker::ChunkRequestSink) -> bool {
        false
    }
    /// Has machines' reports (status events, state, `online`) handed to `sink` in process, as
    /// the ingest connection would get them, if this broker can (`false`: they arrive over
    /// MQTT).
    fn take_reports(&self, _sink: fleetcast_broker::ReportSink) -> bool {
        false
    }
    /// Has operators' admin requests and upload parts and integrators' requests for events
    /// handed to `sink` in process, as the serve connection would get them, if this broker
    /// can (`false`: they arrive over MQTT).
    fn take_admin(&self, _sink: fleetcast_broker::AdminSink) -> bool {
        false
    }
    /// Hands the platform's answer on an operator's reply topic or an integrator's event topic
    /// to its subscriber in process, if this broker can and that subscriber is the gateway's
    /// (`false`: publish it over MQTT).
    fn reply(&self, _topic: &str, _payload: &[u8]) -> bool {
        false
    }
    /// The gateway's counters, if this broker has one.
    fn gateway_counters(&self) -> Option<fleetcast_proto::admin::GatewayCounters> {
        None
    }
}

/// For an external broker: nothing to close from here.
pub struct NoSessionControl;

impl SessionControl for NoSessionControl {
    fn close_sessions(&self, _username: &str) -> usize {
        0
    }
}
