//! Which platform key the machine trusts: the key in its config, advanced along the platform's
//! retained key chain (rotation). Pure: no I/O. The agent persists a newer key before it uses it.
//!
//! Every signed envelope names the generation of the key that signed it (`gen`, a hint the
//! signature does not cover). Against the trusted generation `t`:
//! - `gen == t`: the signature is checked with the trusted key.
//! - `gen > t`: the machine has not followed the chain that far yet. The message is neither
//!   accepted nor rejected (and nothing about it is remembered): the chain is retained and the
//!   platform re-sends its desired notice to a machine whose state is behind.
//! - `gen < t`: signed by a key the platform has rotated away from (perhaps because it leaked):
//!   refused like a bad signature.

use fleetcast_proto::auth::{
    AuthError, PlatformPublicKey, Purpose, SignedEnvelope, MAX_JSON_MESSAGE,
};
use fleetcast_proto::keychain::{ChainError, KeyChain};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A platform public key and its generation in the key chain (0 = the first key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKey {
    pub generation: u32,
    pub key: PlatformPublicKey,
}

/// What the agent persists: the key it reached and the configured key it started from. A stored
/// key counts only while the config still names the same starting key: a machine re-provisioned
/// for another platform must not keep trusting the old platform's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowedKey {
    pub root: TrustedKey,
    pub current: TrustedKey,
}

/// Why a signed message is not from the platform (as far as this machine can tell).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("signed by key generation {gen}, older than the trusted generation {trusted}")]
    OldKey { gen: u32, trusted: u32 },
}

/// The result of checking a signed message.
#[derive(Debug)]
pub enum Checked<T> {
    Verified(T),
    /// Signed (it says) under a generation newer than the trusted one: ignore it for now.
    NewerKey {
        gen: u32,
    },
    Refused(Refused),
}

/// The result of reading the key chain.
#[derive(Debug)]
pub enum ChainStep {
    /// The chain leads to a newer key: persist it, then trust it.
    Advanced(TrustedKey),
    /// Nothing newer (or an empty, cleared topic).
    Unchanged,
    /// The chain does not verify from the trusted key: nothing changes.
    Refused(ChainError),
}

impl TrustedKey {
    /// The key to start from: the stored one if it was followed from `root` and is newer.
    pub fn starting_point(root: TrustedKey, stored: Option<FollowedKey>) -> TrustedKey {
        match stored {
            Some(f) if f.root == root && f.current.generation > root.generation => f.current,
            _ => root,
        }
    }

    /// Checks a signed envelope for `purpose` against this key and the `gen` rules above.
    pub fn check<T: DeserializeOwned>(&self, purpose: Purpose, bytes: &[u8]) -> Checked<T> {
        let env = match parse_envelope(bytes) {
            Ok(env) => env,
            Err(e) => return Checked::Refused(e.into()),
        };
        match env.gen.cmp(&self.generation) {
            std::cmp::Ordering::Greater => Checked::NewerKey { gen: env.gen },
            std::cmp::Ordering::Less => Checked::Refused(Refused::OldKey {
                gen: env.gen,
                trusted: self.generation,
            }),
            std::cmp::Ordering::Equal => match self.key.verify_envelope(purpose, &env) {
                Ok(body) => Checked::Verified(body),
                Err(e) => Checked::Refused(e.into()),
            },
        }
    }

    /// Walks a key chain message from this key. A chain that fails anywhere changes nothing,
    /// even if its first links were valid: it is not what the platform published.
    pub fn follow(&self, bytes: &[u8]) -> ChainStep {
        if bytes.is_empty() {
            return ChainStep::Unchanged;
        }
        let chain = match KeyChain::parse(bytes) {
            Ok(c) => c,
            Err(e) => return ChainStep::Refused(e),
        };
        match chain.follow(self.generation, self.key) {
            Ok((generation, key)) if generation > self.generation => {
                ChainStep::Advanced(TrustedKey { generation, key })
            }
            Ok(_) => ChainStep::Unchanged,
            Err(e) => ChainStep::Refused(e),
        }
    }
}

