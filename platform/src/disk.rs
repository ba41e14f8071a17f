//! Free space where the platform keeps its data, watched so an operator hears of a filling disk
//! before it is full.
//!
//! Why: on a full disk sled's write fails, and sled then refuses every later operation until the
//! database is opened again (its "global error"), so `serve` stops with `No space left on device`
//! rather than run on without storing. Nothing acknowledged is lost: machines keep what was not
//! acknowledged and send it again once `serve` is back (docs/operations.md, "A full disk"). A
//! warning ahead of that, in the log an operator already watches, is what leaves time to act.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often free space is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);
/// While space stays low, the warning is repeated this often.
pub const WARN_EVERY: Duration = Duration::from_secs(600);
/// Free space under this is low, whatever the disk's size.
pub const LOW_BYTES: u64 = 1 << 30;
/// ... and so is under this share of the disk (per mille), on a disk large enough for it.
pub const LOW_PER_MILLE: u64 = 50;

/// Bytes free for an unprivileged writer, and the file system's size, where `path` is.
pub fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to a statvfs to fill.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // `From`, not `as`: the fields are 32 bits wide on some targets (64 here, hence the allow).
    #[allow(clippy::useless_conversion)]
    let (unit, free, total) = (
        u64::from(st.f_frsize),
        u64::from(st.f_bavail),
        u64::from(st.f_blocks),
    );
    Ok((free.saturating_mul(unit), total.saturating_mul(unit)))
}

/// Whether `free` of `total` bytes is low: under [`LOW_BYTES`], or under [`LOW_PER_MILLE`] of
/// the disk.
pub fn is_low(free: u64, total: u64) -> bool {
    free < LOW_BYTES || (free as u128) * 1000 < (total as u128) * LOW_PER_MILLE as u128
}

/// What [`watch`] says after a reading.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    /// Space is low: warn.
    Low,
    /// Space was low when last warned of, and is not any more.
    Recovered,
}

/// When to speak of free space: warns at the first low reading, again every [`WARN_EVERY`]
/// while readings stay low, and once when one is not low after a warning.
#[derive(Debug, Default)]
pub struct Warner {
    warned: Option<tokio::time::Instant>,
}

impl Warner {
    /// The reading `free` of `total` bytes, taken at `now`: what to say, if anything.
    pub fn reading(&mut self, free: u64, total: u64, now: tokio::time::Instant) -> Option<Say> {
        if is_low(free, total) {
            let due = self
                .warned
                .is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
            due.then(|| {
                self.warned = Some(now);
                Say::Low
            })
        } else {
            self.warned.take().map(|_| Say::Recovered)
        }
    }
}

/// Reads the free space under `dir` every [`CHECK_EVERY`] until `stop`; speaks as [`Warner`]
/// decides.
pub async fn watch(dir: PathBuf, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warner = Warner::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let d = dir.clone();
        let (free, total) = match tokio::task::spawn_blocking(move || space(&d)).await {
            Ok(Ok(space)) => space,
            Ok(Err(e)) => {
                tracing::debug!(dir = %dir.display(), error = %e, "free space not read");
                continue;
            }
            Err(_) => continue,
        };
        let mib = |b: u64| b >> 20;
        match warner.reading(free, total, tokio::time::Instant::now()) {
            Some(Say::Low) => tracing::warn!(
                dir = %dir.display(),
                free_mib = mib(free),
                total_mib = mib(total),
                "disk space low where the platform keeps its data: on a full disk `serve` stops (nothing acknowledged is lost); free space (`fleetcast artifact remove` for version files no machine needs), or lower --keep-events"
            ),
            Some(Say::Recovered) => {
                tracing::info!(dir = %dir.display(), free_mib = mib(free), "disk space no longer low")
            }
            None => {}
        }
    }
}

/// How often the database's size is read against its last compaction.
pub const DATABASE_CHECK_EVERY: Duration = Duration::from_secs(3600);
/// While a compaction stays due, the line is repeated this often.
pub const DATABASE_WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Whether to say that a compaction is due: at the first reading that finds it due, then every
/// [`DATABASE_WARN_EVERY`] while it stays due (a restart compacts it).
pub fn compaction_line_due(
    due: bool,
    warned: &mut Option<tokio::time::Instant>,
    now: tokio::time::Instant,
) -> bool {
    if !due {
        *warned = None;
        return false;
    }
    let say = warned.is_none_or(|at| now.saturating_duration_since(at) >= DATABASE_WARN_EVERY);
    if say {
        *warned = Some(now);
    }
    say
}

