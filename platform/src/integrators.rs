//! Integrator requests on `fleet/integrators/{client}/events/get`: stored events after the last
//! id the integrator saw, answered with a signed [`EventBatch`] on
//! `fleet/integrators/{client}/events`. The request is plain JSON (the broker lets only that
//! integrator publish there); the answer is signed, so its authenticity does not depend on the
//! broker. Requests are rate limited per integrator.
//!
//! An answer is at most [`MAX_JSON_MESSAGE`] (256 KiB) signed, the most a receiver accepts and
//! well within a packet, however large the events: a batch holds fewer events when they are
//! large (halved until it fits, down to one), and the integrator asks again from `next`. An event
//! too large on its own (its texts escaped once more inside the envelope) goes with its
//! `error` and `detail` cut, rather than stopping the integrator at it for ever.

use std::collections::HashMap;
use std::time::Instant;

use fleetcast_proto::acl::integrator_of_client;
use fleetcast_proto::admin::FleetEvent;
use fleetcast_proto::auth::{PlatformKey, Purpose, MAX_JSON_MESSAGE};
use fleetcast_proto::events::{EventBatch, EventsRequest};
use rumqttc::QoS;

use crate::admin::response_limit;
use crate::context::Ctx;
use crate::limits::TokenBucket;
use crate::ops::events::bounded_since;

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
        let (events, _, more) = bounded_since(
            |since, n| ctx.store.events_since(since, n),
            |e| e.id,
            req.since,
            req.effective_limit() as usize,
            MAX_JSON_MESSAGE,
        )
        .map_err(|e| e.to_string())?;
        let topic = ctx.topics.integrator_events(client);
        let limit = MAX_JSON_MESSAGE.min(response_limit(&topic));
        let payload = signed_batch(&ctx.keys().platform, client, req.since, events, more, limit)?;
        if ctx.sessions.reply(&topic, &payload) {
            return Ok(());
        }
        ctx.mqtt
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| format!("answer not sent: {e}"))
    }
}

/// Bytes an event's `error` or `detail` keeps when the event alone is too large to send.
const CUT_TEXT: usize = 4096;

/// `text` cut to [`CUT_TEXT`] bytes (on a character boundary), saying how much was cut.
fn cut(text: &mut Option<String>) {
    if let Some(t) = text.as_mut().filter(|t| t.len() > CUT_TEXT) {
        let end = (0..=CUT_TEXT)
            .rev()
            .find(|i| t.is_char_boundary(*i))
            .unwrap_or(0);
        let dropped = t.len() - end;
        t.truncate(end);
        t.push_str(&format!(
            " [{dropped} bytes cut: too large for an event batch]"
        ));
    }
}

/// The signed batch of `events` (read after `since`; `more`: whether others follow them), with
/// as many of them as fit `limit` bytes: halved until the envelope fits. A single event that
/// does not fit goes with its texts cut; an error if even that is too large.
pub fn signed_batch(
    key: &PlatformKey,
    client: &str,
    since: u64,
    mut events: Vec<FleetEvent>,
    mut more: bool,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let mut texts_cut = false;
    loop {
        let batch = EventBatch {
            client: client.to_owned(),
            since,
            next: events.last().map_or(since, |e| e.id),
            more,
            events,
        };
        let payload = key.sign(Purpose::EventBatch, &batch);
        if payload.len() <= limit {
            return Ok(payload);
        }
        events = batch.events;
        match events.as_mut_slice() {
            [one] if !texts_cut => {
                tracing::warn!(
                    client,
                    event = one.id,
                    bytes = payload.len(),
                    "event too large for a batch: sending it with its texts cut"
                );
                cut(&mut one.error);
                cut(&mut one.detail);
                texts_cut = true;
            }
            [] | [_] => {
                return Err(format!(
                    "a batch of {} event(s) is {} bytes signed, over the {limit}-byte limit",
                    events.len(),
                    payload.len()
                ))
            }
            _ => {
                events.truncate(events.len() / 2);
                more = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetcast_proto::{Kind, MachineId, Phase};

    use super::*;

    fn event(id: u64, error: String) -> FleetEvent {
        FleetEvent {
            id,
            recorded_at_ms: 1,
            machine: MachineId::new("vm-1").unwrap(),
            release: None,
            kind: Kind::new("app").unwrap(),
            version: "1.0".into(),
            phase: Phase::InstallFailed,
            at_ms: 1,
            attempt: 1,
            progress: None,
            error: Some(error),
            detail: None,
        }
    }

    fn open(key: &PlatformKey, payload: &[u8]) -> EventBatch {
        key.public().verify(Purpose::EventBatch, payload).unwrap()
    }

    #[test]
    fn a_batch_over_the_limit_is_halved_until_it_fits_and_then_says_more() {
        let key = PlatformKey::from_seed([7; 32]);
        // Quotes are escaped twice in a signed envelope: each takes 4 bytes.
        let events: Vec<FleetEvent> = (1..=8).map(|i| event(i, "\"".repeat(1000))).collect();
        let whole = signed_batch(&key, "int", 0, events.clone(), false, usize::MAX).unwrap();
        assert!(whole.len() > 8 * 4000, "{}", whole.len());
        let limit = whole.len() / 3;
        let payload = signed_batch(&key, "int", 0, events.clone(), false, limit).unwrap();
        assert!(payload.len() <= limit);
        let batch = open(&key, &payload);
        assert_eq!(batch.events, events[..2]);
        assert_eq!((batch.next, batch.more), (2, true));
        // A batch that fits is sent as read, `more` as the store said.
        let small = signed_batch(&key, "int", 0, events[..1].to_vec(), false, limit).unwrap();
        let batch = open(&key, &small);
        assert_eq!((batch.events.len(), batch.next, batch.more), (1, 1, false));
    }

    #[test]
    fn an_event_too_large_alone_goes_with_its_texts_cut_and_nothing_smaller_is_refused() {
        let key = PlatformKey::from_seed([7; 32]);
        let big = event(5, "é".repeat(20_000));
        let payload = signed_batch(&key, "int", 4, vec![big.clone()], false, 20_000).unwrap();
        assert!(payload.len() <= 20_000);
        let batch = open(&key, &payload);
        let error = batch.events[0].error.as_deref().unwrap();
        assert!(
            error.starts_with(&"é".repeat(2048)),
            "cut on a character boundary"
        );
        assert!(
            error.ends_with(" [35904 bytes cut: too large for an event batch]"),
            "{error}"
        );
        assert_eq!((batch.next, batch.more), (5, false));
        assert_eq!(batch.events[0].phase, big.phase);
        // A limit nothing fits: refused, nothing to send.
        let err = signed_batch(&key, "int", 4, vec![big], true, 100).unwrap_err();
        assert!(err.contains("over the 100-byte limit"), "{err}");
    }
}
