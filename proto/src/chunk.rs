//! Artifact transfer: the binary chunk frame, chunk requests, and per-chunk verification with
//! blake3's tree.
//!
//! ## Frame layout (all integers big-endian)
//!
//! ```text
//! offset size field
//!  0      3   magic "FCK"
//!  3      1   format version, 1
//!  4      1   frame type: 0 chunk, 1 manifest part, 2 error, 3 upload part
//!  5      3   reserved, zero
//!  8     32   artifact id (raw blake3 hash)
//! 40      4   index (chunk index, manifest part index, upload part index; 0 for error)
//! 44      4   total (chunk count, manifest part count, upload part count; 0 for error)
//! 48      -   payload: raw bytes (error: UTF-8 reason)
//! ```
//!
//! ## Verifying a chunk on arrival
//!
//! With a power-of-two chunk size of at least 1 KiB (blake3's own chunk), every artifact chunk
//! is a complete blake3 subtree, so its chaining value (CV) can be computed alone. The
//! *manifest* is the list of all chunk CVs; a machine fetches it first and checks it by merging
//! the CVs up the tree to the root, which must equal the artifact id. After that each chunk is
//! checked against its CV on arrival, and a bad chunk is dropped and fetched again alone.
//! A one-chunk artifact has no manifest: the chunk's hash is the artifact id.

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use serde::{Deserialize, Serialize};

use crate::auth::{Purpose, Secret};
use crate::ids::{ArtifactId, MachineId};

pub const FRAME_MAGIC: [u8; 3] = *b"FCK";
pub const FRAME_VERSION: u8 = 1;
pub const FRAME_HEADER_LEN: usize = 48;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
pub const MIN_CHUNK_SIZE: u32 = blake3::CHUNK_LEN as u32;
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
/// Most chunks one request may ask for; machines keep a window well below it.
pub const MAX_CHUNKS_PER_REQUEST: u32 = 256;
/// Most ranges one request may list.
pub const MAX_RANGES_PER_REQUEST: usize = 64;
/// Most manifest parts one request may name with `manifest_parts`.
pub const MAX_MANIFEST_PARTS_PER_REQUEST: u32 = 64;
/// Bytes of one manifest entry (a blake3 chaining value).
pub const CV_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Chunk = 0,
    Manifest = 1,
    Error = 2,
    UploadPart = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: FrameType,
    pub artifact: ArtifactId,
    pub index: u32,
    pub total: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is shorter than the {FRAME_HEADER_LEN}-byte header")]
    Short { len: usize },
    #[error("frame does not start with the FCK magic")]
    BadMagic,
    #[error("frame format version {0} is not supported (expected {FRAME_VERSION})")]
    BadVersion(u8),
    #[error("unknown frame type {0}")]
    BadType(u8),
    #[error("frame index {index} is not below total {total}")]
    IndexOutOfRange { index: u32, total: u32 },
}

