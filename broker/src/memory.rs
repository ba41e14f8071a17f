//! Handing freed heap memory back to the system.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Hands memory freed inside glibc's heaps back to the system every `every` until `shutdown`
/// (`malloc_trim`, on a blocking thread; elsewhere, nothing). glibc keeps freed pages for
/// reuse, and what passes through a process in bursts (a rollout's chunk frames, status
/// batches) leaves them resident: the simulator of 1,000 machines held 2.7 GB after a 1 MiB
/// rollout and 113 MB after one trim; `fleetcast serve` 126 MB after a rollout to 1,000
/// machines, 103 MB when trimmed every second (docs/capacity-notes.md, "Memory over many
/// rollouts").
pub async fn return_freed_memory(every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only walks the allocator's own lists; any thread may call it.
        let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
    }
}
