//! What the agent keeps on disk: `agent.json` (the [`Ledger`], the message counter's
//! reservation and the platform key followed along the key chain) and `outbox.json` (status events not yet acknowledged by the platform). Both are
//! replaced atomically on every change.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::machine::Ledger;
use crate::trust::FollowedKey;

/// Counter values reserved on disk at a time: a restart continues after the reservation, so
/// `ctr` never repeats even if the agent dies between two saves.
pub const CTR_BLOCK: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is corrupt: {error}")]
    Corrupt {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// Every counter value is used up (or the file says so): sending more would repeat one.
    #[error("{path}: the message counter is exhausted; the machine needs new credentials")]
    CounterExhausted { path: PathBuf },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AgentFile {
    #[serde(default)]
    ledger: Ledger,
    /// Counter values below this may have been used.
    #[serde(default)]
    ctr_reserved: u64,
    /// The newest platform key reached along the key chain (absent: the config's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform_key: Option<FollowedKey>,
}

struct Inner {
    file: AgentFile,
    next_ctr: u64,
}

/// `agent.json`, shared by the agent loop (ledger) and every sender of MAC'd messages (counter).
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
}

/// The file's bytes, or `None` when there is no file yet.
fn read_file(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(StoreError::Read {
            path: path.to_owned(),
            error,
        }),
    }
}

fn parse_json<T: for<'de> Deserialize<'de> + Default>(
    path: &Path,
    bytes: Option<&[u8]>,
) -> Result<T, StoreError> {
    let Some(bytes) = bytes else {
        return Ok(T::default());
    };
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
        path: path.to_owned(),
        error,
    })
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("agent.json");
        let bytes = read_file(&path)?;
        Self::decode(path, bytes.as_deref())
    }

    /// What [`Store::open`] makes of the bytes it read from `path` (`None`: no file yet).
    /// Nothing is written until the first change. Separate so tests and fuzzing reach the
    /// decoder without a disk.
    pub fn decode(path: PathBuf, bytes: Option<&[u8]>) -> Result<Self, StoreError> {
        let file: AgentFile = parse_json(&path, bytes)?;
        let next_ctr = file
            .ctr_reserved
            .checked_add(1)
            .ok_or_else(|| StoreError::CounterExhausted { path: path.clone() })?;
        Ok(Self {
            path,
            inner: Arc::new(Mutex::new(Inner { file, next_ctr })),
        })
    }

    pub fn ledger(&self) -> Ledger {
        self.lock().file.ledger.clone()
    }

    pub fn platform_key(&self) -> Option<FollowedKey> {
        self.lock().file.platform_key
    }

    /// Persists a newly followed platform key; only once this returns may it be used.
    pub fn save_platform_key(&self, key: FollowedKey) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let before = inner.file.platform_key.replace(key);
        if let Err(e) = self.write(&inner.file) {
            inner.file.platform_key = before;
            return Err(e);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the data half-written: recover it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, file: &AgentFile) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(file).expect("agent file serializes");
        write_atomic(&self.path, &bytes).map_err(|error| StoreError::Write {
            path: self.path.clone(),
            error,
        })
    }

    pub fn save_ledger(&self, ledger: &Ledger) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.file.ledger = ledger.clone();
        self.write(&inner.file)
    }

    /// The next message counter, strictly above every counter used before, across restarts.
    pub fn next_ctr(&self) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let ctr = inner.next_ctr;
        // u64::MAX itself is never handed out, so the counter after it always exists.
        let after = ctr
            .checked_add(1)
            .ok_or_else(|| StoreError::CounterExhausted {
                path: self.path.clone(),
            })?;
        if ctr > inner.file.ctr_reserved {
            inner.file.ctr_reserved = ctr.saturating_add(CTR_BLOCK - 1);
            if let Err(e) = self.write(&inner.file) {
                inner.file.ctr_reserved = ctr - 1;
                return Err(e);
            }
        }
        inner.next_ctr = after;
        Ok(ctr)
    }
}

/// One sealed status event waiting for the broker's PUBACK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub ctr: u64,
    /// The MAC envelope, exactly as published.
    pub payload: String,
}

/// Status events in order, persisted until acknowledged.
pub struct Outbox {
    path: PathBuf,
    entries: VecDeque<OutboxEntry>,
}

