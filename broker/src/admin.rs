//! The operator's side of the admin protocol (used by the `fleetcast` CLI and the simulator):
//! MAC'd requests on `fleet/admin/{client}/request`, responses on `.../response`, artifact
//! bytes as upload frames on `.../upload`. See proto::admin for the wire types.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcast_proto::acl::{operator_username, validate_name};
use fleetcast_proto::admin::{
    AdminOp, AdminReply, AdminRequest, AdminResponse, ArtifactInfo, ResponseEnvelope,
};
use fleetcast_proto::auth::{Purpose, Secret};
use fleetcast_proto::calls::{self, Call, UploadEnd, UploadStart};
use fleetcast_proto::chunk::{encode_upload_frame, FrameHeader, FrameType, Layout};
use fleetcast_proto::{ArtifactId, Kind, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::client::{self, BrokerUrl, MqttEvent};

/// How long one request waits for its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// An unanswered request is sent again after this long.
const RESEND_AFTER: Duration = Duration::from_secs(2);
/// Upload parts in flight before waiting for the broker's acks.
const UPLOAD_WINDOW: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot connect to the broker at {broker}: {reason}")]
    Connect { broker: String, reason: String },
    #[error("no answer from the platform to {op} within {secs} s (is `fleetcast serve` running on this broker?)")]
    Timeout { op: String, secs: u64 },
    #[error("platform refused: {0}")]
    Refused(String),
    #[error("refused, in an answer that could not be authenticated (wrong operator secret?): {0}")]
    Unverified(String),
    /// The platform could not read the operation's name: it is older than the client. (Its
    /// answer is not authenticated, so it could be forged; but it only stops the client.)
    #[error("the platform does not know {op} (it is older than this client); nothing was done")]
    UnknownOp { op: String },
    #[error("bad operator name: {0}")]
    BadName(String),
    #[error("unexpected reply to {op}: {reply}")]
    UnexpectedReply { op: String, reply: String },
    /// The platform answered, but not with the reply the operation calls for (a platform of
    /// another version, most likely).
    #[error("the platform answered {op} with `{got}`, expected `{expected}`")]
    WrongReply {
        op: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("connection to the broker lost: {0}")]
    Lost(String),
}

/// Requests waiting for their answer, by request id.
type Waiters = Arc<Mutex<HashMap<u64, Waiter>>>;

struct Waiter {
    /// The request's counter: a sealed answer must carry it.
    ctr: u64,
    tx: oneshot::Sender<AdminResponse>,
    /// A plain error that arrived instead: used only if no sealed answer follows within one
    /// resend interval, so a forged refusal cannot pre-empt the platform's real answer.
    unverified: Option<String>,
}

/// The name every platform's first operator has; its secret is `<data>/admin.secret`.
pub const BOOTSTRAP_OPERATOR: &str = "admin";

/// A connected operator client. Cheap to share by reference; requests may run concurrently.
pub struct AdminClient {
    client: AsyncClient,
    client_id: String,
    topics: Topics,
    secret: Secret,
    next_id: AtomicU64,
    last_ctr: AtomicU64,
    waiters: Waiters,
    acks: Mutex<Option<mpsc::UnboundedReceiver<u16>>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn op_name(op: &AdminOp) -> String {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "request".into())
}

/// The error for a plain (unauthenticated) refusal of `op`. A platform from before 2026-11-29
/// 17:40 that does not know an operation cannot read the request at all, so it answers as to a
/// request with a bad MAC, with the reader's error inside: "unknown variant `op`, expected one
/// of ..." and the whole list of the operations it knows. Later platforms seal that answer.
fn plain_refusal(op: &str, text: String) -> AdminError {
    refusal(op, text, AdminError::Unverified)
}

/// A refusal, or [`AdminError::UnknownOp`] when it says the platform could not read `op`'s
/// name (answered unverified by platforms before 2026-11-29 17:40, sealed since).
fn refusal(op: &str, text: String, other: fn(String) -> AdminError) -> AdminError {
    if text.contains(&format!("unknown variant `{op}`")) {
        AdminError::UnknownOp { op: op.to_owned() }
    } else {
        other(text)
    }
}

impl AdminClient {
    /// Connects as the bootstrap operator `admin` (see [`AdminClient::connect_as`]).
    pub async fn connect(
        broker: &BrokerUrl,
        topics: Topics,
        secret: Secret,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        Self::connect_as(broker, topics, BOOTSTRAP_OPERATOR, secret, timeout).await
    }

