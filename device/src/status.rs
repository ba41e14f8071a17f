//! `fleetcast-device status`: what a technician needs to know about this machine, read from its
//! config and data dir alone (no broker, no platform; nothing is written or locked): versions
//! per kind and the active slot, the job in progress and its step, the status events not yet
//! acknowledged, when the platform was last heard from, and the last failure. As text for a
//! person, or as JSON (docs/schemas/device-status.json).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetcast_proto::auth::MacEnvelope;
use fleetcast_proto::status::Progress;
use fleetcast_proto::StatusEvent;
use fleetcast_proto::{ArtifactId, GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId};
use serde::Serialize;

use crate::config::{InstallerConfig, MachineConfig, Problem};
use crate::machine::{Installed, LastError, Step};
use crate::sale_lock::SaleLock;
use crate::store::{Contact, Outbox, Store, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub machine: MachineId,
    /// The groups whose notices the agent follows.
    pub groups: Vec<GroupId>,
    /// Where `groups` come from: `platform` once the platform has named them (a `groups`
    /// command, protocol.md §5), else `config`.
    pub groups_from: &'static str,
    pub config: PathBuf,
    /// What is wrong with the config beyond its syntax (the agent refuses to start with any).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub config_problems: Vec<ConfigProblem>,
    pub data_dir: PathBuf,
    pub broker: String,
    /// This program's version.
    pub agent_version: String,
    /// Generation of the platform key the agent trusts (the configured one, or newer along the
    /// key chain).
    pub key_gen: u32,
    pub kinds: BTreeMap<Kind, KindStatus>,
    pub outbox: OutboxStatus,
    pub last_contact: Contact,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    pub sale_lock: SaleLockStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigProblem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    pub problem: String,
    pub fix: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct KindStatus {
    /// `slots` or `command`.
    pub installer: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installed: Option<Installed>,
    /// What the rollback slot holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<Installed>,
    /// The A/B slots on disk (slots installer, once it installed something).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<SlotsStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobStatus>,
    /// A release waiting for the running install to end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued: Option<ReleaseRef>,
    /// The latest status reported for this kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<LastReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotsStatus {
    /// `a` or `b`; absent: the machine runs the version it shipped with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    pub a: SlotContent,
    pub b: SlotContent,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotContent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Absent while the slot is being written (or empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactId>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub release: ReleaseId,
    pub version: String,
    pub step: Step,
    /// The install policy, as in `fleetcast release create --policy`.
    pub policy: String,
    /// What a `deferred` job waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Download progress last reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReleaseRef {
    pub release: ReleaseId,
    pub version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastReport {
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseId>,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    /// Status events not yet acknowledged by the platform.
    pub events: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SaleLockStatus {
    pub path: PathBuf,
    /// Sales holding the lock now; absent when that cannot be read (no file yet, or no
    /// `/proc/locks`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sales: Option<usize>,
    /// Whether an install holds the lock now (same condition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installing: Option<bool>,
    /// The deprecated `{data_dir}/busy` file exists.
    pub busy_file: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The status of the machine `config` (read from `config_path`, with `problems`) describes
/// (blocking: reads a few small files).
pub fn collect(
    config: &MachineConfig,
    config_path: &Path,
    problems: &[Problem],
) -> Result<DeviceStatus, StatusError> {
    let dir = &config.data_dir;
    let store = Store::open(dir)?;
    let ledger = store.ledger();
    let key_gen = store
        .platform_key()
        .filter(|k| k.root == config.configured_key())
        .map_or(config.platform_key_gen, |k| k.current.generation);
    let outbox = Outbox::open(dir)?;
    let oldest_at_ms = outbox.head().and_then(|e| {
        let env: MacEnvelope = serde_json::from_str(&e.payload).ok()?;
        serde_json::from_str::<StatusEvent>(&env.body)
            .ok()
            .map(|ev| ev.at_ms)
    });
    let mut kinds = BTreeMap::new();
    let mut all: Vec<Kind> = ledger.kinds.keys().cloned().collect();
    all.extend(config.installers.keys().cloned());
    all.extend(config.initial_versions.keys().cloned());
    all.sort();
    all.dedup();
    for kind in all {
        let mut rec = ledger.kinds.get(&kind).cloned().unwrap_or_default();
        // What the machine shipped with, until it installs something (as the agent does).
        if let (None, Some(v)) = (&rec.installed, config.initial_versions.get(&kind)) {
            rec.installed = Some(Installed {
                version: v.clone(),
                artifact: None,
            });
        }
        let installer = config.installer_for(&kind);
        let slots = match installer {
            InstallerConfig::Slots { .. } => slots(&dir.join("slots").join(kind.as_str())),
            InstallerConfig::Command { .. } => None,
        };
        let last = rec.last.as_ref();
        let job = rec.job.as_ref().map(|j| JobStatus {
            release: j.notice.release.clone(),
            version: j.notice.version.clone(),
            step: j.step,
            policy: j.notice.policy.to_string(),
            waiting_for: (j.step == Step::Deferred).then(|| waiting_for(&j.notice.policy)),
            progress: last
                .filter(|l| {
                    j.step == Step::Downloading
                        && l.phase == Phase::Downloading
                        && l.release.as_ref() == Some(&j.notice.release)
                })
                .and_then(|l| l.progress),
        });
        kinds.insert(
            kind,
            KindStatus {
                installer: match installer {
                    InstallerConfig::Slots { .. } => "slots",
                    InstallerConfig::Command { .. } => "command",
                },
                installed: rec.installed.clone(),
                previous: rec.previous.clone(),
                slots,
                job,
                queued: rec.queued.as_ref().map(|n| ReleaseRef {
                    release: n.release.clone(),
                    version: n.version.clone(),
                }),
                last: last.map(|l| LastReport {
                    phase: l.phase,
                    release: l.release.clone(),
                    version: l.version.clone(),
                    error: l.error.clone(),
                    detail: l.detail.clone(),
                }),
            },
        );
    }
    let lock = SaleLock::new(config.sale_lock_path());
    let holders = lock.holders().ok().flatten();
    Ok(DeviceStatus {
        machine: config.machine.clone(),
        groups: ledger
            .groups
            .clone()
            .unwrap_or_else(|| config.groups.clone()),
        groups_from: if ledger.groups.is_some() {
            "platform"
        } else {
            "config"
        },
        config: config_path.to_owned(),
        config_problems: problems
            .iter()
            .map(|p| ConfigProblem {
                line: p.at.map(|a| a.0),
                column: p.at.map(|a| a.1),
                problem: p.what.clone(),
                fix: p.fix.clone(),
            })
            .collect(),
        data_dir: dir.clone(),
        broker: config.broker.clone(),
        agent_version: fleetcast_proto::VERSION.to_owned(),
        key_gen,
        kinds,
        outbox: OutboxStatus {
            events: outbox.len(),
            oldest_at_ms,
        },
        last_contact: Contact::read(dir).unwrap_or_default(),
        last_error: ledger.last_error,
        sale_lock: SaleLockStatus {
            path: lock.path().to_owned(),
            sales: holders.map(|h| h.shared),
            installing: holders.map(|h| h.exclusive > 0),
            busy_file: dir.join("busy").exists(),
        },
    })
}

fn waiting_for(policy: &InstallPolicy) -> String {
    match policy {
        InstallPolicy::Window { start, end, .. } => format!("window {start}-{end}"),
        InstallPolicy::Idle => "idle".into(),
        InstallPolicy::DownloadOnly => "activate".into(),
        InstallPolicy::Immediate => "nothing (installs next)".into(),
    }
}

/// The slots of one kind, if its slots installer has written any.
fn slots(root: &Path) -> Option<SlotsStatus> {
    if !root.is_dir() {
        return None;
    }
    let read = |slot: &str| {
        let file = |name: &str| {
            std::fs::read_to_string(root.join(slot).join(name))
                .ok()
                .map(|s| s.trim().to_owned())
        };
        SlotContent {
            version: file("version"),
            artifact: file("artifact_id").and_then(|a| a.parse().ok()),
        }
    };
    let current = std::fs::read_link(root.join("current"))
        .ok()
        .map(|t| t.to_string_lossy().into_owned());
    Some(SlotsStatus {
        current,
        a: read("a"),
        b: read("b"),
    })
}

/// `2025-06-01 12:00:03 UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `3 min ago`, `2 h ago`, `in the future` (the clock went back).
fn ago(now_ms: u64, ms: u64) -> String {
    let Some(d) = now_ms.checked_sub(ms) else {
        return "in the future: check the clock".into();
    };
    let s = d / 1000;
    match s {
        0..=59 => format!("{s} s ago"),
        60..=5999 => format!("{} min ago", s / 60),
        6000..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

fn when(now_ms: u64, ms: Option<u64>) -> String {
    ms.map_or("never".into(), |ms| {
        format!("{} ({})", utc(ms), ago(now_ms, ms))
    })
}

fn version_of(i: &Option<Installed>) -> String {
    i.as_ref().map_or("-".into(), |i| i.version.clone())
}

/// Columns separated by two spaces, each as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// The status for a person.
pub fn render_text(s: &DeviceStatus, now_ms: u64) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<12}{value}\n"));
    let groups: Vec<&str> = s.groups.iter().map(|g| g.as_str()).collect();
    field(
        "machine",
        format!(
            "{} (groups: {}{}; agent {}; platform key generation {})",
            s.machine,
            if groups.is_empty() {
                "none".into()
            } else {
                groups.join(", ")
            },
            if s.groups_from == "platform" {
                ", as the platform says"
            } else {
                ""
            },
            s.agent_version,
            s.key_gen
        ),
    );
    field("config", s.config.display().to_string());
    for p in &s.config_problems {
        let at = match (p.line, p.column) {
            (Some(l), Some(c)) => format!("line {l}:{c}: "),
            _ => String::new(),
        };
        field(
            "",
            format!(
                "PROBLEM {at}{} (fix: {}); the agent will not start",
                p.problem, p.fix
            ),
        );
    }
    field("data dir", s.data_dir.display().to_string());
    field(
        "broker",
        format!(
            "{}, last connected {}",
            s.broker,
            when(now_ms, s.last_contact.broker_at_ms)
        ),
    );
    let heard = when(now_ms, s.last_contact.platform_at_ms);
    field(
        "platform",
        match &s.last_contact.platform_message {
            Some(what) => format!("last heard {heard}: {what}"),
            None => format!("last heard {heard}"),
        },
    );
    field(
        "outbox",
        match (s.outbox.events, s.outbox.oldest_at_ms) {
            (0, _) => "empty: the platform has every status event".into(),
            (n, Some(at)) => format!(
                "{n} status event(s) not acknowledged yet, the oldest from {}",
                when(now_ms, Some(at))
            ),
            (n, None) => format!("{n} status event(s) not acknowledged yet"),
        },
    );
    let lock = &s.sale_lock;
    let mut sale = match (lock.sales, lock.installing) {
        (Some(0), Some(false)) => "free".to_owned(),
        (Some(n), Some(installing)) => {
            let mut parts = Vec::new();
            if n > 0 {
                parts.push(format!("{n} sale(s) in progress"));
            }
            if installing {
                parts.push("an install holds it".into());
            }
            parts.join(", ")
        }
        _ => "holders unknown".into(),
    };
    if lock.busy_file {
        sale.push_str("; the deprecated busy file exists (a sale by the old protocol)");
    }
    field("sale lock", format!("{}: {sale}", lock.path.display()));
    field(
        "last error",
        match &s.last_error {
            None => "none".into(),
            Some(e) => format!(
                "{} {} {}{}: {}: {}",
                when(now_ms, Some(e.at_ms)),
                e.kind,
                e.version,
                e.release
                    .as_ref()
                    .map_or(String::new(), |r| format!(" ({r})")),
                e.phase,
                e.error
            ),
        },
    );
    let rows: Vec<Vec<String>> = s
        .kinds
        .iter()
        .map(|(kind, k)| {
            let slots = match &k.slots {
                None => "-".to_owned(),
                Some(sl) => {
                    let name = |n: &str, c: &SlotContent| {
                        format!("{n}={}", c.version.as_deref().unwrap_or("empty"))
                    };
                    let current = sl.current.as_deref().unwrap_or("none");
                    format!(
                        "current {current} ({}, {})",
                        name("a", &sl.a),
                        name("b", &sl.b)
                    )
                }
            };
            let mut job = match &k.job {
                None => "-".to_owned(),
                Some(j) => {
                    let mut t = format!("{} {} {}", j.release, j.version, step_name(j.step));
                    if let Some(p) = j.progress.filter(|p| p.total > 0) {
                        t.push_str(&format!(" {} %", p.bytes * 100 / p.total));
                    }
                    if let Some(w) = &j.waiting_for {
                        t.push_str(&format!(", waiting for {w}"));
                    }
                    t
                }
            };
            if let Some(q) = &k.queued {
                job.push_str(&format!("; then {} {}", q.release, q.version));
            }
            let last = k.last.as_ref().map_or("-".into(), |l| {
                let r = l
                    .release
                    .as_ref()
                    .map_or(String::new(), |r| format!(" {r}"));
                format!("{}{r} {}", l.phase, l.version)
            });
            vec![
                kind.to_string(),
                version_of(&k.installed),
                version_of(&k.previous),
                k.installer.to_owned(),
                slots,
                job,
                last,
            ]
        })
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no versions known yet (no initial_versions and nothing installed)\n");
    } else {
        out.push_str(&table(
            &[
                "KIND",
                "INSTALLED",
                "PREVIOUS",
                "INSTALLER",
                "SLOTS",
                "JOB",
                "LAST REPORTED",
            ],
            &rows,
        ));
    }
    out
}

fn step_name(step: Step) -> &'static str {
    match step {
        Step::Downloading => "downloading",
        Step::Deferred => "downloaded, deferred",
        Step::Installing => "installing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_600_001_000), "2026-11-25 09:46:41 UTC");
        assert_eq!(ago(10_000, 7_000), "3 s ago");
        assert_eq!(ago(3_600_000, 0), "60 min ago");
        assert_eq!(ago(0, 1), "in the future: check the clock");
    }

    #[test]
    fn a_table_lines_up_its_columns() {
        let t = table(
            &["KIND", "INSTALLED"],
            &[
                vec!["app".into(), "2.4.1".into()],
                vec!["firmware".into(), "-".into()],
            ],
        );
        assert_eq!(t, "KIND      INSTALLED\napp       2.4.1\nfirmware  -\n");
    }
}
