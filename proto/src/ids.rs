//! Validated identifiers. Parse once at the edge, then trust the type.
//!
//! Machine, group, release and kind ids share one alphabet, `[A-Za-z0-9._-]{1,64}`, so they can
//! never hold the MQTT separators `/ + #` nor be empty. Artifact ids are blake3 hashes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest id accepted for machines, groups, releases and kinds.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} id is empty")]
    Empty { what: &'static str },
    #[error("{what} id {value:?} is longer than {MAX_ID_LEN} characters")]
    TooLong { what: &'static str, value: String },
    #[error("{what} id {value:?} has character {ch:?}; allowed are A-Z a-z 0-9 . _ -")]
    BadChar {
        what: &'static str,
        value: String,
        ch: char,
    },
    #[error("artifact id {value:?} is not 64 lowercase hex digits (a blake3 hash)")]
    BadArtifact { value: String },
}

fn check(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            what,
            value: value.to_owned(),
        });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::BadChar {
            what,
            value: value.to_owned(),
            ch,
        });
    }
    // "." and ".." are valid by alphabet but would be path traversal if ever used as file names.
    if value == "." || value == ".." {
        return Err(IdError::BadChar {
            what,
            value: value.to_owned(),
            ch: '.',
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($what, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// One vending machine, e.g. `vm-001`.
    MachineId,
    "machine"
);
string_id!(
    /// A named set of machines, e.g. `shanghai`.
    GroupId,
    "group"
);
string_id!(
    /// One release (an artifact plus how and where to install it), e.g. `r-000042`.
    ReleaseId,
    "release"
);
string_id!(
    /// A version type: `app`, `firmware`, or any configured type. Each kind is updated on its own.
    Kind,
    "kind"
);

/// An artifact's id is the blake3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ArtifactId([u8; 32]);

impl ArtifactId {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The id of everything `reader` yields, streamed, and its length in bytes.
    pub fn of_reader(mut reader: impl std::io::Read) -> std::io::Result<(Self, u64)> {
        let mut hasher = blake3::Hasher::new();
        let len = std::io::copy(&mut reader, &mut hasher)?;
        Ok((hasher.finalize().into(), len))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for tables and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl From<blake3::Hash> for ArtifactId {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl FromStr for ArtifactId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadArtifact {
            value: s.chars().take(80).collect(),
        };
        if s.len() != 64 || s.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }
}

impl TryFrom<String> for ArtifactId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        value.parse()
    }
}

impl From<ArtifactId> for String {
    fn from(id: ArtifactId) -> String {
        id.to_hex()
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArtifactId({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_are_accepted() {
        for ok in ["vm-001", "a", "shanghai_2", "r.1", &"x".repeat(64)] {
            MachineId::new(ok).unwrap();
        }
    }

    #[test]
    fn ids_that_could_break_topics_or_paths_are_refused() {
        for bad in [
            "",
            "a/b",
            "a+b",
            "a#",
            "with space",
            ".",
            "..",
            "é",
            &"x".repeat(65),
        ] {
            assert!(MachineId::new(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn ids_deserialize_only_when_valid() {
        let ok: GroupId = serde_json::from_str("\"shanghai\"").unwrap();
        assert_eq!(ok.as_str(), "shanghai");
        let err = serde_json::from_str::<GroupId>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("group id"), "{err}");
    }

    #[test]
    fn artifact_id_round_trips_through_hex() {
        let id = ArtifactId::of(b"hello");
        let text = id.to_string();
        assert_eq!(text, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(text.parse::<ArtifactId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ArtifactId>(&json).unwrap(), id);
    }

    #[test]
    fn artifact_id_of_a_reader_matches_the_id_of_its_bytes() {
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let (id, len) = ArtifactId::of_reader(&data[..]).unwrap();
        assert_eq!((id, len), (ArtifactId::of(&data), data.len() as u64));
    }

    #[test]
    fn artifact_id_refuses_short_upper_or_non_hex() {
        let good = ArtifactId::of(b"x").to_hex();
        assert!(good[..63].parse::<ArtifactId>().is_err());
        assert!(good.to_uppercase().parse::<ArtifactId>().is_err());
        assert!(format!("{}g", &good[..63]).parse::<ArtifactId>().is_err());
    }
}
