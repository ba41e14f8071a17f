//! `StatusEvent` bodies: parsed directly and through `seal` + `open`.

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::{Phase, StatusEvent};

use crate::family::sealed;
use crate::samples::{json, status_events};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    sealed(Purpose::Status, data, |e: &StatusEvent| {
        assert_eq!(e.phase.as_str().parse::<Phase>(), Ok(e.phase));
        let _ = (e.phase.is_final(), e.phase.is_failure());
    })
}

pub fn seeds() -> Vec<Vec<u8>> {
    status_events().iter().map(json).collect()
}
