//! What the agent keeps on disk: `agent.json` (the [`Ledger`], the message counter's
//! reservation and the platform key followed along the key chain) and `outbox.json` (status
//! events not yet acknowledged by the platform). Both are replaced atomically on every change.
//! `contact.json` ([`Contact`]) says when the platform and the broker were last reached; it is
//! only for people (`fleetcast-device status`), so it is written at most once a minute.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fleetcast_proto::auth::{MacEnvelope, Purpose, Secret};
use serde::{Deserialize, Serialize};

use crate::durable;
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

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
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
    /// What is on disk: a change is adopted here only once it is durable.
    file: AgentFile,
    next_ctr: u64,
}

/// `agent.json`, shared by the agent loop (ledger) and every sender of MAC'd messages (counter).
///
/// Every change is made to a copy, written, and adopted once durable, so a counter is never
/// handed out from a reservation that is not on disk yet. The `async` methods write through the
/// process's [`durable`] writer; the blocking ones (tools, tests) write on the caller's thread.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
    /// One change on its way to the disk at a time: a change starts from the adopted file.
    saving: Arc<tokio::sync::Mutex<()>>,
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

/// Microseconds since the Unix epoch: where a fresh agent's counter starts.
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
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
    /// Reads `agent.json` (blocking).
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("agent.json");
        let bytes = read_file(&path)?;
        Self::decode(path, bytes.as_deref())
    }

    /// What [`Store::open`] makes of the bytes it read from `path` (`None`: no file yet).
    /// Nothing is written until the first change. Separate so tests and fuzzing reach the
    /// decoder without a disk.
    pub fn decode(path: PathBuf, bytes: Option<&[u8]>) -> Result<Self, StoreError> {
        let fresh = bytes.is_none();
        let file: AgentFile = parse_json(&path, bytes)?;
        let mut next_ctr = file
            .ctr_reserved
            .checked_add(1)
            .ok_or_else(|| StoreError::CounterExhausted { path: path.clone() })?;
        if fresh {
            // No agent.json: a new machine, or one whose data dir was wiped. The platform
            // remembers the old counters for ever, so start above anything a previous agent
            // of this id can have used: the clock in microseconds (a counter advances by one
            // per message, far slower).
            next_ctr = next_ctr.max(clock_seed());
        }
        Ok(Self {
            path,
            inner: Arc::new(Mutex::new(Inner { file, next_ctr })),
            saving: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn ledger(&self) -> Ledger {
        self.lock().file.ledger.clone()
    }

    pub fn platform_key(&self) -> Option<FollowedKey> {
        self.lock().file.platform_key
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the data half-written: recover it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_error(&self, error: std::io::Error) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            error,
        }
    }

    /// The adopted file with `change` applied (it also sees the next counter to hand out).
    fn changed(&self, change: impl FnOnce(&mut AgentFile, u64)) -> AgentFile {
        let inner = self.lock();
        let mut next = inner.file.clone();
        change(&mut next, inner.next_ctr);
        next
    }

    fn encode(file: &AgentFile) -> Vec<u8> {
        serde_json::to_vec_pretty(file).expect("agent file serializes")
    }

    /// Applies `change` and returns once it is durable; on a failed write nothing changes.
    async fn save(&self, change: impl FnOnce(&mut AgentFile, u64)) -> Result<(), StoreError> {
        let _saving = self.saving.lock().await;
        let next = self.changed(change);
        durable::shared()
            .write(&self.path, Self::encode(&next))
            .await
            .map_err(|e| self.write_error(e))?;
        self.lock().file = next;
        Ok(())
    }

    /// [`Store::save`] on the caller's thread.
    fn save_blocking(&self, change: impl FnOnce(&mut AgentFile, u64)) -> Result<(), StoreError> {
        let _saving = self.saving.blocking_lock();
        let next = self.changed(change);
        write_atomic(&self.path, &Self::encode(&next)).map_err(|e| self.write_error(e))?;
        self.lock().file = next;
        Ok(())
    }

    /// Persists a newly followed platform key; only once this returns may it be used.
    pub async fn save_platform_key_async(&self, key: FollowedKey) -> Result<(), StoreError> {
        self.save(|f, _| f.platform_key = Some(key)).await
    }

    /// Blocking [`Store::save_platform_key_async`].
    pub fn save_platform_key(&self, key: FollowedKey) -> Result<(), StoreError> {
        self.save_blocking(|f, _| f.platform_key = Some(key))
    }

    pub async fn save_ledger_async(&self, ledger: &Ledger) -> Result<(), StoreError> {
        self.save(|f, _| f.ledger = ledger.clone()).await
    }

    /// Blocking [`Store::save_ledger_async`].
    pub fn save_ledger(&self, ledger: &Ledger) -> Result<(), StoreError> {
        self.save_blocking(|f, _| f.ledger = ledger.clone())
    }

    /// The next counter if the reservation on disk covers it.
    fn take_reserved(&self) -> Result<Option<u64>, StoreError> {
        let mut inner = self.lock();
        let ctr = inner.next_ctr;
        // u64::MAX itself is never handed out, so the counter after it always exists.
        let after = ctr
            .checked_add(1)
            .ok_or_else(|| StoreError::CounterExhausted {
                path: self.path.clone(),
            })?;
        if ctr > inner.file.ctr_reserved {
            return Ok(None);
        }
        inner.next_ctr = after;
        Ok(Some(ctr))
    }

    /// Reserves the next block from the counter about to be handed out (never lowers it).
    fn reserve(file: &mut AgentFile, next_ctr: u64) {
        file.ctr_reserved = file
            .ctr_reserved
            .max(next_ctr.saturating_add(CTR_BLOCK - 1));
    }

    /// The next message counter, strictly above every counter used before, across restarts.
    /// Waits for the disk only when a new block has to be reserved.
    pub async fn next_ctr_async(&self) -> Result<u64, StoreError> {
        loop {
            if let Some(ctr) = self.take_reserved()? {
                return Ok(ctr);
            }
            self.save(Self::reserve).await?;
        }
    }

    /// Blocking [`Store::next_ctr_async`].
    pub fn next_ctr(&self) -> Result<u64, StoreError> {
        loop {
            if let Some(ctr) = self.take_reserved()? {
                return Ok(ctr);
            }
            self.save_blocking(Self::reserve)?;
        }
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

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&self.entries).expect("outbox serializes")
    }

    fn write_error(&self, error: std::io::Error) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            error,
        }
    }

    async fn save(&self) -> Result<(), StoreError> {
        durable::shared()
            .write(&self.path, self.encode())
            .await
            .map_err(|e| self.write_error(e))
    }

    fn save_blocking(&self) -> Result<(), StoreError> {
        write_atomic(&self.path, &self.encode()).map_err(|e| self.write_error(e))
    }

    /// Appends `entry` and returns once the outbox holding it is durable.
    pub async fn push_async(&mut self, entry: OutboxEntry) -> Result<(), StoreError> {
        self.entries.push_back(entry);
        self.save().await
    }

    /// Blocking [`Outbox::push_async`].
    pub fn push(&mut self, entry: OutboxEntry) -> Result<(), StoreError> {
        self.entries.push_back(entry);
        self.save_blocking()
    }

    pub fn head(&self) -> Option<&OutboxEntry> {
        self.entries.front()
    }

    /// MACs again with `secret` every event whose MAC is another secret's, keeping its body
    /// (and so its counter) exactly; returns how many, after saving them. Why: the platform
    /// checks a machine's reports with the secret it has now, and the outbox sends its head
    /// until that is acknowledged, so after `machine provision --rotate` (or a corrected
    /// secret) one event MAC'd with the old secret held every later one back for good. The
    /// rotation reset the platform's counters, so the counters are accepted again; an event
    /// stored before the rotation whose ack the outbox had not yet written away is stored twice.
    pub fn reseal(&mut self, secret: &Secret) -> Result<usize, StoreError> {
        let mut changed = 0;
        for e in &mut self.entries {
            let Ok(env) = serde_json::from_str::<MacEnvelope>(&e.payload) else {
                continue;
            };
            if secret
                .open_envelope::<serde_json::Value>(Purpose::Status, &env)
                .is_ok()
            {
                continue;
            }
            let sealed = secret.seal_text(Purpose::Status, env.body);
            e.payload = String::from_utf8(sealed).expect("a JSON envelope is UTF-8");
            changed += 1;
        }
        if changed > 0 {
            self.save_blocking()?;
        }
        Ok(changed)
    }

    /// The oldest events as one status message, and how many it holds: the head alone, or,
    /// with more waiting, a batch (a JSON array of their envelopes, protocol.md §6.1) of at
    /// most `max` events and `max_bytes` (the head goes whatever its size). A machine that was
    /// offline, or whose platform is slow to acknowledge, sends its backlog a batch per round
    /// trip instead of an event per round trip.
    pub fn head_message(&self, max: usize, max_bytes: usize) -> Option<(Vec<u8>, usize)> {
        let head = self.entries.front()?;
        if self.entries.len() == 1 || max <= 1 {
            return Some((head.payload.clone().into_bytes(), 1));
        }
        let mut out = Vec::with_capacity(max_bytes.min(64 * 1024));
        out.push(b'[');
        let mut n = 0;
        for e in self.entries.iter().take(max) {
            if n > 0 && out.len() + 1 + e.payload.len() + 1 > max_bytes {
                break;
            }
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(e.payload.as_bytes());
            n += 1;
        }
        if n == 1 {
            return Some((head.payload.clone().into_bytes(), 1));
        }
        out.push(b']');
        Some((out, n))
    }

    /// Drops every entry up to `ctr`; whether any was dropped.
    fn drop_acked(&mut self, ctr: u64) -> bool {
        let before = self.entries.len();
        while self.entries.front().is_some_and(|e| e.ctr <= ctr) {
            self.entries.pop_front();
        }
        self.entries.len() != before
    }

    /// The platform stored every event up to `ctr`: drop them. Returns whether any was dropped
    /// (an old or repeated ack drops nothing).
    ///
    /// The file is rewritten only once the outbox is empty. While events remain, the acked ones
    /// stay on disk until the next write (the next push, or the ack that empties it): after a
    /// crash they are sent again, and the platform acknowledges an event it stored as a replay
    /// without storing it twice (protocol.md §6.1). That saves a durable write per ack that
    /// leaves events waiting (two of the eight outbox writes of an update), and the next event
    /// goes out without waiting for one.
    pub async fn ack_async(&mut self, ctr: u64) -> Result<bool, StoreError> {
        if !self.drop_acked(ctr) {
            return Ok(false);
        }
        if self.entries.is_empty() {
            self.save().await?;
        }
        Ok(true)
    }

    /// Blocking [`Outbox::ack_async`].
    pub fn ack(&mut self, ctr: u64) -> Result<bool, StoreError> {
        if !self.drop_acked(ctr) {
            return Ok(false);
        }
        if self.entries.is_empty() {
            self.save_blocking()?;
        }
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// When this machine last heard from the platform and reached its broker (`contact.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// When a message signed or MAC'd by the platform last verified here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_at_ms: Option<u64>,
    /// What it was: `status_ack`, `notice` or `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_message: Option<String>,
    /// When the broker last accepted the connection (CONNACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_at_ms: Option<u64>,
}

