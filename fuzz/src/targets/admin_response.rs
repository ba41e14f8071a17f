//! `AdminResponse` JSON, as the CLI reads it from its response topic.

use fleetcast_proto::admin::AdminResponse;

use crate::family::round_trip;
use crate::samples::{admin_responses, json};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    let parsed = serde_json::from_slice::<AdminResponse>(data);
    if let Ok(r) = &parsed {
        round_trip(r);
    }
    Verdict::from_ok(parsed.is_ok())
}

pub fn seeds() -> Vec<Vec<u8>> {
    admin_responses().iter().map(json).collect()
}
