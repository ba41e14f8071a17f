//! Counters of a running platform, read by `fleetcast stats` (admin op `stats`). Relaxed
//! atomics: each counter is exact, a snapshot of several is not taken at one instant.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use fleetcast_proto::admin::PlatformStats;

#[derive(Debug)]
pub struct Stats {
    started: Instant,
    chunk_requests: AtomicU64,
    chunk_frames_sent: AtomicU64,
    chunk_bytes_sent: AtomicU64,
    chunk_bytes_broadcast: AtomicU64,
    status_events_stored: AtomicU64,
    ingest_flushes: AtomicU64,
    status_events_resent: AtomicU64,
    reports_dropped: AtomicU64,
    chunk_requests_refused: AtomicU64,
    chunk_frames_unneeded: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            chunk_requests: AtomicU64::new(0),
            chunk_frames_sent: AtomicU64::new(0),
            chunk_bytes_sent: AtomicU64::new(0),
            chunk_bytes_broadcast: AtomicU64::new(0),
            status_events_stored: AtomicU64::new(0),
            ingest_flushes: AtomicU64::new(0),
            status_events_resent: AtomicU64::new(0),
            reports_dropped: AtomicU64::new(0),
            chunk_requests_refused: AtomicU64::new(0),
            chunk_frames_unneeded: AtomicU64::new(0),
        }
    }
}

impl Stats {
    pub fn chunk_request(&self) {
        self.chunk_requests.fetch_add(1, Relaxed);
    }

    pub fn frame_sent(&self, bytes: usize, broadcast: bool) {
        self.chunk_frames_sent.fetch_add(1, Relaxed);
        self.chunk_bytes_sent.fetch_add(bytes as u64, Relaxed);
        if broadcast {
            self.chunk_bytes_broadcast.fetch_add(bytes as u64, Relaxed);
        }
    }

    /// A chunk or manifest frame not read nor sent: every machine that asked for it had it
    /// queued or was written it moments ago.
    pub fn frame_unneeded(&self) {
        self.chunk_frames_unneeded.fetch_add(1, Relaxed);
    }

    pub fn status_resent(&self) {
        self.status_events_resent.fetch_add(1, Relaxed);
    }

    pub fn report_dropped(&self) {
        self.reports_dropped.fetch_add(1, Relaxed);
    }

    pub fn chunk_request_refused(&self) {
        self.chunk_requests_refused.fetch_add(1, Relaxed);
    }

    pub fn batch_flushed(&self, status_events: usize) {
        self.ingest_flushes.fetch_add(1, Relaxed);
        self.status_events_stored
            .fetch_add(status_events as u64, Relaxed);
    }

    pub fn snapshot(&self) -> PlatformStats {
        PlatformStats {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            chunk_requests: self.chunk_requests.load(Relaxed),
            chunk_frames_sent: self.chunk_frames_sent.load(Relaxed),
            chunk_bytes_sent: self.chunk_bytes_sent.load(Relaxed),
            chunk_bytes_broadcast: self.chunk_bytes_broadcast.load(Relaxed),
            status_events_stored: self.status_events_stored.load(Relaxed),
            ingest_flushes: self.ingest_flushes.load(Relaxed),
            status_events_resent: self.status_events_resent.load(Relaxed),
            reports_dropped: self.reports_dropped.load(Relaxed),
            chunk_requests_refused: self.chunk_requests_refused.load(Relaxed),
            chunk_frames_unneeded: self.chunk_frames_unneeded.load(Relaxed),
            last_event_id: 0,
            gateway: None,
            database: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_bytes_are_part_of_the_bytes_sent() {
        let s = Stats::default();
        s.frame_sent(100, false);
        s.frame_sent(1000, true);
        s.chunk_request();
        s.batch_flushed(3);
        let snap = s.snapshot();
        assert_eq!(snap.chunk_frames_sent, 2);
        assert_eq!(snap.chunk_bytes_sent, 1100);
        assert_eq!(snap.chunk_bytes_broadcast, 1000);
        assert_eq!(snap.chunk_requests, 1);
        assert_eq!((snap.status_events_stored, snap.ingest_flushes), (3, 1));
    }
}
