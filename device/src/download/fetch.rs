//! The transfer's decisions as a pure state machine: [`Fetch::handle`] takes a decoded frame, a
//! clock tick or a finished write, with the current time, and returns [`Effect`]s for the edge
//! (`mod.rs`) to carry out. No I/O and no clock: time is passed in, so tests choose it.
//!
//! An attempt ([`Fetch::begin`]) first assembles the manifest from its parts and checks it
//! against the artifact id (unless the artifact is one chunk or a saved manifest verified), then
//! keeps a window of chunks requested. The first request asks for the manifest and the first
//! window together, so a machine needs one round trip, not two; chunk frames that arrive before
//! the manifest verifies (its own, or those other machines asked for on the shared topic) are
//! kept, a window of them, and checked once it does. Each chunk is verified on arrival, handed
//! out to be written, and counted once [`Input::Written`] comes back. The bitmap of written
//! chunks and the verified manifest outlive the attempt, and through [`StagingState`] a restart.
//!
//! [`Fetch::handle_all`] takes the inputs that queued up together and hands out all their
//! writes in one [`Effect::Write`], so the edge makes one trip off the runtime per batch rather
//! than per chunk.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::ControlFlow::{self, Break, Continue};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetcast_proto::chunk::{
    ChunkVerifier, FrameHeader, FrameType, Layout, MAX_CHUNKS_PER_REQUEST, MAX_RANGES_PER_REQUEST,
};
use fleetcast_proto::status::Progress;
use fleetcast_proto::ArtifactId;
use serde::{Deserialize, Serialize};

use super::{DownloadError, Tuning};

/// Chunks per request: however scattered, this many indices form at most as many ranges as a
/// request may carry.
pub const CHUNKS_PER_REQUEST: usize = MAX_CHUNKS_PER_REQUEST as usize / 4;
const _: () = assert!(CHUNKS_PER_REQUEST <= MAX_RANGES_PER_REQUEST);

/// Persisted beside the staging file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingState {
    /// One bit per chunk, hex.
    pub have: String,
    /// The verified manifest, hex.
    #[serde(default)]
    pub manifest: Option<String>,
}

#[derive(Debug)]
pub enum Input {
    /// A frame about this download's artifact, decoded; `payload` follows the header.
    Frame { header: FrameHeader, payload: Bytes },
    /// Time passed: checks for stalls and the attempt timeout.
    Tick,
    /// Time passed while the machine has input it has not handled yet (frames beyond the
    /// tick's batch, or MQTT events its loop has not read, [`super::Unread`]): as [`Self::Tick`]
    /// with twice the wait before asking again, since what it waits for may be in that input.
    TickBehind,
    /// The chunks of an [`Effect::Write`] are in the staging file.
    Written { indices: Vec<u32> },
}

#[derive(Debug)]
pub enum Effect {
    /// Ask the platform for the manifest parts `manifest` and for `chunks` (sorted, at most
    /// [`CHUNKS_PER_REQUEST`]); one sealed request each. The platform sends the manifest parts
    /// of a request before its chunks.
    Request {
        manifest: ManifestParts,
        chunks: Vec<u32>,
    },
    /// Write verified chunks (one or more, distinct), each at its offset of the staging file,
    /// then hand back [`Input::Written`] with their indices. Nothing that follows in the same
    /// list depends on them having been written.
    Write(Vec<ChunkWrite>),
    /// Make the written chunks durable, then save this state that claims them.
    Persist(StagingState),
    /// Report `downloading`.
    Report(Progress),
    /// Every chunk is written and persisted: the attempt succeeded. Always the last effect.
    Done,
    /// The attempt failed. Always the last effect.
    Fail(DownloadError),
}

/// A verified chunk and where it goes in the staging file.
#[derive(Debug)]
pub struct ChunkWrite {
    pub index: u32,
    pub offset: u64,
    pub bytes: Bytes,
}

/// The download of one artifact, across its attempts.
#[derive(Debug)]
pub struct Fetch {
    artifact: ArtifactId,
    layout: Layout,
    tuning: Tuning,
    have: Bitmap,
    /// Bytes of the chunks in `have`.
    have_bytes: u64,
    /// `None` until a manifest verifies.
    verifier: Option<ChunkVerifier>,
    /// The verified manifest, hex, for the saved state (`None` for a one-chunk artifact).
    /// Encoded once: a 200 MB artifact's manifest is 200 KB of hex, and encoding it for each
    /// saved state took 14 % of the agent's CPU in a download.
    manifest: Option<String>,
    /// Whether `have` came (in part) from a saved state: see [`Fetch::has_unverified_chunks`].
    resumed_chunks: bool,
    /// Bytes written since the last [`Effect::Persist`].
    unpersisted: u64,
    /// Whether `have` changed since the last [`Effect::Persist`].
    unsaved: bool,
    /// `None` before the first attempt and once each one ends.
    attempt: Option<Attempt>,
    /// How long a chunk has lately taken to come, across attempts: the longest gap between two
    /// verified chunks, shrunk by a quarter at each chunk that came sooner. It sets how long
    /// an attempt waits without progress ([`Fetch::attempt_timeout`]).
    chunk_time: Duration,
    /// When the last chunk verified (the first attempt's start before any did).
    last_chunk_at: Option<Instant>,
    /// The gaps before the last [`RECENT_GAPS`] chunks: the shortest is what the link needs
    /// for a chunk at least ([`Fetch::stall_time`]).
    recent_gaps: VecDeque<Duration>,
}

/// Chunk gaps kept for [`Fetch::stall_time`].
const RECENT_GAPS: usize = 4;

/// The most an attempt waits without progress however slow the link has been.
pub const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Attempt {
    started: Instant,
    /// Frames of this artifact received in the attempt (said when it stalls).
    frames: u64,
    wait: Wait,
    reports: ProgressReports,
    phase: Phase,
}

/// Progress, and how long to wait without it before asking again.
#[derive(Debug)]
struct Wait {
    /// The last manifest part or written chunk.
    last_progress: Instant,
    /// How many times the wait has been doubled ([`Wait::stall`]): once per re-request, kept
    /// across progress, and halved once the machine has gone a while without a gap between two
    /// pieces of progress of even half the wait ([`Wait::calm`]).
    stalls: u32,
    /// Since when the longest gap between two pieces of progress is being watched...
    calm_since: Instant,
    /// ...and that longest gap.
    longest_gap: Duration,
}

impl Wait {
    fn new(now: Instant) -> Self {
        Self {
            last_progress: now,
            stalls: 0,
            calm_since: now,
            longest_gap: Duration::ZERO,
        }
    }

    /// How long without progress before asking again: `tuning.stall`, doubled per step in
    /// [`Self::stalls`], at most `tuning.stall_max`.
    fn stall(&self, tuning: &Tuning) -> Duration {
        tuning
            .stall
            .saturating_mul(1 << self.stalls.min(16))
            .min(tuning.stall_max.max(tuning.stall))
    }

    /// A manifest part or a chunk came at `now`.
    fn progressed(&mut self, now: Instant, tuning: &Tuning) {
        let gap = now.saturating_duration_since(self.last_progress);
        self.longest_gap = self.longest_gap.max(gap);
        self.last_progress = now;
        self.calm(now, tuning);
    }

    /// The machine asked again for what it is waiting for: the next wait is twice as long.
    /// Progress does not bring it back. Why: on a host serving 10,000 machines at once a
    /// machine gets a chunk every 2-3 s; a wait that went back to 2 s at each chunk asked for
    /// the whole window again between any two of them, and the platform sent 2.5 times the
    /// frames the machines needed.
    fn asked_again(&mut self, now: Instant, tuning: &Tuning) {
        if self.stall(tuning) < tuning.stall_max {
            self.stalls += 1;
        }
        self.calm_since = now;
        self.longest_gap = Duration::ZERO;
    }

    /// Halves the wait once, for two waits in a row, no gap between two pieces of progress
    /// (the one still open included) came to half of it: chunks come fast again. A gap that
    /// held a re-request is at least a whole wait long, so the wait never shrinks on gaps the
    /// machine may have shortened by asking again.
    fn calm(&mut self, now: Instant, tuning: &Tuning) {
        if self.stalls == 0 {
            return;
        }
        let stall = self.stall(tuning);
        if now.saturating_duration_since(self.calm_since) < stall * 2 {
            return;
        }
        let open = now.saturating_duration_since(self.last_progress);
        if self.longest_gap.max(open) < stall / 2 {
            self.stalls -= 1;
        }
        self.calm_since = now;
        self.longest_gap = Duration::ZERO;
    }
}

/// The manifest parts a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestParts {
    Skip,
    /// Every part (`"manifest": true`, what agents before 2026-11-27 always asked).
    All,
    /// Parts `[start, end)` (`"manifest_parts"`): a manifest of more than
    /// [`MANIFEST_WINDOW`] parts is asked a window at a time.
    Window(u32, u32),
}

