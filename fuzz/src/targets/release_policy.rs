//! Version and install-policy helpers of `release`. The first byte picks the function:
//! 0 `parse_hhmm`, 1 `compare_versions` (three lines), 2 `validate_version`,
//! 3 `InstallPolicy` from its CLI form, 4 `InstallPolicy` from JSON (as in a notice).

use std::cmp::Ordering;

use fleetcast_proto::release::{compare_versions, parse_hhmm, validate_version};
use fleetcast_proto::InstallPolicy;

use crate::samples::policies;
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    let Some((mode, rest)) = data.split_first() else {
        return Verdict::Rejected;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return Verdict::Rejected;
    };
    match mode % 5 {
        0 => hhmm(text),
        1 => versions(text),
        2 => version(text),
        3 => match text.parse::<InstallPolicy>() {
            Ok(p) => {
                assert!(p.validate().is_ok(), "{text:?} parsed but does not validate");
                check_policy(&p);
                Verdict::Accepted
            }
            Err(e) => {
                assert_eq!(e.input, text);
                Verdict::Rejected
            }
        },
        _ => match serde_json::from_str::<InstallPolicy>(text) {
            Ok(p) => {
                check_policy(&p);
                Verdict::from_ok(p.validate().is_ok())
            }
            Err(_) => Verdict::Rejected,
        },
    }
}

/// "HH:MM" with two digits each, 00:00 to 23:59, and nothing else.
fn hhmm(text: &str) -> Verdict {
    let b = text.as_bytes();
    let digits = |i: usize| u32::from(b[i] - b'0') * 10 + u32::from(b[i + 1] - b'0');
    let expected = (b.len() == 5
        && b[2] == b':'
        && [0, 1, 3, 4].iter().all(|&i| b[i].is_ascii_digit()))
    .then(|| (digits(0), digits(3)))
    .filter(|&(h, m)| h < 24 && m < 60)
    .map(|(h, m)| h * 60 + m);
    assert_eq!(parse_hhmm(text), expected, "{text:?}");
    Verdict::from_ok(expected.is_some())
}

/// A total order: reflexive, antisymmetric and transitive.
fn versions(text: &str) -> Verdict {
    let mut lines = text.splitn(3, '\n');
    let (a, b, c) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    for v in [a, b, c] {
        assert_eq!(compare_versions(v, v), Ordering::Equal, "{v:?}");
    }
    let ab = compare_versions(a, b);
    assert_eq!(compare_versions(b, a), ab.reverse(), "{a:?} {b:?}");
    let bc = compare_versions(b, c);
    if ab != Ordering::Greater && bc != Ordering::Greater {
        assert_ne!(
            compare_versions(a, c),
            Ordering::Greater,
            "{a:?} <= {b:?} <= {c:?}"
        );
    }
    Verdict::Accepted
}

fn version(text: &str) -> Verdict {
    let expected =
        (1..=64).contains(&text.len()) && text.bytes().all(|c| c.is_ascii_graphic());
    assert_eq!(validate_version(text).is_ok(), expected, "{text:?}");
    Verdict::from_ok(expected)
}

/// What holds for any policy a machine receives: validation and printing never panic, the
/// install decision never panics, and a valid policy prints to a CLI form that parses back to
/// itself.
pub fn check_policy(p: &InstallPolicy) {
    let printed = p.to_string();
    for (now, offset) in [(0, 0), (u64::MAX, i32::MAX), (1_760_000_000_000, i32::MIN)] {
        let _ = p.allows_install_now(now, offset, false);
    }
    if p.validate().is_ok() {
        assert_eq!(printed.parse::<InstallPolicy>().as_ref(), Ok(p), "{printed}");
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let with = |mode: u8, text: &str| {
        let mut v = vec![mode];
        v.extend_from_slice(text.as_bytes());
        v
    };
    let mut out = vec![
        with(0, "02:30"),
        with(0, "23:59"),
        with(1, "2.10.0\n2.9.1\n2.9.1-rc1"),
        with(1, "1.0.0-rc1\n1.0.0\n1.0"),
        with(2, "2.4.1+build.7"),
    ];
    for p in policies() {
        out.push(with(3, &p.to_string()));
        out.push(with(
            4,
            &serde_json::to_string(&p).expect("policies serialize"),
        ));
    }
    out
}