fn parse_envelope(bytes: &[u8]) -> Result<SignedEnvelope, AuthError> {
    if bytes.len() > MAX_JSON_MESSAGE {
        return Err(AuthError::TooLarge { len: bytes.len() });
    }
    serde_json::from_slice(bytes).map_err(AuthError::Envelope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::auth::PlatformKey;
    use fleetcast_proto::keychain::KeyAnnouncement;

    fn key(seed: u8, generation: u32) -> PlatformKey {
        PlatformKey::with_generation([seed; 32], generation)
    }

    fn trusted(k: &PlatformKey) -> TrustedKey {
        TrustedKey {
            generation: k.generation(),
            key: k.public(),
        }
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

    fn chain(links: Vec<SignedEnvelope>) -> Vec<u8> {
        KeyChain { links }.to_bytes()
    }

    #[test]
    fn a_message_is_checked_with_the_key_of_its_generation_only() {
        let (k0, k1) = (key(1, 0), key(2, 1));
        let t = trusted(&k1);
        let ok = t.check::<u32>(Purpose::Command, &k1.sign(Purpose::Command, &7u32));
        assert!(matches!(ok, Checked::Verified(7)), "{ok:?}");
        let newer = key(3, 2).sign(Purpose::Command, &7u32);
        assert!(matches!(
            t.check::<u32>(Purpose::Command, &newer),
            Checked::NewerKey { gen: 2 }
        ));
        let older = k0.sign(Purpose::Command, &7u32);
        assert!(matches!(
            t.check::<u32>(Purpose::Command, &older),
            Checked::Refused(Refused::OldKey { gen: 0, trusted: 1 })
        ));
        // Another key claiming the trusted generation.
        let forged = key(9, 1).sign(Purpose::Command, &7u32);
        assert!(matches!(
            t.check::<u32>(Purpose::Command, &forged),
            Checked::Refused(Refused::Auth(AuthError::BadSignature))
        ));
        assert!(matches!(
            t.check::<u32>(Purpose::Command, b"junk"),
            Checked::Refused(Refused::Auth(AuthError::Envelope(_)))
        ));
    }

    #[test]
    fn a_valid_chain_advances_and_a_forged_one_changes_nothing() {
        let (k0, k1, k2, evil) = (key(1, 0), key(2, 1), key(3, 2), key(9, 1));
        let t = trusted(&k0);
        let good = chain(vec![link(&k0, &k1), link(&k1, &k2)]);
        assert!(matches!(t.follow(&good), ChainStep::Advanced(k) if k == trusted(&k2)));
        assert!(matches!(trusted(&k2).follow(&good), ChainStep::Unchanged));
        assert!(matches!(t.follow(b""), ChainStep::Unchanged));
        assert!(matches!(
            t.follow(&chain(vec![link(&evil, &key(8, 1))])),
            ChainStep::Refused(_)
        ));
        // A valid first link does not excuse a forged second one.
        assert!(matches!(
            t.follow(&chain(vec![link(&k0, &k1), link(&evil, &key(8, 2))])),
            ChainStep::Refused(_)
        ));
        assert!(matches!(t.follow(b"{"), ChainStep::Refused(_)));
    }

    #[test]
    fn a_stored_key_counts_only_for_the_configured_root_and_only_if_newer() {
        let (k0, k2) = (trusted(&key(1, 0)), trusted(&key(3, 2)));
        let stored = FollowedKey {
            root: k0,
            current: k2,
        };
        assert_eq!(TrustedKey::starting_point(k0, Some(stored)), k2);
        assert_eq!(TrustedKey::starting_point(k0, None), k0);
        let other_root = trusted(&key(5, 0));
        assert_eq!(
            TrustedKey::starting_point(other_root, Some(stored)),
            other_root
        );
        // A config provisioned at generation 3 starts there even if an older chain was stored.
        let k3 = trusted(&key(4, 3));
        assert_eq!(TrustedKey::starting_point(k3, Some(stored)), k3);
    }
}