/// Manifest parts asked for at once. A session's queue at the embedded broker's gateway holds
/// 64 frames and drops what does not fit: a request for a manifest of more parts than that
/// (1 KiB chunks from 2 MiB, 64 KiB chunks from 8 GiB) got the same first 64 every time, and
/// the download never verified its manifest. Half the queue leaves room for the chunks asked
/// with the first window.
pub const MANIFEST_WINDOW: u32 = 32;

/// The next window of manifest parts to ask for, and where it ends: from the first missing
/// part, at most [`MANIFEST_WINDOW`]; [`ManifestParts::All`] when that is the whole manifest.
fn manifest_window(parts: &[Option<Bytes>]) -> (ManifestParts, u32) {
    let total = parts.len() as u32;
    let start = parts.iter().position(Option::is_none).unwrap_or(0) as u32;
    let end = total.min(start + MANIFEST_WINDOW);
    if start == 0 && end == total {
        (ManifestParts::All, end)
    } else {
        (ManifestParts::Window(start, end), end)
    }
}

#[derive(Debug)]
enum Phase {
    Manifest {
        parts: Vec<Option<Bytes>>,
        /// When the manifest (and `asked`) was last requested.
        last_request: Instant,
        /// The end of the window of parts last asked for: once every part before it is in,
        /// the next window is asked at once.
        window_end: u32,
        /// The chunks asked for with the manifest, sorted: the first window of missing ones.
        asked: Vec<u32>,
        /// Chunk frames that came before the manifest, unverified: at most `tuning.window`
        /// indices, the first frame of each. `Bytes` share the frame's buffer, so keeping them
        /// costs no copy.
        early: BTreeMap<u32, Bytes>,
        /// Chunks of `asked` whose frame came when `early` was full: asked for again once the
        /// manifest verifies, as nothing else would bring them.
        turned_away: BTreeSet<u32>,
    },
    Chunks {
        verifier: ChunkVerifier,
        /// Requested and not yet received, with when each was last asked for.
        outstanding: HashMap<u32, Instant>,
        /// Verified and handed out in a [`Effect::Write`], not yet [`Input::Written`].
        writing: BTreeSet<u32>,
        /// Where the window's top-up starts looking for a missing chunk.
        cursor: u32,
    },
}

impl Phase {
    /// The chunk phase, with `outstanding` already asked for.
    fn chunks(verifier: ChunkVerifier, outstanding: HashMap<u32, Instant>) -> Self {
        Self::Chunks {
            verifier,
            outstanding,
            writing: BTreeSet::new(),
            cursor: 0,
        }
    }
}

impl Fetch {
    /// A download of `artifact` laid out as `layout`, resumed from `saved` (read beside a
    /// staging file of the right size) where it holds up: a bitmap of the wrong size is
    /// dropped, a manifest that does not verify is fetched again. The bitmap is kept even then:
    /// the whole-file hash at the end catches one that lies.
    pub fn resume(
        artifact: ArtifactId,
        layout: Layout,
        tuning: Tuning,
        saved: Option<StagingState>,
    ) -> Self {
        let (mut have, mut manifest) = (None, None);
        if let Some(saved) = saved {
            have = Bitmap::from_hex(&saved.have, layout.chunks);
            manifest = saved.manifest.and_then(|m| hex::decode(m).ok());
        }
        let have = have.unwrap_or_else(|| Bitmap::new(layout.chunks));
        let (verifier, manifest) = if ChunkVerifier::needs_manifest(&layout) {
            manifest
                .and_then(|m| {
                    let v = ChunkVerifier::from_manifest(artifact, layout, &m).ok()?;
                    Some((v, hex::encode(m)))
                })
                .map_or((None, None), |(v, m)| (Some(v), Some(m)))
        } else {
            (Some(ChunkVerifier::single(artifact, layout)), None)
        };
        let have_bytes = (0..layout.chunks)
            .filter(|&i| have.has(i))
            .map(|i| layout.chunk_len(i) as u64)
            .sum();
        Self {
            artifact,
            layout,
            tuning,
            have,
            have_bytes,
            verifier,
            manifest,
            resumed_chunks: have_bytes > 0,
            unpersisted: 0,
            unsaved: false,
            attempt: None,
            chunk_time: Duration::ZERO,
            last_chunk_at: None,
            recent_gaps: VecDeque::with_capacity(RECENT_GAPS),
        }
    }

    /// How long without progress before asking again: the attempt's wait ([`Wait::stall`]),
    /// or, once two chunks have come, one and a half times the shortest of the last gaps
    /// between chunks where that is longer, at most `tuning.attempt_timeout`. Why: on a slow
    /// link every chunk takes that long to come, so a re-request sooner asks for chunks on
    /// their way (a 64 KiB chunk takes 22 s at 3 KB/s, and the stall timeout doubles only to
    /// 16 s); through an external broker each such request sends them again. The shortest of
    /// several gaps, and capped: a chunk lost and asked for again makes one long gap, which
    /// must not make the next loss wait longer.
    fn stall_time(&self, wait: &Wait) -> Duration {
        let stall = wait.stall(&self.tuning);
        if self.recent_gaps.len() < 2 {
            return stall;
        }
        let link = self.recent_gaps.iter().min().copied().unwrap_or_default() * 3 / 2;
        stall.max(link.min(self.tuning.attempt_timeout))
    }

    /// How long an attempt goes without progress before it fails: `tuning.attempt_timeout`,
    /// or four times the time a chunk has lately taken to come where that is longer (at most
    /// [`MAX_ATTEMPT_TIMEOUT`]). Why: on a link of 2 KB/s (a weak GPRS signal) a 64 KiB chunk
    /// takes 33 s to come, and a fixed 30 s gave attempts up just before their chunk came (behind
    /// a deep network queue, every attempt: the download failed).
    pub fn attempt_timeout(&self) -> Duration {
        let floor = self.tuning.attempt_timeout;
        (self.chunk_time * 4).clamp(floor, MAX_ATTEMPT_TIMEOUT.max(floor))
    }

