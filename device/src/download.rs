//! Fetching one artifact in verified chunks over MQTT (see `fleetcast_proto::chunk`).
//!
//! Manifest first (unless the artifact is one chunk), then a window of chunks in flight; each
//! chunk is checked against the manifest on arrival and written at its offset into a pre-sized
//! staging file. The received bitmap and the manifest are persisted beside it, so an attempt,
//! or a restarted agent, resumes where the last one stopped. The finished file is hashed whole
//! once more, fsynced and renamed into `artifacts/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetcast_proto::auth::{Purpose, Secret};
use fleetcast_proto::chunk::{
    decode_frame, to_ranges, ChunkRequest, ChunkVerifier, FrameType, Layout, MAX_CHUNKS_PER_REQUEST,
};
use fleetcast_proto::release::ArtifactRef;
use fleetcast_proto::status::Progress;
use fleetcast_proto::{ArtifactId, MachineId, Topics};
use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::durable;
use crate::fsutil::sync_dir;
use crate::store::Store;

/// Knobs of the transfer; the defaults are the protocol's recommendations.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Chunks requested and not yet received.
    pub window: usize,
    /// Re-request everything outstanding after this long without a verified chunk.
    pub stall: Duration,
    /// An attempt fails after this long without progress.
    pub attempt_timeout: Duration,
    pub attempts: u32,
    /// Persist the bitmap after this many new bytes.
    pub persist_every: u64,
    /// At most one `downloading` report per this long (besides the one at each attempt's start).
    pub report_every: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            window: 16,
            stall: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(30),
            attempts: 3,
            persist_every: 1024 * 1024,
            report_every: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("artifact {artifact}: {op} {path}: {error}")]
    Io {
        artifact: ArtifactId,
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("artifact {artifact}: invalid layout: {reason}")]
    Layout {
        artifact: ArtifactId,
        reason: String,
    },
    #[error("artifact {artifact}: manifest refused: {reason}")]
    Manifest {
        artifact: ArtifactId,
        reason: String,
    },
    #[error("artifact {artifact}: platform says: {reason}")]
    Platform {
        artifact: ArtifactId,
        reason: String,
    },
    #[error("artifact {artifact}: no progress for {secs} s ({have}/{chunks} chunks)")]
    Stalled {
        artifact: ArtifactId,
        secs: u64,
        have: u32,
        chunks: u32,
    },
    #[error("artifact {artifact}: the assembled file hashes to {got}")]
    WholeFileMismatch {
        artifact: ArtifactId,
        got: ArtifactId,
    },
    #[error("artifact {artifact}: cannot reserve a message counter: {reason}")]
    Counter {
        artifact: ArtifactId,
        reason: String,
    },
    #[error("artifact {artifact}: cancelled")]
    Cancelled { artifact: ArtifactId },
}

/// What a download needs from the agent.
#[derive(Clone)]
pub struct DownloadContext {
    pub machine: MachineId,
    pub topics: Topics,
    pub client: AsyncClient,
    pub secret: Secret,
    pub store: Store,
    pub data_dir: PathBuf,
    pub tuning: Tuning,
}

/// Persisted beside the staging file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StagingState {
    /// One bit per chunk, hex.
    have: String,
    /// The verified manifest, hex.
    #[serde(default)]
    manifest: Option<String>,
}

pub fn artifact_path(data_dir: &Path, artifact: &ArtifactId) -> PathBuf {
    data_dir.join("artifacts").join(artifact.to_hex())
}

/// Deletes staged downloads and downloaded artifacts that are not in `keep` (superseded,
/// cancelled or failed downloads, versions no longer installed nor in the rollback slot), so
/// the data dir does not grow with every release. Files it does not recognise are left alone.
/// Returns how many files it removed.
pub fn remove_unused(
    data_dir: &Path,
    keep: &std::collections::HashSet<ArtifactId>,
) -> std::io::Result<usize> {
    let mut removed = 0;
    for (dir, suffixes) in [
        (data_dir.join("staging"), &[".part", ".state.json"][..]),
        (data_dir.join("artifacts"), &[""][..]),
    ] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let id = suffixes.iter().find_map(|s| {
                name.strip_suffix(s)
                    .and_then(|hex| hex.parse::<ArtifactId>().ok())
            });
            if id.is_some_and(|id| !keep.contains(&id)) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(removed)
}

