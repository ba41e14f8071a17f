//! `StatusAck` bodies: parsed directly and through `sign` + `verify`.

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::StatusAck;

use crate::family::signed;
use crate::samples::{json, status_acks};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    signed(Purpose::StatusAck, data, |_: &StatusAck| {})
}

pub fn seeds() -> Vec<Vec<u8>> {
    status_acks().iter().map(json).collect()
}
