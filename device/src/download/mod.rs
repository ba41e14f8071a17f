//! Fetching one artifact in verified chunks over MQTT (see `fleetcast_proto::chunk`).
//!
//! The manifest (unless the artifact is one chunk) asked for with the first window of chunks,
//! then a window of chunks in flight; each chunk is checked against the manifest (chunks that
//! came before it, once it is in) and written at its offset into a pre-sized staging file. The received bitmap and the manifest are persisted beside it, so an attempt,
//! or a restarted agent, resumes where the last one stopped. The finished file is hashed whole
//! once more, fsynced and renamed into `artifacts/`.
//!
//! Layout:
//! - `fetch`: the transfer's decisions (manifest, window, stalls, timeouts, when to persist
//!   and report), pure.
//! - this module: the edge that carries them out: the staging files, sealed requests over
//!   MQTT, chunk writes off the runtime's threads (the frames that queued up meanwhile, one
//!   blocking task for all their writes), fsync and the saved state, the final hash and rename,
//!   cancellation.

mod fetch;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetcast_proto::auth::{Purpose, Secret};
use fleetcast_proto::chunk::{decode_frame, to_ranges, ChunkRequest, FrameType, Layout};
use fleetcast_proto::release::ArtifactRef;
use fleetcast_proto::status::Progress;
use fleetcast_proto::{ArtifactId, MachineId, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::durable;
use crate::fsutil::sync_dir;
use crate::store::Store;
use fetch::{ChunkWrite, Effect, Fetch, Input, ManifestParts, StagingState};

/// How often the transfer checks for stalls and the attempt timeout.
const TICK: Duration = Duration::from_millis(200);

/// Knobs of the transfer; the defaults are the protocol's recommendations.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Chunks requested and not yet received.
    pub window: usize,
    /// Re-request everything outstanding after this long without a verified chunk. Each
    /// re-request doubles the wait for the next, up to `stall_max`; chunks coming fast again
    /// halve it back (`fetch::Wait`).
    pub stall: Duration,
    pub stall_max: Duration,
    /// An attempt fails after this long without progress.
    pub attempt_timeout: Duration,
    pub attempts: u32,
    /// After an attempt that failed for want of progress, the next starts after this long,
    /// doubled for each such attempt before it, each time between half and 1.5 times that at
    /// random: a platform too busy to answer a fleet at once is not asked again by all of it at
    /// the same moment. Other failures are tried again at once.
    pub retry_pause: Duration,
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
            stall_max: Duration::from_secs(16),
            attempt_timeout: Duration::from_secs(30),
            attempts: 5,
            retry_pause: Duration::from_secs(10),
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
    #[error("artifact {artifact}: platform says: {reason}")]
    Platform {
        artifact: ArtifactId,
        reason: String,
    },
    /// `frames`: frames of the artifact that reached the download in the attempt (none: the
    /// broker or the platform sent nothing, or the agent shed it; some: none of them was
    /// usable), `manifest`: whether the manifest had verified (a manifest that does not verify
    /// is logged as refused).
    #[error("artifact {artifact}: no progress for {secs} s ({have}/{chunks} chunks; {frames} frames received in the attempt, manifest {})", if *manifest { "verified" } else { "not verified" })]
    Stalled {
        artifact: ArtifactId,
        secs: u64,
        have: u32,
        chunks: u32,
        frames: u64,
        manifest: bool,
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
    /// How many MQTT events wait unread by the agent's loop ([`Unread`]).
    pub unread: Unread,
    pub machine: MachineId,
    pub topics: Topics,
    pub client: AsyncClient,
    pub secret: Secret,
    pub store: Store,
    pub data_dir: PathBuf,
    pub tuning: Tuning,
}

/// How many MQTT events the agent has received and not handled yet (its loop's queue): while
/// any wait, a download that has heard nothing for its stall time is behind, not stalled, and
/// waits twice as long before asking again (the frames it waits for may be among them). Why: 10,000 simulated
/// machines on two cores asked again for frames that sat in their own queues (read from the
/// socket, so acknowledged to the gateway, which sends a frame again once it was written more
/// than 2 s before): each machine was written 1.3-1.9 copies of each chunk frame, and every
/// copy costs the server a write and the machine a read.
#[derive(Clone, Default)]
pub struct Unread(Option<Arc<dyn Fn() -> usize + Send + Sync>>);

impl Unread {
    /// Counts what waits in the queue that `events` feeds (without keeping it open).
    pub fn of<T: Send + 'static>(events: &mpsc::Sender<T>) -> Self {
        let weak = events.downgrade();
        Self(Some(Arc::new(move || {
            weak.upgrade()
                .map_or(0, |tx| tx.max_capacity() - tx.capacity())
        })))
    }

    /// Events waiting now (0 where nobody counts them).
    pub fn now(&self) -> usize {
        self.0.as_ref().map_or(0, |count| count())
    }
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
        (
            data_dir.join("staging"),
            &[".part", ".state.json", ".manifest"][..],
        ),
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

/// Allocates the staging file's blocks before anything is fetched, so a disk without room for
/// the artifact fails the download at once, before the link has carried a byte of it. Why:
/// with a sparse file the write that filled the disk found out, after most of the artifact had
/// come (on a metered cellular link, paid for, and again at every retry). A file system that
/// cannot allocate ahead keeps the sparse file. Blocks already written are left as they are,
/// so a resumed download loses nothing.
fn reserve(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let Ok(len) = libc::off_t::try_from(len) else {
        return Ok(());
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor this function borrows; mode 0 allocates the range's
    // holes and changes no data.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS) => Ok(()),
        _ => Err(e),
    }
}

/// Whether `e` is the disk being full: trying again at once or after a pause will not help
/// until someone frees space, and the operator should hear of it now.
fn is_disk_full(e: &DownloadError) -> bool {
    matches!(e, DownloadError::Io { error, .. } if error.kind() == std::io::ErrorKind::StorageFull)
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

/// What [`Staging::open_blocking`] found or created on disk.
struct Opened {
    part_path: PathBuf,
    state_path: PathBuf,
    manifest_path: PathBuf,
    /// Whether the manifest file holds the manifest `fetch` verified.
    manifest_saved: bool,
    fetch: Fetch,
}

/// The staging file of one download, and the way the transfer's effects reach it and the
/// platform.
struct Staging<'a> {
    ctx: &'a DownloadContext,
    artifact: ArtifactId,
    /// Opened for each write and sync, not held: a simulator runs 10,000 agents in one process,
    /// and a descriptor per download besides each connection's went over its open-file limit.
    part_path: PathBuf,
    state_path: PathBuf,
    /// The verified manifest (hex), written once beside the state rather than inside each
    /// saved state: a 200 MB artifact's manifest is 200 KB of hex, and saving it with every
    /// MiB written made the saves grow with the square of the artifact's size (the agent's
    /// largest CPU cost in a 600 MB download, perf: serde_json escaping it).
    manifest_path: PathBuf,
    /// Whether `manifest_path` holds the verified manifest. Only one save runs at a time
    /// ([`Saver`]), so the flag is never raced.
    manifest_saved: Arc<AtomicBool>,
}

impl<'a> Staging<'a> {
    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError {
        io_error(self.artifact, op, path)
    }

    /// Opens (or resumes) the staging file, off the runtime's threads; `None` when the artifact
    /// is already downloaded. One trip to a blocking thread for both: in a simulator the trips
    /// of a fleet's downloads queue behind its chunk writes (0.3-0.4 s each at 1,000 machines).
    async fn open(
        ctx: &'a DownloadContext,
        artifact: &ArtifactRef,
    ) -> Result<Option<(Self, Fetch)>, DownloadError> {
        let (data_dir, artifact_ref) = (ctx.data_dir.clone(), artifact.clone());
        let tuning = ctx.tuning.clone();
        let id = artifact.id;
        let opened = tokio::task::spawn_blocking(move || {
            if artifact_path(&data_dir, &artifact_ref.id)
                .try_exists()
                .unwrap_or(false)
            {
                return Ok(None);
            }
            Self::open_blocking(&data_dir, &artifact_ref, tuning).map(Some)
        })
        .await
        .map_err(|e| DownloadError::Io {
            artifact: id,
            op: "open",
            path: ctx.data_dir.join("staging"),
            error: std::io::Error::other(e),
        })??;
        let Some(opened) = opened else {
            return Ok(None);
        };
        let staging = Self {
            ctx,
            artifact: id,
            part_path: opened.part_path,
            state_path: opened.state_path,
            manifest_path: opened.manifest_path,
            manifest_saved: Arc::new(AtomicBool::new(opened.manifest_saved)),
        };
        Ok(Some((staging, opened.fetch)))
    }

    /// Opens the part file, pre-sized, and resumes the transfer from the state saved beside it
    /// if the part file survived at full size.
    fn open_blocking(
        data_dir: &Path,
        artifact: &ArtifactRef,
        tuning: Tuning,
    ) -> Result<Opened, DownloadError> {
        let id = artifact.id;
        let layout =
            Layout::new(artifact.size, artifact.chunk_size).map_err(|e| DownloadError::Layout {
                artifact: id,
                reason: e.to_string(),
            })?;
        let staging = data_dir.join("staging");
        std::fs::create_dir_all(&staging).map_err(io_error(id, "create", &staging))?;
        let part_path = staging.join(format!("{}.part", id.to_hex()));
        let state_path = staging.join(format!("{}.state.json", id.to_hex()));
        let manifest_path = staging.join(format!("{}.manifest", id.to_hex()));
        let part_ok = std::fs::metadata(&part_path).is_ok_and(|m| m.len() == layout.size);
        let mut saved: Option<StagingState> = part_ok
            .then(|| std::fs::read(&state_path).ok())
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // The manifest in its own file (a state saved before it moved there holds it inline).
        // Verified like any saved manifest: one that does not is fetched again.
        let mut manifest_from_file = false;
        if let Some(saved) = saved.as_mut().filter(|s| s.manifest.is_none()) {
            saved.manifest = std::fs::read(&manifest_path)
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            manifest_from_file = saved.manifest.is_some();
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .map_err(io_error(id, "open", &part_path))?;
        file.set_len(layout.size)
            .map_err(io_error(id, "size", &part_path))?;
        reserve(&file, layout.size).map_err(io_error(id, "reserve space for", &part_path))?;
        let had_state = saved.is_some();
        let fetch = Fetch::resume(id, layout, tuning, saved);
        tracing::debug!(
            artifact = %id.short(),
            part_ok,
            had_state,
            manifest = fetch.has_manifest(),
            bytes = fetch.progress().bytes,
            "staging opened"
        );
        Ok(Opened {
            manifest_saved: manifest_from_file && fetch.has_manifest(),
            fetch,
            part_path,
            state_path,
            manifest_path,
        })
    }

    /// One attempt: carries out what `fetch` decides until it is done or fails, or the download
    /// is cancelled. An attempt that ends early saves what it has, best effort (the reason it
    /// ended matters more than a failed save).
    async fn attempt(
        &self,
        fetch: &mut Fetch,
        frames: &mut mpsc::Receiver<Bytes>,
        carried: Vec<Bytes>,
        cancel: &CancellationToken,
        report: &mut impl FnMut(Progress),
    ) -> Result<(), DownloadError> {
        let result = self.drive(fetch, frames, carried, cancel, report).await;
        if result.is_err() {
            self.save_unsaved(fetch).await;
        }
        result
    }

    /// Saves what `fetch` has not persisted yet, if anything; best effort.
    async fn save_unsaved(&self, fetch: &mut Fetch) {
        if let Some(state) = fetch.unsaved_state() {
            if let Err(e) = self.persist(state).await {
                tracing::debug!(artifact = %self.artifact.short(), "staging state not saved: {e}");
            }
        }
    }

    async fn drive(
        &self,
        fetch: &mut Fetch,
        frames: &mut mpsc::Receiver<Bytes>,
        carried: Vec<Bytes>,
        cancel: &CancellationToken,
        report: &mut impl FnMut(Progress),
    ) -> Result<(), DownloadError> {
        let mut saver = Saver::default();
        let result = self
            .drive_saving(fetch, frames, carried, cancel, report, &mut saver)
            .await;
        if result.is_err() {
            // What the transfer claimed is saved before the attempt's own best-effort save.
            if let Err(e) = saver.drain(self).await {
                tracing::debug!(artifact = %self.artifact.short(), "staging state not saved: {e}");
            }
        }
        result
    }

    async fn drive_saving(
        &self,
        fetch: &mut Fetch,
        frames: &mut mpsc::Receiver<Bytes>,
        carried: Vec<Bytes>,
        cancel: &CancellationToken,
        report: &mut impl FnMut(Progress),
        saver: &mut Saver,
    ) -> Result<(), DownloadError> {
        let cancelled = || DownloadError::Cancelled {
            artifact: self.artifact,
        };
        let mut tick = tokio::time::interval(TICK);
        let carried = carried
            .into_iter()
            .filter_map(|f| decode(&self.artifact, f))
            .collect();
        let mut effects = fetch.begin_with(now(), carried);
        // A window's worth of frames at most per round: enough to write a burst in one trip
        // off the runtime, few enough that requests and ticks are not held up.
        let batch = self.ctx.tuning.window.max(1);
        loop {
            if self.carry_out(fetch, effects, report, saver).await? {
                return Ok(());
            }
            effects = tokio::select! {
                _ = cancel.cancelled() => return Err(cancelled()),
                frame = frames.recv() => {
                    let Some(frame) = frame else { return Err(cancelled()) };
                    let inputs: Vec<Input> = queued(frame, frames, batch)
                        .into_iter()
                        .filter_map(|frame| decode(&self.artifact, frame))
                        .collect();
                    fetch.handle_all(now(), inputs)
                }
                saved = saver.saved(self), if saver.busy() => {
                    saved?;
                    saver.next(self);
                    Vec::new()
                }
                _ = tick.tick() => {
                    let unread = self.ctx.unread.now();
                    fetch.handle_all(now(), tick_inputs(&self.artifact, frames, batch, unread))
                }
            };
        }
    }

    /// Carries out `effects` in order, and what finished writes lead to; `true` once the
    /// attempt is done.
    async fn carry_out(
        &self,
        fetch: &mut Fetch,
        effects: Vec<Effect>,
        report: &mut impl FnMut(Progress),
        saver: &mut Saver,
    ) -> Result<bool, DownloadError> {
        let mut queue = VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Request { manifest, chunks } => self.request(manifest, &chunks).await?,
                Effect::Write(chunks) => {
                    let indices = self.write(chunks).await?;
                    queue.extend(fetch.handle(now(), Input::Written { indices }));
                }
                // The state that ends the transfer is saved before it is reported done, after
                // any still being saved (it supersedes one waiting).
                Effect::Persist(state) if matches!(queue.front(), Some(Effect::Done)) => {
                    saver.drain_superseded(self).await?;
                    self.persist(state).await?
                }
                // Others are saved beside the transfer, never more than one at a time.
                Effect::Persist(state) => saver.submit(self, state),
                Effect::Report(progress) => report(progress),
                Effect::Done => {
                    // Nothing may still be saving once the file moves on (a state written
                    // after it would outlive the download).
                    saver.drain(self).await?;
                    return Ok(true);
                }
                Effect::Fail(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Writes `chunks` in one blocking task; returns their indices.
    async fn write(&self, chunks: Vec<ChunkWrite>) -> Result<Vec<u32>, DownloadError> {
        let part = self.part_path.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&part)?;
            write_chunks(&file, chunks)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(self.io("write", &self.part_path))
    }

    /// Makes the written chunks durable, then the state that claims them.
    /// The verified manifest the state names is written to its own file the first time; the
    /// state is saved without it.
    fn persist(
        &self,
        mut state: StagingState,
    ) -> impl std::future::Future<Output = Result<(), DownloadError>> + Send + 'static {
        let (artifact, part, state_path) = (
            self.artifact,
            self.part_path.clone(),
            self.state_path.clone(),
        );
        let (manifest_path, manifest_saved) =
            (self.manifest_path.clone(), self.manifest_saved.clone());
        async move {
            if let Some(manifest) = state.manifest.take() {
                if !manifest_saved.load(Ordering::Acquire) {
                    durable::shared()
                        .write(&manifest_path, manifest.into_bytes())
                        .await
                        .map_err(io_error(artifact, "write", &manifest_path))?;
                    manifest_saved.store(true, Ordering::Release);
                }
            }
            let sync_part = part.clone();
            // fsync makes the file's data durable whichever descriptor wrote it, and it covers
            // every write that finished before it started: all those `state` claims.
            tokio::task::spawn_blocking(move || std::fs::File::open(&sync_part)?.sync_data())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(io_error(artifact, "fsync", &part))?;
            let bytes = serde_json::to_vec(&state).expect("staging state serializes");
            durable::shared()
                .write(&state_path, bytes)
                .await
                .map_err(io_error(artifact, "write", &state_path))
        }
    }

    async fn request(&self, manifest: ManifestParts, chunks: &[u32]) -> Result<(), DownloadError> {
        let ctr = self
            .ctx
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
            manifest: manifest != ManifestParts::Skip,
            manifest_parts: match manifest {
                ManifestParts::Window(start, end) => Some((start, end)),
                ManifestParts::All | ManifestParts::Skip => None,
            },
            chunks: to_ranges(chunks.iter().copied()),
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
        Ok(())
    }

    /// Deletes the staging files.
    async fn discard(self) {
        let Self {
            part_path,
            state_path,
            manifest_path,
            artifact,
            ..
        } = self;
        let removed = tokio::task::spawn_blocking(move || {
            for path in [&part_path, &state_path, &manifest_path] {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = removed {
            tracing::warn!(artifact = %artifact.short(), "cannot remove the staged download: {e}");
        }
    }

    /// Hashes the assembled file if it holds chunks from before a restart, then moves it into
    /// `artifacts/`. A file whose every chunk was verified by this transfer is not read back:
    /// that would only hash the page cache again (blake3, chunk checks included, was 0.1 CPU-s
    /// of a 200 MB download in a profile; the re-read about half of it).
    async fn finish(&self, fetch: &mut Fetch) -> Result<PathBuf, DownloadError> {
        let path = self.part_path.clone();
        let hashed = if fetch.has_unverified_chunks() {
            tokio::task::spawn_blocking(move || {
                std::fs::File::open(&path)
                    .and_then(ArtifactId::of_reader)
                    .map(|(id, _)| id)
            })
            .await
            .map_err(|e| self.io("hash", &self.part_path)(std::io::Error::other(e)))?
            .map_err(self.io("hash", &self.part_path))?
        } else {
            self.artifact
        };
        if hashed != self.artifact {
            fetch.forget_chunks();
            self.save_unsaved(fetch).await;
            return Err(DownloadError::WholeFileMismatch {
                artifact: self.artifact,
                got: hashed,
            });
        }
        let artifact = self.artifact;
        let (part, state, manifest) = (
            self.part_path.clone(),
            self.state_path.clone(),
            self.manifest_path.clone(),
        );
        let dest = artifact_path(&self.ctx.data_dir, &self.artifact);
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&part)
                .and_then(|f| f.sync_all())
                .map_err(io_error(artifact, "fsync", &part))?;
            let dir = dest.parent().expect("artifacts dir");
            std::fs::create_dir_all(dir).map_err(io_error(artifact, "create", dir))?;
            std::fs::rename(&part, &dest).map_err(io_error(artifact, "rename", &dest))?;
            sync_dir(dir).map_err(io_error(artifact, "fsync", dir))?;
            let _ = std::fs::remove_file(&state);
            let _ = std::fs::remove_file(&manifest);
            Ok(dest)
        })
        .await
        .map_err(|e| self.io("rename", &self.part_path)(std::io::Error::other(e)))?
    }
}

/// Saves staging states beside the transfer (group commit): one save at a time, and while it
/// runs only the newest state waits, replacing older ones. A save of 1 MiB of chunks costs two
/// fsyncs; awaited in line they held the transfer up (200 MB on loopback, download bench: 1.33 s
/// with them in line, 1.02 s with this, 0.89 s with no saves at all). A state claims only chunks whose writes finished before it was made, and the
/// fsync that precedes its write starts later still, so what it claims is on disk.
#[derive(Default)]
struct Saver {
    running: Option<tokio::task::JoinHandle<Result<(), DownloadError>>>,
    waiting: Option<StagingState>,
}

impl Saver {
    fn busy(&self) -> bool {
        self.running.is_some()
    }

    fn submit(&mut self, staging: &Staging<'_>, state: StagingState) {
        self.waiting = Some(state);
        if !self.busy() {
            self.next(staging);
        }
    }

    /// Starts saving the waiting state, if any.
    fn next(&mut self, staging: &Staging<'_>) {
        if let Some(state) = self.waiting.take() {
            self.running = Some(tokio::spawn(staging.persist(state)));
        }
    }

    /// The running save's outcome (pending forever when none runs; guard with [`Self::busy`]).
    async fn saved(&mut self, staging: &Staging<'_>) -> Result<(), DownloadError> {
        let Some(running) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = running.await;
        self.running = None;
        outcome.unwrap_or_else(|e| {
            Err(staging.io("save", &staging.state_path)(
                std::io::Error::other(e),
            ))
        })
    }

    /// Waits for the running save; drops the waiting state (a newer one follows).
    async fn drain_superseded(&mut self, staging: &Staging<'_>) -> Result<(), DownloadError> {
        self.waiting = None;
        self.drain(staging).await
    }

    /// Waits for the running save, then saves the waiting state.
    async fn drain(&mut self, staging: &Staging<'_>) -> Result<(), DownloadError> {
        if self.busy() {
            self.saved(staging).await?;
        }
        if let Some(state) = self.waiting.take() {
            staging.persist(state).await?;
        }
        Ok(())
    }
}

/// The transfer's clock: tokio's, so a paused test runtime pauses it too.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// `first` and the frames queued behind it, `max` in all at most.
fn queued(first: Bytes, frames: &mut mpsc::Receiver<Bytes>, max: usize) -> Vec<Bytes> {
    let mut out = vec![first];
    out.extend(pending(frames, max.saturating_sub(1)));
    out
}

/// A frame of `artifact` as the transfer takes it; a malformed one is dropped and logged.
fn decode(artifact: &ArtifactId, frame: Bytes) -> Option<Input> {
    match decode_frame(&frame) {
        Ok((header, payload)) => {
            let payload = frame.slice_ref(payload);
            Some(Input::Frame { header, payload })
        }
        Err(e) => {
            tracing::warn!(artifact = %artifact.short(), "malformed chunk frame dropped: {e}");
            None
        }
    }
}

/// What a tick of the transfer's clock hands it: the frames waiting now (at most `max`), then
/// the tick ([`Input::TickBehind`] where more frames wait, or `unread` MQTT events do). Frames
/// that came while the task was busy go before the clock, so a stall is time without frames,
/// not time the task did not run: its writes wait for a blocking thread (4 of them for 10,000
/// simulated machines) or a slow disk, and the tick, ready at the same moment as the frames,
/// was taken first about half the time and asked again for what was already in.
fn tick_inputs(
    artifact: &ArtifactId,
    frames: &mut mpsc::Receiver<Bytes>,
    max: usize,
    unread: usize,
) -> Vec<Input> {
    let mut inputs: Vec<Input> = pending(frames, max)
        .into_iter()
        .filter_map(|frame| decode(artifact, frame))
        .collect();
    // Frames beyond this batch, or MQTT input the agent has not handled ([`Unread`]): behind.
    inputs.push(if unread > 0 || !frames.is_empty() {
        Input::TickBehind
    } else {
        Input::Tick
    });
    inputs
}

/// The frames waiting in `frames` now, at most `max`.
fn pending(frames: &mut mpsc::Receiver<Bytes>, max: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    while out.len() < max {
        match frames.try_recv() {
            Ok(frame) => out.push(frame),
            Err(_) => break,
        }
    }
    out
}

/// Writes each chunk at its offset; returns their indices. Blocking.
fn write_chunks(file: &std::fs::File, chunks: Vec<ChunkWrite>) -> std::io::Result<Vec<u32>> {
    let mut indices = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        write_at(file, &chunk.bytes, chunk.offset)?;
        indices.push(chunk.index);
    }
    Ok(indices)
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
    let Some((staging, mut fetch, first)) = open_staging(ctx, artifact, &cancel).await? else {
        return Ok(artifact_path(&ctx.data_dir, &artifact.id));
    };
    let (mut last, mut stalled, mut carried) = (None, 0, Vec::new());
    for attempt in first..=ctx.tuning.attempts {
        let result = match staging
            .attempt(&mut fetch, &mut frames, carried, &cancel, &mut |p| {
                report(p, attempt)
            })
            .await
        {
            Ok(()) => staging.finish(&mut fetch).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(path) => return Ok(path),
            Err(e @ DownloadError::Cancelled { .. }) => return Err((e, attempt)),
            Err(e) => {
                let pause = match e {
                    DownloadError::Stalled { .. } if attempt < ctx.tuning.attempts => {
                        stalled += 1;
                        retry_pause(&ctx.tuning, stalled)
                    }
                    _ => Duration::ZERO,
                };
                tracing::warn!(machine = %ctx.machine, artifact = %artifact.id.short(), attempt, next_in_s = pause.as_secs(), "download attempt failed: {e}");
                last = Some(e);
                if !pause.is_zero() {
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            return Err((DownloadError::Cancelled { artifact: artifact.id }, attempt));
                        }
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                carried = after_the_attempt(&mut frames);
            }
        }
    }
    // Giving up ends the job, and its staging would be removed once that is persisted. It goes
    // first: a download that failed on a full disk holds the space that the failure report
    // and the agent's state need.
    staging.discard().await;
    Err((last.expect("at least one attempt"), ctx.tuning.attempts))
}

/// The frames that came after an attempt ended, for the next one: its chunks and manifest
/// parts, which on a slow link took most of the attempt to come (the next attempt asks for
/// none of them again). The platform's error frames were answers to the failed attempt, and
/// are dropped.
fn after_the_attempt(frames: &mut mpsc::Receiver<Bytes>) -> Vec<Bytes> {
    let mut kept = Vec::new();
    while let Ok(frame) = frames.try_recv() {
        if !matches!(decode_frame(&frame), Ok((h, _)) if h.frame_type == FrameType::Error) {
            kept.push(frame);
        }
    }
    kept
}

/// Opens the staging file, trying again after a pause when the file system refuses (each
/// try counts as an attempt, paused as after a stalled one): a passing "too many open files"
/// must not end the job at once. A disk without room for the artifact ([`reserve`]) and a bad
/// layout fail at once: the operator hears of the full disk now, and retries the release once
/// there is room. Returns the staging, the transfer, and the attempt the transfer starts as,
/// or `None` when the artifact is already downloaded.
async fn open_staging<'a>(
    ctx: &'a DownloadContext,
    artifact: &ArtifactRef,
    cancel: &CancellationToken,
) -> Result<Option<(Staging<'a>, Fetch, u32)>, (DownloadError, u32)> {
    let mut attempt = 1;
    loop {
        match Staging::open(ctx, artifact).await {
            Ok(opened) => return Ok(opened.map(|(staging, fetch)| (staging, fetch, attempt))),
            Err(e @ DownloadError::Io { .. })
                if attempt < ctx.tuning.attempts && !is_disk_full(&e) =>
            {
                let pause = retry_pause(&ctx.tuning, attempt);
                tracing::warn!(machine = %ctx.machine, artifact = %artifact.id.short(), attempt, next_in_s = pause.as_secs(), "download attempt failed: {e}");
                tokio::select! {
                    _ = cancel.cancelled() => {
                        return Err((DownloadError::Cancelled { artifact: artifact.id }, attempt));
                    }
                    _ = tokio::time::sleep(pause) => {}
                }
                attempt += 1;
            }
            Err(e) => return Err((e, attempt)),
        }
    }
}

