//! Artifact files under the data dir: `artifacts/{hex}` (the bytes) and `artifacts/{hex}.manifest`
//! (the chunk chaining values), uploads staged in `uploads/{hex}.part` with positioned writes,
//! verified by blake3 at commit, then fsynced and renamed into place. Chunk reads go through a
//! small cache of open files, never loading a whole artifact.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fleetcast_proto::chunk::{to_ranges, Layout, ManifestBuilder, VerifyError};
use fleetcast_proto::ArtifactId;

/// Open artifact files kept for chunk serving.
const OPEN_FILES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Layout(#[from] VerifyError),
    #[error("upload part {index} of artifact {artifact} is {got} bytes, expected {expected}")]
    PartLength {
        artifact: ArtifactId,
        index: u32,
        got: usize,
        expected: usize,
    },
    #[error("upload part {index} is beyond the {parts} parts of artifact {artifact}")]
    PartIndex {
        artifact: ArtifactId,
        index: u32,
        parts: u32,
    },
    #[error(
        "uploaded bytes hash to {got}, not to the announced artifact {expected}; upload discarded"
    )]
    HashMismatch {
        expected: ArtifactId,
        got: ArtifactId,
    },
    #[error("artifact {artifact}: manifest file is {got} bytes, its layout says {expected}")]
    ManifestSize {
        artifact: ArtifactId,
        got: usize,
        expected: usize,
    },
    #[error("artifact {artifact}: file is {got} bytes, expected {expected}")]
    Size {
        artifact: ArtifactId,
        got: u64,
        expected: u64,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// One upload in progress.
pub struct Upload {
    pub artifact: ArtifactId,
    pub layout: Layout,
    path: PathBuf,
    file: Arc<File>,
    received: Vec<bool>,
}

/// Where one checked upload part goes; [`PartWrite::write`] is the blocking write, done off the
/// async runtime, and [`Upload::mark_received`] records it afterwards.
pub struct PartWrite {
    file: Arc<File>,
    path: PathBuf,
    offset: u64,
    pub index: u32,
}

impl PartWrite {
    /// Blocking: a positioned write into the staging file.
    pub fn write(&self, bytes: &[u8]) -> Result<(), ArtifactError> {
        self.file
            .write_all_at(bytes, self.offset)
            .map_err(io("write", &self.path))
    }
}

impl Upload {
    /// Writes one part at its offset. A repeated part is written again (same bytes or not:
    /// the commit hash decides). Blocking.
    pub fn write_part(&mut self, index: u32, bytes: &[u8]) -> Result<(), ArtifactError> {
        self.part(index, bytes.len())?.write(bytes)?;
        self.mark_received(index);
        Ok(())
    }

    pub fn mark_received(&mut self, index: u32) {
        if let Some(r) = self.received.get_mut(index as usize) {
            *r = true;
        }
    }

    /// Checks part `index` of `len` bytes against the layout and says where it goes.
    pub fn part(&self, index: u32, len: usize) -> Result<PartWrite, ArtifactError> {
        if index >= self.layout.chunks {
            return Err(ArtifactError::PartIndex {
                artifact: self.artifact,
                index,
                parts: self.layout.chunks,
            });
        }
        let expected = self.layout.chunk_len(index);
        if len != expected {
            return Err(ArtifactError::PartLength {
                artifact: self.artifact,
                index,
                got: len,
                expected,
            });
        }
        Ok(PartWrite {
            file: self.file.clone(),
            path: self.path.clone(),
            offset: self.layout.offset(index),
            index,
        })
    }

    /// Ranges of parts not received yet.
    pub fn missing(&self) -> Vec<(u32, u32)> {
        to_ranges(
            self.received
                .iter()
                .enumerate()
                .filter(|(_, got)| !**got)
                .map(|(i, _)| i as u32),
        )
    }
}

/// The artifact directory.
pub struct ArtifactStore {
    dir: PathBuf,
    uploads: PathBuf,
    open: Mutex<HashMap<ArtifactId, (Arc<File>, u64)>>,
    tick: Mutex<u64>,
}

impl ArtifactStore {
    /// Creates `artifacts/` and `uploads/` under `data_dir`; drops stale staging files (an
    /// upload does not survive a restart: the CLI starts over).
    pub fn open(data_dir: &Path) -> Result<Self, ArtifactError> {
        let dir = data_dir.join("artifacts");
        let uploads = data_dir.join("uploads");
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        std::fs::create_dir_all(&uploads).map_err(io("create", &uploads))?;
        if let Ok(entries) = std::fs::read_dir(&uploads) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self {
            dir,
            uploads,
            open: Mutex::new(HashMap::new()),
            tick: Mutex::new(0),
        })
    }

    pub fn path(&self, id: &ArtifactId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    pub fn manifest_path(&self, id: &ArtifactId) -> PathBuf {
        self.dir.join(format!("{}.manifest", id.to_hex()))
    }

    pub fn exists(&self, id: &ArtifactId) -> bool {
        self.path(id).is_file() && self.manifest_path(id).is_file()
    }

    /// Starts (or restarts) staging `artifact` of `size` bytes in parts of `chunk_size`.
    pub fn begin_upload(
        &self,
        artifact: ArtifactId,
        size: u64,
        chunk_size: u32,
    ) -> Result<Upload, ArtifactError> {
        let layout = Layout::new(size, chunk_size)?;
        let path = self.uploads.join(format!("{}.part", artifact.to_hex()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io("create", &path))?;
        let file = Arc::new(file);
        Ok(Upload {
            artifact,
            layout,
            path,
            file,
            received: vec![false; layout.chunks as usize],
        })
    }

    /// Removes a staging file (failed or abandoned upload).
    pub fn discard(&self, upload: Upload) {
        let _ = std::fs::remove_file(&upload.path);
    }

    /// Verifies a complete upload against its id, writes its manifest and moves it into
    /// place, each file via fsync + rename. On any error the staging file is removed.
    /// Blocking: run it off the async threads.
    pub fn commit(&self, upload: Upload) -> Result<(), ArtifactError> {
        let result = self.commit_inner(&upload);
        if result.is_err() {
            let _ = std::fs::remove_file(&upload.path);
        }
        result
    }

    fn commit_inner(&self, upload: &Upload) -> Result<(), ArtifactError> {
        let Upload {
            artifact,
            layout,
            path,
            file,
            ..
        } = upload;
        file.sync_all().map_err(io("fsync", path))?;
        let got_size = file.metadata().map_err(io("stat", path))?.len();
        if got_size != layout.size {
            return Err(ArtifactError::Size {
                artifact: *artifact,
                got: got_size,
                expected: layout.size,
            });
        }
        let mut hasher = blake3::Hasher::new();
        let mut manifest = ManifestBuilder::new(*layout);
        let mut buf = vec![0u8; layout.chunk_size as usize];
        let mut reader = File::open(path).map_err(io("open", path))?;
        for i in 0..layout.chunks {
            let chunk = &mut buf[..layout.chunk_len(i)];
            reader.read_exact(chunk).map_err(io("read", path))?;
            hasher.update(chunk);
            manifest.push_chunk(chunk);
        }
        let got = ArtifactId::from(hasher.finalize());
        if got != *artifact {
            return Err(ArtifactError::HashMismatch {
                expected: *artifact,
                got,
            });
        }
        let manifest_path = self.manifest_path(artifact);
        let tmp = self.dir.join(format!("{}.manifest.tmp", artifact.to_hex()));
        {
            let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
            f.write_all(&manifest.finish()).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))?;
        }
        std::fs::rename(&tmp, &manifest_path).map_err(io("rename", &manifest_path))?;
        let final_path = self.path(artifact);
        std::fs::rename(path, &final_path).map_err(io("rename", &final_path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &self.dir))?;
        Ok(())
    }

    /// Deletes the artifact's bytes and manifest (either may be gone already), and drops its
    /// open file from the cache, which would otherwise keep the disk space in use. Returns the
    /// bytes freed. Blocking: run it off the async threads.
    pub fn remove(&self, id: &ArtifactId) -> Result<u64, ArtifactError> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let mut freed = 0;
        for path in [self.path(id), self.manifest_path(id)] {
            let size = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("stat", &path)(e)),
            };
            match std::fs::remove_file(&path) {
                Ok(()) => freed += size,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path)(e)),
            }
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &self.dir))?;
        Ok(freed)
    }

    fn file(&self, id: &ArtifactId) -> Result<Arc<File>, ArtifactError> {
        let now = {
            let mut t = self.tick.lock().unwrap_or_else(|p| p.into_inner());
            *t += 1;
            *t
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((f, used)) = open.get_mut(id) {
            *used = now;
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = Arc::new(File::open(&path).map_err(io("open", &path))?);
        if open.len() >= OPEN_FILES {
            if let Some(oldest) = open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                open.remove(&oldest);
            }
        }
        open.insert(*id, (f.clone(), now));
        Ok(f)
    }

    /// Holds the open-file cache, so chunk reads wait (tests of callers that must not block).
    #[cfg(test)]
    pub(crate) fn hold_open_files(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ArtifactId, (Arc<File>, u64)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends chunk `index` to `buf` (a frame's header already in it): read in place, with
    /// no buffer of its own to copy from.
    pub fn append_chunk(
        &self,
        id: &ArtifactId,
        layout: &Layout,
        index: u32,
        buf: &mut Vec<u8>,
    ) -> Result<(), ArtifactError> {
        let at = buf.len();
        buf.resize(at + layout.chunk_len(index), 0);
        self.file(id)?
            .read_exact_at(&mut buf[at..], layout.offset(index))
            .map_err(io("read", &self.path(id)))
    }

    pub fn read_manifest(&self, id: &ArtifactId) -> Result<Vec<u8>, ArtifactError> {
        let path = self.manifest_path(id);
        std::fs::read(&path).map_err(io("read", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::chunk::ChunkVerifier;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 253) as u8).collect()
    }

    #[test]
    fn parts_in_any_order_commit_to_a_verifiable_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let bytes = data(5 * 1024 + 3);
        let id = ArtifactId::of(&bytes);
        let mut up = store.begin_upload(id, bytes.len() as u64, 1024).unwrap();
        for i in [5u32, 0, 3, 1] {
            let l = up.layout;
            let s = l.offset(i) as usize;
            up.write_part(i, &bytes[s..s + l.chunk_len(i)]).unwrap();
        }
        assert_eq!(up.missing(), vec![(2, 3), (4, 5)]);
        for i in [2u32, 4] {
            let s = i as usize * 1024;
            up.write_part(i, &bytes[s..s + 1024]).unwrap();
        }
        assert!(up.missing().is_empty());
        let layout = up.layout;
        store.commit(up).unwrap();
        assert!(store.exists(&id));
        let v =
            ChunkVerifier::from_manifest(id, layout, &store.read_manifest(&id).unwrap()).unwrap();
        let mut buf = Vec::new();
        for i in 0..layout.chunks {
            buf.clear();
            store.append_chunk(&id, &layout, i, &mut buf).unwrap();
            v.verify(i, &buf).unwrap();
        }
    }

    #[test]
    fn bytes_that_do_not_hash_to_the_announced_id_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let bytes = data(2048);
        let id = ArtifactId::of(b"something else");
        let mut up = store.begin_upload(id, 2048, 1024).unwrap();
        up.write_part(0, &bytes[..1024]).unwrap();
        up.write_part(1, &bytes[1024..]).unwrap();
        let err = store.commit(up).unwrap_err();
        assert!(matches!(err, ArtifactError::HashMismatch { .. }), "{err}");
        assert!(!store.exists(&id));
        assert_eq!(
            std::fs::read_dir(dir.path().join("uploads"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn empty_uploads_and_wrong_part_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.begin_upload(ArtifactId::of(b""), 0, 1024),
            Err(ArtifactError::Layout(VerifyError::Empty))
        ));
        let mut up = store
            .begin_upload(ArtifactId::of(b"x"), 1500, 1024)
            .unwrap();
        assert!(matches!(
            up.write_part(1, &[0; 1024]),
            Err(ArtifactError::PartLength { .. })
        ));
        assert!(matches!(
            up.write_part(2, &[0; 1]),
            Err(ArtifactError::PartIndex { .. })
        ));
    }
}