impl Contact {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("contact.json")
    }

    /// The file's contents, or nothing recorded yet (blocking).
    pub fn read(data_dir: &Path) -> Result<Self, StoreError> {
        let path = Self::path(data_dir);
        let bytes = read_file(&path)?;
        parse_json(&path, bytes.as_deref())
    }

    /// Replaces the file durably.
    pub async fn write(&self, data_dir: &Path) -> Result<(), StoreError> {
        let path = Self::path(data_dir);
        let bytes = serde_json::to_vec(self).expect("contact serializes");
        durable::shared()
            .write(&path, bytes)
            .await
            .map_err(|error| StoreError::Write { path, error })
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
        let s = first[0];
        assert_eq!(first, vec![s, s + 1, s + 2, s + 3, s + 4]);
        let again = Store::open(dir.path()).unwrap();
        let next = again.next_ctr().unwrap();
        assert_eq!(next, s + CTR_BLOCK);
    }

    #[test]
    fn a_fresh_data_dir_counts_from_the_clock_so_a_wiped_machine_is_not_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let before = clock_seed();
        let wiped = Store::open(dir.path()).unwrap().next_ctr().unwrap();
        assert!(wiped >= before, "{wiped} < {before}");
        // What its previous life used: a counter started from an earlier clock and advanced
        // by a million messages is still below.
        assert!(before - 1_000_000_000 + 1_000_000 < wiped);
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

    #[tokio::test]
    async fn a_counter_and_an_outbox_entry_are_given_out_only_once_they_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        let held = durable::shared().hold();
        let s = store.clone();
        let ctr = tokio::spawn(async move { s.next_ctr_async().await });
        let push = tokio::spawn(async move {
            outbox
                .push_async(OutboxEntry {
                    ctr: 1,
                    payload: "p1".into(),
                })
                .await
                .map(|()| outbox)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !ctr.is_finished(),
            "a counter from a reservation not on disk yet"
        );
        assert!(!push.is_finished(), "an outbox entry not on disk yet");
        drop(held);
        let first = ctr.await.unwrap().unwrap();
        push.await.unwrap().unwrap();
        assert_eq!(Outbox::open(dir.path()).unwrap().len(), 1);
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.next_ctr_async().await.unwrap(), first + CTR_BLOCK);
    }

    #[tokio::test]
    async fn a_failed_write_changes_nothing_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the data dir should be.
        std::fs::write(dir.path().join("data"), b"").unwrap();
        let store = Store::decode(dir.path().join("data/agent.json"), None).unwrap();
        let ledger = Ledger {
            last_command_seq: 7,
            ..Ledger::default()
        };
        let err = store.save_ledger_async(&ledger).await.unwrap_err();
        assert!(err.to_string().contains("agent.json"), "{err}");
        assert_eq!(store.ledger().last_command_seq, 0);
        assert!(matches!(
            store.next_ctr_async().await,
            Err(StoreError::Write { .. })
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
        // Not written while an event waits: after a crash here, 1 and 2 are sent again (and
        // acknowledged as replays).
        assert_eq!(Outbox::open(dir.path()).unwrap().len(), 3);
        // The next push writes the outbox as it is.
        ob.push(OutboxEntry {
            ctr: 4,
            payload: "p4".into(),
        })
        .unwrap();
        let on_disk = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            on_disk.entries.iter().map(|e| e.ctr).collect::<Vec<_>>(),
            [3, 4]
        );
        // The ack that empties it is written.
        assert!(ob.ack(4).unwrap());
        assert_eq!(
            Outbox::open(dir.path()).unwrap().len(),
            0,
            "acks are persisted"
        );
    }

    #[test]
    fn events_macd_with_another_secret_are_macd_again_keeping_their_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (Secret::from_bytes([1; 32]), Secret::from_bytes([2; 32]));
        let body = |ctr: u64| format!(r#"{{"ctr":{ctr},"x":"event {ctr}"}}"#);
        let entry = |secret: &Secret, ctr: u64| OutboxEntry {
            ctr,
            payload: String::from_utf8(secret.seal_text(Purpose::Status, body(ctr))).unwrap(),
        };
        let mut ob = Outbox::open(dir.path()).unwrap();
        for e in [entry(&old, 1), entry(&old, 2), entry(&new, 3)] {
            ob.push(e).unwrap();
        }
        let kept = ob.entries[2].clone();
        assert_eq!(ob.reseal(&new).unwrap(), 2);
        let on_disk = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            on_disk.entries[2], kept,
            "an event MAC'd with this secret is left as it was"
        );
        for (i, e) in on_disk.entries.iter().enumerate() {
            let ctr = i as u64 + 1;
            assert_eq!(e.ctr, ctr);
            let env: MacEnvelope = serde_json::from_str(&e.payload).unwrap();
            assert_eq!(env.body, body(ctr), "the body is kept byte for byte");
            new.open_envelope::<serde_json::Value>(Purpose::Status, &env)
                .unwrap();
        }
        let mut again = Outbox::open(dir.path()).unwrap();
        assert_eq!(again.reseal(&new).unwrap(), 0, "nothing left to MAC again");
    }

    #[test]
    fn the_outbox_sends_its_head_alone_or_its_oldest_events_as_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        assert!(ob.head_message(64, 1024).is_none());
        let entry = |ctr: u64| OutboxEntry {
            ctr,
            payload: format!("{{\"e\":{ctr}}}"),
        };
        ob.push(entry(1)).unwrap();
        let (alone, n) = ob.head_message(64, 1024).unwrap();
        assert_eq!(
            (&alone[..], n),
            (&b"{\"e\":1}"[..], 1),
            "one event: its envelope"
        );
        for ctr in 2..=5 {
            ob.push(entry(ctr)).unwrap();
        }
        let parsed =
            |bytes: &[u8]| serde_json::from_slice::<Vec<serde_json::Value>>(bytes).unwrap();
        let (all, n) = ob.head_message(64, 1024).unwrap();
        assert_eq!(n, 5);
        assert_eq!(
            parsed(&all).len(),
            5,
            "oldest first: {}",
            String::from_utf8_lossy(&all)
        );
        assert_eq!(parsed(&all)[0]["e"], 1);
        let (three, n) = ob.head_message(3, 1024).unwrap();
        assert_eq!((parsed(&three).len(), n), (3, 3), "at most `max`");
        // Each envelope is 7 bytes: "[", 3 of them, 2 commas and "]" are 25 bytes.
        let (cut, n) = ob.head_message(64, 25).unwrap();
        assert_eq!((cut.len(), n), (25, 3), "at most `max_bytes`");
        assert_eq!(ob.head_message(64, 24).unwrap().1, 2);
        let (head, n) = ob.head_message(64, 2).unwrap();
        assert_eq!(
            (&head[..], n),
            (&b"{\"e\":1}"[..], 1),
            "the head goes whatever its size"
        );
        assert!(ob.ack(4).unwrap());
        assert_eq!(ob.head_message(64, 1024).unwrap().1, 1);
    }

    #[tokio::test]
    async fn the_last_contact_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Contact::read(dir.path()).unwrap(), Contact::default());
        let c = Contact {
            platform_at_ms: Some(5),
            platform_message: Some("status_ack".into()),
            broker_at_ms: Some(4),
        };
        c.write(dir.path()).await.unwrap();
        assert_eq!(Contact::read(dir.path()).unwrap(), c);
    }
}