    /// Whether a verified manifest is in (always, for a one-chunk artifact).
    pub fn has_manifest(&self) -> bool {
        self.verifier.is_some()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            bytes: self.have_bytes,
            total: self.layout.size,
        }
    }

    /// Starts an attempt: reports where the download stands, then asks for the manifest or for
    /// a window of missing chunks (or is done at once when every chunk is already in).
    #[cfg(test)]
    pub fn begin(&mut self, now: Instant) -> Vec<Effect> {
        self.begin_with(now, Vec::new())
    }

    /// [`Fetch::begin`], first taking `carried`: frames that came after the last attempt
    /// ended. Chunks among them are not asked for again (on a slow link, the one that came
    /// just after the attempt timed out took most of it to come).
    pub fn begin_with(&mut self, now: Instant, carried: Vec<Input>) -> Vec<Effect> {
        self.last_chunk_at.get_or_insert(now);
        let mut out = vec![Effect::Report(self.progress())];
        let phase = match &self.verifier {
            Some(verifier) => Phase::chunks(verifier.clone(), HashMap::new()),
            None => {
                // The manifest and the first window in one request: the platform sends the
                // manifest parts first, and the chunks are kept until they can be checked.
                let asked: Vec<u32> = (0..self.layout.chunks)
                    .filter(|&i| !self.have.has(i))
                    .take(self.tuning.window)
                    .collect();
                let parts = vec![None; self.layout.manifest_parts() as usize];
                let (window, window_end) = manifest_window(&parts);
                request(window, asked.clone(), &mut out);
                Phase::Manifest {
                    window_end,
                    parts,
                    last_request: now,
                    asked,
                    early: BTreeMap::new(),
                    turned_away: BTreeSet::new(),
                }
            }
        };
        let mut attempt = Attempt {
            started: now,
            frames: 0,
            wait: Wait::new(now),
            // The report above counts as made.
            reports: ProgressReports::new(
                self.layout.size,
                self.have_bytes,
                now,
                self.tuning.report_every,
            ),
            phase,
        };
        for input in carried {
            if let Input::Frame { header, payload } = input {
                if self
                    .on_frame(&mut attempt, now, header, payload, &mut out)
                    .is_break()
                {
                    return gather_writes(out);
                }
            }
        }
        if self.fill_window(&mut attempt, now, &mut out).is_continue() {
            self.attempt = Some(attempt);
        }
        gather_writes(out)
    }

    /// One input of the running attempt. Between attempts (after `Done` or `Fail`) inputs are
    /// stale and ignored.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        self.handle_all(now, [input])
    }

    /// Inputs that arrived together (frames queued while the edge was busy), in order, as one:
    /// their writes are gathered into one [`Effect::Write`] after the other effects (a
    /// [`Effect::Persist`] claims only chunks already [`Input::Written`], so none waits for
    /// it) and before a closing `Done` or `Fail`.
    pub fn handle_all(
        &mut self,
        now: Instant,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        for input in inputs {
            let Some(mut attempt) = self.attempt.take() else {
                break;
            };
            let flow = match input {
                Input::Frame { header, payload } => {
                    self.on_frame(&mut attempt, now, header, payload, &mut out)
                }
                Input::Written { indices } => {
                    self.on_written(&mut attempt, now, &indices, &mut out)
                }
                Input::Tick => self.on_tick(&mut attempt, now, false, &mut out),
                Input::TickBehind => self.on_tick(&mut attempt, now, true, &mut out),
            };
            if flow.is_continue() {
                self.attempt = Some(attempt);
            }
        }
        gather_writes(out)
    }

    /// The state to save when an attempt ends early (failed or cancelled), if it changed since
    /// the last [`Effect::Persist`]; counts it as saved.
    pub fn unsaved_state(&mut self) -> Option<StagingState> {
        if !self.unsaved {
            return None;
        }
        self.mark_saved();
        Some(self.staging_state())
    }

    /// Whether the file holds chunks this transfer did not verify itself (claimed by a state
    /// saved before a restart), so the whole file must be hashed before it is trusted. Each
    /// chunk verified here was checked against the manifest, and the manifest against the
    /// artifact id: the same computation as hashing the file (protocol.md §7).
    pub fn has_unverified_chunks(&self) -> bool {
        self.resumed_chunks
    }

    /// Every chunk verified, yet the whole file does not: trust none of them. The verified
    /// manifest stays.
    pub fn forget_chunks(&mut self) {
        self.have = Bitmap::new(self.layout.chunks);
        self.resumed_chunks = false;
        self.have_bytes = 0;
        self.unsaved = true;
        self.attempt = None;
    }

    fn staging_state(&self) -> StagingState {
        StagingState {
            have: hex::encode(&self.have.bits),
            manifest: self.manifest.clone(),
        }
    }

    fn mark_saved(&mut self) {
        self.unpersisted = 0;
        self.unsaved = false;
    }

    fn persist(&mut self, out: &mut Vec<Effect>) {
        self.mark_saved();
        // A manifest that verifies when every chunk is already in would save the same twice.
        if !matches!(out.last(), Some(Effect::Persist(_))) {
            out.push(Effect::Persist(self.staging_state()));
        }
    }

    fn stalled(&self, attempt: &Attempt) -> DownloadError {
        DownloadError::Stalled {
            artifact: self.artifact,
            secs: self.attempt_timeout().as_secs(),
            have: self.have.count,
            chunks: self.layout.chunks,
            frames: attempt.frames,
            manifest: self.verifier.is_some(),
        }
    }

    fn on_frame(
        &mut self,
        attempt: &mut Attempt,
        now: Instant,
        header: FrameHeader,
        payload: Bytes,
        out: &mut Vec<Effect>,
    ) -> ControlFlow<()> {
        if header.artifact != self.artifact {
            return Continue(());
        }
        attempt.frames += 1;
        let in_manifest = matches!(attempt.phase, Phase::Manifest { .. });
        match header.frame_type {
            FrameType::Error => {
                out.push(Effect::Fail(DownloadError::Platform {
                    artifact: self.artifact,
                    reason: String::from_utf8_lossy(&payload).into_owned(),
                }));
                Break(())
            }
            FrameType::Manifest if in_manifest => {
                self.on_manifest_part(attempt, now, header, payload, out)
            }
            FrameType::Chunk => {
                // Frames for other machines bring chunks this one has too.
                let index = header.index;
                if header.total == self.layout.chunks
                    && index < self.layout.chunks
                    && !self.have.has(index)
                {
                    if in_manifest {
                        self.keep_early(attempt, index, payload);
                    } else {
                        self.on_chunk(attempt, now, index, payload, out);
                    }
                }
                Continue(())
            }
            // A manifest after it verified is not needed, and upload parts are not for
            // machines.
            _ => Continue(()),
        }
    }

    fn on_manifest_part(
        &mut self,
        attempt: &mut Attempt,
        now: Instant,
        header: FrameHeader,
        payload: Bytes,
        out: &mut Vec<Effect>,
    ) -> ControlFlow<()> {
        let Phase::Manifest {
            parts,
            last_request,
            window_end,
            asked,
            early,
            turned_away,
        } = &mut attempt.phase
        else {
            return Continue(());
        };
        let (index, total) = (header.index, self.layout.manifest_parts());
        if header.total != total || index >= total {
            return Continue(());
        }
        let expected = self.layout.manifest_part_range(index).len();
        if payload.len() != expected {
            tracing::warn!(artifact = %self.artifact.short(), part = index, got = payload.len(), expected, "manifest part has the wrong length; dropped");
            return Continue(());
        }
        parts[index as usize] = Some(payload);
        attempt.wait.progressed(now, &self.tuning);
        if let Some(missing) = parts.iter().position(Option::is_none) {
            // The window asked for is in: the next one, without waiting for a stall.
            if missing as u32 >= *window_end {
                let window;
                (window, *window_end) = manifest_window(parts);
                *last_request = now;
                request(window, Vec::new(), out);
            }
            return Continue(());
        }
        let manifest: Vec<u8> = parts.iter().flatten().flatten().copied().collect();
        match ChunkVerifier::from_manifest(self.artifact, self.layout, &manifest) {
            Ok(verifier) => {
                // The chunks asked for with the manifest are in flight, but for those turned
                // away: they are asked for again now. The kept frames are checked as if they
                // had just arrived.
                let mut outstanding: HashMap<u32, Instant> =
                    asked.iter().map(|&i| (i, *last_request)).collect();
                let again: Vec<u32> = std::mem::take(turned_away).into_iter().collect();
                outstanding.extend(again.iter().map(|&i| (i, now)));
                let early = std::mem::take(early);
                self.verifier = Some(verifier.clone());
                self.manifest = Some(hex::encode(manifest));
                self.persist(out);
                attempt.phase = Phase::chunks(verifier, outstanding);
                request(ManifestParts::Skip, again, out);
                for (index, payload) in early {
                    self.on_chunk(attempt, now, index, payload, out);
                }
                self.fill_window(attempt, now, out)
            }
            Err(e) => {
                // Like a bad chunk: drop it and ask again after the stall time (a forged part
                // on the shared topic must not cost the attempt). Its parts were no progress:
                // the attempt timeout still ends a manifest that never verifies. The kept
                // chunks go too (whoever forged the manifest may have sent them); the
                // re-request asks for them again.
                tracing::warn!(artifact = %self.artifact.short(), "manifest refused: {e}; fetching it again");
                parts.fill(None);
                early.clear();
                turned_away.clear();
                *last_request = now;
                attempt.wait.last_progress = attempt.started;
                Continue(())
            }
        }
    }

    /// Keeps chunk `index` (of this artifact, not in) that came before the manifest, if there
    /// is room: the first frame of each index, at most a window of indices.
    fn keep_early(&self, attempt: &mut Attempt, index: u32, payload: Bytes) {
        let Phase::Manifest {
            asked,
            early,
            turned_away,
            ..
        } = &mut attempt.phase
        else {
            return;
        };
        if early.contains_key(&index) {
            return;
        }
        if early.len() >= self.tuning.window {
            if asked.binary_search(&index).is_ok() {
                turned_away.insert(index);
            }
            return;
        }
        early.insert(index, payload);
    }

    /// Chunk `index` (of this artifact, not in) arrived, or was kept until the manifest
    /// verified.
    fn on_chunk(
        &mut self,
        attempt: &mut Attempt,
        now: Instant,
        index: u32,
        payload: Bytes,
        out: &mut Vec<Effect>,
    ) {
        let Phase::Chunks {
            verifier,
            outstanding,
            writing,
            ..
        } = &mut attempt.phase
        else {
            return;
        };
        // A copy of a chunk being written.
        if writing.contains(&index) {
            return;
        }
        if let Err(e) = verifier.verify(index, &payload) {
            tracing::warn!(artifact = %self.artifact.short(), chunk = index, "bad chunk dropped: {e}");
            if let Some(asked) = outstanding.get_mut(&index) {
                *asked = now;
                out.push(Effect::Request {
                    manifest: ManifestParts::Skip,
                    chunks: vec![index],
                });
            }
            return;
        }
        outstanding.remove(&index);
        writing.insert(index);
        // A verified chunk is progress as it comes, not once written: the link is what a
        // stall is about. Counted at its write, a chunk that came with the tick in one batch
        // (the writes go after the other effects) was no progress yet, and the tick asked
        // again for the rest of the window, on its way. (A disk that never finishes a write
        // holds the transfer in that write, not in a stall.)
        attempt.wait.progressed(now, &self.tuning);
        if let Some(last) = self.last_chunk_at.replace(now) {
            let gap = now.saturating_duration_since(last);
            self.chunk_time = gap.max(self.chunk_time * 3 / 4);
            if self.recent_gaps.len() == RECENT_GAPS {
                self.recent_gaps.pop_front();
            }
            self.recent_gaps.push_back(gap);
        }
        out.push(Effect::Write(vec![ChunkWrite {
            index,
            offset: self.layout.offset(index),
            bytes: payload,
        }]));
    }

    fn on_written(
        &mut self,
        attempt: &mut Attempt,
        now: Instant,
        indices: &[u32],
        out: &mut Vec<Effect>,
    ) -> ControlFlow<()> {
        let Phase::Chunks { writing, .. } = &mut attempt.phase else {
            return Continue(());
        };
        let mut any = false;
        for &index in indices {
            if !writing.remove(&index) {
                continue;
            }
            let len = self.layout.chunk_len(index) as u64;
            self.have.set(index);
            self.have_bytes += len;
            self.unpersisted += len;
            any = true;
        }
        if !any {
            return Continue(());
        }
        self.unsaved = true;
        // The last chunk is persisted with the whole file, and reported as `downloaded`.
        if self.have.count < self.layout.chunks {
            if self.unpersisted >= self.tuning.persist_every {
                self.persist(out);
            }
            if attempt.reports.due(self.have_bytes, now) {
                out.push(Effect::Report(self.progress()));
            }
        }
        self.fill_window(attempt, now, out)
    }

    fn on_tick(
        &mut self,
        attempt: &mut Attempt,
        now: Instant,
        behind: bool,
        out: &mut Vec<Effect>,
    ) -> ControlFlow<()> {
        let quiet = now.saturating_duration_since(attempt.wait.last_progress);
        if quiet > self.attempt_timeout() {
            out.push(Effect::Fail(self.stalled(attempt)));
            return Break(());
        }
        // Asking a platform too busy to answer again and again only makes it busier: each
        // re-request without progress doubles the wait for the next (with a fixed 2 s and three
        // attempts, a 10,000-machine rollout on one busy host left 3,881 machines
        // `download_failed`; with this and the pauses between attempts, none).
        attempt.wait.calm(now, &self.tuning);
        let stall = self.stall_time(&attempt.wait);
        // Behind (input it has not handled yet, which may hold what it waits for): twice the
        // wait, not an endless one. A steady stream of frames it does not need (others' chunks
        // sent again to everyone fetching, where the broker cannot address the machines that
        // asked, which one machine's credentials asking for every chunk can cause) must not
        // keep it from ever asking for the one it lacks.
        let stall = if behind { stall * 2 } else { stall };
        if quiet <= stall {
            return Continue(());
        }
        match &mut attempt.phase {
            Phase::Manifest {
                parts,
                last_request,
                window_end,
                asked,
                early,
                turned_away,
            } => {
                // Asked again the way it was asked first: the manifest with the chunks of the
                // first window not kept yet (a kept one, if forged, is asked for alone once the
                // manifest shows it).
                if now.saturating_duration_since(*last_request) > stall {
                    *last_request = now;
                    turned_away.clear();
                    let missing: Vec<u32> = asked
                        .iter()
                        .filter(|i| !early.contains_key(i))
                        .copied()
                        .collect();
                    let window;
                    (window, *window_end) = manifest_window(parts);
                    tracing::debug!(artifact = %self.artifact.short(), chunks = missing.len(), early = early.len(), parts = parts.iter().filter(|p| p.is_some()).count(), "no manifest yet: asking for it again");
                    request(window, missing, out);
                    attempt.wait.asked_again(now, &self.tuning);
                }
            }
            Phase::Chunks { outstanding, .. } => {
                if outstanding
                    .values()
                    .any(|&asked| now.saturating_duration_since(asked) > stall)
                {
                    let all: Vec<u32> = outstanding.keys().copied().collect();
                    outstanding.values_mut().for_each(|asked| *asked = now);
                    tracing::debug!(artifact = %self.artifact.short(), n = all.len(), "no progress: re-requesting outstanding chunks");
                    request(ManifestParts::Skip, all, out);
                    attempt.wait.asked_again(now, &self.tuning);
                }
            }
        }
        Continue(())
    }

    /// Ends the attempt once every chunk is in; else tops the window up, from the first missing
    /// chunk on (wrapping around), with chunks neither in, asked for nor being written.
    fn fill_window(
        &mut self,
        attempt: &mut Attempt,
        now: Instant,
        out: &mut Vec<Effect>,
    ) -> ControlFlow<()> {
        let Phase::Chunks {
            outstanding,
            writing,
            cursor,
            ..
        } = &mut attempt.phase
        else {
            return Continue(());
        };
        let chunks = self.layout.chunks;
        if self.have.count == chunks {
            self.persist(out);
            out.push(Effect::Done);
            return Break(());
        }
        let mut fresh = Vec::new();
        while outstanding.len() + writing.len() < self.tuning.window {
            let mut scanned = 0;
            while scanned < chunks
                && (self.have.has(*cursor)
                    || outstanding.contains_key(cursor)
                    || writing.contains(cursor))
            {
                *cursor = (*cursor + 1) % chunks;
                scanned += 1;
            }
            if scanned == chunks {
                break;
            }
            outstanding.insert(*cursor, now);
            fresh.push(*cursor);
        }
        request(ManifestParts::Skip, fresh, out);
        Continue(())
    }
}

