//! Release notices (platform -> machine or group, signed, retained) and install policies.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{ArtifactId, GroupId, Kind, MachineId, ReleaseId};

/// Who a notice addresses. A machine acts on a notice only if it names the machine itself or
/// one of its groups, so a notice replayed onto another machine's topic is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Machine(MachineId),
    Group(GroupId),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Machine(m) => write!(f, "machine {m}"),
            Target::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// What a machine needs to fetch and check an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// blake3 of the whole file.
    pub id: ArtifactId,
    pub size: u64,
    /// Bytes per chunk frame: a power of two from 1 KiB to 1 MiB.
    pub chunk_size: u32,
    /// Original file name, informative only.
    pub name: String,
}

/// When a machine may install a release once it is downloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InstallPolicy {
    /// Download and install at once.
    Immediate,
    /// Download at once; install only between `start` and `end` ("HH:MM", the window may wrap
    /// past midnight). Times are in the machine's local time, or at `utc_offset_minutes` east of
    /// UTC when given.
    Window {
        start: String,
        end: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        utc_offset_minutes: Option<i32>,
    },
    /// Download at once; install only while the machine is not serving a customer.
    Idle,
    /// Download at once; install on a later `activate` command.
    DownloadOnly,
}

/// Why a policy string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad install policy {input:?}: {why} (expected immediate, idle, download-only, or window:HH:MM-HH:MM[@+HH:MM])")]
pub struct PolicyError {
    pub input: String,
    pub why: String,
}

/// Minutes after midnight of an "HH:MM" string: two ASCII digits each, nothing else.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    // Digits checked first: `u32::from_str` alone also takes "+1".
    let two_digits = |p: &str| match p.as_bytes() {
        &[a, b] if a.is_ascii_digit() && b.is_ascii_digit() => {
            Some(u32::from((a - b'0') * 10 + (b - b'0')))
        }
        _ => None,
    };
    let (h, m) = s.split_once(':')?;
    let (h, m) = (two_digits(h)?, two_digits(m)?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn parse_offset(s: &str) -> Option<i32> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let minutes = parse_hhmm(rest)? as i32;
    (minutes <= 14 * 60).then_some(sign * minutes)
}

impl InstallPolicy {
    /// Checks a policy received over the wire (the CLI form is checked by `FromStr`).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let InstallPolicy::Window {
            start,
            end,
            utc_offset_minutes,
        } = self
        {
            let err = |why: &str| PolicyError {
                input: self.to_string(),
                why: why.to_owned(),
            };
            let (s, e) = (parse_hhmm(start), parse_hhmm(end));
            if s.is_none() || e.is_none() {
                return Err(err("window times must be HH:MM"));
            }
            if s == e {
                return Err(err("window start and end are equal"));
            }
            // unsigned_abs: i32::MIN.abs() overflows (a panic in debug; in release it stays
            // negative and passed this check).
            if utc_offset_minutes.is_some_and(|o| o.unsigned_abs() > 14 * 60) {
                return Err(err("UTC offset beyond +-14:00"));
            }
        }
        Ok(())
    }

    /// Whether an install may start at `now_utc_ms`, for a machine whose local time is
    /// `local_offset_minutes` east of UTC and which is `busy` serving a customer or not.
    pub fn allows_install_now(
        &self,
        now_utc_ms: u64,
        local_offset_minutes: i32,
        busy: bool,
    ) -> bool {
        match self {
            InstallPolicy::Immediate => true,
            InstallPolicy::DownloadOnly => false,
            InstallPolicy::Idle => !busy,
            InstallPolicy::Window {
                start,
                end,
                utc_offset_minutes,
            } => {
                let (Some(s), Some(e)) = (parse_hhmm(start), parse_hhmm(end)) else {
                    return false;
                };
                let offset = utc_offset_minutes.unwrap_or(local_offset_minutes) as i64;
                let minute_of_day =
                    ((now_utc_ms / 60_000) as i64 + offset).rem_euclid(24 * 60) as u32;
                if s < e {
                    (s..e).contains(&minute_of_day)
                } else {
                    minute_of_day >= s || minute_of_day < e
                }
            }
        }
    }
}

