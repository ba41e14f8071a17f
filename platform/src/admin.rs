//! Operator requests on `fleet/admin/{client}/request` and upload parts on `.../upload`:
//! authenticated with the admin secret (MAC, freshness, per-client counter), answered on
//! `.../response`. One task handles them in order; commits hash off the async threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fleetcast_proto::acl::{operator_of_client, Role};
use fleetcast_proto::admin::{
    AdminOp, AdminReply, AdminRequest, AdminResponse, ArtifactInfo, AuditEntry, ResponseEnvelope,
    ADMIN_FRESHNESS_MS,
};
use fleetcast_proto::auth::{peek_body, Purpose, Secret};
use fleetcast_proto::calls::{self, Call, UploadEnd, UploadStart};
use fleetcast_proto::chunk::{open_upload_frame, Layout};
use fleetcast_proto::release::validate_version;
use fleetcast_proto::{ArtifactId, Kind};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::artifacts::Upload;
use crate::context::Ctx;
use crate::error::PlatformError;
use crate::integrators::Integrators;
use crate::now_ms;
use crate::ops::{artifacts, events, identities, inventory, keys, machines, releases, rollouts};
use crate::ops::{refused, OpError};
use crate::publish;
use crate::store::{OperatorRecord, StoreError};

/// What the serve connection forwards to the admin task.
#[derive(Debug)]
pub enum AdminInput {
    Request {
        client: String,
        payload: bytes::Bytes,
    },
    Upload {
        client: String,
        payload: bytes::Bytes,
    },
    /// An integrator asks for stored events.
    IntegratorEvents {
        client: String,
        payload: bytes::Bytes,
    },
    /// The serve connection (re)connected: re-publish desired notices and progress.
    Republish,
}

struct Staged {
    upload: Upload,
    kind: Kind,
    version: String,
    name: String,
    notes: Option<String>,
    client: String,
    /// First write error (e.g. disk full): reported at commit.
    failed: Option<String>,
    /// Last begin or part: an upload idle for [`UPLOAD_IDLE`] is abandoned.
    touched: Instant,
}

/// An upload with no part or request for this long was abandoned (the CLI died): its
/// staging file and state are dropped.
pub const UPLOAD_IDLE: Duration = Duration::from_secs(600);

/// What the platform remembers of one admin client: its last counter and the responses to its
/// recent changes, so a retried change (same counter) gets the same answer instead of running
/// twice. A retried recent read is run again, a bounded number of times.
#[derive(Default)]
struct ClientSeen {
    last_ctr: u64,
    last_at_ms: u64,
    responses: std::collections::VecDeque<(u64, AdminResponse)>,
    /// The counters of this client's recent reads and how often each ran again: a retry is
    /// answered, a replay cannot make the platform read over and over.
    reads: std::collections::VecDeque<(u64, u8)>,
}

/// Most parts one upload may have: the platform keeps a flag per part while it uploads, so this
/// bounds what one `upload_begin` can make it allocate (4 Mi parts: 256 GiB at 64 KiB chunks).
pub const MAX_UPLOAD_PARTS: u32 = 1 << 22;

/// Responses kept per client for retries.
const KEPT_RESPONSES: usize = 16;
/// How often one read (one counter) may run again.
const READ_RETRIES: u8 = 3;

struct Admin {
    ctx: Arc<Ctx>,
    ctrs: HashMap<String, ClientSeen>,
    uploads: HashMap<ArtifactId, Staged>,
}

/// Handles admin input until shutdown.
pub async fn run(
    ctx: Arc<Ctx>,
    mut input: mpsc::Receiver<AdminInput>,
    shutdown: CancellationToken,
) -> Result<(), PlatformError> {
    let mut admin = Admin {
        ctx,
        ctrs: HashMap::new(),
        uploads: HashMap::new(),
    };
    let mut integrators = Integrators::default();
    let mut sweep = tokio::time::interval(UPLOAD_IDLE / 10);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sweep.tick() => { admin.drop_abandoned_uploads(); continue }
            item = input.recv() => match item { Some(i) => i, None => break },
        };
        match item {
            AdminInput::Request { client, payload } => admin.request(&client, &payload).await,
            AdminInput::Upload { client, payload } => admin.part(&client, &payload).await,
            AdminInput::IntegratorEvents { client, payload } => {
                if let Err(why) = integrators.request(&admin.ctx, &client, &payload).await {
                    tracing::warn!(client, reason = %why, "integrator request refused");
                }
            }
            AdminInput::Republish => match publish::republish_all(&admin.ctx).await {
                Ok((notices, progress)) => {
                    tracing::info!(
                        notices,
                        progress,
                        "re-published desired notices and rollout progress"
                    )
                }
                Err(e) => tracing::warn!(error = %e, "re-publish after connect failed"),
            },
        }
    }
    for (_, s) in admin.uploads.drain() {
        admin.ctx.files.discard(s.upload);
    }
    Ok(())
}