/// Requests for the `manifest` parts (with the first of them) and for `chunks`, sorted,
/// [`CHUNKS_PER_REQUEST`] at a time.
fn request(manifest: ManifestParts, mut chunks: Vec<u32>, out: &mut Vec<Effect>) {
    chunks.sort_unstable();
    if manifest != ManifestParts::Skip && chunks.is_empty() {
        out.push(Effect::Request {
            manifest,
            chunks: Vec::new(),
        });
    }
    out.extend(
        chunks
            .chunks(CHUNKS_PER_REQUEST)
            .enumerate()
            .map(|(n, batch)| Effect::Request {
                manifest: if n == 0 {
                    manifest
                } else {
                    ManifestParts::Skip
                },
                chunks: batch.to_vec(),
            }),
    );
}

/// `effects` with every write gathered into one [`Effect::Write`], after the others and before
/// a closing `Done` or `Fail`.
fn gather_writes(effects: Vec<Effect>) -> Vec<Effect> {
    let mut writes = Vec::new();
    let mut out: Vec<Effect> = Vec::with_capacity(effects.len());
    for effect in effects {
        match effect {
            Effect::Write(batch) => writes.extend(batch),
            other => out.push(other),
        }
    }
    if !writes.is_empty() {
        let closing = matches!(out.last(), Some(Effect::Done | Effect::Fail(_)));
        out.insert(out.len() - usize::from(closing), Effect::Write(writes));
    }
    out
}

#[derive(Debug)]
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