struct Bitmap {
    bits: Vec<u8>,
    count: u32,
}

impl Bitmap {
    fn new(chunks: u32) -> Self {
        Self {
            bits: vec![0; (chunks as usize).div_ceil(8)],
            count: 0,
        }
    }
    fn from_hex(hex_bits: &str, chunks: u32) -> Option<Self> {
        let bits = hex::decode(hex_bits).ok()?;
        if bits.len() != (chunks as usize).div_ceil(8) {
            return None;
        }
        let mut b = Self { bits, count: 0 };
        b.count = (0..chunks).filter(|&i| b.has(i)).count() as u32;
        Some(b)
    }
    fn has(&self, i: u32) -> bool {
        self.bits[i as usize / 8] & (1 << (i % 8)) != 0
    }
    fn set(&mut self, i: u32) {
        if !self.has(i) {
            self.bits[i as usize / 8] |= 1 << (i % 8);
            self.count += 1;
        }
    }
}

fn io_error(
    artifact: ArtifactId,
    op: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> DownloadError {
    let path = path.to_owned();
    move |error| DownloadError::Io {
        artifact,
        op,
        path,
        error,
    }
}

/// What [`Transfer::open_blocking`] found or created on disk.
struct Staged {
    layout: Layout,
    part_path: PathBuf,
    state_path: PathBuf,
    file: std::fs::File,
    have: Bitmap,
    verifier: Option<ChunkVerifier>,
    manifest: Option<Vec<u8>>,
    have_bytes: u64,
}

struct Transfer<'a> {
    ctx: &'a DownloadContext,
    artifact: ArtifactId,
    layout: Layout,
    part_path: PathBuf,
    state_path: PathBuf,
    /// Shared with the blocking tasks that write and sync it.
    file: Arc<std::fs::File>,
    have: Bitmap,
    verifier: Option<ChunkVerifier>,
    manifest: Option<Vec<u8>>,
    have_bytes: u64,
}

impl<'a> Transfer<'a> {
    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError {
        io_error(self.artifact, op, path)
    }

    /// Opens (or resumes) the staging file, off the runtime's threads.
    async fn open(ctx: &'a DownloadContext, artifact: &ArtifactRef) -> Result<Self, DownloadError> {
        let (ctx_dir, artifact_ref) = (ctx.data_dir.clone(), artifact.clone());
        let id = artifact.id;
        let staged =
            tokio::task::spawn_blocking(move || Self::open_blocking(&ctx_dir, &artifact_ref))
                .await
                .map_err(|e| DownloadError::Io {
                    artifact: id,
                    op: "open",
                    path: ctx.data_dir.join("staging"),
                    error: std::io::Error::other(e),
                })??;
        Ok(Self {
            ctx,
            artifact: id,
            layout: staged.layout,
            part_path: staged.part_path,
            state_path: staged.state_path,
            file: Arc::new(staged.file),
            have: staged.have,
            verifier: staged.verifier,
            manifest: staged.manifest,
            have_bytes: staged.have_bytes,
        })
    }

