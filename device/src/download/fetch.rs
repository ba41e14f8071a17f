//! The transfer's decisions as a pure state machine: [`Fetch::handle`] takes a decoded frame, a
//! clock tick or a finished write, with the current time, and returns [`Effect`]s for the edge
//! (`mod.rs`) to carry out. No I/O and no clock: time is passed in, so tests choose it.
//!
//! An attempt ([`Fetch::begin`]) first assembles the manifest from its parts and checks it
//! against the artifact id (unless the artifact is one chunk or a saved manifest verified), then
//! keeps a window of chunks requested. Each chunk is verified on arrival, handed out to be
//! written, and counted once [`Input::Written`] comes back. The bitmap of written chunks and the
//! verified manifest outlive the attempt, and through [`StagingState`] a restart.

use std::collections::{BTreeSet, HashMap};
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
    /// The chunk of an [`Effect::Write`] is in the staging file.
    Written { index: u32 },
}

#[derive(Debug)]
pub enum Effect {
    /// Ask the platform for every manifest part (`manifest`) or for `chunks` (sorted, at most
    /// [`CHUNKS_PER_REQUEST`]); one sealed request each.
    Request { manifest: bool, chunks: Vec<u32> },
    /// Write a verified chunk at `offset` of the staging file, then hand back
    /// [`Input::Written`].
    Write {
        index: u32,
        offset: u64,
        bytes: Bytes,
    },
    /// Make the written chunks durable, then save this state that claims them.
    Persist(StagingState),
    /// Report `downloading`.
    Report(Progress),
    /// Every chunk is written and persisted: the attempt succeeded. Always the last effect.
    Done,
    /// The attempt failed. Always the last effect.
    Fail(DownloadError),
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
    /// The verified manifest, for the saved state (`None` for a one-chunk artifact).
    manifest: Option<Vec<u8>>,
    /// Bytes written since the last [`Effect::Persist`].
    unpersisted: u64,
    /// Whether `have` changed since the last [`Effect::Persist`].
    unsaved: bool,
    /// `None` before the first attempt and once each one ends.
    attempt: Option<Attempt>,
}

#[derive(Debug)]
struct Attempt {
    started: Instant,
    /// The last manifest part or written chunk.
    last_progress: Instant,
    reports: ProgressReports,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    Manifest {
        parts: Vec<Option<Bytes>>,
        last_request: Instant,
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
    fn chunks(verifier: ChunkVerifier) -> Self {
        Self::Chunks {
            verifier,
            outstanding: HashMap::new(),
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
                    Some((v, m))
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
            unpersisted: 0,
            unsaved: false,
            attempt: None,
        }
    }

    pub fn progress(&self) -> Progress {
        Progress {
            bytes: self.have_bytes,
            total: self.layout.size,
        }
    }

    /// Starts an attempt: reports where the download stands, then asks for the manifest or for
    /// a window of missing chunks (or is done at once when every chunk is already in).
    pub fn begin(&mut self, now: Instant) -> Vec<Effect> {
        let mut out = vec![Effect::Report(self.progress())];
        let phase = match &self.verifier {
            Some(verifier) => Phase::chunks(verifier.clone()),
            None => {
                out.push(Effect::Request {
                    manifest: true,
                    chunks: Vec::new(),
                });
                Phase::Manifest {
                    parts: vec![None; self.layout.manifest_parts() as usize],
                    last_request: now,
                }
            }
        };
        let mut attempt = Attempt {
            started: now,
            last_progress: now,
            // The report above counts as made.
            reports: ProgressReports::new(
                self.layout.size,
                self.have_bytes,
                now,
                self.tuning.report_every,
            ),
            phase,
        };
        if self.fill_window(&mut attempt, now, &mut out).is_continue() {
            self.attempt = Some(attempt);
        }
        out
    }

    /// One input of the running attempt. Between attempts (after `Done` or `Fail`) inputs are
    /// stale and ignored.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(mut attempt) = self.attempt.take() else {
            return out;
        };
        let flow = match input {
            Input::Frame { header, payload } => {
                self.on_frame(&mut attempt, now, header, payload, &mut out)
            }
            Input::Written { index } => self.on_written(&mut attempt, now, index, &mut out),
            Input::Tick => self.on_tick(&mut attempt, now, &mut out),
        };
        if flow.is_continue() {
            self.attempt = Some(attempt);
        }
        out
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

    /// Every chunk verified, yet the whole file does not: trust none of them. The verified
    /// manifest stays.
    pub fn forget_chunks(&mut self) {
        self.have = Bitmap::new(self.layout.chunks);
        self.have_bytes = 0;
        self.unsaved = true;
        self.attempt = None;
    }