/// The pause before the attempt that follows the `stalled`-th one to fail for want of progress
/// (see [`Tuning::retry_pause`]).
fn retry_pause(tuning: &Tuning, stalled: u32) -> Duration {
    let base = tuning
        .retry_pause
        .saturating_mul(1 << stalled.saturating_sub(1).min(16));
    base.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staging file of `len` bytes in `dir`, open for reading and writing.
    fn part_file(dir: &tempfile::TempDir, len: u64) -> std::fs::File {
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("a.part"))
            .unwrap();
        file.set_len(len).unwrap();
        file
    }

    /// The staging file's blocks are allocated when it opens (a sparse file takes none), and
    /// what was written before stays.
    #[test]
    fn the_staging_file_is_reserved_whole_and_keeps_what_it_holds() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let file = part_file(&dir, 1 << 20);
        std::os::unix::fs::FileExt::write_all_at(&file, b"kept", 4096).unwrap();
        assert!(file.metadata().unwrap().blocks() * 512 < 1 << 20);
        reserve(&file, 1 << 20).unwrap();
        assert!(file.metadata().unwrap().blocks() * 512 >= 1 << 20);
        let mut back = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 4096).unwrap();
        assert_eq!(&back, b"kept");
        assert_eq!(file.metadata().unwrap().len(), 1 << 20);
    }

    /// Between attempts, chunks and manifest parts that came are kept for the next attempt;
    /// the platform's error frames (answers to the failed one) are not.
    #[test]
    fn frames_after_an_attempt_are_kept_but_the_platforms_errors() {
        use fleetcast_proto::chunk::{encode_frame, FrameHeader};
        let artifact = ArtifactId::of(b"x");
        let frame = |frame_type, index| {
            let header = FrameHeader {
                frame_type,
                artifact,
                index,
                total: 4,
            };
            Bytes::from(encode_frame(&header, b"payload"))
        };
        let (tx, mut rx) = mpsc::channel(8);
        let sent = [
            frame(FrameType::Chunk, 1),
            frame(FrameType::Error, 0),
            frame(FrameType::Manifest, 0),
            frame(FrameType::Chunk, 2),
        ];
        for f in &sent {
            tx.try_send(f.clone()).unwrap();
        }
        let kept = after_the_attempt(&mut rx);
        assert_eq!(kept, [sent[0].clone(), sent[2].clone(), sent[3].clone()]);
        assert!(rx.try_recv().is_err(), "the queue is emptied");
    }

    #[test]
    fn the_pause_after_a_stalled_attempt_doubles_each_time_and_is_drawn_around_it() {
        let tuning = Tuning::default();
        for (stalled, base) in [(1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0)] {
            let pauses: Vec<f64> = (0..200)
                .map(|_| retry_pause(&tuning, stalled).as_secs_f64())
                .collect();
            assert!(
                pauses
                    .iter()
                    .all(|&p| (base * 0.5..base * 1.5).contains(&p)),
                "{stalled}: {pauses:?}"
            );
            let spread = pauses.iter().cloned().fold(f64::MIN, f64::max)
                - pauses.iter().cloned().fold(f64::MAX, f64::min);
            assert!(spread > base * 0.5, "drawn at random: {pauses:?}");
        }
    }

    fn tiny_artifact() -> ArtifactRef {
        ArtifactRef {
            id: ArtifactId::from_bytes([5; 32]),
            size: 3 * 65536,
            chunk_size: 65536,
            name: "a.bin".into(),
        }
    }

    /// A staging directory that cannot be created for a moment (here a file stands in its
    /// way) costs an attempt and a pause, not the job: once it can be, the transfer starts, as
    /// its next attempt.
    #[tokio::test]
    async fn a_staging_file_that_cannot_be_opened_is_tried_again_after_a_pause() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, _eventloop) = test_context(dir.path());
        ctx.tuning.retry_pause = Duration::from_millis(500);
        let blocker = dir.path().join("staging");
        std::fs::write(&blocker, b"in the way").unwrap();
        let (_tx, frames) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let clear = {
            let blocker = blocker.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                std::fs::remove_file(blocker).unwrap();
            })
        };
        let started = std::sync::Mutex::new(Vec::new());
        let stop = cancel.clone();
        let result = download(&ctx, &tiny_artifact(), frames, cancel, |_, attempt| {
            started.lock().unwrap().push(attempt);
            stop.cancel();
        })
        .await;
        clear.await.unwrap();
        assert_eq!(
            *started.lock().unwrap(),
            vec![2],
            "the transfer starts as attempt 2"
        );
        assert!(
            matches!(result, Err((DownloadError::Cancelled { .. }, 2))),
            "{result:?}"
        );
        assert!(dir.path().join("staging").is_dir());
    }

    /// One that never can be fails the download after its attempts, with the file system's
    /// error.
    #[tokio::test]
    async fn a_staging_file_that_never_opens_fails_the_download_after_every_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, _eventloop) = test_context(dir.path());
        ctx.tuning.retry_pause = Duration::from_millis(5);
        ctx.tuning.attempts = 3;
        std::fs::write(dir.path().join("staging"), b"in the way").unwrap();
        let (_tx, frames) = mpsc::channel(4);
        let result = download(
            &ctx,
            &tiny_artifact(),
            frames,
            CancellationToken::new(),
            |_, _| panic!("no transfer starts"),
        )
        .await;
        assert!(
            matches!(result, Err((DownloadError::Io { op: "create", .. }, 3))),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn frames_queued_behind_the_first_are_taken_together_up_to_the_bound() {
        let (tx, mut rx) = mpsc::channel(32);
        for i in 0u8..20 {
            tx.send(Bytes::from(vec![i])).await.unwrap();
        }
        let first = rx.recv().await.unwrap();
        let taken = queued(first, &mut rx, 16);
        let firsts: Vec<u8> = taken.iter().map(|b| b[0]).collect();
        assert_eq!(firsts, (0..16).collect::<Vec<_>>());
        // The rest waits for the next round; an empty queue ends a round at once.
        let first = rx.recv().await.unwrap();
        assert_eq!(queued(first, &mut rx, 16).len(), 4);
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!(queued(first, &mut rx, 16).len(), 1);
    }

    #[test]
    fn frames_waiting_when_the_clock_ticks_count_before_it() {
        use fleetcast_proto::chunk::{encode_frame, FrameHeader, ManifestBuilder};

        let bytes: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let (id, layout) = (ArtifactId::of(&bytes), Layout::new(4096, 1024).unwrap());
        let mut manifest = ManifestBuilder::new(layout);
        (0..4).for_each(|i| manifest.push_chunk(&bytes[i * 1024..(i + 1) * 1024]));
        let saved = StagingState {
            have: "00".into(),
            manifest: Some(hex::encode(manifest.finish())),
        };
        let chunk = |i: u32| {
            let header = FrameHeader {
                frame_type: FrameType::Chunk,
                artifact: id,
                index: i,
                total: 4,
            };
            let at = i as usize * 1024;
            Bytes::from(encode_frame(&header, &bytes[at..at + 1024]))
        };
        let asked_again =
            |effects: &[Effect]| effects.iter().any(|e| matches!(e, Effect::Request { .. }));
        let tuning = Tuning {
            window: 4,
            ..Tuning::default()
        };
        let t0 = std::time::Instant::now();
        let late = t0 + tuning.stall + Duration::from_millis(500);

        // Chunks 0 and 1 came while the task was busy past the stall time.
        let (tx, mut rx) = mpsc::channel(8);
        tx.try_send(chunk(0)).unwrap();
        tx.try_send(chunk(1)).unwrap();
        // Behind: MQTT input not handled yet, or frames beyond the batch taken.
        assert!(matches!(
            tick_inputs(&id, &mut mpsc::channel(1).1, 16, 1).last(),
            Some(Input::TickBehind)
        ));
        let (more_tx, mut more) = mpsc::channel(8);
        for i in 0..3 {
            more_tx.try_send(chunk(i)).unwrap();
        }
        let inputs = tick_inputs(&id, &mut more, 2, 0);
        assert_eq!(inputs.len(), 3);
        assert!(matches!(inputs.last(), Some(Input::TickBehind)));
        let inputs = tick_inputs(&id, &mut rx, 16, 0);
        assert!(matches!(inputs.last(), Some(Input::Tick)));
        assert_eq!(inputs.len(), 3);
        let mut fetch = Fetch::resume(id, layout, tuning.clone(), Some(saved.clone()));
        assert!(asked_again(&fetch.begin(t0)), "the first window");
        let effects = fetch.handle_all(late, inputs);
        assert!(
            !asked_again(&effects),
            "asked again for chunks it had: {effects:?}"
        );
        assert!(rx.try_recv().is_err(), "every waiting frame was taken");

        // The tick taken first, as before: chunks 0..4 asked for again, 0 and 1 on their way.
        let mut fetch = Fetch::resume(id, layout, tuning, Some(saved));
        fetch.begin(t0);
        let mut first = vec![Input::Tick];
        first.extend(
            [chunk(0), chunk(1)]
                .into_iter()
                .filter_map(|f| decode(&id, f)),
        );
        assert!(asked_again(&fetch.handle_all(late, first)));
    }

    #[tokio::test]
    async fn unread_counts_what_waits_in_the_queue_without_keeping_it_open() {
        assert_eq!(Unread::default().now(), 0);
        let (tx, mut rx) = mpsc::channel::<u8>(4);
        let unread = Unread::of(&tx);
        assert_eq!(unread.now(), 0);
        tx.send(1).await.unwrap();
        tx.send(2).await.unwrap();
        assert_eq!(unread.now(), 2);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(unread.now(), 1);
        drop(tx);
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, None, "the count kept the queue open");
        assert_eq!(unread.now(), 0);
    }

    /// A download context over `dir`, its MQTT client never connected (keep the event loop).
    fn test_context(dir: &Path) -> (DownloadContext, rumqttc::EventLoop) {
        let (client, eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("staging-test", "127.0.0.1", 1), 8);
        let ctx = DownloadContext {
            unread: Unread::default(),
            machine: MachineId::new("vm-1").unwrap(),
            topics: Topics::default(),
            client,
            secret: Secret::from_bytes([7; 32]),
            store: Store::open(dir).unwrap(),
            data_dir: dir.to_owned(),
            tuning: Tuning::default(),
        };
        (ctx, eventloop)
    }

    #[tokio::test]
    async fn states_are_saved_beside_the_transfer_one_at_a_time_the_newest_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, _eventloop) = test_context(dir.path());
        let artifact = ArtifactRef {
            id: ArtifactId::from_bytes([9; 32]),
            size: 3 * 65536,
            chunk_size: 65536,
            name: "a.bin".into(),
        };
        let (staging, _fetch) = Staging::open(&ctx, &artifact)
            .await
            .unwrap()
            .expect("not downloaded yet");
        let state = |have: &str| StagingState {
            have: have.into(),
            manifest: None,
        };
        let saved = || -> Option<StagingState> {
            serde_json::from_slice(&std::fs::read(&staging.state_path).ok()?).ok()
        };
        let mut saver = Saver::default();
        // The disk is stalled: submitting does not wait for it.
        let held = durable::shared().hold();
        for have in ["01", "03", "07"] {
            saver.submit(&staging, state(have));
        }
        assert!(saver.busy());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(saved(), None, "saved while the disk was held");
        drop(held);
        // The first state, then only the newest of those that waited.
        saver.saved(&staging).await.unwrap();
        assert_eq!(saved(), Some(state("01")));
        saver.next(&staging);
        assert!(saver.busy());
        saver.saved(&staging).await.unwrap();
        assert_eq!(saved(), Some(state("07")));
        saver.next(&staging);
        assert!(!saver.busy(), "a state was saved twice");
        // What waits when the transfer stops is saved by the drain.
        saver.submit(&staging, state("0f"));
        saver.submit(&staging, state("1f"));
        saver.drain(&staging).await.unwrap();
        assert_eq!(saved(), Some(state("1f")));
    }

    #[tokio::test]
    async fn the_manifest_is_saved_once_in_its_own_file_and_resumed_from_it() {
        use fleetcast_proto::chunk::ManifestBuilder;
        let dir = tempfile::tempdir().unwrap();
        let (ctx, _eventloop) = test_context(dir.path());
        let bytes: Vec<u8> = (0..3 * 1024u32 - 7).map(|i| (i * 7 % 251) as u8).collect();
        let layout = Layout::new(bytes.len() as u64, 1024).unwrap();
        let mut builder = ManifestBuilder::new(layout);
        for chunk in bytes.chunks(1024) {
            builder.push_chunk(chunk);
        }
        let manifest = hex::encode(builder.finish());
        let artifact = ArtifactRef {
            id: ArtifactId::of(&bytes),
            size: bytes.len() as u64,
            chunk_size: 1024,
            name: "a.bin".into(),
        };
        let state = |have: &str, manifest: Option<&str>| StagingState {
            have: have.into(),
            manifest: manifest.map(str::to_owned),
        };
        let (staging, fetch) = Staging::open(&ctx, &artifact)
            .await
            .unwrap()
            .expect("not downloaded yet");
        assert!(!fetch.has_manifest());
        staging.persist(state("01", Some(&manifest))).await.unwrap();
        let on_disk = || -> StagingState {
            serde_json::from_slice(&std::fs::read(&staging.state_path).unwrap()).unwrap()
        };
        assert_eq!(on_disk(), state("01", None));
        assert_eq!(
            std::fs::read(&staging.manifest_path).unwrap(),
            manifest.as_bytes()
        );
        // Written once: a later state does not write it again.
        std::fs::write(&staging.manifest_path, b"not written again").unwrap();
        staging.persist(state("03", Some(&manifest))).await.unwrap();
        assert_eq!(
            std::fs::read(&staging.manifest_path).unwrap(),
            b"not written again"
        );
        assert_eq!(on_disk(), state("03", None));

        // A restart resumes with the manifest from its file, verified.
        std::fs::write(&staging.manifest_path, &manifest).unwrap();
        let (again, fetch) = Staging::open(&ctx, &artifact)
            .await
            .unwrap()
            .expect("not downloaded yet");
        assert!(fetch.has_manifest());
        assert_eq!(fetch.progress().bytes, 2048);
        assert!(again.manifest_saved.load(Ordering::Acquire));
        // One that does not verify is fetched again, and saved again once it is.
        std::fs::write(&staging.manifest_path, hex::encode([0u8; 96])).unwrap();
        let (again, fetch) = Staging::open(&ctx, &artifact)
            .await
            .unwrap()
            .expect("not downloaded yet");
        assert!(!fetch.has_manifest());
        assert!(!again.manifest_saved.load(Ordering::Acquire));
        // A state saved with the manifest inline (before it had its own file) still resumes.
        std::fs::remove_file(&staging.manifest_path).unwrap();
        let inline = serde_json::to_vec(&state("07", Some(&manifest))).unwrap();
        std::fs::write(&staging.state_path, inline).unwrap();
        let (again, fetch) = Staging::open(&ctx, &artifact)
            .await
            .unwrap()
            .expect("not downloaded yet");
        assert!(fetch.has_manifest());
        assert_eq!(fetch.progress().bytes, bytes.len() as u64);
        assert!(!again.manifest_saved.load(Ordering::Acquire));
        // Discarded with the rest.
        again.persist(state("07", Some(&manifest))).await.unwrap();
        assert!(again.manifest_path.exists());
        let manifest_path = again.manifest_path.clone();
        again.discard().await;
        assert!(!manifest_path.exists());
    }

    #[test]
    fn chunks_written_together_land_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let file = part_file(&dir, 40);
        let chunk = |index: u32, fill: u8, len: usize| ChunkWrite {
            index,
            offset: index as u64 * 10,
            bytes: Bytes::from(vec![fill; len]),
        };
        let written = write_chunks(
            &file,
            vec![chunk(3, b'd', 10), chunk(0, b'a', 10), chunk(2, b'c', 4)],
        )
        .unwrap();
        assert_eq!(written, [3, 0, 2]);
        let mut expected = [0u8; 40];
        expected[..10].fill(b'a');
        expected[20..24].fill(b'c');
        expected[30..].fill(b'd');
        assert_eq!(std::fs::read(dir.path().join("a.part")).unwrap(), expected);
    }
}
