//! What machines report: status events (one per phase change, QoS 1, MAC'd) and the retained
//! inventory `state`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::auth::{parse_envelope, AuthError, MacEnvelope, MAX_JSON_MESSAGE};
use crate::ids::{ArtifactId, GroupId, Kind, MachineId, ReleaseId};

/// Where one machine stands with one release. Machines report every phase but `pending` and
/// `superseded`, which only the platform assigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Platform only: published, nothing heard from the machine yet.
    Pending,
    /// The machine accepted the notice (signature, target and seq checked).
    Notified,
    /// Downloaded and waiting: for the install window, for idle, or for `activate`.
    Deferred,
    /// Fetching chunks; carries progress.
    Downloading,
    /// Whole file verified against the artifact id.
    Downloaded,
    /// Gave up fetching after its retries (error says why).
    DownloadFailed,
    Installing,
    /// Installed and healthy: the upgrade succeeded.
    Installed,
    /// The installer failed; the previous version is still active.
    InstallFailed,
    /// Installed but failed its health check; the machine switched back to the previous version.
    RolledBack,
    /// Refused: bad signature, not addressed to this machine, downgrade, or incompatible.
    Rejected,
    /// Cancelled by an operator before installing.
    Cancelled,
    /// Platform only: a newer release of the same kind replaced this one before it finished.
    Superseded,
}

impl Phase {
    pub const ALL: [Phase; 13] = [
        Phase::Pending,
        Phase::Notified,
        Phase::Deferred,
        Phase::Downloading,
        Phase::Downloaded,
        Phase::DownloadFailed,
        Phase::Installing,
        Phase::Installed,
        Phase::InstallFailed,
        Phase::RolledBack,
        Phase::Rejected,
        Phase::Cancelled,
        Phase::Superseded,
    ];

    /// No further event is expected for this release on this machine.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::DownloadFailed
                | Phase::Installed
                | Phase::InstallFailed
                | Phase::RolledBack
                | Phase::Rejected
                | Phase::Cancelled
                | Phase::Superseded
        )
    }

    /// A final phase that is not success.
    pub fn is_failure(self) -> bool {
        self.is_final() && !matches!(self, Phase::Installed | Phase::Superseded)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Notified => "notified",
            Phase::Deferred => "deferred",
            Phase::Downloading => "downloading",
            Phase::Downloaded => "downloaded",
            Phase::DownloadFailed => "download_failed",
            Phase::Installing => "installing",
            Phase::Installed => "installed",
            Phase::InstallFailed => "install_failed",
            Phase::RolledBack => "rolled_back",
            Phase::Rejected => "rejected",
            Phase::Cancelled => "cancelled",
            Phase::Superseded => "superseded",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown phase {s:?}"))
    }
}

/// Bytes verified so far of an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub bytes: u64,
    pub total: u64,
}

/// One status event, body of a MAC'd message on `fleet/machines/{m}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub machine: MachineId,
    /// The machine's monotonic message counter (replay protection).
    pub ctr: u64,
    /// When the phase was entered, machine clock, ms since the Unix epoch.
    pub at_ms: u64,
    /// The release this is about. For `rejected` it is the id the notice claimed, unverified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseId>,
    pub kind: Kind,
    #[serde(default)]
    pub version: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// 1 for the first try; a retried download or install counts up.
    #[serde(default = "one")]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Human-readable context, e.g. "waiting for window 02:00-04:00".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn one() -> u32 {
    1
}

/// At most this many status events in one message (protocol.md §6.1, "Batches").
pub const MAX_STATUS_BATCH: usize = 64;

/// The envelopes of one message on `fleet/machines/{m}/status`: a single MAC'd envelope, or a
/// JSON array of 1 to [`MAX_STATUS_BATCH`] of them, oldest first (an agent sending several
/// events of its outbox at once). Each envelope is checked as if it had come alone.
pub fn status_envelopes(payload: &[u8]) -> Result<Vec<MacEnvelope>, AuthError> {
    if !is_batch(payload) {
        return parse_envelope(payload).map(|env| vec![env]);
    }
    let envelopes: Vec<MacEnvelope> = parse_envelope(payload)?;
    if envelopes.is_empty() || envelopes.len() > MAX_STATUS_BATCH {
        return Err(AuthError::BatchSize {
            len: envelopes.len(),
            max: MAX_STATUS_BATCH,
        });
    }
    Ok(envelopes)
}

/// How many status events a message on `fleet/machines/{m}/status` carries, without checking
/// any (what a broker charges against the sender's report rate): the length of a batch, 1 for
/// anything else (a message that does not parse is refused whole by the platform).
pub fn status_count(payload: &[u8]) -> usize {
    if !is_batch(payload) || payload.len() > MAX_JSON_MESSAGE {
        return 1;
    }
    serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(payload).map_or(1, |v| v.len().max(1))
}

/// Whether `payload` is a JSON array (its first non-blank byte is `[`).
fn is_batch(payload: &[u8]) -> bool {
    payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'[')
}

/// The body on `fleet/machines/{m}/status/ack`, MAC'd with the machine's own secret (only it
/// and the platform hold it; protocol.md §6.1): the platform has durably stored every
/// status event of `machine` up to and including counter `ctr`. A machine drops an event from
/// its outbox only on this acknowledgement (not on the broker's PUBACK), so an event the broker
/// accepted but lost before the platform stored it (a broker crash) is sent again. Replaying an
/// old ack is harmless: it only acknowledges what was already acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAck {
    pub machine: MachineId,
    pub ctr: u64,
}

