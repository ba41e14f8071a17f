//! Plain-text tables and human-readable UTC times for CLI output.
//!
//! # Cells are made safe to print
//!
//! Table cells may hold strings a machine sent (versions, `error`, ...). [`render`] passes every
//! cell (and header) through [`cell`] before measuring or printing it, so no cell can add a
//! line, move the cursor, change colours or reorder text in the operator's terminal:
//!
//! - Control characters are shown as a visible escape instead of being printed (`\n`, `\x1b`,
//!   `\u{202e}`, ...: the rules are those of [`fleetcast_proto::text`], shared with the
//!   platform's log lines); `--json` gives the exact value.
//! - A cell longer than [`MAX_CELL_CHARS`] characters (counted after escaping) keeps its first
//!   [`MAX_CELL_CHARS`] characters followed by `…(+N chars)`, where N is how many characters
//!   of the escaped text were left out.
//!
//! Everything else, including non-ASCII text such as `é` or `上海`, is printed unchanged.
//! Columns are padded by hand to the widest cell counted in characters, so no width, however
//! large, can make formatting panic. `--json` output does not go through this module and
//! stays exact.

use chrono::{TimeZone, Utc};

/// Longest cell a table prints, in characters. Ids and versions are at most 64 characters and
/// times 19, so a single value never comes near it; only a list (a machine's groups or
/// versions, a release's targets) or a free-text `error` can, and past this a cell wraps over
/// several lines of an ordinary terminal and the table can no longer be read anyway. The full
/// value is in `--json`.
pub const MAX_CELL_CHARS: usize = 200;

/// `s` made safe for one table cell: control characters escaped, and cut to
/// [`MAX_CELL_CHARS`] characters with a `…(+N chars)` marker (see the module doc).
pub fn cell(s: &str) -> String {
    fleetcast_proto::text::shown_max(s, MAX_CELL_CHARS).to_string()
}

/// `2026-11-25 12:00:03` (UTC), or `-` for none. A time past the year 9999 (a machine's
/// clock is its own, and never checked: protocol.md §2) shows as its number, not wrapped into
/// 1969 or shown as a year of five digits.
pub fn time(ms: Option<u64>) -> String {
    /// 9999-12-31 23:59:59.999 UTC.
    const LAST_MS: u64 = 253_402_300_799_999;
    match ms {
        None => "-".into(),
        Some(ms) if ms > LAST_MS => format!("{ms} ms (not a date)"),
        Some(ms) => match Utc.timestamp_millis_opt(ms as i64).single() {
            Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
            None => format!("{ms} ms (not a date)"),
        },
    }
}

/// Bytes as `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Left-aligned columns separated by two spaces; no trailing spaces. Every cell goes through
/// [`cell`] first, so each row is one line whatever the cells hold.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let headers: Vec<String> = headers.iter().map(|h| cell(h)).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            out.push_str(c);
            if i + 1 < cells.len() {
                // Padded by hand: `{:<w$}` panics on a width over u16::MAX.
                let width = widths.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(c.chars().count()) + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&headers);
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_seconds() {
        assert_eq!(time(Some(1_795_608_003_000)), "2026-11-25 12:00:03");
        assert_eq!(time(None), "-");
        // What a machine's own clock may say: never wrapped or shown past 9999.
        assert_eq!(time(Some(253_402_300_799_999)), "9999-12-31 23:59:59");
        assert_eq!(
            time(Some(253_402_300_800_000)),
            "253402300800000 ms (not a date)"
        );
        assert_eq!(time(Some(u64::MAX)), "18446744073709551615 ms (not a date)");
    }

    #[test]
    fn tables_align_columns() {
        let t = render(
            &["A", "LONG"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "".into()]],
        );
        assert_eq!(t, "A    LONG\nxyz  1\nq\n");
    }

    #[test]
    fn byte_sizes_are_human() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn control_characters_are_escaped_and_stay_on_one_line() {
        let evil = "1.0\nvic-1  yes  app=0.0.1-COMPROMISED\r\x1b[31mred\x1b[8m";
        let t = render(
            &["MACHINE", "VERSIONS", "BUSY"],
            &[vec!["vm-1".into(), evil.into(), "idle".into()]],
        );
        assert_eq!(t.lines().count(), 2, "{t:?}");
        let row = t.lines().nth(1).unwrap();
        assert!(
            row.contains("1.0\\nvic-1  yes  app=0.0.1-COMPROMISED\\r\\x1b[31mred\\x1b[8m  idle"),
            "{row:?}"
        );
        assert!(!t.contains('\x1b') && !t.contains('\r'), "{t:?}");
        assert_eq!(cell("a\tb\0c\x7fd"), "a\\tb\\x00c\\x7fd");
        assert_eq!(cell("\u{85}\u{9b}31m"), "\\u{85}\\u{9b}31m");
        assert_eq!(
            cell("abc\u{202e}fed\u{2066}x\u{2069}"),
            "abc\\u{202e}fed\\u{2066}x\\u{2069}"
        );
        assert_eq!(cell("a\u{2028}b"), "a\\u{2028}b");
    }

    #[test]
    fn a_huge_cell_is_truncated_without_panicking() {
        let huge = "9".repeat(70_000);
        let t = render(
            &["VERSION", "MACHINES"],
            &[
                vec![huge.clone(), "1".into()],
                vec!["2.0".into(), "3".into()],
            ],
        );
        let row = t.lines().nth(1).unwrap();
        let shown = format!(
            "{}…(+{} chars)",
            "9".repeat(MAX_CELL_CHARS),
            70_000 - MAX_CELL_CHARS
        );
        assert_eq!(row, format!("{shown}  1"));
        // The other rows are padded to the truncated cell, not to 70,000 characters.
        let width = shown.chars().count();
        assert_eq!(t.lines().nth(2).unwrap(), format!("{:<width$}  3", "2.0"));
        // The escaped text is what counts: 150 newlines are 300 characters shown.
        assert_eq!(
            cell(&"\n".repeat(150)),
            format!("{}…(+100 chars)", "\\n".repeat(100))
        );
        // At the cap exactly, nothing is cut.
        let full = "x".repeat(MAX_CELL_CHARS);
        assert_eq!(cell(&full), full);
    }

    #[test]
    fn ordinary_text_is_unchanged_and_aligned() {
        for s in ["2.4.1", "café", "上海-北区", "é", "", "C:\\path\\x41"] {
            assert_eq!(cell(s), s);
        }
        let t = render(
            &["GROUP", "NOTE"],
            &[
                vec!["上海".into(), "é".into()],
                vec!["shanghai".into(), "ok".into()],
            ],
        );
        assert_eq!(t, "GROUP     NOTE\n上海        é\nshanghai  ok\n");
    }
}
