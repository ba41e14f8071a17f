//! The admin transport: operator requests on `fleet/admin/{client}/request` and upload parts
//! on `.../upload`, authenticated with the operator's secret (MAC, freshness, per-client
//! counter), checked against the operator's role, audited, dispatched to [`crate::ops`] (or
//! to the [`Uploads`] in progress) and answered, sealed, on `.../response`. One task handles
//! them in order; a retried change is answered from memory instead of running twice.
//! `release_remove` relies on that order ([`crate::ops::removal`]): no other change runs
//! between its assessment and its last delete.

use std::collections::HashMap;
use std::sync::Arc;

use fleetcast_broker::client::MAX_PACKET;
use fleetcast_proto::acl::{operator_of_client, Role};
use fleetcast_proto::admin::{
    AdminOp, AdminReply, AdminRequest, AdminResponse, AuditEntry, ResponseEnvelope,
    ADMIN_FRESHNESS_MS,
};
use fleetcast_proto::auth::{peek_body, AuthError, Purpose, Secret};
use fleetcast_proto::calls::Call;
use fleetcast_proto::chunk::open_upload_frame;
use fleetcast_proto::text::shown;
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::Ctx;
use crate::error::PlatformError;
use crate::integrators::Integrators;
use crate::now_ms;
use crate::ops::OpError;
use crate::ops::{
    artifacts, events, identities, inventory, keys, machines, releases, removal, rollouts,
};
use crate::publish;
use crate::store::{AdminCounter, OperatorRecord, StoreError};
use crate::unknown_fields::unknown_field;
use crate::uploads::{Uploads, UPLOAD_IDLE};

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

/// Responses kept per client for retries.
const KEPT_RESPONSES: usize = 16;
/// How often one read (one counter) may run again.
const READ_RETRIES: u8 = 3;

struct Admin {
    ctx: Arc<Ctx>,
    ctrs: HashMap<String, ClientSeen>,
    uploads: Uploads,
}

