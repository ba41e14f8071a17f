//! `Layout`, `ChunkVerifier::from_manifest` and `verify`.
//!
//! The first byte picks a mode:
//! - even: honest. The rest is an artifact; its real manifest must verify, every chunk must
//!   verify, and one flipped bit must fail exactly the chunk (or the manifest) it is in.
//! - odd: hostile. Layout, artifact id, manifest, chunk index and chunk bytes all come from the
//!   input, as they could from a forged notice or frames on a shared topic.

use fleetcast_proto::chunk::{
    ChunkVerifier, Layout, ManifestBuilder, VerifyError, CV_LEN, MIN_CHUNK_SIZE,
};
use fleetcast_proto::ArtifactId;

use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => honest(*mode, rest),
        Some((_, rest)) => hostile(rest),
        None => Verdict::Rejected,
    }
}

fn honest(mode: u8, bytes: &[u8]) -> Verdict {
    // 1 KiB to 8 KiB chunks, so short inputs still make several.
    let chunk_size = MIN_CHUNK_SIZE << ((mode >> 1) % 4);
    let Ok(layout) = Layout::new(bytes.len() as u64, chunk_size) else {
        assert!(bytes.is_empty());
        return Verdict::Rejected;
    };
    let id = ArtifactId::of(bytes);
    let chunk = |i: u32| {
        let start = layout.offset(i) as usize;
        &bytes[start..start + layout.chunk_len(i)]
    };
    let verifier = if ChunkVerifier::needs_manifest(&layout) {
        let mut builder = ManifestBuilder::new(layout);
        for i in 0..layout.chunks {
            builder.push_chunk(chunk(i));
        }
        let mut manifest = builder.finish();
        let verifier = ChunkVerifier::from_manifest(id, layout, &manifest)
            .unwrap_or_else(|e| panic!("honest manifest refused: {e}"));
        let at = usize::from(mode) * 31 % manifest.len();
        manifest[at] ^= 0x10;
        assert_eq!(
            ChunkVerifier::from_manifest(id, layout, &manifest).unwrap_err(),
            VerifyError::ManifestMismatch { artifact: id }
        );
        verifier
    } else {
        ChunkVerifier::single(id, layout)
    };
    for i in 0..layout.chunks {
        verifier
            .verify(i, chunk(i))
            .unwrap_or_else(|e| panic!("honest chunk {i} refused: {e}"));
    }
    let at = usize::from(mode) * 7919 % bytes.len();
    let index = (at as u64 / u64::from(chunk_size)) as u32;
    let mut bad = chunk(index).to_vec();
    bad[at - layout.offset(index) as usize] ^= 1;
    assert!(matches!(
        verifier.verify(index, &bad),
        Err(VerifyError::ChunkMismatch { index: i, .. }) if i == index
    ));
    Verdict::Accepted
}

fn hostile(bytes: &[u8]) -> Verdict {
    let mut input = Input(bytes);
    let flags = input.byte();
    let chunk_size = if flags & 1 == 0 {
        MIN_CHUNK_SIZE << (input.byte() % 12)
    } else {
        input.u32()
    };
    let size = if flags & 2 == 0 {
        u64::from(input.u32() & 0xfffff)
    } else {
        input.u64()
    };
    let index = input.u32();
    let Ok(layout) = Layout::new(size, chunk_size) else {
        return Verdict::Rejected;
    };
    assert!(layout.chunks >= 1 && layout.offset(layout.chunks - 1) < size);
    for part in [0, layout.manifest_parts().saturating_sub(1)] {
        let range = layout.manifest_part_range(part);
        assert!(range.end <= layout.manifest_len() && range.len() <= chunk_size as usize);
    }
    let manifest = input.take(layout.manifest_len());
    let chunk = input.rest();
    // Half the time the id is the manifest's own root, so the checks behind it are reached.
    let id = if flags & 4 == 0 && layout.chunks >= 2 && manifest.len() == layout.manifest_len() {
        let cvs: Vec<[u8; CV_LEN]> = manifest
            .chunks_exact(CV_LEN)
            .map(|c| c.try_into().expect("exact chunks"))
            .collect();
        ArtifactId::from(fleetcast_proto::chunk::root_from_cvs(&cvs))
    } else {
        ArtifactId::of(manifest)
    };
    let verifier = if ChunkVerifier::needs_manifest(&layout) {
        match ChunkVerifier::from_manifest(id, layout, manifest) {
            Ok(v) => v,
            Err(_) => return Verdict::Rejected,
        }
    } else {
        ChunkVerifier::single(id, layout)
    };
    Verdict::from_ok(verifier.verify(index % (layout.chunks + 1), chunk).is_ok())
}

/// Reads fields off the front of the input, with zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn rest(&mut self) -> &'a [u8] {
        self.take(self.0.len())
    }
    fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.take(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_be_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let artifact = |len: usize| (0..len).map(|i| (i * 31 % 251) as u8);
    let mut out = Vec::new();
    // Honest: one chunk, and 1 KiB chunks with a short last one.
    out.push([0u8].into_iter().chain(artifact(700)).collect());
    out.push([0u8].into_iter().chain(artifact(5 * 1024 + 17)).collect());
    out.push([2u8].into_iter().chain(artifact(4 * 2048)).collect());
    // Hostile: a real 3-chunk manifest with its root id (flags 0), chunk 1 of it.
    let bytes: Vec<u8> = artifact(2 * 1024 + 5).collect();
    let layout = Layout::new(bytes.len() as u64, 1024).expect("valid layout");
    let mut builder = ManifestBuilder::new(layout);
    for i in 0..layout.chunks {
        let start = layout.offset(i) as usize;
        builder.push_chunk(&bytes[start..start + layout.chunk_len(i)]);
    }
    let mut seed = vec![1u8, 0, 0];
    seed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    seed.extend_from_slice(&1u32.to_be_bytes());
    seed.extend_from_slice(&builder.finish());
    seed.extend_from_slice(&bytes[1024..2048]);
    out.push(seed);
    out
}