/// What one machine runs and is doing for one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindState {
    /// Installed and active version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactId>,
    /// The release the machine is working on or last finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseId>,
    /// Phase of `release`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Highest notice `seq` accepted for this kind.
    #[serde(default)]
    pub seq: u64,
}

/// Inventory, body of a MAC'd retained message on `fleet/machines/{m}/state`. Sent on every
/// connect and after every change; the platform's reconciler compares it with desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    pub machine: MachineId,
    pub ctr: u64,
    pub at_ms: u64,
    pub agent_version: String,
    #[serde(default)]
    pub groups: Vec<GroupId>,
    /// Serving a customer right now (the `idle` policy waits for false).
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub kinds: BTreeMap<Kind, KindState>,
    /// Generation of the platform key the machine trusts now (0 = the key in its config).
    /// The platform re-sends the key chain to a machine behind the current generation.
    #[serde(default)]
    pub key_gen: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_message_is_one_envelope_or_an_array_of_1_to_64() {
        use crate::auth::{Purpose, Secret};
        let secret = Secret::from_bytes([7; 32]);
        let one = secret.seal(Purpose::Status, &serde_json::json!({"ctr": 1}));
        let lone = status_envelopes(&one).unwrap();
        assert_eq!(lone.len(), 1);
        assert_eq!(status_count(&one), 1);
        let batch = |n: usize| {
            let items: Vec<String> = (0..n)
                .map(|_| String::from_utf8(one.clone()).unwrap())
                .collect();
            format!(" [{}]", items.join(",")).into_bytes()
        };
        let three = status_envelopes(&batch(3)).unwrap();
        assert_eq!(three.len(), 3);
        let opened: serde_json::Value = secret.open_envelope(Purpose::Status, &three[2]).unwrap();
        assert_eq!(opened["ctr"], 1, "each envelope opens as if it came alone");
        assert_eq!(status_count(&batch(3)), 3);
        assert_eq!(status_envelopes(&batch(64)).unwrap().len(), 64);
        for n in [0, 65] {
            assert!(
                matches!(
                    status_envelopes(&batch(n)),
                    Err(AuthError::BatchSize { len, max: 64 }) if len == n
                ),
                "{n}"
            );
        }
        // What a broker charges: the array's length, whatever its items.
        assert_eq!(status_count(&batch(65)), 65);
        assert_eq!(status_count(b"[1, {\"a\": [2, 3]}, \"x\"]"), 3);
        assert_eq!(status_count(b"[1, 2"), 1, "does not parse: refused whole");
        assert!(status_envelopes(b"[1, 2]").is_err());
        assert!(status_envelopes(b"[1, 2").is_err());
    }

    #[test]
    fn phases_use_the_documented_names_both_ways() {
        for p in Phase::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
        }
        assert_eq!(Phase::DownloadFailed.as_str(), "download_failed");
        assert!("finished".parse::<Phase>().is_err());
    }

    #[test]
    fn only_end_states_are_final_and_only_bad_ends_are_failures() {
        assert!(!Phase::Downloaded.is_final());
        assert!(!Phase::Deferred.is_final());
        assert!(Phase::Installed.is_final() && !Phase::Installed.is_failure());
        assert!(Phase::RolledBack.is_failure());
        assert!(Phase::Superseded.is_final() && !Phase::Superseded.is_failure());
    }

    #[test]
    fn status_event_round_trips_and_defaults_missing_fields() {
        let e = StatusEvent {
            machine: MachineId::new("vm-1").unwrap(),
            ctr: 7,
            at_ms: 1,
            release: Some(ReleaseId::new("r-1").unwrap()),
            kind: Kind::new("app").unwrap(),
            version: "1.0".into(),
            phase: Phase::Downloading,
            progress: Some(Progress {
                bytes: 10,
                total: 20,
            }),
            attempt: 2,
            error: None,
            detail: None,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<StatusEvent>(&json).unwrap(), e);
        let minimal: StatusEvent = serde_json::from_str(
            r#"{"machine":"vm-1","ctr":1,"at_ms":2,"kind":"app","phase":"installed"}"#,
        )
        .unwrap();
        assert_eq!(minimal.attempt, 1);
        assert_eq!(minimal.release, None);
    }

    #[test]
    fn status_acks_round_trip() {
        let a = StatusAck {
            machine: MachineId::new("vm-1").unwrap(),
            ctr: 42,
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"machine":"vm-1","ctr":42}"#);
        assert_eq!(serde_json::from_str::<StatusAck>(&json).unwrap(), a);
    }

    #[test]
    fn machine_state_round_trips() {
        let mut kinds = BTreeMap::new();
        kinds.insert(
            Kind::new("app").unwrap(),
            KindState {
                version: Some("2.4.0".into()),
                seq: 3,
                ..Default::default()
            },
        );
        let s = MachineState {
            machine: MachineId::new("vm-1").unwrap(),
            ctr: 1,
            at_ms: 2,
            agent_version: "0.1.0".into(),
            groups: vec![GroupId::new("g").unwrap()],
            busy: true,
            kinds,
            key_gen: 2,
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<MachineState>(&json).unwrap(), s);
    }
}