pub fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&FRAME_MAGIC);
    out.push(FRAME_VERSION);
    out.push(header.frame_type as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(header.artifact.as_bytes());
    out.extend_from_slice(&header.index.to_be_bytes());
    out.extend_from_slice(&header.total.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn decode_frame(bytes: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Err(FrameError::Short { len: bytes.len() });
    }
    if bytes[..3] != FRAME_MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[3] != FRAME_VERSION {
        return Err(FrameError::BadVersion(bytes[3]));
    }
    let frame_type = match bytes[4] {
        0 => FrameType::Chunk,
        1 => FrameType::Manifest,
        2 => FrameType::Error,
        3 => FrameType::UploadPart,
        other => return Err(FrameError::BadType(other)),
    };
    let mut id = [0u8; 32];
    id.copy_from_slice(&bytes[8..40]);
    let word =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let (index, total) = (word(40), word(44));
    if frame_type != FrameType::Error && index >= total {
        return Err(FrameError::IndexOutOfRange { index, total });
    }
    let header = FrameHeader {
        frame_type,
        artifact: ArtifactId::from_bytes(id),
        index,
        total,
    };
    Ok((header, &bytes[FRAME_HEADER_LEN..]))
}

/// Bytes of the MAC that ends every upload frame.
pub const UPLOAD_MAC_LEN: usize = 32;

/// An upload part frame followed by a 32-byte MAC of the whole frame with the uploading
/// operator's secret ([`Purpose::UploadPart`]), so nobody else can inject parts into an upload.
pub fn encode_upload_frame(secret: &Secret, header: &FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = encode_frame(header, payload);
    let mac = secret.mac_bytes(Purpose::UploadPart, &out);
    out.extend_from_slice(&mac);
    out
}

/// An error frame to one machine (on `fleet/machines/{m}/chunks`) followed by a 32-byte MAC of
/// the whole frame with that machine's secret ([`Purpose::ChunkError`]): an error frame ends
/// the machine's download attempt, so one nobody but the platform can make.
pub fn encode_error_frame(secret: &Secret, header: &FrameHeader, reason: &[u8]) -> Vec<u8> {
    let mut out = encode_frame(header, reason);
    let mac = secret.mac_bytes(Purpose::ChunkError, &out);
    out.extend_from_slice(&mac);
    out
}

/// Checks a MAC'd error frame ([`encode_error_frame`]) with the machine's `secret`; the frame
/// without its MAC (header and reason), or `None` if it is not one: too short, another type,
/// or a MAC that does not verify (forged, or from a platform before 2026-11-30).
pub fn open_error_frame<'a>(secret: &Secret, bytes: &'a [u8]) -> Option<&'a [u8]> {
    if bytes.len() < FRAME_HEADER_LEN + UPLOAD_MAC_LEN {
        return None;
    }
    let (frame, mac) = bytes.split_at(bytes.len() - UPLOAD_MAC_LEN);
    let mac: &[u8; UPLOAD_MAC_LEN] = mac.try_into().expect("split at the MAC length");
    let (header, _) = decode_frame(frame).ok()?;
    (header.frame_type == FrameType::Error
        && secret.verify_mac_bytes(Purpose::ChunkError, frame, mac))
    .then_some(frame)
}

/// Why an upload frame was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadFrameError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("upload frame is too short to hold its MAC")]
    NoMac,
    #[error("upload frame MAC does not verify (not sent by this operator)")]
    BadMac,
    #[error("frame on the upload topic is not an upload part")]
    NotUpload,
}

/// Checks an upload frame's MAC with `secret` and decodes it.
pub fn open_upload_frame<'a>(
    secret: &Secret,
    bytes: &'a [u8],
) -> Result<(FrameHeader, &'a [u8]), UploadFrameError> {
    if bytes.len() < FRAME_HEADER_LEN + UPLOAD_MAC_LEN {
        return Err(UploadFrameError::NoMac);
    }
    let (frame, mac) = bytes.split_at(bytes.len() - UPLOAD_MAC_LEN);
    let mac: &[u8; UPLOAD_MAC_LEN] = mac.try_into().expect("split at the MAC length");
    if !secret.verify_mac_bytes(Purpose::UploadPart, frame, mac) {
        return Err(UploadFrameError::BadMac);
    }
    let (header, payload) = decode_frame(frame)?;
    if header.frame_type != FrameType::UploadPart {
        return Err(UploadFrameError::NotUpload);
    }
    Ok((header, payload))
}

/// Body of a MAC'd request on `fleet/machines/{m}/chunks/get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub machine: MachineId,
    pub ctr: u64,
    pub artifact: ArtifactId,
    /// Send the manifest: every part, or with `manifest_parts` those only.
    #[serde(default)]
    pub manifest: bool,
    /// With `manifest`: only manifest parts `[start, end)`, at most
    /// [`MAX_MANIFEST_PARTS_PER_REQUEST`]. A manifest of more parts than a session's queue on
    /// the broker holds is fetched a window at a time (protocol.md §7.3); platforms before
    /// 2026-11-27 ignore the field and send every part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_parts: Option<(u32, u32)>,
    /// Half-open ranges `[start, end)` of chunk indices wanted.
    #[serde(default)]
    pub chunks: Vec<(u32, u32)>,
}