    fn open_blocking(data_dir: &Path, artifact: &ArtifactRef) -> Result<Staged, DownloadError> {
        let id = artifact.id;
        let layout =
            Layout::new(artifact.size, artifact.chunk_size).map_err(|e| DownloadError::Layout {
                artifact: id,
                reason: e.to_string(),
            })?;
        let staging = data_dir.join("staging");
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |error| DownloadError::Io {
                artifact: id,
                op,
                path,
                error,
            }
        };
        std::fs::create_dir_all(&staging).map_err(io("create", &staging))?;
        let part_path = staging.join(format!("{}.part", id.to_hex()));
        let state_path = staging.join(format!("{}.state.json", id.to_hex()));
        let saved: Option<StagingState> = std::fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let part_ok = std::fs::metadata(&part_path).is_ok_and(|m| m.len() == layout.size);
        let mut have = None;
        let mut manifest = None;
        if let (Some(saved), true) = (saved, part_ok) {
            have = Bitmap::from_hex(&saved.have, layout.chunks);
            manifest = saved.manifest.and_then(|m| hex::decode(m).ok());
        }
        let have = have.unwrap_or_else(|| Bitmap::new(layout.chunks));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .map_err(io("open", &part_path))?;
        file.set_len(layout.size).map_err(io("size", &part_path))?;
        let verifier = if ChunkVerifier::needs_manifest(&layout) {
            manifest
                .as_deref()
                .and_then(|m| ChunkVerifier::from_manifest(id, layout, m).ok())
        } else {
            Some(ChunkVerifier::single(id, layout))
        };
        if verifier.is_none() {
            manifest = None;
        }
        let have_bytes = (0..layout.chunks)
            .filter(|&i| have.has(i))
            .map(|i| layout.chunk_len(i) as u64)
            .sum();
        Ok(Staged {
            layout,
            part_path,
            state_path,
            file,
            have,
            verifier,
            manifest,
            have_bytes,
        })
    }

    fn progress(&self) -> Progress {
        Progress {
            bytes: self.have_bytes,
            total: self.layout.size,
        }
    }

    /// Makes the received chunks durable, then the bitmap that claims them.
    async fn persist(&self) -> Result<(), DownloadError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(self.io("fsync", &self.part_path))?;
        let state = StagingState {
            have: hex::encode(&self.have.bits),
            manifest: self.manifest.as_ref().map(hex::encode),
        };
        let bytes = serde_json::to_vec(&state).expect("staging state serializes");
        durable::shared()
            .write(&self.state_path, bytes)
            .await
            .map_err(self.io("write", &self.state_path))
    }

    async fn request(&self, manifest: bool, chunks: &[u32]) -> Result<(), DownloadError> {
        let mut sorted = chunks.to_vec();
        sorted.sort_unstable();
        for batch in sorted
            .chunks(MAX_CHUNKS_PER_REQUEST as usize / 4)
            .map(Some)
            .chain(
                // A manifest-only request has no chunks.
                (chunks.is_empty() && manifest).then_some(None),
            )
        {
            let ctr =
                self.ctx
                    .store
                    .next_ctr_async()
                    .await
                    .map_err(|e| DownloadError::Counter {
                        artifact: self.artifact,
                        reason: e.to_string(),
                    })?;
            let req = ChunkRequest {
                machine: self.ctx.machine.clone(),
                ctr,
                artifact: self.artifact,
                manifest,
                chunks: batch
                    .map(|b| to_ranges(b.iter().copied()))
                    .unwrap_or_default(),
            };
            let payload = self.ctx.secret.seal(Purpose::ChunkRequest, &req);
            if let Err(e) = self
                .ctx
                .client
                .publish(
                    self.ctx.topics.chunk_request(&self.ctx.machine),
                    QoS::AtMostOnce,
                    false,
                    payload,
                )
                .await
            {
                // The client is gone (agent stopping); the stall timer would retry anyway.
                tracing::debug!(artifact = %self.artifact.short(), "chunk request not queued: {e}");
            }
        }
        Ok(())
    }

    /// One attempt: manifest (if needed), then every missing chunk.
    async fn attempt(
        &mut self,
        frames: &mut mpsc::Receiver<Bytes>,
        cancel: &CancellationToken,
        report: &mut impl FnMut(Progress),
    ) -> Result<(), DownloadError> {
        let tuning = self.ctx.tuning.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let attempt_started = Instant::now();
        let mut last_progress = attempt_started;
        let mut last_request = attempt_started;
        let stalled = |t: &Self| DownloadError::Stalled {
            artifact: t.artifact,
            secs: tuning.attempt_timeout.as_secs(),
            have: t.have.count,
            chunks: t.layout.chunks,
        };

        if self.verifier.is_none() {
            let parts_total = self.layout.manifest_parts();
            let mut parts: Vec<Option<Vec<u8>>> = vec![None; parts_total as usize];
            self.request(true, &[]).await?;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Err(DownloadError::Cancelled { artifact: self.artifact }),
                    frame = frames.recv() => {
                        let Some(frame) = frame else {
                            return Err(DownloadError::Cancelled { artifact: self.artifact });
                        };
                        let Ok((h, payload)) = decode_frame(&frame) else { continue };
                        if h.artifact != self.artifact { continue }
                        match h.frame_type {
                            FrameType::Error => return Err(DownloadError::Platform {
                                artifact: self.artifact,
                                reason: String::from_utf8_lossy(payload).into_owned(),
                            }),
                            FrameType::Manifest if h.total == parts_total => {
                                let expected = self.layout.manifest_part_range(h.index).len();
                                if payload.len() != expected {
                                    tracing::warn!(artifact = %self.artifact.short(), part = h.index, "manifest part has the wrong length; dropped");
                                    continue;
                                }
                                parts[h.index as usize] = Some(payload.to_vec());
                                last_progress = Instant::now();
                                if parts.iter().all(Option::is_some) {
                                    let manifest: Vec<u8> = parts.iter().flatten().flatten().copied().collect();
                                    match ChunkVerifier::from_manifest(self.artifact, self.layout, &manifest) {
                                        Ok(v) => {
                                            self.verifier = Some(v);
                                            self.manifest = Some(manifest);
                                            self.persist().await?;
                                            break;
                                        }
                                        Err(e) => {
                                            // Like a bad chunk: drop it and ask again after the stall
                                            // time (a forged part on the shared topic must not cost the
                                            // attempt). Its parts were no progress: the attempt timeout
                                            // still ends a manifest that never verifies.
                                            let e = DownloadError::Manifest { artifact: self.artifact, reason: e.to_string() };
                                            tracing::warn!("{e}; fetching it again");
                                            parts.iter_mut().for_each(|p| *p = None);
                                            last_progress = attempt_started;
                                            last_request = Instant::now();
                                        }
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    _ = tick.tick() => {
                        if last_progress.elapsed() > tuning.attempt_timeout {
                            return Err(stalled(self));
                        }
                        if last_progress.elapsed() > tuning.stall && last_request.elapsed() > tuning.stall {
                            last_request = Instant::now();
                            self.request(true, &[]).await?;
                        }
                    }
                }
            }
        }
        let verifier = self.verifier.clone().expect("manifest phase done");

        let mut outstanding: HashMap<u32, Instant> = HashMap::new();
        let mut cursor = 0u32;
        let mut unpersisted = 0u64;
        // The caller reported the attempt's start.
        let mut reports = ProgressReports::new(
            self.layout.size,
            self.have_bytes,
            attempt_started,
            tuning.report_every,
        );
        loop {
            if self.have.count == self.layout.chunks {
                self.persist().await?;
                return Ok(());
            }
            // Top up the window from the first missing chunk on.
            let mut fresh = Vec::new();
            while outstanding.len() < tuning.window {
                let mut scanned = 0;
                while scanned < self.layout.chunks
                    && (self.have.has(cursor) || outstanding.contains_key(&cursor))
                {
                    cursor = (cursor + 1) % self.layout.chunks;
                    scanned += 1;
                }
                if scanned == self.layout.chunks {
                    break;
                }
                outstanding.insert(cursor, Instant::now());
                fresh.push(cursor);
            }
            if !fresh.is_empty() {
                self.request(false, &fresh).await?;
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = self.persist().await;
                    return Err(DownloadError::Cancelled { artifact: self.artifact });
                }
                frame = frames.recv() => {
                    let Some(frame) = frame else {
                        let _ = self.persist().await;
                        return Err(DownloadError::Cancelled { artifact: self.artifact });
                    };
                    let (h, payload) = match decode_frame(&frame) {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(artifact = %self.artifact.short(), "malformed chunk frame dropped: {e}");
                            continue;
                        }
                    };
                    if h.artifact != self.artifact { continue }
                    match h.frame_type {
                        FrameType::Error => {
                            let _ = self.persist().await;
                            return Err(DownloadError::Platform {
                                artifact: self.artifact,
                                reason: String::from_utf8_lossy(payload).into_owned(),
                            });
                        }
                        FrameType::Chunk if h.total == self.layout.chunks && !self.have.has(h.index) => {
                            if let Err(e) = verifier.verify(h.index, payload) {
                                tracing::warn!(artifact = %self.artifact.short(), chunk = h.index, "bad chunk dropped: {e}");
                                if let Some(at) = outstanding.get_mut(&h.index) {
                                    *at = Instant::now();
                                    self.request(false, &[h.index]).await?;
                                }
                                continue;
                            }
                            let offset = self.layout.offset(h.index);
                            let (file, data) = (self.file.clone(), frame.slice_ref(payload));
                            tokio::task::spawn_blocking(move || write_at(&file, &data, offset))
                                .await
                                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                                .map_err(self.io("write", &self.part_path))?;
                            self.have.set(h.index);
                            self.have_bytes += payload.len() as u64;
                            unpersisted += payload.len() as u64;
                            outstanding.remove(&h.index);
                            last_progress = Instant::now();
                            let complete = self.have.count == self.layout.chunks;
                            // The last chunk is persisted with the whole file, right after.
                            if unpersisted >= tuning.persist_every && !complete {
                                unpersisted = 0;
                                self.persist().await?;
                            }
                            if !complete && reports.due(self.have_bytes, Instant::now()) {
                                report(self.progress());
                            }
                        }
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    if last_progress.elapsed() > tuning.attempt_timeout {
                        let _ = self.persist().await;
                        return Err(stalled(self));
                    }
                    let stale: Vec<u32> = outstanding
                        .iter()
                        .filter(|(_, at)| at.elapsed() > tuning.stall)
                        .map(|(i, _)| *i)
                        .collect();
                    if last_progress.elapsed() > tuning.stall && !stale.is_empty() {
                        let all: Vec<u32> = outstanding.keys().copied().collect();
                        for i in &all {
                            outstanding.insert(*i, Instant::now());
                        }
                        tracing::debug!(artifact = %self.artifact.short(), n = all.len(), "no progress: re-requesting outstanding chunks");
                        self.request(false, &all).await?;
                    }
                }
            }
        }
    }

    /// Hashes the assembled file, then moves it into `artifacts/`.
    async fn finish(&mut self) -> Result<PathBuf, DownloadError> {
        let path = self.part_path.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)
                .and_then(ArtifactId::of_reader)
                .map(|(id, _)| id)
        })
        .await
        .map_err(|e| self.io("hash", &self.part_path)(std::io::Error::other(e)))?
        .map_err(self.io("hash", &self.part_path))?;
        if hashed != self.artifact {
            // Start over: every chunk verified, yet the whole does not: trust nothing.
            self.have = Bitmap::new(self.layout.chunks);
            self.have_bytes = 0;
            let _ = self.persist().await;
            return Err(DownloadError::WholeFileMismatch {
                artifact: self.artifact,
                got: hashed,
            });
        }
        let (file, artifact) = (self.file.clone(), self.artifact);
        let (part, state) = (self.part_path.clone(), self.state_path.clone());
        let dest = artifact_path(&self.ctx.data_dir, &self.artifact);
        tokio::task::spawn_blocking(move || {
            file.sync_all()
                .map_err(io_error(artifact, "fsync", &part))?;
            let dir = dest.parent().expect("artifacts dir");
            std::fs::create_dir_all(dir).map_err(io_error(artifact, "create", dir))?;
            std::fs::rename(&part, &dest).map_err(io_error(artifact, "rename", &dest))?;
            sync_dir(dir).map_err(io_error(artifact, "fsync", dir))?;
            let _ = std::fs::remove_file(&state);
            Ok(dest)
        })
        .await
        .map_err(|e| self.io("rename", &self.part_path)(std::io::Error::other(e)))?
    }
}