    fn staging_state(&self) -> StagingState {
        StagingState {
            have: hex::encode(&self.have.bits),
            manifest: self.manifest.as_ref().map(hex::encode),
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

    fn stalled(&self) -> DownloadError {
        DownloadError::Stalled {
            artifact: self.artifact,
            secs: self.tuning.attempt_timeout.as_secs(),
            have: self.have.count,
            chunks: self.layout.chunks,
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
            FrameType::Chunk if !in_manifest => {
                self.on_chunk(attempt, now, header, payload, out);
                Continue(())
            }
            // A chunk cannot be checked before the manifest, a manifest after it is not
            // needed, and upload parts are not for machines.
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
        attempt.last_progress = now;
        if parts.iter().any(Option::is_none) {
            return Continue(());
        }
        let manifest: Vec<u8> = parts.iter().flatten().flatten().copied().collect();
        match ChunkVerifier::from_manifest(self.artifact, self.layout, &manifest) {
            Ok(verifier) => {
                self.verifier = Some(verifier.clone());
                self.manifest = Some(manifest);
                self.persist(out);
                attempt.phase = Phase::chunks(verifier);
                self.fill_window(attempt, now, out)
            }
            Err(e) => {
                // Like a bad chunk: drop it and ask again after the stall time (a forged part
                // on the shared topic must not cost the attempt). Its parts were no progress:
                // the attempt timeout still ends a manifest that never verifies.
                tracing::warn!(artifact = %self.artifact.short(), "manifest refused: {e}; fetching it again");
                parts.fill(None);
                *last_request = now;
                attempt.last_progress = attempt.started;
                Continue(())
            }
        }
    }

    fn on_chunk(
        &mut self,
        attempt: &mut Attempt,
        now: Instant,
        header: FrameHeader,
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
        let index = header.index;
        // Frames for other machines bring chunks this one has, or is writing, too.
        if header.total != self.layout.chunks
            || index >= self.layout.chunks
            || self.have.has(index)
            || writing.contains(&index)
        {
            return;
        }
        if let Err(e) = verifier.verify(index, &payload) {
            tracing::warn!(artifact = %self.artifact.short(), chunk = index, "bad chunk dropped: {e}");
            if let Some(asked) = outstanding.get_mut(&index) {
                *asked = now;
                out.push(Effect::Request {
                    manifest: false,
                    chunks: vec![index],
                });
            }
            return;
        }
        outstanding.remove(&index);
        writing.insert(index);
        out.push(Effect::Write {
            index,
            offset: self.layout.offset(index),
            bytes: payload,
        });
    }

    fn on_written(
        &mut self,
        attempt: &mut Attempt,
        now: Instant,
        index: u32,
        out: &mut Vec<Effect>,
    ) -> ControlFlow<()> {
        let Phase::Chunks { writing, .. } = &mut attempt.phase else {
            return Continue(());
        };
        if !writing.remove(&index) {
            return Continue(());
        }
        let len = self.layout.chunk_len(index) as u64;
        self.have.set(index);
        self.have_bytes += len;
        self.unpersisted += len;
        self.unsaved = true;
        attempt.last_progress = now;
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
        out: &mut Vec<Effect>,
    ) -> ControlFlow<()> {
        let stall = self.tuning.stall;
        let quiet = now.saturating_duration_since(attempt.last_progress);
        if quiet > self.tuning.attempt_timeout {
            out.push(Effect::Fail(self.stalled()));
            return Break(());
        }
        if quiet <= stall {
            return Continue(());
        }
        match &mut attempt.phase {
            Phase::Manifest { last_request, .. } => {
                if now.saturating_duration_since(*last_request) > stall {
                    *last_request = now;
                    out.push(Effect::Request {
                        manifest: true,
                        chunks: Vec::new(),
                    });
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
                    request_chunks(all, out);
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
        request_chunks(fresh, out);
        Continue(())
    }
}

/// Requests for `chunks`, sorted, [`CHUNKS_PER_REQUEST`] at a time.
fn request_chunks(mut chunks: Vec<u32>, out: &mut Vec<Effect>) {
    chunks.sort_unstable();
    out.extend(
        chunks
            .chunks(CHUNKS_PER_REQUEST)
            .map(|batch| Effect::Request {
                manifest: false,
                chunks: batch.to_vec(),
            }),
    );
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
            attempt_timeout: Duration::from_secs(30),
            attempts: 1,
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
                Effect::Request { manifest: true, .. } => "ask manifest".to_owned(),
                Effect::Request { chunks, .. } => format!("ask {chunks:?}"),
                Effect::Write { index, .. } => format!("write {index}"),
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

    /// What the edge does with a chunk frame: hands it in and, once written, says so.
    fn deliver(fetch: &mut Fetch, art: &Art, now: Instant, i: u32) -> Vec<Effect> {
        let mut out = fetch.handle(now, art.chunk(i));
        if let Some(&Effect::Write { index, .. }) = out.last() {
            out.extend(fetch.handle(now, Input::Written { index }));
        }
        out
    }

    #[test]
    fn a_fresh_download_asks_for_the_manifest_then_for_a_window_of_chunks() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.fresh(tuning());
        assert_eq!(show(&f.begin(at(0))), ["report 0/10140", "ask manifest"]);
        let out = f.handle(at(10), art.part(0));
        assert_eq!(show(&out), ["persist", "ask [0, 1, 2, 3]"]);
        assert_eq!(persisted(&out), [art.saved(&[], true)]);
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
        let [Effect::Write {
            index: 2,
            offset,
            bytes,
        }] = &out[..]
        else {
            panic!("{:?}", show(&out));
        };
        assert_eq!((*offset, &bytes[..]), (2048, &art.chunk_bytes(2)[..]));
        assert_eq!(show(&f.handle(at(2), art.chunk(3))), ["write 3"]);
        // Written: the window moves on from the first chunk neither in nor asked for, and
        // counts the chunk still being written.
        assert_eq!(
            show(&f.handle(at(3), Input::Written { index: 2 })),
            ["ask [4]"]
        );
        assert_eq!(
            show(&f.handle(at(3), Input::Written { index: 3 })),
            ["ask [5]"]
        );
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
            Input::Written { index: 7 },
        ];
        for input in ignored {
            let what = format!("{input:?}");
            assert!(f.handle(at(5), input).is_empty(), "{what}");
        }
        assert_eq!(
            show(&f.handle(at(6), Input::Written { index: 1 })),
            ["ask [5]"]
        );
        assert!(f.handle(at(7), Input::Written { index: 1 }).is_empty());
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
    fn a_stall_asks_again_for_everything_outstanding_once_per_stall_period() {
        let at = clock();
        let art = Art::new(10);
        let mut f = art.resumed(tuning(), &[]);
        f.begin(at(0));
        let mut tick = |ms| show(&f.handle(at(ms), Input::Tick));
        assert!(tick(1000).is_empty());
        assert!(tick(2000).is_empty());
        assert_eq!(tick(2100), ["ask [0, 1, 2, 3]"]);
        assert!(tick(2300).is_empty());
        assert!(tick(4000).is_empty());
        assert_eq!(tick(4200), ["ask [0, 1, 2, 3]"]);
        // Progress holds the next one off for a stall period...
        assert_eq!(
            show(&deliver(&mut f, &art, at(4500), 2)),
            ["write 2", "ask [4]"]
        );
        let mut tick = |ms| show(&f.handle(at(ms), Input::Tick));
        assert!(tick(6300).is_empty());
        // ...then everything outstanding goes again, the chunk asked for last too.
        assert_eq!(tick(6600), ["ask [0, 1, 3, 4]"]);
        assert!(tick(6800).is_empty());
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
        // Chunks cannot be checked yet.
        assert!(f.handle(at(4), art.chunk(0)).is_empty());
        let out = f.handle(at(5), art.part(1));
        assert_eq!(show(&out), ["persist", "ask [0, 1, 2, 3]"]);
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
        assert_eq!(
            show(&f.handle(at(6), art.part(0))),
            ["persist", "ask [0, 1, 2, 3]"]
        );
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
        assert!(f
            .handle(at(200), art.part_with(2, forged.clone()))
            .is_empty());
        let mut tick = |ms| show(&f.handle(at(ms), Input::Tick));
        assert!(tick(1000).is_empty());
        // The parts were no progress (2.1 s since the start), but the manifest was last asked
        // for with the forged part.
        assert!(tick(2100).is_empty());
        assert_eq!(tick(2300), ["ask manifest"]);
        // Every part is needed again: the good ones may have been forged as well.
        assert!(f.handle(at(2400), art.part(2)).is_empty());
        f.handle(at(2400), art.part(0));
        assert_eq!(
            show(&f.handle(at(2400), art.part(1))),
            ["persist", "ask [0, 1, 2, 3]"]
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
        // A manifest that does not verify is fetched again; the bitmap stays (the whole-file
        // hash checks it).
        let mut saved = art.saved(&[0, 1, 3], true);
        saved.manifest = saved.manifest.map(|m| m.replacen('a', "b", 1));
        let mut f = resume(saved);
        assert_eq!(show(&f.begin(at(0))), ["report 3072/10140", "ask manifest"]);
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