impl ChunkRequest {
    /// The manifest parts this request asks for, of a manifest of `parts` parts (none without
    /// `manifest`). Call after [`ChunkRequest::validate`].
    pub fn manifest_indices(&self, parts: u32) -> std::ops::Range<u32> {
        match (self.manifest, self.manifest_parts) {
            (false, _) => 0..0,
            (true, None) => 0..parts,
            (true, Some((start, end))) => start..end.min(parts),
        }
    }

    /// Checks the request's shape against the artifact's chunk and manifest part counts.
    pub fn validate(&self, chunk_count: u32, manifest_parts: u32) -> Result<(), String> {
        if let Some((start, end)) = self.manifest_parts {
            if !self.manifest {
                return Err("manifest_parts without manifest".into());
            }
            if start >= end || end > manifest_parts {
                return Err(format!(
                    "manifest parts {start}..{end} are empty or beyond {manifest_parts} parts"
                ));
            }
            if end - start > MAX_MANIFEST_PARTS_PER_REQUEST {
                return Err(format!(
                    "{} manifest parts requested, at most {MAX_MANIFEST_PARTS_PER_REQUEST}",
                    end - start
                ));
            }
        }
        if self.chunks.len() > MAX_RANGES_PER_REQUEST {
            return Err(format!(
                "{} ranges, at most {MAX_RANGES_PER_REQUEST}",
                self.chunks.len()
            ));
        }
        let mut total = 0u32;
        for &(start, end) in &self.chunks {
            if start >= end || end > chunk_count {
                return Err(format!(
                    "range {start}..{end} is empty or beyond {chunk_count} chunks"
                ));
            }
            total = total.saturating_add(end - start);
        }
        if total > MAX_CHUNKS_PER_REQUEST {
            return Err(format!(
                "{total} chunks requested, at most {MAX_CHUNKS_PER_REQUEST}"
            ));
        }
        Ok(())
    }

    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().flat_map(|&(s, e)| s..e)
    }
}

/// Turns sorted indices into half-open ranges: `[1,2,3,7]` -> `[(1,4),(7,8)]`.
pub fn to_ranges(indices: impl IntoIterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for i in indices {
        match out.last_mut() {
            Some((_, end)) if *end == i => *end += 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("chunk size {0} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    #[error("artifact of {size} bytes at chunk size {chunk_size} has too many chunks")]
    TooLarge { size: u64, chunk_size: u32 },
    #[error("empty artifacts are not supported")]
    Empty,
    #[error("manifest of {got} bytes, expected {expected} ({chunks} chunks)")]
    ManifestLength {
        got: usize,
        expected: usize,
        chunks: u32,
    },
    #[error("manifest does not hash to artifact {artifact}")]
    ManifestMismatch { artifact: ArtifactId },
    #[error("chunk {index} of artifact {artifact} is {got} bytes, expected {expected}")]
    ChunkLength {
        artifact: ArtifactId,
        index: u32,
        got: usize,
        expected: usize,
    },
    #[error("chunk {index} of artifact {artifact} does not match its hash")]
    ChunkMismatch { artifact: ArtifactId, index: u32 },
    #[error("chunk index {index} is beyond the {count} chunks of artifact {artifact}")]
    ChunkIndex {
        artifact: ArtifactId,
        index: u32,
        count: u32,
    },
}

/// Shape of an artifact split into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: u32,
}

impl Layout {
    pub fn new(size: u64, chunk_size: u32) -> Result<Self, VerifyError> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(VerifyError::BadChunkSize(chunk_size));
        }
        if size == 0 {
            return Err(VerifyError::Empty);
        }
        let chunks = size.div_ceil(chunk_size as u64);
        let chunks =
            u32::try_from(chunks).map_err(|_| VerifyError::TooLarge { size, chunk_size })?;
        Ok(Self {
            size,
            chunk_size,
            chunks,
        })
    }

    pub fn offset(&self, index: u32) -> u64 {
        index as u64 * self.chunk_size as u64
    }

    pub fn chunk_len(&self, index: u32) -> usize {
        let start = self.offset(index);
        (self.size - start).min(self.chunk_size as u64) as usize
    }

    /// Bytes of the manifest (one CV per chunk).
    pub fn manifest_len(&self) -> usize {
        self.chunks as usize * CV_LEN
    }

    /// Manifest parts: the manifest is sent in frames of at most `chunk_size` bytes.
    pub fn manifest_parts(&self) -> u32 {
        self.manifest_len().div_ceil(self.chunk_size as usize) as u32
    }

    /// Byte range of manifest part `part`.
    pub fn manifest_part_range(&self, part: u32) -> std::ops::Range<usize> {
        let start = part as usize * self.chunk_size as usize;
        start..(start + self.chunk_size as usize).min(self.manifest_len())
    }
}

