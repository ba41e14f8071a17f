//! Text that came from outside, made safe to show: in an operator's terminal table or in a log
//! line; and a gate that keeps one client from filling the log.
//!
//! # Shown text
//!
//! [`shown`] (log lines) and [`shown_max`] (any length, e.g. table cells) wrap a string in a
//! [`Display`](fmt::Display) that writes it on one line, escaped and cut, without allocating:
//!
//! - Control characters are written as a visible escape instead: `\n`, `\r` and `\t` for those
//!   three; `\xNN` (two lowercase hex digits) for the other C0 controls U+0000–U+001F and DEL
//!   U+007F (so ESC shows as `\x1b`); `\u{NNNN}` (lowercase hex) for the C1 controls
//!   U+0080–U+009F and for the Unicode bidi and line controls U+061C, U+200E, U+200F, U+2028,
//!   U+2029, U+202A–U+202E and U+2066–U+2069 (so a right-to-left override shows as
//!   `\u{202e}`). A backslash already in the text is written as is: the text shown is not meant
//!   to be parsed back.
//! - Text longer than the limit (counted after escaping) keeps its first `max` characters
//!   followed by `…(+N chars)`, N being how many characters of the escaped text were left out.
//!
//! Everything else, including non-ASCII text such as `é` or `上海`, is written unchanged. So a
//! machine that puts a newline and a forged log line in a version string, or 60,000 characters
//! in a phase name, costs the log one line of at most [`LOG_CHARS`] characters of its value.
//!
//! # Log gate
//!
//! A rejected message is worth one log line; a machine that sends a thousand a second is worth
//! a few lines and a count. [`LogGate`] admits at most `per_window` lines per key (a machine, a
//! user name, a peer address) per window and counts the rest, and reports that count with the
//! key's next admitted line.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest value a log line shows, in characters. Ids and versions are at most 64 characters,
/// so a valid value is never cut; only what a client made up can be.
pub const LOG_CHARS: usize = 200;

/// Whether `c` is written as an escape (see the module doc).
pub fn is_control(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{2028}'
        | '\u{2029}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}')
}

/// `text` escaped and cut to [`LOG_CHARS`] characters, for a log line.
pub fn shown(text: &str) -> Shown<'_> {
    shown_max(text, LOG_CHARS)
}

/// `text` escaped and cut to `max` characters.
pub fn shown_max(text: &str, max: usize) -> Shown<'_> {
    Shown { text, max }
}

