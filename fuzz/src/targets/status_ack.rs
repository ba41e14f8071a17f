//! `StatusAck` bodies: parsed directly and through `seal` + `open` (MAC'd with the machine's
//! secret).

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::StatusAck;

use crate::family::sealed;
use crate::samples::{json, status_acks};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    sealed(Purpose::StatusAck, data, |_: &StatusAck| {})
}

pub fn seeds() -> Vec<Vec<u8>> {
    status_acks().iter().map(json).collect()
}