impl Outbox {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("outbox.json");
        let bytes = read_file(&path)?;
        Self::decode(path, bytes.as_deref())
    }

    /// What [`Outbox::open`] makes of the bytes it read from `path` (`None`: no file yet).
    pub fn decode(path: PathBuf, bytes: Option<&[u8]>) -> Result<Self, StoreError> {
        let entries: VecDeque<OutboxEntry> = parse_json(&path, bytes)?;
        Ok(Self { path, entries })
    }

    fn save(&self) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(&self.entries).expect("outbox serializes");
        write_atomic(&self.path, &bytes).map_err(|error| StoreError::Write {
            path: self.path.clone(),
            error,
        })
    }

    pub fn push(&mut self, entry: OutboxEntry) -> Result<(), StoreError> {
        self.entries.push_back(entry);
        self.save()
    }

    pub fn head(&self) -> Option<&OutboxEntry> {
        self.entries.front()
    }

    /// Drops the head if it is `ctr` (acknowledged).
    /// The platform stored every event up to `ctr`: drop them. Returns whether any was dropped
    /// (an old or repeated ack drops nothing).
    pub fn ack(&mut self, ctr: u64) -> Result<bool, StoreError> {
        let before = self.entries.len();
        while self.entries.front().is_some_and(|e| e.ctr <= ctr) {
            self.entries.pop_front();
        }
        if self.entries.len() == before {
            return Ok(false);
        }
        self.save()?;
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_continues_above_its_reservation_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first: Vec<u64> = (0..5).map(|_| store.next_ctr().unwrap()).collect();
        assert_eq!(first, vec![1, 2, 3, 4, 5]);
        let again = Store::open(dir.path()).unwrap();
        let next = again.next_ctr().unwrap();
        assert!(next > 5, "{next}");
        assert_eq!(next, CTR_BLOCK + 1);
    }

    #[test]
    fn a_followed_platform_key_survives_a_restart_with_the_ledger_and_counter() {
        use crate::trust::TrustedKey;
        use fleetcast_proto::auth::PlatformKey;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.platform_key(), None);
        let key = |seed, generation| TrustedKey {
            generation,
            key: PlatformKey::from_seed([seed; 32]).public(),
        };
        let followed = FollowedKey {
            root: key(1, 0),
            current: key(2, 2),
        };
        let ctr = store.next_ctr().unwrap();
        store.save_platform_key(followed).unwrap();
        store.save_ledger(&Ledger::default()).unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.platform_key(), Some(followed));
        assert!(again.next_ctr().unwrap() > ctr);
    }

    #[test]
    fn a_reservation_at_the_end_of_the_counter_is_refused_not_wrapped_to_zero() {
        // Before: ctr_reserved + 1 overflowed (a panic in debug; in release the counter
        // restarted at 0, every message a replay to the platform).
        let path = PathBuf::from("/dev/null/agent.json");
        let at_max = format!(r#"{{"ctr_reserved":{}}}"#, u64::MAX);
        assert!(matches!(
            Store::decode(path.clone(), Some(at_max.as_bytes())),
            Err(StoreError::CounterExhausted { .. })
        ));

        // Near the end the reservation stops at u64::MAX, and u64::MAX is never handed out.
        let dir = tempfile::tempdir().unwrap();
        let near = format!(r#"{{"ctr_reserved":{}}}"#, u64::MAX - 3);
        std::fs::write(dir.path().join("agent.json"), near).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.next_ctr().unwrap(), u64::MAX - 2);
        assert_eq!(store.next_ctr().unwrap(), u64::MAX - 1);
        assert!(matches!(
            store.next_ctr(),
            Err(StoreError::CounterExhausted { .. })
        ));
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::CounterExhausted { .. })
        ));
    }

    #[test]
    fn the_outbox_survives_a_restart_and_an_ack_drops_everything_up_to_its_counter() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        for ctr in [1, 2, 3] {
            ob.push(OutboxEntry {
                ctr,
                payload: format!("p{ctr}"),
            })
            .unwrap();
        }
        assert!(!ob.ack(0).unwrap(), "an old ack drops nothing");
        let mut ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(ob.len(), 3);
        assert!(ob.ack(1).unwrap());
        assert_eq!(ob.head().unwrap().ctr, 2);
        assert!(!ob.ack(1).unwrap(), "a repeated ack drops nothing");
        assert!(ob.ack(2).unwrap());
        let ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(ob.head().unwrap().ctr, 3, "acks are persisted");
    }
}
