//! Raw envelopes as they arrive: every `verify` and `open` the platform and machines run, with
//! the fixed test keys. A fuzzer forges no signature, so past the seeds this covers the
//! envelope parser, the size limit and the hex decoding of signatures and MACs.

use fleetcast_proto::admin::AdminRequest;
use fleetcast_proto::auth::{peek_body, Purpose};
use fleetcast_proto::chunk::ChunkRequest;
use fleetcast_proto::command::Command;
use fleetcast_proto::status::{status_count, status_envelopes};
use fleetcast_proto::{MachineState, ReleaseNotice, StatusAck, StatusEvent};
use serde_json::Value;

use crate::family::{platform_key, platform_public, secret};
use crate::samples::{
    admin_requests, chunk_requests, commands, machine_states, notices, status_acks, status_events,
};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    let key = platform_public();
    let s = secret();
    let oks = [
        key.verify::<ReleaseNotice>(Purpose::Release, data).is_ok(),
        key.verify::<Command>(Purpose::Command, data).is_ok(),
        s.open::<StatusEvent>(Purpose::Status, data).is_ok(),
        s.open::<StatusAck>(Purpose::StatusAck, data).is_ok(),
        s.open::<MachineState>(Purpose::State, data).is_ok(),
        s.open::<ChunkRequest>(Purpose::ChunkRequest, data).is_ok(),
        s.open::<AdminRequest>(Purpose::Admin, data).is_ok(),
        // A batch of status events (protocol.md §6.1): the platform opens each envelope.
        status_envelopes(data).is_ok_and(|envs| {
            envs.iter()
                .all(|e| s.open_envelope::<StatusEvent>(Purpose::Status, e).is_ok())
        }),
    ];
    // What the gateway charges a status message, before anything is checked.
    let _ = status_count(data);
    // The platform peeks at a body (which machine?) before it looks up the secret.
    let _ = peek_body::<Value>(data);
    Verdict::from_ok(oks.contains(&true))
}

pub fn seeds() -> Vec<Vec<u8>> {
    let key = platform_key();
    let s = secret();
    let mut out = Vec::new();
    out.extend(notices().iter().map(|m| key.sign(Purpose::Release, m)));
    out.extend(commands().iter().map(|m| key.sign(Purpose::Command, m)));
    out.extend(status_acks().iter().map(|m| s.seal(Purpose::StatusAck, m)));
    out.extend(status_events().iter().map(|m| s.seal(Purpose::Status, m)));
    out.extend(machine_states().iter().map(|m| s.seal(Purpose::State, m)));
    out.extend(chunk_requests().iter().map(|m| s.seal(Purpose::ChunkRequest, m)));
    out.extend(admin_requests().iter().map(|m| s.seal(Purpose::Admin, m)));
    let batch: Vec<Vec<u8>> = status_events()
        .iter()
        .map(|m| s.seal(Purpose::Status, m))
        .collect();
    out.push([b"[".to_vec(), batch.join(&b","[..]), b"]".to_vec()].concat());
    out
}