/// When a download reports `downloading`: at most every ~10 % of the file and at most once per
/// `every` (1,000 machines fetching 1 MiB in a second report once each, not ten times).
#[derive(Debug)]
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
        if have < self.next_bytes || now.saturating_duration_since(self.last) < self.every {
            return false;
        }
        self.next_bytes = have + self.step;
        self.last = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::chunk::ManifestBuilder;

    const CHUNK: u32 = 1024;

    /// An artifact of 1 KiB chunks, the last one 100 bytes short.
    struct Art {
        bytes: Vec<u8>,
        id: ArtifactId,
        layout: Layout,
        manifest: Vec<u8>,
    }

    impl Art {
        fn new(chunks: u32) -> Self {
            let size = chunks as u64 * CHUNK as u64 - 100;
            let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let layout = Layout::new(size, CHUNK).unwrap();
            let mut manifest = ManifestBuilder::new(layout);
            for i in 0..chunks {
                manifest.push_chunk(&Self::slice(&bytes, &layout, i));
            }
            Self {
                id: ArtifactId::of(&bytes),
                bytes,
                layout,
                manifest: manifest.finish(),
            }
        }

        fn slice(bytes: &[u8], layout: &Layout, i: u32) -> Vec<u8> {
            let start = layout.offset(i) as usize;
            bytes[start..start + layout.chunk_len(i)].to_vec()
        }

        fn chunk_bytes(&self, i: u32) -> Vec<u8> {
            Self::slice(&self.bytes, &self.layout, i)
        }

        fn frame(&self, frame_type: FrameType, index: u32, total: u32, payload: Vec<u8>) -> Input {
            Input::Frame {
                header: FrameHeader {
                    frame_type,
                    artifact: self.id,
                    index,
                    total,
                },
                payload: payload.into(),
            }
        }

        fn chunk(&self, i: u32) -> Input {
            self.chunk_with(i, self.chunk_bytes(i))
        }

        fn chunk_with(&self, i: u32, payload: Vec<u8>) -> Input {
            self.frame(FrameType::Chunk, i, self.layout.chunks, payload)
        }

        fn part(&self, p: u32) -> Input {
            self.part_with(
                p,
                self.manifest[self.layout.manifest_part_range(p)].to_vec(),
            )
        }

        fn part_with(&self, p: u32, payload: Vec<u8>) -> Input {
            self.frame(
                FrameType::Manifest,
                p,
                self.layout.manifest_parts(),
                payload,
            )
        }

        fn error(&self, reason: &str) -> Input {
            self.frame(FrameType::Error, 0, 0, reason.as_bytes().to_vec())
        }

        fn saved(&self, have: &[u32], manifest: bool) -> StagingState {
            let mut bits = Bitmap::new(self.layout.chunks);
            have.iter().for_each(|&i| bits.set(i));
            StagingState {
                have: hex::encode(&bits.bits),
                manifest: manifest.then(|| hex::encode(&self.manifest)),
            }
        }

        /// A download that has nothing yet.
        fn fresh(&self, tuning: Tuning) -> Fetch {
            Fetch::resume(self.id, self.layout, tuning, None)
        }

        /// A download that has the manifest and `have`.
        fn resumed(&self, tuning: Tuning, have: &[u32]) -> Fetch {
            Fetch::resume(self.id, self.layout, tuning, Some(self.saved(have, true)))
        }
    }

    fn tuning() -> Tuning {
        Tuning {
            window: 4,
            stall: Duration::from_secs(2),
            stall_max: Duration::from_secs(8),
            attempt_timeout: Duration::from_secs(30),
            attempts: 1,
            retry_pause: Duration::from_secs(10),
            persist_every: 1024 * 1024,
            report_every: Duration::from_secs(5),
        }
    }

    fn clock() -> impl Fn(u64) -> Instant {
        let t0 = Instant::now();
        move |ms| t0 + Duration::from_millis(ms)
    }

    fn show(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .map(|e| match e {
                Effect::Request {
                    manifest: ManifestParts::All,
                    chunks,
                } if chunks.is_empty() => "ask manifest".to_owned(),
                Effect::Request {
                    manifest: ManifestParts::All,
                    chunks,
                } => format!("ask manifest {chunks:?}"),
                Effect::Request {
                    manifest: ManifestParts::Window(start, end),
                    chunks,
                } if chunks.is_empty() => format!("ask manifest {start}..{end}"),
                Effect::Request {
                    manifest: ManifestParts::Window(start, end),
                    chunks,
                } => format!("ask manifest {start}..{end} {chunks:?}"),
                Effect::Request { chunks, .. } => format!("ask {chunks:?}"),
                Effect::Write(chunks) => match &chunks[..] {
                    [one] => format!("write {}", one.index),
                    _ => format!("write {:?}", indices(chunks)),
                },
                Effect::Persist(_) => "persist".to_owned(),
                Effect::Report(p) => format!("report {}/{}", p.bytes, p.total),
                Effect::Done => "done".to_owned(),
                Effect::Fail(e) => format!("fail: {e}"),
            })
            .collect()
    }

    fn persisted(effects: &[Effect]) -> Vec<StagingState> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Persist(state) => Some(state.clone()),
                _ => None,
            })
            .collect()
    }

    fn indices(chunks: &[ChunkWrite]) -> Vec<u32> {
        chunks.iter().map(|c| c.index).collect()
    }

    /// The chunks written by `effects`.
    fn written(effects: &[Effect]) -> Vec<u32> {
        effects
            .iter()
            .flat_map(|e| match e {
                Effect::Write(chunks) => indices(chunks),
                _ => Vec::new(),
            })
            .collect()
    }

    fn written_input(indices: &[u32]) -> Input {
        Input::Written {
            indices: indices.to_vec(),
        }
    }

    /// What the edge does with inputs: hands them in and, once their chunks are written, says
    /// so.
    fn feed(fetch: &mut Fetch, now: Instant, inputs: Vec<Input>) -> Vec<Effect> {
        let mut out = fetch.handle_all(now, inputs);
        let done = written(&out);
        if !done.is_empty() {
            out.extend(fetch.handle(now, written_input(&done)));
        }
        out
    }

    /// [`feed`] with chunk `i`.
    fn deliver(fetch: &mut Fetch, art: &Art, now: Instant, i: u32) -> Vec<Effect> {
        feed(fetch, now, vec![art.chunk(i)])
    }

    #[test]
    fn a_fresh_download_asks_for_the_manifest_and_the_first_window_in_one_request() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.fresh(tuning());
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 0/10140", "ask manifest [0, 1, 2, 3]"]
        );
        // The window is in flight already: the manifest asks for nothing more.
        let out = f.handle(at(10), art.part(0));
        assert_eq!(show(&out), ["persist"]);
        assert_eq!(persisted(&out), [art.saved(&[], true)]);
        assert_eq!(
            show(&deliver(&mut f, &art, at(20), 0)),
            ["write 0", "ask [4]"]
        );
        // The chunks asked for with the manifest count as asked for then.
        assert!(f.handle(at(2000), Input::Tick).is_empty());
        assert_eq!(show(&f.handle(at(2100), Input::Tick)), ["ask [1, 2, 3, 4]"]);
    }

    /// A manifest of 70 parts (1 KiB chunks, 2.2 MB) is asked 32 parts at a time: the next
    /// window as soon as one is in, a stalled one again from its first missing part. Asked all
    /// at once, a broker that queues 64 frames per session dropped the same parts every time.
    #[test]
    fn a_manifest_of_many_parts_is_asked_a_window_at_a_time() {
        let at = clock();
        let art = Art::new(70 * 32);
        assert_eq!(art.layout.manifest_parts(), 70);
        let mut f = art.fresh(tuning());
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 0/2293660", "ask manifest 0..32 [0, 1, 2, 3]"]
        );
        for p in 0..31 {
            assert_eq!(show(&f.handle(at(10), art.part(p))), Vec::<String>::new());
        }
        assert_eq!(
            show(&f.handle(at(10), art.part(31))),
            ["ask manifest 32..64"]
        );
        // Part 40 of that window is lost: once the rest is in, nothing more until a stall,
        // then again from part 40.
        for p in (32..64).filter(|&p| p != 40) {
            assert_eq!(show(&f.handle(at(20), art.part(p))), Vec::<String>::new());
        }
        assert!(f.handle(at(2000), Input::Tick).is_empty());
        assert_eq!(
            show(&f.handle(at(2100), Input::Tick)),
            ["ask manifest 40..70 [0, 1, 2, 3]"]
        );
        assert_eq!(
            show(&f.handle(at(2110), art.part(40))),
            Vec::<String>::new()
        );
        for p in 64..69 {
            assert_eq!(show(&f.handle(at(2120), art.part(p))), Vec::<String>::new());
        }
        // The last part: the manifest verifies.
        assert_eq!(show(&f.handle(at(2130), art.part(69))), ["persist"]);
        assert!(f.has_manifest());
    }

    #[test]
    fn a_window_wider_than_64_chunks_is_asked_for_with_the_manifest_64_at_a_time() {
        let at = clock();
        let art = Art::new(150);
        let mut f = art.fresh(Tuning {
            window: 100,
            ..tuning()
        });
        let asked: Vec<(ManifestParts, Vec<u32>)> = f
            .begin(at(0))
            .into_iter()
            .filter_map(|e| match e {
                Effect::Request { manifest, chunks } => Some((manifest, chunks)),
                _ => None,
            })
            .collect();
        assert_eq!(
            asked,
            [
                (ManifestParts::All, (0..64).collect::<Vec<_>>()),
                (ManifestParts::Skip, (64..100).collect())
            ]
        );
    }

    #[test]
    fn a_one_chunk_artifact_needs_no_manifest() {
        let at = clock();
        let art = Art::new(1);
        let mut f = art.fresh(tuning());
        assert_eq!(show(&f.begin(at(0))), ["report 0/924", "ask [0]"]);
        let out = deliver(&mut f, &art, at(10), 0);
        assert_eq!(show(&out), ["write 0", "persist", "done"]);
        assert_eq!(persisted(&out), [art.saved(&[0], false)]);
    }

    #[test]
    fn a_window_wider_than_64_chunks_is_asked_for_64_at_a_time() {
        let at = clock();
        let art = Art::new(150);
        let mut f = art.resumed(
            Tuning {
                window: 100,
                ..tuning()
            },
            &[],
        );
        let asked: Vec<Vec<u32>> = f
            .begin(at(0))
            .into_iter()
            .filter_map(|e| match e {
                Effect::Request { chunks, .. } => Some(chunks),
                _ => None,
            })
            .collect();
        assert_eq!(asked, [(0..64).collect::<Vec<_>>(), (64..100).collect()]);
    }

    #[test]
    fn chunks_arriving_out_of_order_are_written_at_their_offsets_and_the_window_moves_on() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 0/10140", "ask [0, 1, 2, 3]"]
        );
        let out = f.handle(at(1), art.chunk(2));
        let [Effect::Write(chunks)] = &out[..] else {
            panic!("{:?}", show(&out));
        };
        let [ChunkWrite {
            index: 2,
            offset,
            bytes,
        }] = &chunks[..]
        else {
            panic!("{:?}", show(&out));
        };
        assert_eq!((*offset, &bytes[..]), (2048, &art.chunk_bytes(2)[..]));
        assert_eq!(show(&f.handle(at(2), art.chunk(3))), ["write 3"]);
        // Written: the window moves on from the first chunk neither in nor asked for, and
        // counts the chunk still being written.
        assert_eq!(show(&f.handle(at(3), written_input(&[2]))), ["ask [4]"]);
        assert_eq!(show(&f.handle(at(3), written_input(&[3]))), ["ask [5]"]);
        let mut seen = Vec::new();
        for i in [0, 5, 4, 1, 7, 6, 9, 8] {
            seen.extend(show(&deliver(&mut f, &art, at(4), i)));
        }
        #[rustfmt::skip]
        assert_eq!(seen, [
            "write 0", "ask [6]",
            "write 5", "ask [7]",
            "write 4", "ask [8]",
            "write 1", "ask [9]",
            // Nothing left to ask for: the top-up wraps around and finds every chunk in or asked.
            "write 7",
            "write 6",
            "write 9",
            "write 8", "persist", "done",
        ]);
        assert!(
            f.handle(at(4), art.chunk(0)).is_empty(),
            "the attempt is over"
        );
    }

    #[test]
    fn duplicate_and_foreign_frames_are_ignored() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        assert_eq!(
            show(&deliver(&mut f, &art, at(1), 0)),
            ["write 0", "ask [4]"]
        );
        assert_eq!(show(&f.handle(at(2), art.chunk(0))), Vec::<String>::new());
        // A copy arriving while the first is still being written.
        assert_eq!(show(&f.handle(at(3), art.chunk(1))), ["write 1"]);
        assert!(f.handle(at(4), art.chunk(1)).is_empty());
        let other = Art::new(12);
        let ignored = [
            other.chunk(2),
            other.error("unknown artifact"),
            art.frame(FrameType::Chunk, 2, 11, art.chunk_bytes(2)),
            art.frame(FrameType::Chunk, 12, 10, art.chunk_bytes(2)),
            art.frame(FrameType::UploadPart, 2, 10, art.chunk_bytes(2)),
            art.part(0),
            written_input(&[7]),
        ];
        for input in ignored {
            let what = format!("{input:?}");
            assert!(f.handle(at(5), input).is_empty(), "{what}");
        }
        assert_eq!(show(&f.handle(at(6), written_input(&[1]))), ["ask [5]"]);
        assert!(f.handle(at(7), written_input(&[1])).is_empty());
        assert_eq!(f.progress().bytes, 2048);
    }

    #[test]
    fn a_bad_chunk_is_dropped_and_asked_for_again_alone() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        let mut forged = art.chunk_bytes(1);
        forged[7] ^= 1;
        assert_eq!(
            show(&f.handle(at(1), art.chunk_with(1, forged))),
            ["ask [1]"]
        );
        let short = art.chunk_bytes(1)[..1000].to_vec();
        assert_eq!(
            show(&f.handle(at(2), art.chunk_with(1, short))),
            ["ask [1]"]
        );
        // Not asked for (another machine's): dropped, not asked for.
        let mut forged = art.chunk_bytes(8);
        forged[0] ^= 1;
        assert!(f.handle(at(3), art.chunk_with(8, forged)).is_empty());
        assert_eq!(
            show(&deliver(&mut f, &art, at(4), 1)),
            ["write 1", "ask [4]"]
        );
        assert_eq!(f.progress().bytes, 1024);
    }

    #[test]
    fn a_stall_asks_again_for_everything_outstanding_waiting_twice_as_long_each_time() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        let mut tick = |ms| show(&f.handle(at(ms), Input::Tick));
        assert!(tick(1000).is_empty());
        assert!(tick(2000).is_empty());
        assert_eq!(tick(2100), ["ask [0, 1, 2, 3]"]);
        assert!(tick(2300).is_empty());
        // Nothing came: the next waits 4 s, then 8 s, which is the most (`stall_max`).
        assert!(tick(6000).is_empty());
        assert_eq!(tick(6200), ["ask [0, 1, 2, 3]"]);
        assert!(tick(14_100).is_empty());
        assert_eq!(tick(14_300), ["ask [0, 1, 2, 3]"]);
        assert!(tick(22_200).is_empty());
        assert_eq!(tick(22_400), ["ask [0, 1, 2, 3]"]);
        // Progress does not bring the wait back: a machine that had to ask again is on a
        // platform that answers slowly...
        assert_eq!(
            show(&deliver(&mut f, &art, at(22_500), 2)),
            ["write 2", "report 1024/10140", "ask [4]"]
        );
        let mut tick = |ms| show(&f.handle(at(ms), Input::Tick));
        assert!(tick(24_600).is_empty());
        assert!(tick(30_400).is_empty());
        // ...so everything outstanding goes again, the chunk asked for last too, after the
        // whole wait.
        assert_eq!(tick(30_600), ["ask [0, 1, 3, 4]"]);
        assert!(tick(38_500).is_empty());
        assert_eq!(tick(38_700), ["ask [0, 1, 3, 4]"]);
    }

    /// A machine with input it has not handled yet is behind, not stalled: it waits twice as
    /// long before asking again (what it waits for may be in that input), but not for ever
    /// (a stream of frames it does not need must not keep it from asking), and the attempt
    /// timeout still holds.
    #[test]
    fn a_machine_behind_its_own_input_waits_twice_as_long_before_asking_again() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        let mut behind = |ms| show(&f.handle(at(ms), Input::TickBehind));
        for ms in (2_100..=4_000).step_by(100) {
            assert!(behind(ms).is_empty(), "behind, and asked at {ms} ms");
        }
        assert_eq!(behind(4_100), ["ask [0, 1, 2, 3]"]);
        // Asked once, the wait is 4 s: 8 s while behind.
        for ms in (4_200..=12_100).step_by(100) {
            assert!(behind(ms).is_empty(), "behind, and asked at {ms} ms");
        }
        assert_eq!(behind(12_200), ["ask [0, 1, 2, 3]"]);
        let out = f.handle(at(40_500), Input::TickBehind);
        assert!(
            matches!(out.last(), Some(Effect::Fail(_))),
            "30 s without progress must end the attempt, behind or not: {:?}",
            show(&out)
        );
    }

    /// Ticks every 200 ms from `from` to `to` (ms), delivering chunks at the times given
    /// (lowest first); returns the re-requests the ticks made.
    fn run(
        f: &mut Fetch,
        art: &Art,
        at: &impl Fn(u64) -> Instant,
        (from, to): (u64, u64),
        chunks: &mut std::collections::VecDeque<(u64, u32)>,
    ) -> Vec<(u64, Vec<String>)> {
        let mut asked = Vec::new();
        let mut ms = from;
        while ms <= to {
            while chunks.front().is_some_and(|(t, _)| *t <= ms) {
                let (t, i) = chunks.pop_front().unwrap();
                deliver(f, art, at(t), i);
            }
            let out = show(&f.handle(at(ms), Input::Tick));
            if !out.is_empty() {
                asked.push((ms, out));
            }
            ms += 200;
        }
        asked
    }

    #[test]
    fn a_machine_whose_chunks_come_slowly_asks_again_once_then_waits_and_fast_chunks_bring_the_wait_back(
    ) {
        let at = clock();
        let art = Art::new(60);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        // A busy platform: a chunk every 3 s. The first 2 s without one asks again once (the
        // wait doubles to 4 s); after that, chunks every 3 s are no stall.
        let mut slow: std::collections::VecDeque<(u64, u32)> =
            (0..10).map(|i| (3000 * (i + 1), i as u32)).collect();
        let asked = run(&mut f, &art, &at, (0, 30_000), &mut slow);
        assert_eq!(asked, [(2200, vec!["ask [0, 1, 2, 3]".to_owned()])]);
        // Chunks every 0.5 s for 20 s: after two waits of 4 s without a gap of 2 s, the wait
        // is 2 s again...
        let mut fast: std::collections::VecDeque<(u64, u32)> = (10..50)
            .map(|i| (30_000 + 500 * (i - 9), i as u32))
            .collect();
        assert!(run(&mut f, &art, &at, (30_200, 50_000), &mut fast).is_empty());
        // ...so a silence after them is asked about after 2 s, not 4.
        let asked = run(&mut f, &art, &at, (50_200, 56_000), &mut Default::default());
        assert_eq!(asked.first().map(|(t, _)| *t), Some(52_200), "{asked:?}");
    }

    #[test]
    fn an_attempt_without_progress_for_the_timeout_fails_with_its_counts() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        deliver(&mut f, &art, at(1000), 0);
        deliver(&mut f, &art, at(1000), 1);
        let out = f.handle(at(31_000), Input::Tick);
        assert!(
            !matches!(out.last(), Some(Effect::Fail(_))),
            "{:?}",
            show(&out)
        );
        let out = f.handle(at(31_100), Input::Tick);
        let [Effect::Fail(DownloadError::Stalled {
            secs: 30,
            have: 2,
            chunks: 10,
            ..
        })] = &out[..]
        else {
            panic!("{:?}", show(&out));
        };
        assert!(f.handle(at(31_200), art.chunk(2)).is_empty());
        // What it has is saved on the way out, once.
        assert_eq!(f.unsaved_state(), Some(art.saved(&[0, 1], true)));
        assert_eq!(f.unsaved_state(), None);
        // The next attempt goes on from there.
        assert_eq!(
            show(&f.begin(at(32_000))),
            ["report 2048/10140", "ask [2, 3, 4, 5]"]
        );
    }

    /// On a slow link an attempt waits four times as long as chunks have lately taken to
    /// come, where that is longer than the attempt timeout; once chunks come fast again the
    /// timeout shrinks back to the tuning's.
    #[test]
    fn an_attempt_on_a_slow_link_waits_as_long_as_its_chunks_take() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        assert_eq!(f.attempt_timeout(), Duration::from_secs(30));
        // A chunk every 20 s (a 64 KiB chunk at about 3 KB/s).
        deliver(&mut f, &art, at(20_000), 0);
        deliver(&mut f, &art, at(40_000), 1);
        assert_eq!(f.attempt_timeout(), Duration::from_secs(80));
        // 30 s without a chunk no longer ends the attempt; 80 s does.
        let out = f.handle(at(120_000), Input::Tick);
        assert!(
            !matches!(out.last(), Some(Effect::Fail(_))),
            "{:?}",
            show(&out)
        );
        let out = f.handle(at(120_100), Input::Tick);
        let [Effect::Fail(DownloadError::Stalled {
            secs: 80, have: 2, ..
        })] = &out[..]
        else {
            panic!("{:?}", show(&out));
        };
        // Chunks that come fast again bring the timeout back down, a quarter per chunk.
        let mut g = art.resumed(tuning(), &[]);
        g.begin(at(0));
        deliver(&mut g, &art, at(20_000), 0);
        for (i, t) in (1..8).zip((20_100..).step_by(100)) {
            deliver(&mut g, &art, at(t), i);
        }
        assert_eq!(g.attempt_timeout(), Duration::from_secs(30));
        // However slow the link, an attempt gives up after MAX_ATTEMPT_TIMEOUT.
        let mut h = art.resumed(tuning(), &[]);
        h.begin(at(0));
        deliver(&mut h, &art, at(3_600_000), 0);
        assert_eq!(h.attempt_timeout(), MAX_ATTEMPT_TIMEOUT);
    }

    /// Once chunks have come 20 s apart (a slow link), the machine asks again only after 30 s
    /// without one, not after the stall timeout (at most 8 s in this tuning): a re-request
    /// sooner would ask for what is on its way.
    #[test]
    fn on_a_slow_link_the_machine_asks_again_only_after_a_chunks_time_and_a_half() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        let mut slow: std::collections::VecDeque<(u64, u32)> = [(20_000, 0), (40_000, 1)].into();
        let before = run(&mut f, &art, &at, (0, 40_000), &mut slow);
        assert!(
            !before.is_empty(),
            "before two chunks came the stall timeout applies"
        );
        let after = run(&mut f, &art, &at, (40_200, 80_000), &mut Default::default());
        assert_eq!(after.first().map(|(t, _)| *t), Some(70_200), "{after:?}");
    }

    /// Frames that came after an attempt ended are taken by the next one before it asks: the
    /// chunk among them is written, not asked for again.
    #[test]
    fn a_chunk_that_came_between_attempts_is_not_asked_for_again() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 0/10140", "ask [0, 1, 2, 3]"]
        );
        let out = f.handle(at(30_100), Input::Tick);
        assert!(
            matches!(out.last(), Some(Effect::Fail(_))),
            "{:?}",
            show(&out)
        );
        let out = f.begin_with(at(40_000), vec![art.chunk(0)]);
        assert_eq!(
            show(&out),
            ["report 0/10140", "ask [1, 2, 3]", "write 0"],
            "the carried chunk is written (writes go last) and not asked for"
        );
        let out = f.handle(at(40_001), written_input(&[0]));
        assert_eq!(show(&out), ["ask [4]"]);
    }

    #[test]
    fn the_manifest_is_assembled_from_parts_in_any_order() {
        let at = clock();
        let art = Art::new(70);
        assert_eq!(art.layout.manifest_parts(), 3);
        let mut f = art.fresh(tuning());
        f.begin(at(0));
        assert!(f.handle(at(1), art.part(2)).is_empty());
        assert!(f.handle(at(2), art.part(0)).is_empty());
        assert!(f.handle(at(3), art.part(0)).is_empty());
        // Chunks cannot be checked yet: kept until they can.
        assert!(f.handle(at(4), art.chunk(0)).is_empty());
        let out = f.handle(at(5), art.part(1));
        assert_eq!(show(&out), ["persist", "write 0"]);
        assert_eq!(persisted(&out), [art.saved(&[], true)]);
    }

    #[test]
    fn a_manifest_part_of_the_wrong_length_is_dropped() {
        let at = clock();
        let art = Art::new(70);
        let mut f = art.fresh(tuning());
        f.begin(at(0));
        assert!(f.handle(at(1), art.part(1)).is_empty());
        assert!(f.handle(at(2), art.part(2)).is_empty());
        let part0 = art.manifest[art.layout.manifest_part_range(0)].to_vec();
        let mut long = part0.clone();
        long.push(0);
        assert!(f.handle(at(3), art.part_with(0, long)).is_empty());
        assert!(f
            .handle(at(4), art.part_with(0, part0[..1000].to_vec()))
            .is_empty());
        let wrong_total = art.frame(FrameType::Manifest, 0, 4, part0);
        assert!(f.handle(at(5), wrong_total).is_empty());
        assert_eq!(show(&f.handle(at(6), art.part(0))), ["persist"]);
    }

    #[test]
    fn a_forged_manifest_is_dropped_and_asked_for_again_after_the_stall_time() {
        let at = clock();
        let art = Art::new(70);
        let mut f = art.fresh(tuning());
        f.begin(at(0));
        let mut forged = art.manifest[art.layout.manifest_part_range(2)].to_vec();
        forged[5] ^= 1;
        f.handle(at(100), art.part(0));
        f.handle(at(100), art.part(1));
        f.handle(at(150), art.chunk(1));
        f.handle(at(150), art.chunk(9));
        assert!(f
            .handle(at(200), art.part_with(2, forged.clone()))
            .is_empty());
        let mut tick = |ms| show(&f.handle(at(ms), Input::Tick));
        assert!(tick(1000).is_empty());
        // The parts were no progress (2.1 s since the start), but the manifest was last asked
        // for with the forged part. The chunks kept went with it: all of the first window is
        // asked for again.
        assert!(tick(2100).is_empty());
        assert_eq!(tick(2300), ["ask manifest [0, 1, 2, 3]"]);
        // Every part is needed again: the good ones may have been forged as well.
        assert!(f.handle(at(2400), art.part(2)).is_empty());
        f.handle(at(2400), art.part(0));
        f.handle(at(2400), art.chunk(2));
        assert_eq!(
            show(&f.handle(at(2400), art.part(1))),
            ["persist", "write 2"]
        );

        // A manifest that never verifies still ends the attempt, counted from its start.
        let mut f = art.fresh(tuning());
        f.begin(at(0));
        for ms in (1000..30_000).step_by(1000) {
            f.handle(at(ms), art.part(0));
            f.handle(at(ms), art.part(1));
            f.handle(at(ms), art.part_with(2, forged.clone()));
        }
        let out = f.handle(at(30_100), Input::Tick);
        let [Effect::Fail(DownloadError::Stalled {
            have: 0,
            chunks: 70,
            ..
        })] = &out[..]
        else {
            panic!("{:?}", show(&out));
        };
    }

    #[test]
    fn chunk_frames_before_the_manifest_are_written_once_it_verifies_and_not_asked_for_again() {
        let at = clock();
        let art = Art::new(70);
        let mut f = art.fresh(tuning());
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 0/71580", "ask manifest [0, 1, 2, 3]"]
        );
        // Two of its own and one another machine asked for, on the shared topic, all before
        // the manifest is complete; a copy, one of the wrong artifact and one of the wrong
        // total are not kept.
        let other = Art::new(12);
        for input in [
            art.part(2),
            art.chunk(2),
            art.chunk(9),
            art.chunk(2),
            other.chunk(3),
            art.frame(FrameType::Chunk, 3, 71, art.chunk_bytes(3)),
            art.chunk(1),
            art.part(0),
        ] {
            let what = format!("{input:?}");
            assert!(f.handle(at(100), input).is_empty(), "{what}");
        }
        let out = f.handle(at(200), art.part(1));
        assert_eq!(show(&out), ["persist", "write [1, 2, 9]"]);
        let Some(Effect::Write(chunks)) = out.last() else {
            unreachable!()
        };
        for c in chunks {
            assert_eq!(c.offset, art.layout.offset(c.index));
            assert_eq!(&c.bytes[..], &art.chunk_bytes(c.index)[..]);
        }
        // Written: the window (0 and 3 in flight) moves on past them.
        assert_eq!(
            show(&f.handle(at(300), written_input(&[1, 2, 9]))),
            ["ask [4, 5]"]
        );
        assert_eq!(f.progress().bytes, 3 * 1024);
        // A stall asks again for what is outstanding, none of the kept ones.
        assert_eq!(show(&f.handle(at(2400), Input::Tick)), ["ask [0, 3, 4, 5]"]);
    }

    #[test]
    fn a_forged_chunk_kept_before_the_manifest_is_dropped_and_asked_for_again_alone() {
        let at = clock();
        let art = Art::new(70);
        let mut f = art.fresh(tuning());
        f.begin(at(0));
        let forge = |i| {
            let mut bytes = art.chunk_bytes(i);
            bytes[3] ^= 1;
            art.chunk_with(i, bytes)
        };
        f.handle(at(100), forge(1));
        // First come: the good copy after a forged one is not kept.
        f.handle(at(100), art.chunk(1));
        f.handle(at(100), art.chunk(2));
        // Not asked for (another machine's): dropped, not asked for.
        f.handle(at(100), forge(8));
        f.handle(at(200), art.part(0));
        f.handle(at(200), art.part(1));
        assert_eq!(
            show(&f.handle(at(200), art.part(2))),
            ["persist", "ask [1]", "write 2"]
        );
        assert_eq!(show(&f.handle(at(300), written_input(&[2]))), ["ask [4]"]);
        assert_eq!(
            show(&deliver(&mut f, &art, at(400), 1)),
            ["write 1", "ask [5]"]
        );
        assert_eq!(f.progress().bytes, 2 * 1024);
    }

    #[test]
    fn chunk_frames_beyond_a_window_before_the_manifest_are_ignored() {
        let at = clock();
        let art = Art::new(70);
        let mut f = art.fresh(tuning());
        f.begin(at(0));
        // Four other machines' chunks fill the window; a fifth, and then one of its own, find
        // no room.
        for i in [10, 11, 12, 13, 14, 0] {
            assert!(f.handle(at(100), art.chunk(i)).is_empty());
        }
        // A stall before the manifest asks for it again with the rest of the first window.
        assert_eq!(
            show(&f.handle(at(2100), Input::Tick)),
            ["ask manifest [0, 1, 2, 3]"]
        );
        // Turned away again: nothing else would bring it, so it is asked for as soon as the
        // manifest verifies, though the window is full.
        assert!(f.handle(at(2200), art.chunk(0)).is_empty());
        f.handle(at(2300), art.part(0));
        f.handle(at(2300), art.part(1));
        let out = f.handle(at(2300), art.part(2));
        assert_eq!(show(&out), ["persist", "ask [0]", "write [10, 11, 12, 13]"]);
        // 14 is asked for when the window reaches it.
        let mut seen = Vec::new();
        seen.extend(show(&f.handle(at(2400), written_input(&[10, 11, 12, 13]))));
        for i in 0..4 {
            seen.extend(show(&deliver(&mut f, &art, at(2500), i)));
        }
        assert_eq!(
            seen,
            [
                "write 0", "ask [4]", "write 1", "ask [5]", "write 2", "ask [6]", "write 3",
                "ask [7]"
            ]
        );
    }

    #[test]
    fn frames_handled_together_are_written_in_one_batch_and_topped_up_in_one_request() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        let mut forged = art.chunk_bytes(2);
        forged[0] ^= 1;
        let out = f.handle_all(
            at(1),
            [
                art.chunk(0),
                art.chunk(1),
                art.chunk_with(2, forged),
                art.chunk(3),
                art.chunk(1),
            ],
        );
        assert_eq!(show(&out), ["ask [2]", "write [0, 1, 3]"]);
        assert_eq!(
            show(&f.handle(at(2), written_input(&[0, 1, 3]))),
            ["ask [4, 5, 6]"]
        );
        assert_eq!(f.progress().bytes, 3 * 1024);
        // A batch that ends the attempt: its writes still come before the closing effect.
        let out = f.handle_all(
            at(3),
            [art.chunk(4), art.error("rate limited"), art.chunk(5)],
        );
        assert_eq!(
            show(&out),
            ["write 4", "fail: artifact {}: platform says: rate limited"]
                .map(|s| s.replace("{}", &art.id.to_string()))
        );
    }

    #[test]
    fn the_last_chunks_written_together_persist_once_and_end_the_attempt() {
        let at = clock();
        let art = Art::new(4);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        let out = feed(&mut f, at(1), (0..4).map(|i| art.chunk(i)).collect());
        assert_eq!(show(&out), ["write [0, 1, 2, 3]", "persist", "done"]);
        assert_eq!(persisted(&out), [art.saved(&[0, 1, 2, 3], true)]);
    }

    #[test]
    fn an_error_frame_ends_the_attempt_with_the_platforms_reason() {
        let at = clock();
        let art = Art::new(10);
        let platform_says = |out: &[Effect]| match out {
            [Effect::Fail(DownloadError::Platform { reason, .. })] => reason.clone(),
            _ => panic!("{:?}", show(out)),
        };
        // Waiting for the manifest...
        let mut f = art.fresh(tuning());
        f.begin(at(0));
        let out = f.handle(at(1), art.error("unknown artifact"));
        assert_eq!(platform_says(&out), "unknown artifact");
        assert!(f.handle(at(2), art.part(0)).is_empty());
        // ...or for chunks.
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        deliver(&mut f, &art, at(1), 0);
        let out = f.handle(at(2), art.error("rate limited"));
        assert_eq!(platform_says(&out), "rate limited");
        assert!(f.handle(at(3), art.chunk(1)).is_empty());
        assert_eq!(f.unsaved_state(), Some(art.saved(&[0], true)));
    }

    #[test]
    fn a_resumed_download_asks_only_for_the_missing_chunks() {
        let at = clock();
        let art = Art::new(10);
        let resume = |saved| Fetch::resume(art.id, art.layout, tuning(), Some(saved));
        let mut f = resume(art.saved(&[0, 1, 3], true));
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 3072/10140", "ask [2, 4, 5, 6]"]
        );
        // Every chunk in: only the rename is left.
        let all: Vec<u32> = (0..10).collect();
        let mut f = resume(art.saved(&all, true));
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 10140/10140", "persist", "done"]
        );
        // A manifest that does not verify is fetched again, with the first missing chunks; the
        // bitmap stays (the whole-file hash checks it).
        let mut saved = art.saved(&[0, 1, 3], true);
        saved.manifest = saved.manifest.map(|m| m.replacen('a', "b", 1));
        let mut f = resume(saved.clone());
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 3072/10140", "ask manifest [2, 4, 5, 6]"]
        );
        // Every chunk in but the manifest: only the manifest is asked for.
        saved.have = art.saved(&all, true).have;
        let mut f = resume(saved);
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 10140/10140", "ask manifest"]
        );
        assert_eq!(show(&f.handle(at(1), art.part(0))), ["persist", "done"]);
        // A bitmap of the wrong size is not this artifact's.
        let mut saved = art.saved(&[0, 1, 3], true);
        saved.have.push_str("00");
        let mut f = resume(saved);
        assert_eq!(
            show(&f.begin(at(0))),
            ["report 0/10140", "ask [0, 1, 2, 3]"]
        );
    }

    #[test]
    fn progress_is_reported_at_each_start_then_at_most_every_tenth_and_every_five_seconds() {
        let at = clock();
        let art = Art::new(20);
        let mut f = art.resumed(
            Tuning {
                window: 20,
                ..tuning()
            },
            &[],
        );
        assert_eq!(show(&f.begin(at(0)))[0], "report 0/20380");
        // A chunk a second: a report every 5 s; none for the last chunk (`downloaded` is).
        let reports: Vec<String> = (0..20)
            .flat_map(|i| show(&deliver(&mut f, &art, at((i as u64 + 1) * 1000), i)))
            .filter(|e| e.starts_with("report"))
            .collect();
        assert_eq!(
            reports,
            [
                "report 5120/20380",
                "report 10240/20380",
                "report 15360/20380"
            ]
        );
    }

    #[test]
    fn the_state_is_persisted_every_persist_every_bytes_and_with_the_last_chunk() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(
            Tuning {
                persist_every: 3 * 1024,
                ..tuning()
            },
            &[],
        );
        f.begin(at(0));
        let out: Vec<Effect> = (0..10)
            .flat_map(|i| deliver(&mut f, &art, at(1), i))
            .collect();
        assert_eq!(
            persisted(&out),
            [
                art.saved(&[0, 1, 2], true),
                art.saved(&[0, 1, 2, 3, 4, 5], true),
                art.saved(&[0, 1, 2, 3, 4, 5, 6, 7, 8], true),
                art.saved(&(0..10).collect::<Vec<_>>(), true),
            ]
        );
        assert_eq!(show(&out).last().unwrap(), "done");
        assert_eq!(f.unsaved_state(), None);
    }

    #[test]
    fn a_whole_file_mismatch_forgets_every_chunk_but_keeps_the_manifest() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &(0..10).collect::<Vec<_>>());
        assert_eq!(show(&f.begin(at(0))).last().unwrap(), "done");
        f.forget_chunks();
        assert_eq!(f.unsaved_state(), Some(art.saved(&[], true)));
        assert_eq!(
            show(&f.begin(at(1))),
            ["report 0/10140", "ask [0, 1, 2, 3]"]
        );
    }

    #[test]
    fn only_chunks_from_before_a_restart_call_for_hashing_the_whole_file() {
        let art = Art::new(10);
        assert!(!art.fresh(tuning()).has_unverified_chunks());
        assert!(!art.resumed(tuning(), &[]).has_unverified_chunks());
        let mut f = art.resumed(tuning(), &[3]);
        assert!(
            f.has_unverified_chunks(),
            "chunk 3 was claimed by a saved state"
        );
        // Forgotten, every chunk is fetched and verified again.
        f.forget_chunks();
        assert!(!f.has_unverified_chunks());
    }

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
