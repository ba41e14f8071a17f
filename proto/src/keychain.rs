//! Platform key rotation: a chain of announcements, each naming the next platform key and
//! signed by the key before it.
//!
//! A machine pins generation 0 (the key in its config). When the platform rotates, it appends
//! `KeyAnnouncement { generation: n, key }` signed by key `n - 1` and publishes the whole chain
//! retained on `fleet/platform/keys`. A machine walks the chain from the key it holds and ends
//! with the newest key it can reach by valid signatures; a link that does not verify stops the
//! walk, so a forged or truncated chain can never move a machine to a key the platform did not
//! announce. Everything signed carries the signer's generation as a hint (`gen`), so a machine
//! that sees a newer generation waits for the chain instead of rejecting the message.

use serde::{Deserialize, Serialize};

use crate::auth::{AuthError, PlatformPublicKey, Purpose, SignedEnvelope, MAX_JSON_MESSAGE};

/// Body of one link: the key of `generation`, announced under the key of `generation - 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAnnouncement {
    pub generation: u32,
    pub key: PlatformPublicKey,
    pub issued_at_ms: u64,
}

/// The retained chain, oldest link first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChain {
    pub links: Vec<SignedEnvelope>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("key chain of {len} bytes is over the limit")]
    TooLarge { len: usize },
    #[error("malformed key chain: {0}")]
    Malformed(serde_json::Error),
    #[error("link for generation {generation} does not verify under the previous key: {source}")]
    BadLink { generation: u32, source: AuthError },
    #[error("link {index} announces generation {got}, expected {expected}")]
    OutOfOrder {
        index: usize,
        got: u32,
        expected: u32,
    },
}

impl KeyChain {
    pub fn parse(bytes: &[u8]) -> Result<Self, ChainError> {
        if bytes.len() > MAX_JSON_MESSAGE {
            return Err(ChainError::TooLarge { len: bytes.len() });
        }
        serde_json::from_slice(bytes).map_err(ChainError::Malformed)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("chains serialize")
    }

    /// Walks the chain from `(generation, key)` and returns the newest key reached. Links at or
    /// below `generation` are skipped (already followed).
    pub fn follow(
        &self,
        generation: u32,
        key: PlatformPublicKey,
    ) -> Result<(u32, PlatformPublicKey), ChainError> {
        let (mut generation, mut key) = (generation, key);
        for (index, link) in self.links.iter().enumerate() {
            let hint = link.gen.saturating_add(1);
            if hint <= generation {
                continue;
            }
            let a: KeyAnnouncement =
                key.verify_envelope(Purpose::KeyRotation, link)
                    .map_err(|source| ChainError::BadLink {
                        generation: hint,
                        source,
                    })?;
            if a.generation != generation + 1 {
                return Err(ChainError::OutOfOrder {
                    index,
                    got: a.generation,
                    expected: generation + 1,
                });
            }
            generation = a.generation;
            key = a.key;
        }
        Ok((generation, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::PlatformKey;

    fn key(seed: u8, generation: u32) -> PlatformKey {
        PlatformKey::with_generation([seed; 32], generation)
    }

    fn link(signer: &PlatformKey, next: &PlatformKey) -> SignedEnvelope {
        signer.sign_envelope(
            Purpose::KeyRotation,
            &KeyAnnouncement {
                generation: next.generation(),
                key: next.public(),
                issued_at_ms: 1,
            },
        )
    }

    #[test]
    fn a_machine_follows_every_rotation_it_missed() {
        let (k0, k1, k2) = (key(1, 0), key(2, 1), key(3, 2));
        let chain = KeyChain {
            links: vec![link(&k0, &k1), link(&k1, &k2)],
        };
        let chain = KeyChain::parse(&chain.to_bytes()).unwrap();
        assert_eq!(chain.follow(0, k0.public()).unwrap(), (2, k2.public()));
        assert_eq!(chain.follow(1, k1.public()).unwrap(), (2, k2.public()));
        assert_eq!(chain.follow(2, k2.public()).unwrap(), (2, k2.public()));
        assert_eq!(
            KeyChain::default().follow(0, k0.public()).unwrap(),
            (0, k0.public())
        );
    }

    #[test]
    fn a_forged_link_moves_no_machine_to_the_forgers_key() {
        let (k0, k1, evil) = (key(1, 0), key(2, 1), key(9, 1));
        // Signed by the attacker's own key, claiming generation 0 signed it.
        let chain = KeyChain {
            links: vec![link(&evil, &key(9, 1))],
        };
        assert!(matches!(
            chain.follow(0, k0.public()),
            Err(ChainError::BadLink { .. })
        ));
        // A valid link followed by a forged one: the machine must not end on the forged key.
        let chain = KeyChain {
            links: vec![link(&k0, &k1), link(&evil, &key(9, 2))],
        };
        assert!(chain.follow(0, k0.public()).is_err());
        // A genuine link that skips a generation is refused.
        let chain = KeyChain {
            links: vec![link(&k0, &key(4, 2))],
        };
        assert!(matches!(
            chain.follow(0, k0.public()),
            Err(ChainError::OutOfOrder { .. })
        ));
        assert!(KeyChain::parse(b"[1,2]").is_err());
    }
}
