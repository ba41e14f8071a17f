//! `events_since`, `audit`, `stats`: what the platform recorded and counted.
//!
//! A page of events or audit entries holds at most its `limit` and about [`PAGE_BYTES`] of JSON
//! ([`bounded_since`]): an entry can be large (a status event's error text, up to a 256 KiB
//! message; an audit entry's request, e.g. a 1,000-machine provisioning batch), and 500 of them
//! would not fit one packet.

use fleetcast_proto::admin::{
    AuditEntry, Backup, Compaction, DatabaseSize, FleetEvent, PlatformStats,
};
use fleetcast_proto::calls::{self, Page};
use fleetcast_proto::events::MAX_BATCH_EVENTS;
use serde::Serialize;

use crate::context::Ctx;
use crate::inventory::PAGE_BYTES;
use crate::ops::OpError;
use crate::store::StoreError;

/// Entries read from the store at first, and at most at a time, while a page fills.
const FIRST_READ: usize = 16;
const READ_STEP: usize = 64;

/// Entries with an id above `since`, read with `read(since, n)` (at most `n` entries after
/// `since`, and whether more follow), kept while they fit `limit` entries and `budget` bytes of
/// JSON (at least one, however large). Returns them, the id to continue from (the last one's,
/// or `since`) and whether more follow.
pub fn bounded_since<T: Serialize>(
    mut read: impl FnMut(u64, usize) -> Result<(Vec<T>, bool), StoreError>,
    id: impl Fn(&T) -> u64,
    since: u64,
    limit: usize,
    budget: usize,
) -> Result<(Vec<T>, u64, bool), StoreError> {
    let (mut out, mut next, mut used) = (Vec::new(), since, 0usize);
    loop {
        // Past the first read, about as many as the budget has room for at the size so far:
        // large entries are not read by the dozen only to be left out.
        let room = match used.checked_div(out.len()) {
            None => FIRST_READ,
            Some(average) => budget.saturating_sub(used) / average.max(1) + 1,
        };
        let want = limit.saturating_sub(out.len()).min(room).min(READ_STEP);
        if want == 0 {
            return Ok((out, next, true));
        }
        let (batch, more) = read(next, want)?;
        for item in batch {
            // The comma between entries counts too.
            let size = serde_json::to_vec(&item).map_or(0, |v| v.len()) + 1;
            if !out.is_empty() && used + size > budget {
                return Ok((out, next, true));
            }
            used += size;
            next = id(&item);
            out.push(item);
        }
        if !more {
            return Ok((out, next, false));
        }
        if out.len() >= limit {
            return Ok((out, next, true));
        }
    }
}

fn page_limit(limit: Option<u32>) -> usize {
    limit.unwrap_or(MAX_BATCH_EVENTS).clamp(1, MAX_BATCH_EVENTS) as usize
}

pub fn since(ctx: &Ctx, c: calls::EventsSince) -> Result<Page<FleetEvent, u64>, OpError> {
    let (events, next, more) = bounded_since(
        |since, n| ctx.store.events_since(since, n),
        |e| e.id,
        c.since,
        page_limit(c.limit),
        PAGE_BYTES,
    )?;
    Ok(Page {
        items: events,
        next,
        more,
    })
}

pub fn audit(ctx: &Ctx, c: calls::Audit) -> Result<Page<AuditEntry, u64>, OpError> {
    let (entries, next, more) = bounded_since(
        |since, n| ctx.store.audit_since(since, n),
        |e| e.id,
        c.since,
        page_limit(c.limit),
        PAGE_BYTES,
    )?;
    Ok(Page {
        items: entries,
        next,
        more,
    })
}

pub async fn stats(ctx: &Ctx, _: calls::Stats) -> Result<PlatformStats, OpError> {
    // sled sums its files' sizes: off the async threads.
    let sizes = crate::inventory::off_thread(&ctx.store, |store| Ok(store.size_on_disk()?)).await?;
    Ok(PlatformStats {
        gateway: ctx.sessions.gateway_counters(),
        last_event_id: ctx.store.last_event_id()?,
        database: sizes.map(|s| DatabaseSize {
            on_disk_bytes: s.on_disk,
            compacted_bytes: s.last,
            compaction_due: crate::store::compact::is_due(s.on_disk, s.last),
        }),
        ..ctx.stats.snapshot()
    })
}

/// `db_compact`: the database compacted now, while the platform runs
/// ([`crate::store::SledStore::compact`]), off the async threads.
pub async fn compact(ctx: &Ctx, _: calls::DbCompact) -> Result<Compaction, OpError> {
    let r = crate::inventory::off_thread(&ctx.store, |store| match store.compact_online() {
        None => Err(OpError::Refused(
            "this platform's store keeps nothing on disk to compact".into(),
        )),
        Some(Err(e)) => Err(OpError::Refused(format!("not compacted: {e}"))),
        Some(Ok(r)) => Ok(r),
    })
    .await?;
    crate::store::compact::log_online(&r, "db_compact");
    Ok(Compaction {
        before_bytes: r.before,
        after_bytes: r.after,
        records: r.records,
        live_bytes: r.live_bytes,
        took_ms: r.took.as_millis() as u64,
    })
}