impl fmt::Display for InstallPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallPolicy::Immediate => f.write_str("immediate"),
            InstallPolicy::Idle => f.write_str("idle"),
            InstallPolicy::DownloadOnly => f.write_str("download-only"),
            InstallPolicy::Window {
                start,
                end,
                utc_offset_minutes,
            } => {
                write!(f, "window:{start}-{end}")?;
                if let Some(o) = utc_offset_minutes {
                    let sign = if *o < 0 { '-' } else { '+' };
                    let minutes = o.unsigned_abs();
                    write!(f, "@{sign}{:02}:{:02}", minutes / 60, minutes % 60)?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for InstallPolicy {
    type Err = PolicyError;
    fn from_str(input: &str) -> Result<Self, PolicyError> {
        let err = |why: &str| PolicyError {
            input: input.to_owned(),
            why: why.to_owned(),
        };
        match input {
            "immediate" | "now" => return Ok(InstallPolicy::Immediate),
            "idle" => return Ok(InstallPolicy::Idle),
            "download-only" | "download_only" => return Ok(InstallPolicy::DownloadOnly),
            _ => {}
        }
        let spec = input
            .strip_prefix("window:")
            .ok_or_else(|| err("unknown policy"))?;
        let (range, offset) = match spec.split_once('@') {
            Some((r, o)) => (
                r,
                Some(parse_offset(o).ok_or_else(|| err("bad UTC offset"))?),
            ),
            None => (spec, None),
        };
        let (start, end) = range
            .split_once('-')
            .ok_or_else(|| err("window needs START-END"))?;
        let policy = InstallPolicy::Window {
            start: start.to_owned(),
            end: end.to_owned(),
            utc_offset_minutes: offset,
        };
        policy.validate().map_err(|e| err(&e.why))?;
        Ok(policy)
    }
}

/// The signed body of a release notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseNotice {
    pub release: ReleaseId,
    /// Platform-wide, strictly increasing. A machine keeps, per kind, the highest `seq` it
    /// accepted and ignores anything not newer: the later of a machine and a group notice wins,
    /// and an old notice replayed by anyone is refused.
    pub seq: u64,
    pub target: Target,
    pub kind: Kind,
    pub version: String,
    pub artifact: ArtifactRef,
    pub policy: InstallPolicy,
    /// A rollback to a stable version: allowed to go down in version.
    #[serde(default)]
    pub rollback: bool,
    pub issued_at_ms: u64,
}

impl ReleaseNotice {
    /// Whether this notice is meant for `machine`, a member of `groups`.
    pub fn addresses(&self, machine: &MachineId, groups: &[GroupId]) -> bool {
        match &self.target {
            Target::Machine(m) => m == machine,
            Target::Group(g) => groups.contains(g),
        }
    }
}

/// Compares version strings: dot/dash separated parts, numeric parts numerically
/// (`2.10.0 > 2.9.1`), other parts as text, and a longer version wins a tie (`1.2.1 > 1.2`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let split = |s: &str| -> Vec<String> {
        s.split(['.', '-', '+'])
            .map(|p| p.to_owned())
            .collect::<Vec<_>>()
    };
    let (pa, pb) = (split(a), split(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Greater,
            (Err(_), Ok(_)) => Ordering::Less,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Version strings: 1 to 64 printable ASCII characters, no spaces.
pub fn validate_version(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 64 || !v.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "version {v:?} must be 1 to 64 printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/asyncapi.yaml says a target has exactly one key: the one place where a field the
    /// receiver does not know is not ignored.
    #[test]
    fn a_target_is_exactly_one_key() {
        let t: Target = serde_json::from_str(r#"{"group":"g1"}"#).unwrap();
        assert_eq!(t, Target::Group("g1".parse().unwrap()));
        for other in [
            r#"{"group":"g1","machine":"vm-1"}"#,
            r#"{"machine":"vm-1","note":1}"#,
            r#"{}"#,
        ] {
            assert!(serde_json::from_str::<Target>(other).is_err(), "{other}");
        }
    }

    #[test]
    fn policies_parse_from_their_cli_form_and_print_back() {
        for text in [
            "immediate",
            "idle",
            "download-only",
            "window:02:00-04:00",
            "window:22:30-01:15@+08:00",
            "window:01:00-02:00@-05:30",
        ] {
            let p: InstallPolicy = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
        }
    }

    #[test]
    fn bad_policies_are_refused_with_the_reason() {
        for bad in [
            "later",
            "window:2:00-04:00",
            "window:02:00",
            "window:02:00-02:00",
            "window:25:00-01:00",
            "window:01:00-02:00@+15:00",
        ] {
            let err = bad.parse::<InstallPolicy>().unwrap_err();
            assert_eq!(err.input, bad);
        }
    }

    #[test]
    fn window_times_are_two_digits_each_and_a_sign_is_not_a_digit() {
        assert_eq!(parse_hhmm("02:30"), Some(150));
        assert_eq!(parse_hhmm("23:59"), Some(23 * 60 + 59));
        // Found by fuzzing (release_policy): u32's parser takes a leading '+'.
        for bad in [
            "+2:20", "02:+5", "+0:+0", "2:300", "24:00", "12:60", " 1:00", "12:00 ",
        ] {
            assert_eq!(parse_hhmm(bad), None, "{bad}");
        }
        assert!("window:+2:20-04:00".parse::<InstallPolicy>().is_err());
        let wire = InstallPolicy::Window {
            start: "+2:20".into(),
            end: "04:00".into(),
            utc_offset_minutes: None,
        };
        assert!(wire.validate().is_err());
        assert_eq!(parse_offset("+-1:00"), None);
        assert_eq!(parse_offset("++1:00"), None);
    }

    #[test]
    fn the_most_negative_offset_is_refused_and_printed_without_overflow() {
        let p: InstallPolicy = serde_json::from_str(
            r#"{"type":"window","start":"02:00","end":"04:00","utc_offset_minutes":-2147483648}"#,
        )
        .unwrap();
        let err = p.validate().unwrap_err();
        assert_eq!(err.why, "UTC offset beyond +-14:00");
        assert_eq!(err.input, "window:02:00-04:00@-35791394:08");
        let most = InstallPolicy::Window {
            start: "02:00".into(),
            end: "04:00".into(),
            utc_offset_minutes: Some(i32::MAX),
        };
        assert!(most.validate().is_err());
        let edge: InstallPolicy = "window:02:00-04:00@-14:00".parse().unwrap();
        assert_eq!(edge.to_string(), "window:02:00-04:00@-14:00");
    }

    #[test]
    fn policy_json_is_tagged_by_type() {
        let p: InstallPolicy = "window:02:00-04:00".parse().unwrap();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "window", "start": "02:00", "end": "04:00"})
        );
        let back: InstallPolicy = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            serde_json::to_value(InstallPolicy::DownloadOnly).unwrap(),
            serde_json::json!({"type": "download_only"})
        );
    }

    #[test]
    fn window_allows_installs_only_inside_it_and_wraps_midnight() {
        let at = |h: u64, m: u64| (h * 60 + m) * 60_000;
        let day: InstallPolicy = "window:02:00-04:00".parse().unwrap();
        assert!(!day.allows_install_now(at(1, 59), 0, false));
        assert!(day.allows_install_now(at(2, 0), 0, false));
        assert!(day.allows_install_now(at(3, 59), 0, true));
        assert!(!day.allows_install_now(at(4, 0), 0, false));
        // 18:30 UTC is 02:30 at +08:00.
        assert!(day.allows_install_now(at(18, 30), 8 * 60, false));
        let night: InstallPolicy = "window:23:00-01:00".parse().unwrap();
        assert!(night.allows_install_now(at(23, 30), 0, false));
        assert!(night.allows_install_now(at(0, 30), 0, false));
        assert!(!night.allows_install_now(at(12, 0), 0, false));
        let pinned: InstallPolicy = "window:02:00-04:00@+08:00".parse().unwrap();
        assert!(
            pinned.allows_install_now(at(18, 30), 0, false),
            "explicit offset beats local"
        );
    }

    #[test]
    fn idle_waits_for_a_free_machine_and_download_only_never_installs_by_itself() {
        assert!(InstallPolicy::Idle.allows_install_now(0, 0, false));
        assert!(!InstallPolicy::Idle.allows_install_now(0, 0, true));
        assert!(!InstallPolicy::DownloadOnly.allows_install_now(0, 0, false));
        assert!(InstallPolicy::Immediate.allows_install_now(0, 0, true));
    }

    #[test]
    fn versions_compare_numerically_by_part() {
        use Ordering::*;
        assert_eq!(compare_versions("2.10.0", "2.9.1"), Greater);
        assert_eq!(compare_versions("2.4.1", "2.4.1"), Equal);
        assert_eq!(compare_versions("2.4", "2.4.1"), Less);
        assert_eq!(compare_versions("1.0.0-rc1", "1.0.0-rc2"), Less);
        assert_eq!(
            compare_versions("1.0.0", "1.0.0-rc1"),
            Less,
            "longer wins a tie"
        );
    }

    #[test]
    fn notices_address_their_machine_or_its_groups_only() {
        let m = MachineId::new("vm-1").unwrap();
        let g = GroupId::new("g").unwrap();
        let mut n = ReleaseNotice {
            release: ReleaseId::new("r-1").unwrap(),
            seq: 1,
            target: Target::Machine(m.clone()),
            kind: Kind::new("app").unwrap(),
            version: "1".into(),
            artifact: ArtifactRef {
                id: ArtifactId::of(b"a"),
                size: 1,
                chunk_size: 65536,
                name: "a".into(),
            },
            policy: InstallPolicy::Immediate,
            rollback: false,
            issued_at_ms: 0,
        };
        assert!(n.addresses(&m, &[]));
        assert!(!n.addresses(&MachineId::new("vm-2").unwrap(), std::slice::from_ref(&g)));
        n.target = Target::Group(g.clone());
        assert!(n.addresses(&m, &[g]));
        assert!(!n.addresses(&m, &[]));
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["target"], serde_json::json!({"group": "g"}));
        assert_eq!(serde_json::from_value::<ReleaseNotice>(json).unwrap(), n);
    }
}
