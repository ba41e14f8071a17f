//! `MachineState` bodies: parsed directly and through `seal` + `open`.

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::MachineState;

use crate::family::sealed;
use crate::samples::{json, machine_states};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    sealed(Purpose::State, data, |_: &MachineState| {})
}

pub fn seeds() -> Vec<Vec<u8>> {
    machine_states().iter().map(json).collect()
}
