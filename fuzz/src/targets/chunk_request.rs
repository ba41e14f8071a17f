//! `ChunkRequest` bodies: parsed directly and through `seal` + `open`, then `validate`d the way
//! the platform's chunk server does before it sends anything.

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::chunk::{
    ChunkRequest, MAX_CHUNKS_PER_REQUEST, MAX_MANIFEST_PARTS_PER_REQUEST,
};

use crate::family::sealed;
use crate::samples::{chunk_requests, json};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    sealed(Purpose::ChunkRequest, data, |r: &ChunkRequest| {
        for chunk_count in [1, 6, 1000, u32::MAX] {
            let parts = chunk_count.div_ceil(32);
            if r.validate(chunk_count, parts).is_ok() {
                // What passes validation is bounded work for the server.
                let mut n = 0u32;
                for i in r.indices() {
                    assert!(i < chunk_count, "index {i} of {chunk_count} chunks passed");
                    n += 1;
                    assert!(n <= MAX_CHUNKS_PER_REQUEST, "{r:?} passed with too many chunks");
                }
                let asked = r.manifest_indices(parts);
                assert!(asked.end <= parts, "{r:?}: parts {asked:?} of {parts}");
                if r.manifest_parts.is_some() {
                    assert!(
                        asked.len() as u32 <= MAX_MANIFEST_PARTS_PER_REQUEST,
                        "{r:?} passed with too many manifest parts"
                    );
                }
            }
        }
    })
}

pub fn seeds() -> Vec<Vec<u8>> {
    chunk_requests().iter().map(json).collect()
}
