//! `KeyChain::parse` and `follow`, as machines and integrators read `fleet/platform/keys`.
//! Whatever the bytes, following from the test key may only end on a key that the test keys'
//! own chain announced (a fuzzer cannot forge a link), and never panics.

use fleetcast_proto::auth::{PlatformKey, Purpose};
use fleetcast_proto::keychain::{KeyAnnouncement, KeyChain};

use crate::family::platform_key;
use crate::Verdict;

/// The next generations after the test platform key.
fn next_keys() -> [PlatformKey; 2] {
    [
        PlatformKey::with_generation([0x51; 32], 1),
        PlatformKey::with_generation([0x52; 32], 2),
    ]
}

pub fn run(data: &[u8]) -> Verdict {
    let Ok(chain) = KeyChain::parse(data) else {
        return Verdict::Rejected;
    };
    let start = platform_key().public();
    let reachable = [start, next_keys()[0].public(), next_keys()[1].public()];
    match chain.follow(0, start) {
        Ok((generation, key)) => {
            assert!(generation <= 2, "followed to generation {generation}");
            assert_eq!(key, reachable[generation as usize]);
            Verdict::Accepted
        }
        Err(_) => Verdict::Rejected,
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let [k1, k2] = next_keys();
    let link = |signer: &PlatformKey, next: &PlatformKey| {
        signer.sign_envelope(
            Purpose::KeyRotation,
            &KeyAnnouncement {
                generation: next.generation(),
                key: next.public(),
                issued_at_ms: 1_760_000_000_000,
            },
        )
    };
    vec![
        KeyChain::default().to_bytes(),
        KeyChain {
            links: vec![link(platform_key(), &k1)],
        }
        .to_bytes(),
        KeyChain {
            links: vec![link(platform_key(), &k1), link(&k1, &k2)],
        }
        .to_bytes(),
    ]
}