impl Admin {
    /// Drops uploads idle for [`UPLOAD_IDLE`] with their staging files.
    fn drop_abandoned_uploads(&mut self) {
        let idle: Vec<ArtifactId> = self
            .uploads
            .iter()
            .filter(|(_, s)| s.touched.elapsed() >= UPLOAD_IDLE)
            .map(|(a, _)| *a)
            .collect();
        for artifact in idle {
            if let Some(s) = self.uploads.remove(&artifact) {
                tracing::warn!(artifact = %artifact.short(), client = %s.client, "abandoned upload dropped");
                self.ctx.files.discard(s.upload);
            }
        }
    }

    /// The operator a client id belongs to, if it exists.
    fn operator(&self, client: &str) -> Result<Option<OperatorRecord>, StoreError> {
        match operator_of_client(client) {
            Some(name) => self.ctx.store.operator(name),
            None => Ok(None),
        }
    }

    async fn request(&mut self, client: &str, payload: &[u8]) {
        let operator = match self.operator(client) {
            Ok(Some(op)) => op,
            Ok(None) => {
                tracing::warn!(client, "admin request refused: no such operator");
                self.refuse_unverified(client, payload, "no such operator (revoked?)")
                    .await;
                return;
            }
            Err(e) => {
                tracing::error!(client, error = %e, "operator lookup failed");
                return;
            }
        };
        let req: AdminRequest = match operator.secret.open(Purpose::Admin, payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(client, reason = %e, "admin request refused");
                self.refuse_unverified(
                    client,
                    payload,
                    &format!("request refused: {e} (wrong operator secret?)"),
                )
                .await;
                return;
            }
        };
        if req.client != client {
            tracing::warn!(client, claimed = %req.client, "admin request refused: client does not match its topic");
            return;
        }
        let now = now_ms();
        if now.abs_diff(req.at_ms) > ADMIN_FRESHNESS_MS {
            let text = format!(
                "request refused: its clock is {} s away from the platform's (limit {} s)",
                now.abs_diff(req.at_ms) / 1000,
                ADMIN_FRESHNESS_MS / 1000
            );
            tracing::warn!(client, "{text}");
            let response = AdminResponse::error(req.id, req.ctr, text);
            self.respond(client, &operator.secret, &response).await;
            return;
        }
        // Forget clients whose requests could no longer pass the freshness check anyway.
        self.ctrs
            .retain(|_, seen| now.abs_diff(seen.last_at_ms) <= 2 * ADMIN_FRESHNESS_MS);
        let seen = self.ctrs.entry(client.to_owned()).or_default();
        let change = req.op.is_change();
        if req.ctr <= seen.last_ctr {
            if let Some((_, cached)) = seen.responses.iter().find(|(c, _)| *c == req.ctr) {
                tracing::debug!(
                    client,
                    ctr = req.ctr,
                    "retried admin request: sending its response again"
                );
                let cached = cached.clone();
                self.respond(client, &operator.secret, &cached).await;
                return;
            }
            // A recent read seen before (retried, or replayed: its answer is sealed for the
            // operator, and reading twice changes nothing) is answered by reading again, at
            // most READ_RETRIES times.
            let rerun = seen
                .reads
                .iter_mut()
                .find(|(c, n)| *c == req.ctr && *n < READ_RETRIES);
            match rerun {
                Some((_, n)) if !change => *n += 1,
                _ => {
                    tracing::warn!(
                        client,
                        ctr = req.ctr,
                        last = seen.last_ctr,
                        "admin request refused: replayed counter"
                    );
                    return;
                }
            }
        } else {
            seen.last_ctr = req.ctr;
            if !change {
                seen.reads.push_back((req.ctr, 0));
                while seen.reads.len() > KEPT_RESPONSES {
                    seen.reads.pop_front();
                }
            }
        }
        seen.last_at_ms = now;
        let audited = req.op.is_change() || operator.role() < req.op.required_role();
        let audit_request = audited.then(|| serde_json::to_value(&req.op).unwrap_or_default());
        let action = req.op.name();
        let result = if operator.role() < req.op.required_role() {
            Err(OpError::Refused(format!(
                "operator {} has role {}; {} needs {}",
                operator.info.name,
                operator.role(),
                action,
                req.op.required_role()
            )))
        } else {
            self.handle(client, &operator, req.op).await
        };
        let response = match result {
            Ok(reply) => AdminResponse::ok(req.id, req.ctr, reply),
            Err(e) => {
                tracing::info!(client, error = %e, "admin request failed");
                AdminResponse::error(req.id, req.ctr, e.to_string())
            }
        };
        if let Some(request) = audit_request {
            let mut entry = AuditEntry {
                id: 0,
                at_ms: now,
                operator: operator.info.name.clone(),
                client: client.to_owned(),
                action: action.to_owned(),
                request,
                result: response.error.clone().unwrap_or_else(|| "ok".into()),
            };
            // The record of an action is durable before the operator hears of it.
            let stored = self.ctx.store.append_audit(&mut entry);
            let flushed = match stored {
                Ok(()) => self.ctx.store.flush_async().await,
                Err(e) => Err(e),
            };
            if let Err(e) = flushed {
                tracing::error!(client, action, error = %e, "audit entry not stored");
            }
        }
        // Only changes keep their response for a retry: a read is simply run again, and keeping
        // reads (a 1,000-machine `release_status` is about 300 KB) for every polling client for
        // ten minutes held hundreds of megabytes.
        if let Some(seen) = self.ctrs.get_mut(client).filter(|_| change) {
            seen.responses.push_back((req.ctr, response.clone()));
            while seen.responses.len() > KEPT_RESPONSES {
                seen.responses.pop_front();
            }
        }
        self.respond(client, &operator.secret, &response).await;
    }

    /// Answers a request the platform could not authenticate. It has no key to seal with, so
    /// the answer is plain and the CLI shows it as unverified; the id is read unauthenticated.
    async fn refuse_unverified(&self, client: &str, payload: &[u8], text: &str) {
        let Some(id) = peek_body::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("id").and_then(|v| v.as_u64()))
        else {
            return;
        };
        let env = ResponseEnvelope {
            id,
            sealed: None,
            unverified_error: Some(text.to_owned()),
        };
        self.send_response(client, &env).await;
    }

    async fn respond(&self, client: &str, secret: &Secret, response: &AdminResponse) {
        let env = ResponseEnvelope {
            id: response.id,
            sealed: Some(secret.seal_box(Purpose::AdminResponse, client, response)),
            unverified_error: None,
        };
        self.send_response(client, &env).await;
    }

    async fn send_response(&self, client: &str, env: &ResponseEnvelope) {
        let payload = serde_json::to_vec(env).expect("responses serialize");
        if let Err(e) = self
            .ctx
            .mqtt
            .publish(
                self.ctx.topics.admin_response(client),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
        {
            tracing::warn!(client, error = %e, "admin response not sent");
        }
    }

    async fn part(&mut self, client: &str, payload: &[u8]) {
        let secret = match self.operator(client) {
            Ok(Some(op)) if op.role() >= Role::Operator => op.secret,
            Ok(_) => {
                tracing::warn!(
                    client,
                    "upload frame from no operator allowed to upload dropped"
                );
                return;
            }
            Err(e) => {
                tracing::error!(client, error = %e, "operator lookup failed");
                return;
            }
        };
        let (header, bytes) = match open_upload_frame(&secret, payload) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(client, reason = %e, "upload frame dropped");
                return;
            }
        };
        let Some(staged) = self.uploads.get_mut(&header.artifact) else {
            tracing::debug!(client, artifact = %header.artifact.short(), "upload part for no upload in progress dropped");
            return;
        };
        if staged.client != client || staged.failed.is_some() {
            return;
        }
        staged.touched = Instant::now();
        // The write runs on the blocking pool; this loop waits for it (parts arrive in order
        // from one client, and the disk is the limit anyway).
        let written = match staged.upload.part(header.index, bytes.len()) {
            Ok(part) => {
                let bytes = bytes.to_vec();
                match tokio::task::spawn_blocking(move || part.write(&bytes).map(|()| part.index))
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(client, error = %e, "upload write task failed");
                        return;
                    }
                }
            }
            Err(e) => Err(e),
        };
        let Some(staged) = self.uploads.get_mut(&header.artifact) else {
            return;
        };
        match written {
            Ok(index) => staged.upload.mark_received(index),
            Err(e) => {
                tracing::warn!(client, artifact = %header.artifact.short(), error = %e, "upload part not stored");
                if matches!(e, crate::artifacts::ArtifactError::Io { .. }) {
                    staged.failed = Some(e.to_string());
                }
            }
        }
    }

    /// Runs one authenticated, authorized operation: a thin dispatch to [`crate::ops`], each
    /// function taking its typed call and returning its typed reply.
    async fn handle(
        &mut self,
        client: &str,
        operator: &OperatorRecord,
        op: AdminOp,
    ) -> Result<AdminReply, OpError> {
        use fleetcast_proto::calls::{self as c, AnyCall};
        // Its own handle on the context: the upload steps borrow `self` mutably.
        let ctx_handle = self.ctx.clone();
        let ctx = &*ctx_handle;
        let by = operator.info.name.as_str();
        match AnyCall::from(op) {
            AnyCall::UploadBegin(call) => self.upload_begin(client, call).map(c::UploadBegin::wrap),
            AnyCall::UploadCommit(call) => self
                .upload_commit(client, call)
                .await
                .map(c::UploadCommit::wrap),
            AnyCall::ArtifactList(call) => artifacts::list(ctx, call).map(c::ArtifactList::wrap),
            AnyCall::ReleaseCreate(call) => releases::create(ctx, call)
                .await
                .map(c::ReleaseCreate::wrap),
            AnyCall::ReleasePlan(call) => releases::plan(ctx, call).map(c::ReleasePlan::wrap),
            AnyCall::ReleasePublish(call) => releases::publish(ctx, call)
                .await
                .map(c::ReleasePublish::wrap),
            AnyCall::ReleaseRetry(call) => {
                releases::retry(ctx, call).await.map(c::ReleaseRetry::wrap)
            }
            AnyCall::ReleaseList(call) => releases::list(ctx, call).map(c::ReleaseList::wrap),
            AnyCall::ReleaseStatus(call) => releases::status(ctx, call).map(c::ReleaseStatus::wrap),
            AnyCall::Rollback(call) => releases::rollback(ctx, call).await.map(c::Rollback::wrap),
            AnyCall::Activate(call) => releases::activate(ctx, call).await.map(c::Activate::wrap),
            AnyCall::RolloutStatus(call) => rollouts::status(ctx, call).map(c::RolloutStatus::wrap),
            AnyCall::RolloutPause(call) => rollouts::pause(ctx, by, call)
                .await
                .map(c::RolloutPause::wrap),
            AnyCall::RolloutResume(call) => rollouts::resume(ctx, by, call)
                .await
                .map(c::RolloutResume::wrap),
            AnyCall::RolloutCancel(call) => rollouts::cancel(ctx, by, call)
                .await
                .map(c::RolloutCancel::wrap),
            AnyCall::Machines(call) => machines::list(ctx, call).map(c::Machines::wrap),
            AnyCall::MachineProvision(call) => machines::provision(ctx, call)
                .await
                .map(c::MachineProvision::wrap),
            AnyCall::MachineProvisionBatch(call) => machines::provision_batch(ctx, call)
                .await
                .map(c::MachineProvisionBatch::wrap),
            AnyCall::MachineRevoke(call) => machines::revoke(ctx, call)
                .await
                .map(c::MachineRevoke::wrap),
            AnyCall::OperatorAdd(call) => identities::operator_add(ctx, by, call)
                .await
                .map(c::OperatorAdd::wrap),
            AnyCall::OperatorList(call) => {
                identities::operator_list(ctx, call).map(c::OperatorList::wrap)
            }
            AnyCall::OperatorRevoke(call) => identities::operator_revoke(ctx, call)
                .await
                .map(c::OperatorRevoke::wrap),
            AnyCall::IntegratorAdd(call) => identities::integrator_add(ctx, by, call)
                .await
                .map(c::IntegratorAdd::wrap),
            AnyCall::EventsSince(call) => events::since(ctx, call).map(c::EventsSince::wrap),
            AnyCall::Audit(call) => events::audit(ctx, call).map(c::Audit::wrap),
            AnyCall::Stats(call) => events::stats(ctx, call).map(c::Stats::wrap),
            AnyCall::KeyRotate(call) => keys::rotate(ctx, call).await.map(c::KeyRotate::wrap),
            AnyCall::MosquittoConfig(call) => {
                keys::mosquitto_config(ctx, call).map(c::MosquittoConfig::wrap)
            }
            AnyCall::MachineQuery(call) => inventory::machine_query(ctx, call)
                .await
                .map(c::MachineQuery::wrap),
            AnyCall::Versions(call) => inventory::versions(ctx, call).await.map(c::Versions::wrap),
            AnyCall::History(call) => inventory::history(ctx, call).await.map(c::History::wrap),
        }
    }

    fn upload_begin(
        &mut self,
        client: &str,
        call: calls::UploadBegin,
    ) -> Result<UploadStart, OpError> {
        let calls::UploadBegin {
            kind,
            version,
            name,
            size,
            artifact,
            chunk_size,
            notes,
        } = call;
        validate_version(&version).map_err(OpError::Refused)?;
        if name.len() > 255 || notes.as_ref().is_some_and(|n| n.len() > 4096) {
            return refused("file name (255) or notes (4096 bytes) too long");
        }
        let store = &self.ctx.store;
        if let Some(existing) = store.artifact_for_version(&kind, &version)? {
            if existing.id == artifact && self.ctx.files.exists(&artifact) {
                return Ok(UploadStart::Stored(existing));
            }
            return refused(format!(
                "{kind} {version} is already uploaded with different bytes (artifact {}); versions are immutable: upload under a new version",
                existing.id.short()
            ));
        }
        if let Some(existing) = store.artifact(&artifact)? {
            return refused(format!(
                "these exact bytes are already uploaded as {} {} (artifact {}); an artifact id is its content hash, so it has one kind and version",
                existing.kind, existing.version, artifact.short()
            ));
        }
        let layout = Layout::new(size, chunk_size)
            .map_err(|e| OpError::Refused(format!("cannot upload: {e}")))?;
        if layout.chunks > MAX_UPLOAD_PARTS {
            return refused(format!(
                "cannot upload: {} parts of {chunk_size} bytes is more than {MAX_UPLOAD_PARTS}; use a larger chunk size",
                layout.chunks
            ));
        }
        if let Some(old) = self.uploads.remove(&artifact) {
            self.ctx.files.discard(old.upload);
        }
        let upload = self.ctx.files.begin_upload(artifact, size, chunk_size)?;
        self.uploads.insert(
            artifact,
            Staged {
                upload,
                kind,
                version,
                name,
                notes,
                client: client.to_owned(),
                failed: None,
                touched: Instant::now(),
            },
        );
        Ok(UploadStart::Ready {
            parts: layout.chunks,
            part_size: chunk_size,
        })
    }

    async fn upload_commit(
        &mut self,
        client: &str,
        call: calls::UploadCommit,
    ) -> Result<UploadEnd, OpError> {
        let artifact = call.artifact;
        let Some(mut staged) = self.uploads.remove(&artifact) else {
            if let Some(info) = self.ctx.store.artifact(&artifact)? {
                return Ok(UploadEnd::Stored(info));
            }
            return refused(format!(
                "no upload of artifact {} in progress (start with upload_begin)",
                artifact.short()
            ));
        };
        if staged.client != client {
            self.uploads.insert(artifact, staged);
            return refused("this upload belongs to another client");
        }
        if let Some(why) = staged.failed {
            self.ctx.files.discard(staged.upload);
            return refused(format!("upload failed and was discarded: {why}"));
        }
        let missing = staged.upload.missing();
        if !missing.is_empty() {
            staged.touched = Instant::now();
            self.uploads.insert(artifact, staged);
            return Ok(UploadEnd::Missing(missing));
        }
        let Staged {
            upload,
            kind,
            version,
            name,
            notes,
            ..
        } = staged;
        let layout = upload.layout;
        let files = self.ctx.files.clone();
        tokio::task::spawn_blocking(move || files.commit(upload))
            .await
            .map_err(|e| OpError::Refused(format!("commit task failed: {e}")))??;
        let info = ArtifactInfo {
            id: artifact,
            kind,
            version,
            name,
            size: layout.size,
            chunk_size: layout.chunk_size,
            notes,
            uploaded_at_ms: now_ms(),
        };
        self.ctx.store.put_artifact(&info)?;
        self.ctx.store.flush_async().await?;
        tracing::info!(artifact = %artifact.short(), kind = %info.kind, version = %info.version, size = info.size, "artifact stored");
        Ok(UploadEnd::Stored(info))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::chunk::{encode_upload_frame, FrameHeader, FrameType};

    struct Fixture {
        dir: tempfile::TempDir,
        /// Keeps the client's request queue open; never polled.
        _eventloop: rumqttc::EventLoop,
        admin: Admin,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (mqtt, eventloop) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 4096);
        let ctx = Arc::new(Ctx::for_tests(dir.path(), mqtt));
        Fixture {
            dir,
            _eventloop: eventloop,
            admin: Admin {
                ctx,
                ctrs: HashMap::new(),
                uploads: HashMap::new(),
            },
        }
    }

    /// Sends `op` as the bootstrap admin on client `fleetcast-op-admin.t` with counter `ctr`,
    /// through the whole request path (MAC, freshness, counter, role, audit, response).
    async fn send(admin: &mut Admin, ctr: u64, op: AdminOp) {
        let client = "fleetcast-op-admin.t";
        let req = AdminRequest {
            client: client.into(),
            id: ctr,
            ctr,
            at_ms: now_ms(),
            op,
        };
        let payload = operator(admin).secret.seal(Purpose::Admin, &req);
        admin.request(client, &payload).await;
    }

    #[tokio::test]
    async fn a_retried_change_is_answered_from_memory_and_a_retried_read_is_run_again_unkept() {
        let f = fixture();
        let mut admin = f.admin;
        let add = AdminOp::OperatorAdd {
            name: "ops".into(),
            role: fleetcast_proto::acl::Role::Operator,
        };
        send(&mut admin, 10, add.clone()).await;
        send(&mut admin, 10, add).await;
        let seen = &admin.ctrs["fleetcast-op-admin.t"];
        assert_eq!(seen.responses.len(), 1, "the change's response is kept");
        assert!(
            seen.responses[0].1.error.is_none(),
            "{:?}",
            seen.responses[0].1
        );
        assert_eq!(
            admin.ctx.store.operators().unwrap().len(),
            2,
            "a retried change does not run twice"
        );
        // Reads keep no response; a retried read runs again, at most READ_RETRIES times.
        for _ in 0..6 {
            send(&mut admin, 11, AdminOp::ReleaseList).await;
        }
        send(&mut admin, 12, AdminOp::Machines).await;
        let seen = &admin.ctrs["fleetcast-op-admin.t"];
        assert_eq!(seen.responses.len(), 1);
        assert_eq!(seen.last_ctr, 12);
        assert_eq!(
            seen.reads.iter().copied().collect::<Vec<_>>(),
            [(11, READ_RETRIES), (12, 0)]
        );
    }

    fn bytes(seed: u8) -> Vec<u8> {
        (0..2500u32).map(|i| (i as u8).wrapping_mul(seed)).collect()
    }

    /// The bootstrap admin, who runs every request in these tests.
    fn operator(admin: &Admin) -> OperatorRecord {
        admin.ctx.store.operator("admin").unwrap().unwrap()
    }

    async fn begin(admin: &mut Admin, client: &str, version: &str, data: &[u8]) -> ArtifactId {
        let artifact = ArtifactId::of(data);
        let reply = admin
            .handle(
                client,
                &operator(admin),
                AdminOp::UploadBegin {
                    kind: Kind::new("app").unwrap(),
                    version: version.into(),
                    name: "a.bin".into(),
                    size: data.len() as u64,
                    artifact,
                    chunk_size: 1024,
                    notes: None,
                },
            )
            .await
            .unwrap();
        assert!(
            matches!(reply, AdminReply::UploadReady { parts: 3, .. }),
            "{reply:?}"
        );
        artifact
    }

    async fn send_part(
        admin: &mut Admin,
        client: &str,
        artifact: ArtifactId,
        data: &[u8],
        index: u32,
    ) {
        let header = FrameHeader {
            frame_type: FrameType::UploadPart,
            artifact,
            index,
            total: 3,
        };
        let start = index as usize * 1024;
        let part = &data[start..data.len().min(start + 1024)];
        let secret = operator(admin).secret;
        admin
            .part(client, &encode_upload_frame(&secret, &header, part))
            .await;
    }

    async fn commit(
        admin: &mut Admin,
        client: &str,
        artifact: ArtifactId,
    ) -> Result<AdminReply, OpError> {
        let op = operator(admin);
        admin
            .handle(client, &op, AdminOp::UploadCommit { artifact })
            .await
    }

    fn staging_files(f: &Fixture) -> usize {
        std::fs::read_dir(f.dir.path().join("uploads"))
            .unwrap()
            .count()
    }

    #[tokio::test]
    async fn concurrent_uploads_of_different_artifacts_both_commit() {
        let mut f = fixture();
        let (one, two) = (bytes(3), bytes(5));
        let a = begin(&mut f.admin, "fleetcast-op-admin.a", "1.0", &one).await;
        let b = begin(&mut f.admin, "fleetcast-op-admin.b", "2.0", &two).await;
        for i in 0..3 {
            send_part(&mut f.admin, "fleetcast-op-admin.a", a, &one, i).await;
            send_part(&mut f.admin, "fleetcast-op-admin.b", b, &two, 2 - i).await;
        }
        // A part for no upload in progress changes nothing.
        send_part(
            &mut f.admin,
            "fleetcast-op-admin.a",
            ArtifactId::of(b"none"),
            &one,
            0,
        )
        .await;
        for (client, id) in [("fleetcast-op-admin.a", a), ("fleetcast-op-admin.b", b)] {
            let reply = commit(&mut f.admin, client, id).await.unwrap();
            assert!(matches!(reply, AdminReply::Artifact { .. }), "{reply:?}");
            assert!(f.admin.ctx.files.exists(&id));
        }
        assert_eq!(staging_files(&f), 0);
    }

    #[tokio::test]
    async fn an_abandoned_upload_is_dropped_with_its_staging_file() {
        let mut f = fixture();
        let data = bytes(7);
        let a = begin(&mut f.admin, "fleetcast-op-admin.a", "1.0", &data).await;
        send_part(&mut f.admin, "fleetcast-op-admin.a", a, &data, 0).await;
        assert_eq!(staging_files(&f), 1);
        f.admin.drop_abandoned_uploads();
        assert_eq!(f.admin.uploads.len(), 1, "an active upload is kept");
        // The client went away: nothing for longer than UPLOAD_IDLE (moved back, not waited).
        let idle_since = Instant::now()
            .checked_sub(UPLOAD_IDLE + Duration::from_secs(1))
            .unwrap();
        f.admin.uploads.get_mut(&a).unwrap().touched = idle_since;
        f.admin.drop_abandoned_uploads();
        assert!(f.admin.uploads.is_empty());
        assert_eq!(staging_files(&f), 0);
        let err = commit(&mut f.admin, "fleetcast-op-admin.a", a)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no upload of artifact"), "{err}");
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_upload_with_a_clear_error() {
        let mut f = fixture();
        let data = bytes(9);
        let artifact = ArtifactId::of(&data);
        // The staging file is /dev/full: every write fails with ENOSPC.
        let staging = f
            .dir
            .path()
            .join("uploads")
            .join(format!("{}.part", artifact.to_hex()));
        std::os::unix::fs::symlink("/dev/full", &staging).unwrap();
        begin(&mut f.admin, "fleetcast-op-admin.a", "1.0", &data).await;
        for i in 0..3 {
            send_part(&mut f.admin, "fleetcast-op-admin.a", artifact, &data, i).await;
        }
        let err = commit(&mut f.admin, "fleetcast-op-admin.a", artifact)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("upload failed") && text.contains("No space left on device"),
            "{text}"
        );
        assert!(f.admin.uploads.is_empty());
        assert!(!f.admin.ctx.files.exists(&artifact));
    }

    #[tokio::test]
    async fn an_upload_with_more_parts_than_the_platform_tracks_is_refused_before_allocating() {
        let mut f = fixture();
        let op = operator(&f.admin);
        let err = f
            .admin
            .handle(
                "fleetcast-op-admin.a",
                &op,
                AdminOp::UploadBegin {
                    kind: Kind::new("app").unwrap(),
                    version: "9.9".into(),
                    name: "huge.bin".into(),
                    size: (MAX_UPLOAD_PARTS as u64 + 1) * 1024,
                    artifact: ArtifactId::of(b"huge"),
                    chunk_size: 1024,
                    notes: None,
                },
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("larger chunk size"), "{err}");
        assert!(f.admin.uploads.is_empty());
        assert_eq!(staging_files(&f), 0);
    }
}
