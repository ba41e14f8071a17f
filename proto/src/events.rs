//! What integrators read: every persisted status event (signed, on `fleet/events`), rollout
//! progress (signed, retained), and batches of stored events on request, so an integrator that
//! was away catches up from the last event id it saw.

use serde::{Deserialize, Serialize};

use crate::admin::FleetEvent;

/// Most events one batch carries.
pub const MAX_BATCH_EVENTS: u32 = 500;

/// An integrator's request on `fleet/integrators/{client}/events/get` (plain JSON: the broker
/// lets only that integrator publish there, and the answer is signed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsRequest {
    /// Return events with an id above this (0: from the first).
    pub since: u64,
    /// At most this many (capped at [`MAX_BATCH_EVENTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The signed answer on `fleet/integrators/{client}/events` (purpose `EventBatch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    /// The client it answers: a batch replayed to another integrator is recognisable.
    pub client: String,
    pub since: u64,
    pub events: Vec<FleetEvent>,
    /// Ask again with `since = next` for more.
    pub next: u64,
    /// Whether more events were stored after `next` when this batch was made.
    pub more: bool,
}

impl EventsRequest {
    /// The number of events to return.
    pub fn effective_limit(&self) -> u32 {
        self.limit
            .unwrap_or(MAX_BATCH_EVENTS)
            .clamp(1, MAX_BATCH_EVENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_default_to_a_full_batch_and_are_capped() {
        let r: EventsRequest = serde_json::from_str(r#"{"since": 5}"#).unwrap();
        assert_eq!(r.effective_limit(), MAX_BATCH_EVENTS);
        let r = EventsRequest {
            since: 0,
            limit: Some(1_000_000),
        };
        assert_eq!(r.effective_limit(), MAX_BATCH_EVENTS);
        let r = EventsRequest {
            since: 0,
            limit: Some(0),
        };
        assert_eq!(r.effective_limit(), 1);
        assert!(serde_json::from_str::<EventsRequest>(r#"{"since": -1}"#).is_err());
    }
}