/// See [`shown`].
#[derive(Clone, Copy)]
pub struct Shown<'a> {
    text: &'a str,
    max: usize,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kept = 0usize;
        let mut dropped = 0usize;
        let mut piece = Piece::default();
        for c in self.text.chars() {
            piece.set(c);
            for c in piece.as_str().chars() {
                if kept < self.max {
                    f.write_char(c)?;
                    kept += 1;
                } else {
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            write!(f, "…(+{dropped} chars)")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One character as shown: itself, or its escape (at most `\u{10ffff}`, 10 bytes).
#[derive(Default)]
struct Piece {
    buf: [u8; 12],
    len: usize,
}

impl Piece {
    fn set(&mut self, c: char) {
        self.len = 0;
        // Writing to a 12-byte buffer what is at most 10 bytes cannot fail.
        let _ = match c {
            c if !is_control(c) => self.write_char(c),
            '\n' => self.write_str("\\n"),
            '\r' => self.write_str("\\r"),
            '\t' => self.write_str("\\t"),
            c if (c as u32) < 0x80 => write!(self, "\\x{:02x}", c as u32),
            c => write!(self, "\\u{{{:x}}}", c as u32),
        };
    }

    fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl fmt::Write for Piece {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Admits at most `per_window` log lines per key per window (see the module doc). Shared
/// between tasks; its lock is held for a map lookup only.
pub struct LogGate {
    per_window: u32,
    window: Duration,
    keys: Mutex<HashMap<String, Slot>>,
}

struct Slot {
    since: Instant,
    logged: u32,
    quiet: u64,
}

/// What [`LogGate::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log this line; `quiet_before` lines of this key were left out since its last one.
    Log { quiet_before: u64 },
    /// Leave this line out (it is counted).
    Quiet,
}

impl Default for LogGate {
    fn default() -> Self {
        Self::per_minute()
    }
}

impl LogGate {
    /// Keys kept at most; past this, keys whose window has ended are forgotten (with their
    /// counts), and if none has, the new key is logged without being remembered.
    pub const MAX_KEYS: usize = 4096;

    pub fn new(per_window: u32, window: Duration) -> Self {
        LogGate {
            per_window,
            window,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Five lines per key per minute: enough to see what a client does wrong.
    pub fn per_minute() -> Self {
        Self::new(5, Duration::from_secs(60))
    }

    pub fn admit(&self, key: &str) -> Admit {
        self.admit_at(key, Instant::now())
    }

    fn admit_at(&self, key: &str, now: Instant) -> Admit {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = keys.get_mut(key) {
            if now.saturating_duration_since(slot.since) >= self.window {
                let quiet_before = slot.quiet;
                *slot = Slot {
                    since: now,
                    logged: 1,
                    quiet: 0,
                };
                return Admit::Log { quiet_before };
            }
            if slot.logged < self.per_window {
                slot.logged += 1;
                return Admit::Log { quiet_before: 0 };
            }
            slot.quiet += 1;
            return Admit::Quiet;
        }
        if keys.len() >= Self::MAX_KEYS {
            keys.retain(|_, s| now.saturating_duration_since(s.since) < self.window);
            if keys.len() >= Self::MAX_KEYS {
                return Admit::Log { quiet_before: 0 };
            }
        }
        keys.insert(
            key.to_owned(),
            Slot {
                since: now,
                logged: 1,
                quiet: 0,
            },
        );
        Admit::Log { quiet_before: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> String {
        shown(text).to_string()
    }

    #[test]
    fn a_forged_log_line_stays_on_one_line() {
        let evil = "install\n2026-11-26T00:00:00Z  INFO machine vm-9 rolled back\r\x1b[2K";
        let out = s(evil);
        assert!(!out.contains('\n') && !out.contains('\r') && !out.contains('\x1b'));
        assert_eq!(
            out,
            "install\\n2026-11-26T00:00:00Z  INFO machine vm-9 rolled back\\r\\x1b[2K"
        );
        assert_eq!(s("a\tb\0c\x7fd"), "a\\tb\\x00c\\x7fd");
        assert_eq!(s("\u{85}\u{9b}31m"), "\\u{85}\\u{9b}31m");
        assert_eq!(
            s("abc\u{202e}fed\u{2066}x\u{2069}"),
            "abc\\u{202e}fed\\u{2066}x\\u{2069}"
        );
        assert_eq!(s("a\u{2028}b"), "a\\u{2028}b");
    }

    #[test]
    fn a_long_value_is_cut_with_a_count() {
        let huge = "9".repeat(60_000);
        assert_eq!(
            s(&huge),
            format!("{}…(+{} chars)", "9".repeat(LOG_CHARS), 60_000 - LOG_CHARS)
        );
        // The escaped text is what counts: 150 newlines are 300 characters shown.
        assert_eq!(
            s(&"\n".repeat(150)),
            format!("{}…(+100 chars)", "\\n".repeat(100))
        );
        let full = "x".repeat(LOG_CHARS);
        assert_eq!(s(&full), full);
        assert_eq!(shown_max("abcdef", 3).to_string(), "abc…(+3 chars)");
    }

    #[test]
    fn ordinary_text_is_unchanged() {
        for t in [
            "2.4.1",
            "café",
            "上海-北区",
            "é",
            "",
            "C:\\path\\x41",
            "\u{10ffff}",
        ] {
            assert_eq!(s(t), t);
        }
        assert_eq!(format!("{:?}", shown("a\nb")), "a\\nb");
    }

    #[test]
    fn the_gate_admits_a_few_lines_per_key_and_counts_the_rest() {
        let gate = LogGate::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        let log0 = Admit::Log { quiet_before: 0 };
        assert_eq!(gate.admit_at("vm-1", t0), log0);
        assert_eq!(gate.admit_at("vm-1", t0), log0);
        for _ in 0..1000 {
            assert_eq!(gate.admit_at("vm-1", t0), Admit::Quiet);
        }
        // Another key is not held back by the first.
        assert_eq!(gate.admit_at("vm-2", t0), log0);
        // After the window, the next line says how many were left out.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            gate.admit_at("vm-1", later),
            Admit::Log { quiet_before: 1000 }
        );
        assert_eq!(gate.admit_at("vm-1", later), log0);
        assert_eq!(gate.admit_at("vm-1", later), Admit::Quiet);
    }

    #[test]
    fn the_gate_keeps_a_bounded_number_of_keys() {
        let gate = LogGate::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..LogGate::MAX_KEYS + 100 {
            assert!(matches!(
                gate.admit_at(&format!("k{i}"), t0),
                Admit::Log { .. }
            ));
        }
        assert_eq!(gate.keys.lock().unwrap().len(), LogGate::MAX_KEYS);
        // Once their window has ended, old keys make room.
        let later = t0 + Duration::from_secs(61);
        gate.admit_at("new", later);
        assert_eq!(gate.keys.lock().unwrap().len(), 1);
    }
}