/// Handles admin input until shutdown.
pub async fn run(
    ctx: Arc<Ctx>,
    mut input: mpsc::Receiver<AdminInput>,
    shutdown: CancellationToken,
) -> Result<(), PlatformError> {
    let ctrs = remembered_counters(&ctx, now_ms());
    let mut admin = Admin {
        ctx,
        ctrs,
        uploads: Uploads::default(),
    };
    let mut integrators = Integrators::default();
    let mut sweep = tokio::time::interval(UPLOAD_IDLE / 10);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sweep.tick() => { admin.uploads.drop_abandoned(&admin.ctx.files); continue }
            item = input.recv() => match item { Some(i) => i, None => break },
        };
        match item {
            AdminInput::Request { client, payload } => admin.request(&client, &payload).await,
            AdminInput::Upload { client, payload } => admin.upload_part(&client, &payload).await,
            AdminInput::IntegratorEvents { client, payload } => {
                if let Err(why) = integrators.request(&admin.ctx, &client, &payload).await {
                    if let Some(quiet_before) = admin.ctx.should_log(&client) {
                        let (client, why) = (shown(&client), why.to_string());
                        let reason = shown(&why);
                        tracing::warn!(%client, %reason, quiet_before, "integrator request refused");
                    }
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
    admin.uploads.discard_all(&admin.ctx.files);
    Ok(())
}

/// How long a client's counter is kept after its last request: a request older than
/// [`ADMIN_FRESHNESS_MS`] fails the freshness check anyway, and clocks may differ by as much.
const COUNTER_KEPT_MS: u64 = 2 * ADMIN_FRESHNESS_MS;

/// The admin clients' counters kept from before a restart (the stored ones still within
/// [`COUNTER_KEPT_MS`]; older ones are removed), so a change replayed across a restart is
/// refused as it would have been before. A store that cannot be read leaves the platform
/// without them, said in the log: replay protection then starts from the restart, as it did
/// before counters were stored.
fn remembered_counters(ctx: &Ctx, now: u64) -> HashMap<String, ClientSeen> {
    let stored = match ctx.store.admin_counters() {
        Ok(stored) => stored,
        Err(e) => {
            tracing::error!(error = %e, "admin counters not read: changes made before the restart could be replayed for the next {} minutes", COUNTER_KEPT_MS / 60_000);
            return HashMap::new();
        }
    };
    let mut ctrs = HashMap::new();
    for counter in stored {
        if now.abs_diff(counter.at_ms) > COUNTER_KEPT_MS {
            if let Err(e) = ctx.store.remove_admin_counter(&counter.client) {
                tracing::warn!(error = %e, "stale admin counter not removed");
            }
            continue;
        }
        let seen = ClientSeen {
            last_ctr: counter.ctr,
            last_at_ms: counter.at_ms,
            ..ClientSeen::default()
        };
        ctrs.insert(counter.client, seen);
    }
    ctrs
}

/// Room left in a packet for its MQTT header (fixed header, topic length, packet id) and
/// then some: rumqttc refuses to send a larger packet by closing the whole connection.
const PACKET_HEADROOM: usize = 1024;

/// The largest response payload that fits one packet on `topic`.
pub(crate) fn response_limit(topic: &str) -> usize {
    MAX_PACKET.saturating_sub(PACKET_HEADROOM + topic.len())
}

/// The response sealed for `client`, in its envelope: the bytes published.
fn sealed_response(client: &str, secret: &Secret, response: &AdminResponse) -> Vec<u8> {
    let env = ResponseEnvelope {
        id: response.id,
        sealed: Some(secret.seal_box(Purpose::AdminResponse, client, response)),
        unverified_error: None,
    };
    serde_json::to_vec(&env).expect("responses serialize")
}

/// A field of the request in `payload` (its MAC verified, `req` read from it) that this
/// platform does not know and whose value is not an absent one ([`unknown_field`]).
fn unknown_field_of(payload: &[u8], req: &AdminRequest) -> Option<String> {
    let sent = peek_body::<serde_json::Value>(payload).ok()?;
    unknown_field(&sent, &serde_json::to_value(req).ok()?)
}

/// What the operator hears instead of a reply of `bytes` that does not fit a packet.
fn too_large(op: &str, change: bool, bytes: usize) -> String {
    let limit = format!("{} MiB", MAX_PACKET >> 20);
    if change {
        format!(
            "{op} was done, but its reply of {bytes} bytes is over the {limit} packet limit and was not sent; read the result with a paged call"
        )
    } else {
        format!(
            "reply of {bytes} bytes to {op} is over the {limit} packet limit; ask for pages (`--limit`/`after`)"
        )
    }
}

/// The `id`, `ctr` and `op` of a request's body, read without knowing its op.
fn id_ctr_op(payload: &[u8]) -> Option<(u64, u64, String)> {
    let body = peek_body::<serde_json::Value>(payload).ok()?;
    let op = body
        .get("op")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned();
    Some((body.get("id")?.as_u64()?, body.get("ctr")?.as_u64()?, op))
}

impl Admin {
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
                if let Some(quiet_before) = self.ctx.should_log(client) {
                    let client = shown(client);
                    tracing::warn!(%client, quiet_before, "admin request refused: no such operator");
                }
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
            // Authentic (its MAC verified), but not a request this platform reads: an op or a
            // value of a newer CLI, most likely. Answered sealed, so the CLI takes the answer
            // at once (it holds an unverified one until its first resend, as anyone could have
            // sent it), and nothing runs.
            Err(AuthError::Body(e)) if let Some((id, ctr, op)) = id_ctr_op(payload) => {
                let text = format!(
                    "request refused: this platform cannot read it ({e}); is it older than the \
                     CLI? Nothing was done"
                );
                if let Some(quiet_before) = self.ctx.should_log(client) {
                    let (client, op) = (shown(client), shown(&op));
                    tracing::info!(%client, %op, quiet_before, "admin request this platform cannot read refused");
                }
                let response = AdminResponse::error(id, ctr, text);
                self.respond(
                    client,
                    &operator.secret,
                    &response,
                    "unreadable request",
                    false,
                )
                .await;
                return;
            }
            Err(e) => {
                if let Some(quiet_before) = self.ctx.should_log(client) {
                    let reason = e.to_string();
                    let (client, reason) = (shown(client), shown(&reason));
                    tracing::warn!(%client, %reason, quiet_before, "admin request refused");
                }
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
            if let Some(quiet_before) = self.ctx.should_log(client) {
                let (client, claimed) = (shown(client), shown(&req.client));
                tracing::warn!(%client, %claimed, quiet_before, "admin request refused: client does not match its topic");
            }
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
            self.respond(client, &operator.secret, &response, req.op.name(), false)
                .await;
            return;
        }
        // Forget clients whose requests could no longer pass the freshness check anyway.
        let store = &self.ctx.store;
        self.ctrs.retain(|client, seen| {
            let keep = now.abs_diff(seen.last_at_ms) <= COUNTER_KEPT_MS;
            if !keep {
                if let Err(e) = store.remove_admin_counter(client) {
                    tracing::warn!(client, error = %e, "stale admin counter not removed");
                }
            }
            keep
        });
        let seen = self.ctrs.entry(client.to_owned()).or_default();
        let change = req.op.is_change();
        // A read run again for a retry is in the audit log once already (if it is audited).
        let mut read_again = false;
        if req.ctr <= seen.last_ctr {
            if let Some((_, cached)) = seen.responses.iter().find(|(c, _)| *c == req.ctr) {
                tracing::debug!(
                    client,
                    ctr = req.ctr,
                    "retried admin request: sending its response again"
                );
                let cached = cached.clone();
                self.respond(client, &operator.secret, &cached, req.op.name(), change)
                    .await;
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
                Some((_, n)) if !change => {
                    *n += 1;
                    read_again = true;
                }
                // A change under a read's counter is refused like any reused counter.
                _ => {
                    tracing::warn!(
                        client,
                        ctr = req.ctr,
                        last = seen.last_ctr,
                        "admin request refused: replayed counter"
                    );
                    // Sealed for the operator: only its own client can read it. The CLI
                    // resending a change across a restart of the platform gets here.
                    let text = format!(
                        "request refused: its counter {} is not above {}, the last this client used; \
                         if it was a change, it ran or was refused once already (`fleetcast audit` \
                         shows which)",
                        req.ctr, seen.last_ctr
                    );
                    let response = AdminResponse::error(req.id, req.ctr, text);
                    self.respond(client, &operator.secret, &response, req.op.name(), false)
                        .await;
                    return;
                }
            }
        } else {
            if change && operator.role() >= req.op.required_role() {
                // Stored before the change runs, and made durable by the flush of its audit
                // entry (every change is audited) before its response goes out: after a
                // restart, the same request is still a replay. (A change refused for its role
                // runs nothing, so a viewer cycling client ids stores no counters.)
                let counter = AdminCounter {
                    client: client.to_owned(),
                    ctr: req.ctr,
                    at_ms: now,
                };
                if let Err(e) = self.ctx.store.put_admin_counter(&counter) {
                    tracing::error!(client, error = %e, "admin counter not stored; change refused");
                    let text =
                        format!("request refused: the platform could not store its counter: {e}");
                    let response = AdminResponse::error(req.id, req.ctr, text);
                    self.respond(client, &operator.secret, &response, req.op.name(), false)
                        .await;
                    return;
                }
            }
            seen.last_ctr = req.ctr;
            if !change {
                seen.reads.push_back((req.ctr, 0));
                while seen.reads.len() > KEPT_RESPONSES {
                    seen.reads.pop_front();
                }
            }
        }
        seen.last_at_ms = now;
        let audited =
            !read_again && (req.op.is_audited() || operator.role() < req.op.required_role());
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
        } else if let Some(field) = unknown_field_of(payload, &req) {
            Err(OpError::Refused(format!(
                "unknown field {field:?} in {action}: this platform does not know it (is it \
                 older than the CLI?); nothing was done"
            )))
        } else {
            self.handle(client, &operator, req.op).await
        };
        let response = match result {
            Ok(reply) => AdminResponse::ok(req.id, req.ctr, reply),
            Err(e) => {
                // A refusal is the operator's answer (unknown id, a rule), not the platform
                // failing: a refused change at info (the audit log has it too), a refused read
                // at debug (the CLI asks one expecting a refusal before every publish without
                // waves, which logged a line each time).
                if matches!(e, OpError::Refused(_)) {
                    if audit_request.is_some() {
                        tracing::info!(client, reason = %e, "admin request refused");
                    } else {
                        tracing::debug!(client, reason = %e, "admin read refused");
                    }
                } else {
                    tracing::warn!(client, error = %e, "admin request failed");
                }
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
        self.respond(client, &operator.secret, &response, action, change)
            .await;
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
        let payload = serde_json::to_vec(&env).expect("responses serialize");
        let topic = self.ctx.topics.admin_response(client);
        self.send_response(client, topic, payload).await;
    }

    /// Seals `response` for the operator and sends it; a response too large for one packet is
    /// replaced by an error saying so (`op` names the request, `change` whether it ran one).
    async fn respond(
        &self,
        client: &str,
        secret: &Secret,
        response: &AdminResponse,
        op: &str,
        change: bool,
    ) {
        let topic = self.ctx.topics.admin_response(client);
        let limit = response_limit(&topic);
        let mut payload = sealed_response(client, secret, response);
        if payload.len() > limit {
            let text = too_large(op, change, payload.len());
            tracing::warn!(client, op, bytes = payload.len(), limit, "{text}");
            let refusal = AdminResponse::error(response.id, response.ctr, text);
            payload = sealed_response(client, secret, &refusal);
        }
        self.send_response(client, topic, payload).await;
    }

    async fn send_response(&self, client: &str, topic: String, payload: Vec<u8>) {
        if self.ctx.sessions.reply(&topic, &payload) {
            return;
        }
        if let Err(e) = self
            .ctx
            .mqtt
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            tracing::warn!(client, error = %e, "admin response not sent");
        }
    }

    async fn upload_part(&mut self, client: &str, payload: &[u8]) {
        let secret = match self.operator(client) {
            Ok(Some(op)) if op.role() >= Role::Operator => op.secret,
            Ok(_) => {
                if let Some(quiet_before) = self.ctx.should_log(client) {
                    let client = shown(client);
                    tracing::warn!(%client, quiet_before, "upload frame from no operator allowed to upload dropped");
                }
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
                if let Some(quiet_before) = self.ctx.should_log(client) {
                    let reason = e.to_string();
                    let (client, reason) = (shown(client), shown(&reason));
                    tracing::warn!(%client, %reason, quiet_before, "upload frame dropped");
                }
                return;
            }
        };
        self.uploads.part(client, &header, bytes).await;
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
        let ctx = &*self.ctx;
        let by = operator.info.name.as_str();
        match AnyCall::from(op) {
            AnyCall::UploadBegin(call) => self
                .uploads
                .begin(ctx, client, call)
                .map(c::UploadBegin::wrap),
            AnyCall::UploadCommit(call) => self
                .uploads
                .commit(ctx, client, call)
                .await
                .map(c::UploadCommit::wrap),
            AnyCall::ArtifactList(call) => artifacts::list(ctx, call).map(c::ArtifactList::wrap),
            AnyCall::ArtifactRemove(call) => artifacts::remove(ctx, call)
                .await
                .map(c::ArtifactRemove::wrap),
            AnyCall::ReleaseCreate(call) => releases::create(ctx, call)
                .await
                .map(c::ReleaseCreate::wrap),
            AnyCall::ReleasePlan(call) => releases::plan(ctx, call).await.map(c::ReleasePlan::wrap),
            AnyCall::ReleasePublish(call) => releases::publish(ctx, call)
                .await
                .map(c::ReleasePublish::wrap),
            AnyCall::ReleaseRetry(call) => {
                releases::retry(ctx, call).await.map(c::ReleaseRetry::wrap)
            }
            AnyCall::ReleaseList(call) => releases::list(ctx, call).map(c::ReleaseList::wrap),
            AnyCall::ReleaseQuery(call) => releases::query(ctx, call).map(c::ReleaseQuery::wrap),
            AnyCall::DbCompact(call) => events::compact(ctx, call).await.map(c::DbCompact::wrap),
            AnyCall::DbBackup(call) => events::backup(ctx, call).await.map(c::DbBackup::wrap),
            AnyCall::ReleaseRemove(call) => {
                removal::remove(ctx, call).await.map(c::ReleaseRemove::wrap)
            }
            AnyCall::ReleaseStatus(call) => releases::status(ctx, call)
                .await
                .map(c::ReleaseStatus::wrap),
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
            AnyCall::MachineProvisionCheck(call) => {
                machines::provision_check(ctx, call).map(c::MachineProvisionCheck::wrap)
            }
            AnyCall::MachineGroups(call) => machines::groups(ctx, call)
                .await
                .map(c::MachineGroups::wrap),
            AnyCall::MachineGroupsBatch(call) => machines::groups_batch(ctx, call)
                .await
                .map(c::MachineGroupsBatch::wrap),
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
            AnyCall::IntegratorList(call) => {
                identities::integrator_list(ctx, call).map(c::IntegratorList::wrap)
            }
            AnyCall::IntegratorRevoke(call) => identities::integrator_revoke(ctx, call)
                .await
                .map(c::IntegratorRevoke::wrap),
            AnyCall::EventsSince(call) => events::since(ctx, call).map(c::EventsSince::wrap),
            AnyCall::Audit(call) => events::audit(ctx, call).map(c::Audit::wrap),
            AnyCall::Stats(call) => events::stats(ctx, call).await.map(c::Stats::wrap),
            AnyCall::KeyRotate(call) => keys::rotate(ctx, call).await.map(c::KeyRotate::wrap),
            AnyCall::MosquittoConfig(call) => keys::mosquitto_config(ctx, call)
                .await
                .map(c::MosquittoConfig::wrap),
            AnyCall::MachineQuery(call) => inventory::machine_query(ctx, call)
                .await
                .map(c::MachineQuery::wrap),
            AnyCall::Versions(call) => inventory::versions(ctx, call).await.map(c::Versions::wrap),
            AnyCall::History(call) => inventory::history(ctx, call).await.map(c::History::wrap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        /// Keeps the client's request queue open; never polled.
        _eventloop: rumqttc::EventLoop,
        admin: Admin,
    }

    fn fixture() -> Fixture {
        let (dir, eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        Fixture {
            _dir: dir,
            _eventloop: eventloop,
            admin: Admin {
                ctx,
                ctrs: HashMap::new(),
                uploads: Uploads::default(),
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

    #[tokio::test]
    async fn an_export_retried_is_read_again_but_audited_once() {
        let f = fixture();
        let mut admin = f.admin;
        let export = AdminOp::MosquittoConfig {
            after: None,
            limit: Some(10),
        };
        for _ in 0..3 {
            send(&mut admin, 20, export.clone()).await;
        }
        let seen = &admin.ctrs["fleetcast-op-admin.t"];
        assert!(seen.responses.is_empty(), "an export is not kept");
        assert_eq!(seen.reads.iter().copied().collect::<Vec<_>>(), [(20, 2)]);
        let (entries, _) = admin.ctx.store.audit_since(0, 100).unwrap();
        let exports: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(exports, ["mosquitto_config"]);
        // Its next pages are not audited; the next export is.
        let next = AdminOp::MosquittoConfig {
            after: Some(fleetcast_proto::MachineId::new("vm-1").unwrap()),
            limit: Some(10),
        };
        send(&mut admin, 21, next).await;
        send(&mut admin, 22, export).await;
        let (entries, _) = admin.ctx.store.audit_since(0, 100).unwrap();
        assert_eq!(entries.len(), 2);
    }

    #[tokio::test]
    async fn changes_store_their_counter_and_a_restart_keeps_only_the_fresh_ones() {
        let f = fixture();
        let mut admin = f.admin;
        send(&mut admin, 30, AdminOp::ReleaseList).await;
        assert_eq!(
            admin.ctx.store.admin_counters().unwrap(),
            [],
            "reads store none"
        );
        let add = AdminOp::OperatorAdd {
            name: "ops".into(),
            role: fleetcast_proto::acl::Role::Operator,
        };
        send(&mut admin, 31, add).await;
        let stored = admin.ctx.store.admin_counters().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            (stored[0].client.as_str(), stored[0].ctr),
            ("fleetcast-op-admin.t", 31)
        );
        // A change refused for its role runs nothing and stores no counter.
        let viewer = OperatorRecord {
            info: fleetcast_proto::admin::OperatorInfo {
                name: "eve".into(),
                role: Role::Viewer,
                created_at_ms: 0,
                created_by: "admin".into(),
            },
            secret: Secret::from_bytes([5; 32]),
        };
        admin
            .ctx
            .store
            .transaction(|rec| rec.put_operator(&viewer))
            .unwrap();
        let refused = AdminRequest {
            client: "fleetcast-op-eve.1".into(),
            id: 1,
            ctr: 1,
            at_ms: now_ms(),
            op: AdminOp::OperatorRevoke { name: "ops".into() },
        };
        let payload = viewer.secret.seal(Purpose::Admin, &refused);
        admin.request("fleetcast-op-eve.1", &payload).await;
        assert_eq!(admin.ctx.store.operators().unwrap().len(), 3, "nothing ran");
        assert_eq!(admin.ctx.store.admin_counters().unwrap().len(), 1);
        let old = AdminCounter {
            client: "fleetcast-op-admin.old".into(),
            ctr: 5,
            at_ms: stored[0].at_ms - COUNTER_KEPT_MS - 1,
        };
        admin.ctx.store.put_admin_counter(&old).unwrap();
        let now = stored[0].at_ms + 1;
        let kept = remembered_counters(&admin.ctx, now);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["fleetcast-op-admin.t"]);
        assert_eq!(kept["fleetcast-op-admin.t"].last_ctr, 31);
        assert_eq!(
            admin.ctx.store.admin_counters().unwrap(),
            stored,
            "the stale counter is removed from the store"
        );
    }

    /// A change whose body carries a field this platform does not know is refused, runs
    /// nothing, and is audited with the refusal; the same field left at an absent value is
    /// harmless. (Parsed alone, the field was dropped and the change ran.)
    #[tokio::test]
    async fn a_change_with_a_field_this_platform_does_not_know_runs_nothing() {
        let f = fixture();
        let mut admin = f.admin;
        let client = "fleetcast-op-admin.t";
        let add = |ctr: u64, expires: serde_json::Value| {
            serde_json::json!({
                "client": client, "id": ctr, "ctr": ctr, "at_ms": now_ms(),
                "op": "operator_add", "name": "ops", "role": "viewer", "expires_in_days": expires,
            })
        };
        let payload = operator(&admin)
            .secret
            .seal(Purpose::Admin, &add(40, 30.into()));
        admin.request(client, &payload).await;
        let answer = &admin.ctrs[client].responses[0].1;
        assert_eq!(
            answer.error.as_deref(),
            Some(
                "unknown field \"expires_in_days\" in operator_add: this platform does not know it \
                 (is it older than the CLI?); nothing was done"
            ),
            "{answer:?}"
        );
        assert_eq!(admin.ctx.store.operators().unwrap().len(), 1, "nothing ran");
        let (entries, _) = admin.ctx.store.audit_since(0, 100).unwrap();
        assert_eq!(entries.len(), 1);
        assert!(
            entries[0].result.starts_with("unknown field"),
            "{entries:?}"
        );

        let payload = operator(&admin)
            .secret
            .seal(Purpose::Admin, &add(41, 0.into()));
        admin.request(client, &payload).await;
        let answer = &admin.ctrs[client].responses[1].1;
        assert!(answer.error.is_none(), "{answer:?}");
        assert_eq!(admin.ctx.store.operators().unwrap().len(), 2);
    }

    /// The bootstrap admin, who runs every request in these tests.
    fn operator(admin: &Admin) -> OperatorRecord {
        admin.ctx.store.operator("admin").unwrap().unwrap()
    }
}