/// `db_backup`: the platform backed up now, while it runs ([`crate::backup`]). The copy blocks
/// this task's thread, which hands its other tasks to another worker first.
pub async fn backup(ctx: &Ctx, _: calls::DbBackup) -> Result<Backup, OpError> {
    let made = crate::store::sled::off_the_runtime(|| {
        crate::backup::make(
            &*ctx.store,
            &ctx.files,
            &|| ctx.keys(),
            &ctx.data_dir,
            crate::now_ms(),
        )
    })
    .map_err(|e| OpError::Refused(format!("not backed up: {e}")))?;
    tracing::info!(
        path = %made.path.display(),
        records = made.db.records,
        artifact_files = made.artifact_files,
        copied = made.artifact_files_copied,
        writes_waited_ms = made.writes_held.as_millis() as u64,
        "backed up"
    );
    Ok(Backup {
        path: made.path.display().to_string(),
        records: made.db.records,
        live_bytes: made.db.live_bytes,
        db_bytes: made.db.after,
        artifact_files: made.artifact_files,
        artifact_bytes: made.artifact_bytes,
        artifact_files_copied: made.artifact_files_copied,
        key_gen: made.key_gen,
        writes_held_ms: made.writes_held.as_millis() as u64,
        took_ms: made.took.as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries `1..=n`, each `size` bytes of JSON (a string of `size - 2` characters), read as a
    /// store does; counts the reads.
    struct Log {
        n: u64,
        size: usize,
        reads: usize,
    }

    impl Log {
        fn read(
            &mut self,
            since: u64,
            limit: usize,
        ) -> Result<(Vec<(u64, String)>, bool), StoreError> {
            self.reads += 1;
            let items: Vec<(u64, String)> = (since + 1..=self.n)
                .take(limit)
                .map(|i| (i, "x".repeat(self.size)))
                .collect();
            let more = items.last().is_some_and(|(i, _)| *i < self.n);
            Ok((items, more))
        }
    }

    fn run(log: &mut Log, since: u64, limit: usize, budget: usize) -> (Vec<u64>, u64, bool) {
        let (items, next, more) =
            bounded_since(|s, n| log.read(s, n), |e| e.0, since, limit, budget).unwrap();
        (items.into_iter().map(|e| e.0).collect(), next, more)
    }

    #[test]
    fn a_page_ends_at_its_limit_or_its_bytes_and_says_where_to_go_on() {
        let mut log = Log {
            n: 200,
            size: 100,
            reads: 0,
        };
        // By count: 150 entries need reads of 16, then at most 64.
        let (ids, next, more) = run(&mut log, 0, 150, usize::MAX);
        assert_eq!((ids.len(), ids[0], next, more), (150, 1, 150, true));
        assert_eq!(log.reads, 4);
        // By bytes: each entry is ~110 bytes of JSON; 1,000 bytes hold nine.
        let (ids, next, more) = run(&mut log, 10, 500, 1000);
        assert_eq!((ids.len(), ids[0], next, more), (9, 11, 19, true));
        // The last page: everything left, nothing more.
        let (ids, next, more) = run(&mut log, 190, 500, usize::MAX);
        assert_eq!(
            (ids, next, more),
            ((191..=200).collect::<Vec<_>>(), 200, false)
        );
        // Nothing after `since`: an empty page that stays put.
        assert_eq!(run(&mut log, 200, 500, 1), (vec![], 200, false));
        // Exactly `limit` left: no more, known from the read itself.
        assert!(!run(&mut log, 195, 5, usize::MAX).2);
    }

    #[test]
    fn large_entries_are_read_about_as_many_as_fit() {
        let mut log = Log {
            n: 500,
            size: 100_000,
            reads: 0,
        };
        let (ids, _, more) = run(&mut log, 0, 500, 1 << 20);
        assert_eq!((ids.len(), more), (10, true));
        // The first read (16) holds more than fit.
        assert_eq!(log.reads, 1);
        let mut log = Log {
            n: 500,
            size: 20_000,
            reads: 0,
        };
        let (ids, _, _) = run(&mut log, 0, 500, 1 << 20);
        assert_eq!(ids.len(), 52);
        // 16, then about what the rest of the budget holds (37): the page ends inside it.
        assert_eq!(log.reads, 2);
    }

    #[test]
    fn one_entry_larger_than_the_budget_still_makes_a_page_of_its_own() {
        let mut log = Log {
            n: 3,
            size: 5000,
            reads: 0,
        };
        assert_eq!(run(&mut log, 0, 500, 100), (vec![1], 1, true));
        assert_eq!(run(&mut log, 2, 500, 100), (vec![3], 3, false));
    }
}