/// The chaining value of chunk `index` of an artifact laid out as `layout`.
pub fn chunk_cv(layout: &Layout, index: u32, data: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(layout.offset(index))
        .update(data)
        .finalize_non_root()
}

fn merge(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_len(cvs.len());
    merge_subtrees_non_root(&merge(&cvs[..left]), &merge(&cvs[left..]), Mode::Hash)
}

/// blake3's tree is left-full: the left subtree holds the largest power of two below `n` leaves.
fn left_len(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Root hash of an artifact of two or more chunks from its chunk CVs.
pub fn root_from_cvs(cvs: &[ChainingValue]) -> blake3::Hash {
    assert!(
        cvs.len() >= 2,
        "a one-chunk artifact's root is its plain hash"
    );
    let left = left_len(cvs.len());
    merge_subtrees_root(&merge(&cvs[..left]), &merge(&cvs[left..]), Mode::Hash)
}

/// Builds the manifest while the whole artifact streams by, chunk by chunk.
pub struct ManifestBuilder {
    layout: Layout,
    manifest: Vec<u8>,
}

impl ManifestBuilder {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            manifest: Vec::with_capacity(layout.manifest_len()),
        }
    }

    /// Feed chunks in order, each exactly `layout.chunk_len(i)` bytes.
    pub fn push_chunk(&mut self, data: &[u8]) {
        let index = (self.manifest.len() / CV_LEN) as u32;
        assert!(index < self.layout.chunks && data.len() == self.layout.chunk_len(index));
        self.manifest
            .extend_from_slice(&chunk_cv(&self.layout, index, data));
    }

    pub fn finish(self) -> Vec<u8> {
        assert_eq!(self.manifest.len(), self.layout.manifest_len());
        self.manifest
    }
}

/// Checks chunks of one artifact as they arrive.
#[derive(Debug, Clone)]
pub struct ChunkVerifier {
    artifact: ArtifactId,
    layout: Layout,
    /// Empty for a one-chunk artifact.
    cvs: Vec<ChainingValue>,
}

impl ChunkVerifier {
    /// Whether this artifact needs a manifest before chunks can be checked.
    pub fn needs_manifest(layout: &Layout) -> bool {
        layout.chunks > 1
    }

    /// A verifier for a one-chunk artifact.
    pub fn single(artifact: ArtifactId, layout: Layout) -> Self {
        assert_eq!(layout.chunks, 1);
        Self {
            artifact,
            layout,
            cvs: Vec::new(),
        }
    }

