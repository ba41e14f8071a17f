//! Event log retention: the platform keeps the newest [`MachineLimits::events_kept`] status
//! events and deletes older ones in the background, a batch at a time on a blocking thread.
//!
//! Every status event a machine reports is stored (`events`, for integrators' replay and
//! `fleetcast events`), so the log grows with fleet size times rollouts: 50,000 events for ten
//! rollouts to 1,000 machines, about 0.9 MB of records. Unbounded, it grows the disk for as long as
//! the platform runs. Deleting does not give back the memory sled took for what it deleted
//! (measured: docs/capacity-notes.md, "Memory over many rollouts"); the page cache's bound is what bounds that. What a machine ended with in each release stays in its target record, which
//! retention does not touch.
//!
//! [`MachineLimits::events_kept`]: crate::limits::MachineLimits::events_kept

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::PlatformError;

/// Events kept by default: 20 rollouts to 10,000 machines at five events each.
pub const DEFAULT_EVENTS_KEPT: u64 = 1_000_000;

/// How often the log is checked.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Records (an event, or a block of up to 16 stored together) deleted per blocking call, so a
/// long backlog (a lowered limit, a first start after an upgrade) never holds a blocking thread
/// for long.
const PRUNE_BATCH: usize = 1_000;

/// Deletes what is beyond `kept` every [`PRUNE_EVERY`] until `stop`. A failed delete is logged
/// and tried again next time: retention is housekeeping, never a reason to stop the platform.
pub async fn run(
    store: Arc<dyn Store>,
    kept: u64,
    stop: CancellationToken,
) -> Result<(), PlatformError> {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let mut deleted = 0;
        loop {
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.prune_events(kept, PRUNE_BATCH)).await {
                Ok(Ok(n)) => {
                    deleted += n;
                    if n < PRUNE_BATCH || stop.is_cancelled() {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "deleting old events failed; trying again later");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event retention task panicked; trying again later");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::debug!(records = deleted, kept, "old events deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use fleetcast_proto::admin::FleetEvent;
    use fleetcast_proto::Phase;

    fn stored(store: &dyn Store, n: u64) {
        for _ in 0..n {
            let mut e = FleetEvent {
                id: 0,
                recorded_at_ms: 1,
                machine: "vm-1".parse().unwrap(),
                release: None,
                kind: "app".parse().unwrap(),
                version: "1".into(),
                phase: Phase::Notified,
                at_ms: 2,
                attempt: 1,
                progress: None,
                error: None,
                detail: None,
            };
            store.append_event(&mut e).unwrap();
        }
    }

    /// A backlog of several batches goes in one pass (the first tick is at once); what is kept
    /// is the newest, and events stored later are pruned on a later pass.
    #[tokio::test(start_paused = true)]
    async fn the_log_is_cut_to_the_newest_kept_in_the_background() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        stored(&*store, 3 * PRUNE_BATCH as u64 + 10);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(store.clone(), 100, stop.clone()));
        let ids = |s: &Arc<dyn Store>| -> (u64, u64, usize) {
            let all = s.events().unwrap();
            (all[0].id, all[all.len() - 1].id, all.len())
        };
        let until = |s: &Arc<dyn Store>, want: (u64, u64, usize)| {
            let s = s.clone();
            async move {
                for _ in 0..200 {
                    if ids(&s) == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("events {:?}, not {want:?}", ids(&s));
            }
        };
        let newest = 3 * PRUNE_BATCH as u64 + 10;
        until(&store, (newest - 99, newest, 100)).await;
        stored(&*store, 50);
        tokio::time::sleep(PRUNE_EVERY).await;
        until(&store, (newest + 50 - 99, newest + 50, 100)).await;
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