/// Reads the database's size every `check_every` until `stop`, and compacts it while it stays
/// in use once that is due ([`crate::store::compact::is_due`]; [`crate::store::SledStore::compact`]),
/// unless the policy is `never`: sled gives nothing back while it runs, and a platform that is
/// never restarted would otherwise run out of disk. With `never`, or when a compaction fails
/// (the reason is in the line), it says so in the log instead, at once and then daily.
pub async fn watch_database(
    store: std::sync::Arc<dyn crate::store::Store>,
    when: crate::serve::AutoCompaction,
    stop: CancellationToken,
) {
    // Not at once: `serve` has just compacted at its start if that was due.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + when.check_every,
        when.check_every,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut warned, mut last_failure) = (None, None);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = store.clone();
        let Ok(Ok(Some(sizes))) = tokio::task::spawn_blocking(move || s.size_on_disk()).await
        else {
            continue;
        };
        let due = crate::store::compact::is_due_from(when.min_bytes, sizes.on_disk, sizes.last);
        let mut failed = None;
        // A compaction that failed is not tried again for a day: one whose copy read back
        // differently would otherwise hold every write up for a whole copy each hour.
        let now = tokio::time::Instant::now();
        let retry =
            last_failure.is_none_or(|at| now.saturating_duration_since(at) >= DATABASE_WARN_EVERY);
        if due && when.policy != crate::store::compact::Policy::Never && retry {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.compact_online()).await {
                Ok(Some(Ok(r))) => {
                    crate::store::compact::log_online(&r, "it was due");
                    (warned, last_failure) = (None, None);
                    continue;
                }
                Ok(Some(Err(e))) => failed = Some(e.to_string()),
                Err(e) => failed = Some(format!("the compaction's task failed: {e}")),
                Ok(None) => {}
            }
            if failed.is_some() {
                // Said now, whenever the line was last said.
                (warned, last_failure) = (None, Some(now));
            }
        }
        if compaction_line_due(due, &mut warned, tokio::time::Instant::now()) {
            match failed {
                Some(error) => tracing::warn!(
                    on_disk_mib = sizes.on_disk >> 20,
                    compacted_mib = sizes.last.map(|b| b >> 20),
                    %error,
                    "the database's file is due for compaction and the compaction failed, changing nothing; it is tried again in a day (`fleetcast db compact --online` tries now)"
                ),
                None => tracing::warn!(
                    on_disk_mib = sizes.on_disk >> 20,
                    compacted_mib = sizes.last.map(|b| b >> 20),
                    "the database's file is due for compaction (64 MiB or more, and 4 times its size after its last compaction if it had one: sled keeps what later writes replace), and `serve --compact never` leaves it: restart `serve` with `--compact auto`, or stop it and run `fleetcast db compact`"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_compaction_is_said_at_once_then_daily_and_not_once_done() {
        let t0 = tokio::time::Instant::now();
        let mut warned = None;
        assert!(!compaction_line_due(false, &mut warned, t0));
        assert!(
            compaction_line_due(true, &mut warned, t0),
            "first due reading"
        );
        let hour = Duration::from_secs(3600);
        assert!(!compaction_line_due(true, &mut warned, t0 + hour));
        assert!(!compaction_line_due(true, &mut warned, t0 + 23 * hour));
        assert!(
            compaction_line_due(true, &mut warned, t0 + 24 * hour),
            "a day later"
        );
        assert!(
            !compaction_line_due(false, &mut warned, t0 + 25 * hour),
            "compacted"
        );
        assert!(
            compaction_line_due(true, &mut warned, t0 + 26 * hour),
            "due again: at once"
        );
    }

    /// `watch_database` on a real store, its size read every 50 ms, with a threshold a small
    /// database passes: `auto` compacts it while in use, `never` leaves it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_due_database_is_compacted_while_in_use_unless_never() {
        use crate::store::compact::Policy;
        use crate::store::{SledStore, Store};
        use std::sync::Arc;

        for policy in [Policy::Never, Policy::Auto] {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
            store.flush().unwrap();
            let stop = CancellationToken::new();
            let when = crate::serve::AutoCompaction {
                policy,
                check_every: Duration::from_millis(50),
                min_bytes: 0,
            };
            let watch = tokio::spawn(watch_database(store.clone(), when, stop.clone()));
            let compacted = || store.size_on_disk().unwrap().unwrap().last.is_some();
            // `never`: twenty readings, none compacts; `auto`: the first that finds it due.
            let give = if policy == Policy::Never { 1 } else { 10 };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(give);
            while !compacted() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(compacted(), policy == Policy::Auto, "{policy:?}");
            stop.cancel();
            watch.await.unwrap();
        }
    }

    /// A compaction that failed (here: another holds the compaction lock) is not tried again
    /// at the next readings, only a day later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_compaction_is_not_tried_again_within_the_day() {
        use crate::store::{SledStore, Store};
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.path().join("db.lock"))
            .unwrap();
        lock.lock().unwrap();
        let stop = CancellationToken::new();
        let when = crate::serve::AutoCompaction {
            policy: crate::store::compact::Policy::Auto,
            check_every: Duration::from_millis(50),
            min_bytes: 0,
        };
        let watch = tokio::spawn(watch_database(store.clone(), when, stop.clone()));
        let compacted = || store.size_on_disk().unwrap().unwrap().last.is_some();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!compacted(), "refused while the lock is held");
        drop(lock);
        // Ten more readings find it due; none tries again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!compacted(), "tried again within the day");
        stop.cancel();
        watch.await.unwrap();
    }

    #[test]
    fn low_is_under_a_gibibyte_or_five_percent() {
        const GIB: u64 = 1 << 30;
        assert!(is_low(GIB - 1, 2 * GIB), "under 1 GiB");
        assert!(!is_low(GIB, 2 * GIB));
        assert!(is_low(4 * GIB, 100 * GIB), "4 % of a large disk");
        assert!(!is_low(5 * GIB, 100 * GIB));
        assert!(!is_low(u64::MAX, u64::MAX), "no overflow");
        assert!(is_low(0, 0));
    }

    #[test]
    fn a_low_disk_is_warned_of_at_once_then_every_ten_minutes_and_its_recovery_once() {
        const GIB: u64 = 1 << 30;
        let (low, fine) = ((GIB / 2, 100 * GIB), (50 * GIB, 100 * GIB));
        let t0 = tokio::time::Instant::now();
        let at = |d: Duration| t0 + d;
        let mut w = Warner::default();
        assert_eq!(
            w.reading(fine.0, fine.1, t0),
            None,
            "nothing to say of a fine disk"
        );
        assert_eq!(
            w.reading(low.0, low.1, at(CHECK_EVERY)),
            Some(Say::Low),
            "at once"
        );
        // Every minute's reading stays quiet until ten minutes after the warning.
        for minute in 2..=10 {
            assert_eq!(
                w.reading(low.0, low.1, at(CHECK_EVERY * minute)),
                None,
                "minute {minute}"
            );
        }
        assert_eq!(
            w.reading(low.0, low.1, at(CHECK_EVERY * 11)),
            Some(Say::Low),
            "repeated"
        );
        assert_eq!(w.reading(low.0, low.1, at(CHECK_EVERY * 12)), None);
        assert_eq!(
            w.reading(fine.0, fine.1, at(CHECK_EVERY * 13)),
            Some(Say::Recovered)
        );
        assert_eq!(
            w.reading(fine.0, fine.1, at(CHECK_EVERY * 14)),
            None,
            "said once"
        );
        // Low again: a new warning at once, not ten minutes after the last one.
        assert_eq!(
            w.reading(low.0, low.1, at(CHECK_EVERY * 15)),
            Some(Say::Low)
        );
    }

    #[test]
    fn the_space_of_a_real_directory_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = space(dir.path()).unwrap();
        assert!(total > 0 && free <= total, "{free} of {total}");
        let missing = dir.path().join("missing");
        assert!(space(&missing).is_err());
    }
}
