//! What integrators exchange with the platform: `EventsRequest` (plain JSON from an integrator)
//! and `EventBatch` (signed by the platform), parsed directly and through sign + verify.

use fleetcast_proto::admin::FleetEvent;
use fleetcast_proto::auth::Purpose;
use fleetcast_proto::events::{EventBatch, EventsRequest, MAX_BATCH_EVENTS};

use crate::family::{round_trip, signed};
use crate::samples::{json, machine, release};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    let request = match serde_json::from_slice::<EventsRequest>(data) {
        Ok(r) => {
            let limit = r.effective_limit();
            assert!((1..=MAX_BATCH_EVENTS).contains(&limit));
            round_trip(&r);
            Verdict::Accepted
        }
        Err(_) => Verdict::Rejected,
    };
    let batch = signed(Purpose::EventBatch, data, |b: &EventBatch| round_trip(b));
    let event = signed(Purpose::Event, data, |e: &FleetEvent| round_trip(e));
    request.or(batch).or(event)
}

pub fn seeds() -> Vec<Vec<u8>> {
    let event = FleetEvent {
        id: 7,
        recorded_at_ms: 1_760_000_000_100,
        machine: machine(),
        release: Some(release()),
        kind: crate::samples::kind(),
        version: "2.4.1".into(),
        phase: fleetcast_proto::Phase::Installed,
        at_ms: 1_760_000_000_000,
        attempt: 1,
        progress: None,
        error: None,
        detail: None,
    };
    vec![
        json(&EventsRequest {
            since: 0,
            limit: None,
        }),
        json(&EventsRequest {
            since: 117,
            limit: Some(500),
        }),
        json(&event),
        json(&EventBatch {
            client: "fleetcast-int-erp".into(),
            since: 6,
            events: vec![event.clone()],
            next: 7,
            more: false,
        }),
    ]
}