    /// Connects as operator `operator` with its secret and subscribes to this session's
    /// response topic. The client id is `fleetcast-op-<operator>.<random>`, so one operator
    /// can run several commands at once.
    pub async fn connect_as(
        broker: &BrokerUrl,
        topics: Topics,
        operator: &str,
        secret: Secret,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        validate_name(operator).map_err(AdminError::BadName)?;
        let username = operator_username(operator);
        let client_id = format!("{username}.{:08x}", rand::random::<u32>());
        let mut opts =
            client::options_as(broker, &client_id, &username, Some(&secret.mqtt_password()));
        opts.set_clean_session(true);
        let (client, eventloop) = client::connect(opts, 256);
        let (tx, mut rx) = mpsc::channel(256);
        let shutdown = CancellationToken::new();
        let driver = tokio::spawn(client::drive(eventloop, tx, shutdown.clone()));
        let connect_err = |reason: String| AdminError::Connect {
            broker: broker.to_string(),
            reason,
        };
        // The first CONNACK; the broker refusing us shows up as a disconnect.
        let connected = client::wait_for(&mut rx, timeout, |e| {
            matches!(e, MqttEvent::Connected { .. })
        })
        .await;
        if let Err(e) = connected {
            shutdown.cancel();
            let e = e.to_string();
            return Err(connect_err(format!("{e} ({})", connect_hint(&e))));
        }
        let response_topic = topics.admin_response(&client_id);
        client
            .subscribe(response_topic.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        // A response published before the broker registered our subscription would be lost:
        // wait for the SUBACK.
        let subscribed =
            client::wait_for(&mut rx, timeout, |e| matches!(e, MqttEvent::SubAck(_))).await;
        if let Err(e) = subscribed {
            shutdown.cancel();
            return Err(connect_err(format!(
                "the broker did not confirm the response subscription: {e}"
            )));
        }
        let waiters: Waiters = Arc::default();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let task = {
            let waiters = waiters.clone();
            let client = client.clone();
            let shutdown = shutdown.clone();
            let secret = secret.clone();
            let client_id = client_id.clone();
            tokio::spawn(async move {
                let _driver = driver;
                loop {
                    let event = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        e = rx.recv() => match e { Some(e) => e, None => return },
                    };
                    match event {
                        MqttEvent::Connected { .. } => {
                            // A broker restart forgets our subscription.
                            let _ = client
                                .subscribe(response_topic.clone(), QoS::AtLeastOnce)
                                .await;
                        }
                        MqttEvent::Publish(p) if p.topic == response_topic => {
                            deliver(&waiters, &secret, &client_id, &p.payload)
                        }
                        MqttEvent::PubAck(pkid) => {
                            let _ = ack_tx.send(pkid);
                        }
                        MqttEvent::Disconnected(e) => {
                            tracing::debug!(error = %e, "admin connection dropped; reconnecting")
                        }
                        _ => {}
                    }
                }
            })
        };
        Ok(Self {
            client,
            client_id,
            topics,
            secret,
            next_id: AtomicU64::new(1),
            last_ctr: AtomicU64::new(0),
            waiters,
            acks: Mutex::new(Some(ack_rx)),
            shutdown,
            task,
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    fn next_ctr(&self) -> u64 {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut prev = self.last_ctr.load(Ordering::SeqCst);
        loop {
            let next = now_us.max(prev + 1);
            match self
                .last_ctr
                .compare_exchange(prev, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    /// Sends one typed call and waits for the reply it calls for; any other reply is
    /// [`AdminError::WrongReply`].
    pub async fn call<C: Call>(&self, call: C) -> Result<C::Reply, AdminError> {
        self.call_with_timeout(call, REQUEST_TIMEOUT).await
    }

    /// [`AdminClient::call`], waiting up to `timeout` for the answer (an op that may run
    /// longer than [`REQUEST_TIMEOUT`]).
    pub async fn call_with_timeout<C: Call>(
        &self,
        call: C,
        timeout: Duration,
    ) -> Result<C::Reply, AdminError> {
        let reply = self.request_with_timeout(call.into(), timeout).await?;
        C::reply(reply).map_err(|other| AdminError::WrongReply {
            op: C::OP,
            expected: C::REPLY,
            got: calls::reply_name(&other),
        })
    }

    /// Sends one request and waits for its response, whatever reply it is (prefer
    /// [`AdminClient::call`]).
    pub async fn request(&self, op: AdminOp) -> Result<AdminReply, AdminError> {
        self.request_with_timeout(op, REQUEST_TIMEOUT).await
    }

    pub async fn request_with_timeout(
        &self,
        op: AdminOp,
        timeout: Duration,
    ) -> Result<AdminReply, AdminError> {
        let name = op_name(&op);
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let req = AdminRequest {
            client: self.client_id.clone(),
            id,
            ctr: self.next_ctr(),
            at_ms: now_ms(),
            op,
        };
        let (tx, mut rx) = oneshot::channel();
        self.waiters.lock().expect("waiters").insert(
            id,
            Waiter {
                ctr: req.ctr,
                tx,
                unverified: None,
            },
        );
        let payload = self.secret.seal(Purpose::Admin, &req);
        let topic = self.topics.admin_request(&self.client_id);
        // A request published before the platform subscribed (it is starting, or reconnecting
        // after a broker restart) is gone: resend the same bytes until answered. The platform
        // answers a repeated counter with its cached response, so nothing runs twice.
        let deadline = tokio::time::Instant::now() + timeout;
        let resp = loop {
            if let Err(e) = self
                .client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
            {
                self.waiters.lock().expect("waiters").remove(&id);
                return Err(AdminError::Lost(e.to_string()));
            }
            let wait_until = (tokio::time::Instant::now() + RESEND_AFTER).min(deadline);
            match tokio::time::timeout_at(wait_until, &mut rx).await {
                Ok(Ok(resp)) => break resp,
                Ok(Err(_)) => return Err(AdminError::Lost("client closed".into())),
                Err(_) if tokio::time::Instant::now() < deadline => {
                    let unverified = {
                        let mut waiting = self.waiters.lock().expect("waiters");
                        let text = waiting.get_mut(&id).and_then(|w| w.unverified.take());
                        if text.is_some() {
                            waiting.remove(&id);
                        }
                        text
                    };
                    if let Some(text) = unverified {
                        return Err(plain_refusal(&name, text));
                    }
                    tracing::debug!(op = %name, id, "no response yet; resending the request");
                }
                Err(_) => {
                    self.waiters.lock().expect("waiters").remove(&id);
                    return Err(AdminError::Timeout {
                        op: name,
                        secs: timeout.as_secs(),
                    });
                }
            }
        };
        match (resp.ok, resp.error) {
            (_, Some(e)) => Err(refusal(&name, e, AdminError::Refused)),
            (Some(reply), None) => Ok(reply),
            (None, None) => Err(AdminError::UnexpectedReply {
                op: name,
                reply: "empty response".into(),
            }),
        }
    }

    /// Uploads a version file: hashes it, announces it, streams its parts (windowed on the
    /// broker's acks), commits, and resends whatever the platform reports missing.
    /// `progress(sent_bytes, total_bytes)` is called as parts are acknowledged by the broker.
    pub async fn upload(
        &self,
        path: &Path,
        kind: Kind,
        version: String,
        notes: Option<String>,
        chunk_size: u32,
        progress: impl Fn(u64, u64) + Send + Sync,
    ) -> Result<ArtifactInfo, AdminError> {
        let io = |source| AdminError::Io {
            path: path.to_owned(),
            source,
        };
        let (artifact, size) = std::fs::File::open(path)
            .and_then(ArtifactId::of_reader)
            .map_err(io)?;
        let layout = Layout::new(size, chunk_size).map_err(|e| AdminError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "artifact".into());
        let begin = calls::UploadBegin {
            kind,
            version,
            name,
            size,
            artifact,
            chunk_size,
            notes,
        };
        let parts = match self.call(begin).await? {
            UploadStart::Stored(artifact) => {
                progress(size, size);
                return Ok(artifact);
            }
            UploadStart::Ready { parts, part_size }
                if part_size == chunk_size && parts == layout.chunks =>
            {
                parts
            }
            UploadStart::Ready { parts, part_size } => {
                return Err(AdminError::UnexpectedReply {
                    op: "upload_begin".into(),
                    reply: format!(
                        "{parts} parts of {part_size} bytes, expected {} of {chunk_size}",
                        layout.chunks
                    ),
                })
            }
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut todo: Vec<(u32, u32)> = vec![(0, parts)];
        for _round in 0..5 {
            self.send_parts(&mut file, &layout, artifact, &todo, &progress)
                .await
                .map_err(|e| match e {
                    SendError::Io(e) => io(e),
                    SendError::Mqtt(e) => AdminError::Lost(e),
                })?;
            // Parts and the commit travel on different topics, so the commit can overtake the
            // last parts inside the broker: ask twice before resending anything.
            let mut reply = self.call(calls::UploadCommit { artifact }).await?;
            if matches!(reply, UploadEnd::Missing(_)) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                reply = self.call(calls::UploadCommit { artifact }).await?;
            }
            match reply {
                UploadEnd::Stored(artifact) => return Ok(artifact),
                UploadEnd::Missing(parts) => {
                    tracing::info!(
                        missing = parts.len(),
                        "platform is missing upload parts; resending"
                    );
                    todo = parts;
                }
            }
        }
        Err(AdminError::Refused(
            "upload still incomplete after 5 rounds".into(),
        ))
    }

    async fn send_parts(
        &self,
        file: &mut std::fs::File,
        layout: &Layout,
        artifact: ArtifactId,
        ranges: &[(u32, u32)],
        progress: &(impl Fn(u64, u64) + Send + Sync),
    ) -> Result<(), SendError> {
        let mut acks = self
            .acks
            .lock()
            .expect("acks")
            .take()
            .expect("one upload at a time");
        // Acks of earlier requests are not upload acks.
        while acks.try_recv().is_ok() {}
        let result = async {
            let topic = self.topics.admin_upload(&self.client_id);
            let total: u64 = ranges.iter().map(|(s, e)| (e - s) as u64).sum();
            let (mut sent, mut acked, mut bytes) = (0u64, 0u64, 0u64);
            let mut buf = vec![0u8; layout.chunk_size as usize];
            for index in ranges.iter().flat_map(|&(s, e)| s..e) {
                while sent - acked >= UPLOAD_WINDOW {
                    wait_ack(&mut acks).await?;
                    acked += 1;
                }
                let len = layout.chunk_len(index);
                file.seek(SeekFrom::Start(layout.offset(index)))
                    .map_err(SendError::Io)?;
                file.read_exact(&mut buf[..len]).map_err(SendError::Io)?;
                let header = FrameHeader {
                    frame_type: FrameType::UploadPart,
                    artifact,
                    index,
                    total: layout.chunks,
                };
                self.client
                    .publish(
                        topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        encode_upload_frame(&self.secret, &header, &buf[..len]),
                    )
                    .await
                    .map_err(|e| SendError::Mqtt(e.to_string()))?;
                sent += 1;
                bytes += len as u64;
                progress(bytes.min(layout.size), layout.size);
            }
            while acked < sent.min(total) {
                wait_ack(&mut acks).await?;
                acked += 1;
            }
            Ok(())
        }
        .await;
        *self.acks.lock().expect("acks") = Some(acks);
        result
    }

    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Hands a response to the request waiting for it. A sealed response must open with this
/// operator's secret for this client and answer the waiting request's counter; anything else
/// (forged, replayed, for another session) is dropped, and the request keeps waiting.
fn deliver(waiters: &Waiters, secret: &Secret, client_id: &str, payload: &[u8]) {
    let env: ResponseEnvelope = match serde_json::from_slice(payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "malformed admin response dropped");
            return;
        }
    };
    let mut waiting = waiters.lock().expect("waiters");
    let Some(waiter) = waiting.get_mut(&env.id) else {
        return;
    };
    let Some(sealed) = &env.sealed else {
        if let Some(text) = env.unverified_error {
            waiter.unverified.get_or_insert(text);
        }
        return;
    };
    match secret.open_box::<AdminResponse>(Purpose::AdminResponse, client_id, sealed) {
        Ok(resp) if resp.id == env.id && resp.ctr == waiter.ctr => {
            if let Some(w) = waiting.remove(&env.id) {
                let _ = w.tx.send(resp);
            }
        }
        Ok(_) => tracing::warn!(
            id = env.id,
            "sealed admin response to another request (replayed?) dropped"
        ),
        Err(e) => {
            tracing::warn!(id = env.id, error = %e, "admin response that does not open dropped")
        }
    }
}

enum SendError {
    Io(std::io::Error),
    Mqtt(String),
}

async fn wait_ack(acks: &mut mpsc::UnboundedReceiver<u16>) -> Result<(), SendError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, acks.recv()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(SendError::Mqtt("client closed".into())),
        Err(_) => Err(SendError::Mqtt(
            "broker stopped acknowledging upload parts".into(),
        )),
    }
}

/// The operator secret: `hex` when given (the `FLEETCAST_ADMIN_SECRET` variable), else the
/// contents of `file` (`fleetcast serve` writes it as `<data>/admin.secret`).
pub fn load_secret(hex: Option<&str>, file: &Path) -> Result<Secret, String> {
    let (text, source) = match hex {
        Some(h) => (h.to_owned(), "FLEETCAST_ADMIN_SECRET".to_owned()),
        None => (
            std::fs::read_to_string(file).map_err(|e| {
                format!(
                    "cannot read the admin secret {}: {e} (run `fleetcast serve` first, or pass --admin-secret-file / FLEETCAST_ADMIN_SECRET)",
                    file.display()
                )
            })?,
            file.display().to_string(),
        ),
    };
    text.parse()
        .map_err(|e| format!("admin secret from {source}: {e}"))
}

/// What to check, by how connecting failed (every failure used to suggest a wrong secret,
/// even a refused TCP connection or a TLS error).
fn connect_hint(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("bad user name or password")
        || r.contains("badusernamepassword")
        || r.contains("notauthorized")
        || r.contains("not authorized")
    {
        "wrong operator name or secret, or the operator was revoked?"
    } else if r.contains("connection refused (os error") || r.contains("connectionrefused") {
        "nothing listens there: is the platform running, and is this its broker address?"
    } else if r.contains("certificate") || r.contains("tls") || r.contains("unknownissuer") {
        "TLS: does --ca-file (or the profile's ca_file) hold the broker's CA, and does the URL name the host its certificate names?"
    } else if r.contains("dns")
        || r.contains("failed to lookup")
        || r.contains("name or service not known")
    {
        "is the host name in the broker URL right?"
    } else {
        "is the platform running there, and are the operator name and secret right?"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each way connecting fails gets its own hint (rumqttc's texts, as the CLI saw them).
    #[test]
    fn a_failed_connect_says_what_to_check() {
        let hint = |e: &str| connect_hint(e);
        assert!(hint("I/O: Connection refused (os error 111)").contains("nothing listens there"));
        assert!(hint("Connection refused, return code: `NotAuthorized`").contains("secret"));
        assert!(hint("Connection refused, return code: `BadUserNamePassword`").contains("secret"));
        assert!(hint("TLS: invalid peer certificate: UnknownIssuer").contains("--ca-file"));
        assert!(
            hint("I/O: failed to lookup address information: Name or service not known")
                .contains("host name")
        );
    }

    #[test]
    fn a_platform_that_cannot_read_the_operation_is_said_to_be_older() {
        // What a platform answers to an operation it does not know: its reader's error.
        let secret = Secret::from_bytes([1; 32]);
        let body = serde_json::json!({"client": "fleetcast-op-admin.1", "id": 1, "ctr": 2,
            "at_ms": 3, "op": "machine_groups_next", "machines": ["vm-1"]});
        let sealed = secret.seal(Purpose::Admin, &body);
        let e = secret
            .open::<AdminRequest>(Purpose::Admin, &sealed)
            .unwrap_err();
        let answer = format!("request refused: {e} (wrong operator secret?)");
        let err = plain_refusal("machine_groups_next", answer.clone());
        assert_eq!(
            err.to_string(),
            "the platform does not know machine_groups_next (it is older than this client); nothing was done"
        );
        // Any other plain refusal stays what it is.
        assert!(matches!(
            plain_refusal("machines", answer),
            AdminError::Unverified(_)
        ));
        assert!(matches!(
            plain_refusal("machine_groups", "request refused: bad MAC".into()),
            AdminError::Unverified(_)
        ));
        // A platform since 2026-11-29 answers the same sealed.
        let sealed_answer = format!("request refused: this platform cannot read it ({e}); ...");
        assert!(matches!(
            refusal("machine_groups_next", sealed_answer, AdminError::Refused),
            AdminError::UnknownOp { .. }
        ));
        assert!(matches!(
            refusal(
                "machines",
                "unknown release r-9".into(),
                AdminError::Refused
            ),
            AdminError::Refused(_)
        ));
    }
}
