//! Integrator requests on `fleet/integrators/{client}/events/get`: stored events after the last
//! id the integrator saw, answered with a signed [`EventBatch`] on
//! `fleet/integrators/{client}/events`. The request is plain JSON (the broker lets only that
//! integrator publish there); the answer is signed, so its authenticity does not depend on the
//! broker. Requests are rate limited per integrator.

use std::collections::HashMap;
use std::time::Instant;

use fleetcast_proto::acl::integrator_of_client;
use fleetcast_proto::auth::Purpose;
use fleetcast_proto::events::{EventBatch, EventsRequest};
use rumqttc::QoS;

use crate::context::Ctx;
use crate::limits::TokenBucket;

/// Largest request accepted.
const MAX_REQUEST: usize = 4096;
/// Requests per second per integrator, and the burst.
const RATE: f64 = 5.0;
const BURST: f64 = 20.0;

/// Answers integrators; remembers each one's request budget.
#[derive(Default)]
pub struct Integrators {
    budgets: HashMap<String, TokenBucket>,
}

impl Integrators {
    /// Handles one request from `client` (a client id). Returns why it was refused, if it was.
    pub async fn request(&mut self, ctx: &Ctx, client: &str, payload: &[u8]) -> Result<(), String> {
        let name = integrator_of_client(client).ok_or("not an integrator client id")?;
        if ctx
            .store
            .integrator(name)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Err(format!("unknown integrator {name}"));
        }
        let now = Instant::now();
        if self.budgets.len() > 10_000 {
            self.budgets.retain(|_, b| !b.is_full(now));
        }
        let budget = self
            .budgets
            .entry(name.to_owned())
            .or_insert_with(|| TokenBucket::new(RATE, BURST, now));
        if !budget.take(1.0, now) {
            return Err("over the request rate".into());
        }
        if payload.len() > MAX_REQUEST {
            return Err(format!("request of {} bytes is too large", payload.len()));
        }
        let req: EventsRequest =
            serde_json::from_slice(payload).map_err(|e| format!("malformed request: {e}"))?;
        let (events, more) = ctx
            .store
            .events_since(req.since, req.effective_limit() as usize)
            .map_err(|e| e.to_string())?;
        let batch = EventBatch {
            client: client.to_owned(),
            since: req.since,
            next: events.last().map_or(req.since, |e| e.id),
            more,
            events,
        };
        let payload = ctx.keys().platform.sign(Purpose::EventBatch, &batch);
        ctx.mqtt
            .publish(
                ctx.topics.integrator_events(client),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .map_err(|e| format!("answer not sent: {e}"))
    }
}