/// When a download reports `downloading`: at most every ~10 % of the file and at most once per
/// `every` (1,000 machines fetching 1 MiB in a second report once each, not ten times).
struct ProgressReports {
    step: u64,
    every: Duration,
    next_bytes: u64,
    last: Instant,
}

impl ProgressReports {
    /// `have` bytes were reported at `at` (the attempt's start).
    fn new(size: u64, have: u64, at: Instant, every: Duration) -> Self {
        let step = (size / 10).max(1);
        Self {
            step,
            every,
            next_bytes: have + step,
            last: at,
        }
    }

    /// Whether `have` bytes at `now` are worth a report; if so, counts it as made.
    fn due(&mut self, have: u64, now: Instant) -> bool {
        if have < self.next_bytes || now.duration_since(self.last) < self.every {
            return false;
        }
        self.next_bytes = have + self.step;
        self.last = now;
        true
    }
}

#[cfg(unix)]
fn write_at(file: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)
}

/// Downloads `artifact` into `{data}/artifacts/{id}` and returns its path. `frames` carries
/// every chunk frame received for this artifact; `report(progress, attempt)` is called at the
/// start of each attempt, then at most once per `tuning.report_every` and at most every ~10 %
/// (a download that finishes within `report_every` reports once).
pub async fn download(
    ctx: &DownloadContext,
    artifact: &ArtifactRef,
    mut frames: mpsc::Receiver<Bytes>,
    cancel: CancellationToken,
    mut report: impl FnMut(Progress, u32),
) -> Result<PathBuf, (DownloadError, u32)> {
    let dest = artifact_path(&ctx.data_dir, &artifact.id);
    if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
        return Ok(dest);
    }
    let mut t = Transfer::open(ctx, artifact).await.map_err(|e| (e, 1))?;
    let mut last = None;
    for attempt in 1..=ctx.tuning.attempts {
        report(t.progress(), attempt);
        let result = match t
            .attempt(&mut frames, &cancel, &mut |p| report(p, attempt))
            .await
        {
            Ok(()) => t.finish().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(path) => return Ok(path),
            Err(e @ DownloadError::Cancelled { .. }) => return Err((e, attempt)),
            Err(e) => {
                tracing::warn!(artifact = %artifact.id.short(), attempt, "download attempt failed: {e}");
                last = Some(e);
                // Frames left from the failed attempt are stale.
                while frames.try_recv().is_ok() {}
            }
        }
    }
    Err((last.expect("at least one attempt"), ctx.tuning.attempts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_download_reports_only_at_its_start_and_a_slow_one_every_few_seconds() {
        let t0 = Instant::now();
        let every = Duration::from_secs(5);
        let ms = |n| t0 + Duration::from_millis(n);
        let mib = 1024 * 1024;
        // 1 MiB in one second: every 10 % passes, none is reported (the start was).
        let mut fast = ProgressReports::new(mib, 0, t0, every);
        assert!((1..=10).all(|i| !fast.due(i * mib / 10, ms(i * 100))));
        // 100 MiB in 100 s: once per 5 s, each at least 10 % after the previous one.
        let mut slow = ProgressReports::new(100 * mib, 0, t0, every);
        let reported: Vec<u64> = (1..=100)
            .filter(|&s| slow.due(s * mib, ms(s * 1000)))
            .collect();
        assert_eq!(reported, vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
        // 100 MiB in 10 s: time is the limit, not bytes.
        let mut quick = ProgressReports::new(100 * mib, 0, t0, every);
        let reported: Vec<u64> = (1..=100)
            .filter(|&p| quick.due(p * mib, ms(p * 100)))
            .collect();
        assert_eq!(reported, vec![50, 100]);
        // A resumed attempt counts from what it already has.
        let mut resumed = ProgressReports::new(100 * mib, 95 * mib, t0, every);
        assert!(!resumed.due(100 * mib, ms(6000)));
    }
}