    /// Checks a complete manifest against the artifact id.
    pub fn from_manifest(
        artifact: ArtifactId,
        layout: Layout,
        manifest: &[u8],
    ) -> Result<Self, VerifyError> {
        if layout.chunks == 1 {
            return Ok(Self::single(artifact, layout));
        }
        if manifest.len() != layout.manifest_len() {
            return Err(VerifyError::ManifestLength {
                got: manifest.len(),
                expected: layout.manifest_len(),
                chunks: layout.chunks,
            });
        }
        let cvs: Vec<ChainingValue> = manifest
            .chunks_exact(CV_LEN)
            .map(|c| c.try_into().expect("exact chunks"))
            .collect();
        if ArtifactId::from(root_from_cvs(&cvs)) != artifact {
            return Err(VerifyError::ManifestMismatch { artifact });
        }
        Ok(Self {
            artifact,
            layout,
            cvs,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn verify(&self, index: u32, data: &[u8]) -> Result<(), VerifyError> {
        let artifact = self.artifact;
        if index >= self.layout.chunks {
            return Err(VerifyError::ChunkIndex {
                artifact,
                index,
                count: self.layout.chunks,
            });
        }
        let expected = self.layout.chunk_len(index);
        if data.len() != expected {
            return Err(VerifyError::ChunkLength {
                artifact,
                index,
                got: data.len(),
                expected,
            });
        }
        let ok = if self.cvs.is_empty() {
            ArtifactId::of(data) == artifact
        } else {
            chunk_cv(&self.layout, index, data) == self.cvs[index as usize]
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::ChunkMismatch { artifact, index })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn upload_frames_open_only_with_the_uploaders_secret_and_unchanged() {
        let secret = Secret::from_bytes([7; 32]);
        let header = FrameHeader {
            frame_type: FrameType::UploadPart,
            artifact: ArtifactId::of(b"a"),
            index: 1,
            total: 3,
        };
        let frame = encode_upload_frame(&secret, &header, b"bytes");
        let (h, payload) = open_upload_frame(&secret, &frame).unwrap();
        assert_eq!((h, payload), (header, &b"bytes"[..]));
        assert_eq!(
            open_upload_frame(&Secret::from_bytes([8; 32]), &frame),
            Err(UploadFrameError::BadMac)
        );
        let mut changed = frame.clone();
        changed[FRAME_HEADER_LEN] ^= 1;
        assert_eq!(
            open_upload_frame(&secret, &changed),
            Err(UploadFrameError::BadMac)
        );
        // A frame without a MAC (the old format) is refused, not misread.
        let bare = encode_frame(&header, b"bytes");
        assert!(open_upload_frame(&secret, &bare).is_err());
        let chunk = encode_upload_frame(
            &secret,
            &FrameHeader {
                frame_type: FrameType::Chunk,
                ..header
            },
            b"x",
        );
        assert_eq!(
            open_upload_frame(&secret, &chunk),
            Err(UploadFrameError::NotUpload)
        );
    }

    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn manifest_for(bytes: &[u8], layout: Layout) -> Vec<u8> {
        let mut b = ManifestBuilder::new(layout);
        for i in 0..layout.chunks {
            let start = layout.offset(i) as usize;
            b.push_chunk(&bytes[start..start + layout.chunk_len(i)]);
        }
        b.finish()
    }

    #[test]
    fn merged_chunk_cvs_equal_blake3_hash_for_many_sizes() {
        for chunk_size in [1024u32, 2048, 4096, 65536] {
            let c = chunk_size as usize;
            let mut sizes = vec![
                c + 1,
                2 * c,
                2 * c + 1,
                3 * c,
                3 * c + 1,
                4 * c,
                5 * c - 1,
                7 * c + 1,
                8 * c,
                9 * c + 1,
            ];
            if chunk_size <= 2048 {
                sizes.extend([16 * c + 1, 33 * c, 100 * c + 7]);
            }
            for size in sizes {
                let bytes = data(size);
                let layout = Layout::new(size as u64, chunk_size).unwrap();
                let id = ArtifactId::of(&bytes);
                let manifest = manifest_for(&bytes, layout);
                let v = ChunkVerifier::from_manifest(id, layout, &manifest)
                    .unwrap_or_else(|e| panic!("size {size} chunk {chunk_size}: {e}"));
                for i in 0..layout.chunks {
                    let start = layout.offset(i) as usize;
                    v.verify(i, &bytes[start..start + layout.chunk_len(i)])
                        .unwrap();
                }
            }
        }
    }

    #[test]
    fn one_byte_and_one_chunk_artifacts_verify_against_the_plain_hash() {
        for size in [1usize, 1000, 1024, 65536] {
            let bytes = data(size);
            let layout = Layout::new(size as u64, 65536).unwrap();
            assert_eq!(layout.chunks, 1);
            assert!(!ChunkVerifier::needs_manifest(&layout));
            let v = ChunkVerifier::single(ArtifactId::of(&bytes), layout);
            v.verify(0, &bytes).unwrap();
            let mut bad = bytes.clone();
            bad[0] ^= 1;
            assert!(matches!(
                v.verify(0, &bad),
                Err(VerifyError::ChunkMismatch { .. })
            ));
        }
    }

    #[test]
    fn a_flipped_bit_in_one_chunk_fails_only_that_chunk() {
        let bytes = data(5 * 1024 + 17);
        let layout = Layout::new(bytes.len() as u64, 1024).unwrap();
        let v = ChunkVerifier::from_manifest(
            ArtifactId::of(&bytes),
            layout,
            &manifest_for(&bytes, layout),
        )
        .unwrap();
        let mut chunk2 = bytes[2048..3072].to_vec();
        chunk2[100] ^= 0x80;
        assert_eq!(
            v.verify(2, &chunk2),
            Err(VerifyError::ChunkMismatch {
                artifact: ArtifactId::of(&bytes),
                index: 2
            })
        );
        v.verify(3, &bytes[3072..4096]).unwrap();
        assert!(matches!(
            v.verify(5, &bytes[5120..5121]),
            Err(VerifyError::ChunkLength { .. })
        ));
        assert!(matches!(
            v.verify(6, &[]),
            Err(VerifyError::ChunkIndex { .. })
        ));
        // A chunk moved to another index does not verify either.
        assert!(v.verify(1, &bytes[3072..4096]).is_err());
    }

    #[test]
    fn a_tampered_or_truncated_manifest_is_refused() {
        let bytes = data(4 * 1024);
        let layout = Layout::new(bytes.len() as u64, 1024).unwrap();
        let id = ArtifactId::of(&bytes);
        let mut m = manifest_for(&bytes, layout);
        assert!(matches!(
            ChunkVerifier::from_manifest(id, layout, &m[..64]),
            Err(VerifyError::ManifestLength { .. })
        ));
        m[5] ^= 1;
        assert_eq!(
            ChunkVerifier::from_manifest(id, layout, &m).unwrap_err(),
            VerifyError::ManifestMismatch { artifact: id }
        );
    }

    #[test]
    fn layout_refuses_bad_chunk_sizes_and_empty_files() {
        for bad in [0, 512, 1000, 3 * 1024, 2 * 1024 * 1024] {
            assert_eq!(Layout::new(10, bad), Err(VerifyError::BadChunkSize(bad)));
        }
        assert_eq!(Layout::new(0, 1024), Err(VerifyError::Empty));
        let l = Layout::new(70 * 1024 + 1, 1024).unwrap();
        assert_eq!(
            (
                l.chunks,
                l.chunk_len(70),
                l.manifest_len(),
                l.manifest_parts()
            ),
            (71, 1, 71 * 32, 3)
        );
        assert_eq!(l.manifest_part_range(2), 2048..2272);
    }

    #[test]
    fn frames_round_trip() {
        let h = FrameHeader {
            frame_type: FrameType::Chunk,
            artifact: ArtifactId::of(b"a"),
            index: 3,
            total: 9,
        };
        let bytes = encode_frame(&h, b"payload");
        assert_eq!(bytes.len(), FRAME_HEADER_LEN + 7);
        assert_eq!(&bytes[..4], b"FCK\x01");
        let (back, payload) = decode_frame(&bytes).unwrap();
        assert_eq!((back, payload), (h, &b"payload"[..]));
        let err = FrameHeader {
            frame_type: FrameType::Error,
            artifact: ArtifactId::of(b"a"),
            index: 0,
            total: 0,
        };
        assert_eq!(
            decode_frame(&encode_frame(&err, b"unknown")).unwrap().0,
            err
        );
    }

    #[test]
    fn malformed_frames_are_refused() {
        let h = FrameHeader {
            frame_type: FrameType::Manifest,
            artifact: ArtifactId::of(b"a"),
            index: 0,
            total: 1,
        };
        let good = encode_frame(&h, b"x");
        assert_eq!(
            decode_frame(&good[..47]),
            Err(FrameError::Short { len: 47 })
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode_frame(&bad), Err(FrameError::BadMagic));
        let mut bad = good.clone();
        bad[3] = 2;
        assert_eq!(decode_frame(&bad), Err(FrameError::BadVersion(2)));
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(decode_frame(&bad), Err(FrameError::BadType(9)));
        let mut bad = good;
        bad[43] = 1;
        assert_eq!(
            decode_frame(&bad),
            Err(FrameError::IndexOutOfRange { index: 1, total: 1 })
        );
    }

    #[test]
    fn chunk_requests_are_bounded_and_ranges_compress() {
        assert_eq!(
            to_ranges([1, 2, 3, 7, 9, 10]),
            vec![(1, 4), (7, 8), (9, 11)]
        );
        let mut r = ChunkRequest {
            machine: MachineId::new("vm-1").unwrap(),
            ctr: 1,
            artifact: ArtifactId::of(b"a"),
            manifest: false,
            manifest_parts: None,
            chunks: vec![(0, 4), (8, 9)],
        };
        r.validate(10, 1).unwrap();
        assert_eq!(r.indices().collect::<Vec<_>>(), vec![0, 1, 2, 3, 8]);
        r.chunks = vec![(0, 11)];
        assert!(r.validate(10, 1).is_err());
        r.chunks = vec![(3, 3)];
        assert!(r.validate(10, 1).is_err());
        r.chunks = vec![(0, 300)];
        assert!(r.validate(1000, 1).unwrap_err().contains("at most"));
    }

    #[test]
    fn a_request_names_a_window_of_manifest_parts_or_asks_for_all() {
        let mut r = ChunkRequest {
            machine: MachineId::new("vm-1").unwrap(),
            ctr: 1,
            artifact: ArtifactId::of(b"a"),
            manifest: true,
            manifest_parts: None,
            chunks: vec![],
        };
        r.validate(10_000, 200).unwrap();
        assert_eq!(r.manifest_indices(200), 0..200);
        r.manifest_parts = Some((64, 128));
        r.validate(10_000, 200).unwrap();
        assert_eq!(r.manifest_indices(200), 64..128);
        // Absent when not set: the request is byte for byte what older agents send.
        let mut plain = r.clone();
        plain.manifest_parts = None;
        assert!(!serde_json::to_string(&plain)
            .unwrap()
            .contains("manifest_parts"));
        for (bad, why) in [
            ((64, 64), "empty"),
            ((190, 201), "beyond"),
            ((0, 65), "at most 64"),
        ] {
            r.manifest_parts = Some(bad);
            let e = r.validate(10_000, 200).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        r.manifest_parts = Some((0, 10));
        r.manifest = false;
        assert!(r
            .validate(10_000, 200)
            .unwrap_err()
            .contains("without manifest"));
        assert_eq!(r.manifest_indices(200), 0..0);
    }
}
