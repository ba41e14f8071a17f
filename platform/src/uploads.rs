//! Artifact uploads in progress: `upload_begin` stages a file, parts arrive on the operator's
//! upload topic (already authenticated by [`crate::admin`]), `upload_commit` verifies and
//! stores the artifact. An upload belongs to the client that began it; one left idle for
//! [`UPLOAD_IDLE`] was abandoned and is dropped with its staging file. The bytes on disk are
//! [`crate::artifacts`]'s business; this module keeps who is uploading what.

use std::collections::HashMap;
use std::time::Duration;

use fleetcast_proto::admin::ArtifactInfo;
use fleetcast_proto::calls::{self, UploadEnd, UploadStart};
use fleetcast_proto::chunk::{FrameHeader, Layout};
use fleetcast_proto::release::validate_version;
use fleetcast_proto::{ArtifactId, Kind};
use tokio::time::Instant;

use crate::artifacts::{ArtifactError, ArtifactStore, Upload};
use crate::context::Ctx;
use crate::now_ms;
use crate::ops::{refused, OpError};

/// An upload with no part or request for this long was abandoned (the CLI died): its
/// staging file and state are dropped.
pub const UPLOAD_IDLE: Duration = Duration::from_secs(600);

/// Most parts one upload may have: the platform keeps a flag per part while it uploads, so this
/// bounds what one `upload_begin` can make it allocate (4 Mi parts: 256 GiB at 64 KiB chunks).
pub const MAX_UPLOAD_PARTS: u32 = 1 << 22;

struct Staged {
    upload: Upload,
    kind: Kind,
    version: String,
    name: String,
    notes: Option<String>,
    client: String,
    /// First write error (e.g. disk full): reported at commit.
    failed: Option<String>,
    /// Last begin or part: an upload idle for [`UPLOAD_IDLE`] is abandoned.
    touched: Instant,
}

/// The uploads in progress, by artifact. Owned by the admin task, which handles requests and
/// parts in order.
#[derive(Default)]
pub struct Uploads {
    staged: HashMap<ArtifactId, Staged>,
}

impl Uploads {
    /// How many uploads are in progress.
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// `upload_begin` from `client`: refuses what can never be stored (a version uploaded
    /// with other bytes, bytes uploaded under another version, too many parts), answers
    /// `Stored` for bytes already stored under this version, else stages a fresh file
    /// (dropping an earlier upload of the same artifact).
    pub fn begin(
        &mut self,
        ctx: &Ctx,
        client: &str,
        call: calls::UploadBegin,
    ) -> Result<UploadStart, OpError> {
        let calls::UploadBegin {
            kind,
            version,
            name,
            size,
            artifact,
            chunk_size,
            notes,
        } = call;
        validate_version(&version).map_err(OpError::Refused)?;
        if name.len() > 255 || notes.as_ref().is_some_and(|n| n.len() > 4096) {
            return refused("file name (255) or notes (4096 bytes) too long");
        }
        let store = &ctx.store;
        if let Some(existing) = store.artifact_for_version(&kind, &version)? {
            if existing.id != artifact {
                let removed = match existing.removed_at_ms {
                    Some(_) => ", since removed",
                    None => "",
                };
                return refused(format!(
                    "{kind} {version} is already uploaded with different bytes (artifact {}{removed}); versions are immutable: upload under a new version",
                    existing.id.short()
                ));
            }
            if existing.removed_at_ms.is_none() && ctx.files.exists(&artifact) {
                return Ok(UploadStart::Stored(existing));
            }
            // The same bytes again, after `artifact_remove` (or with its files lost): staged
            // like a first upload, and stored again at commit.
        } else if let Some(existing) = store.artifact(&artifact)? {
            // Bytes removed that no release names any more (a version mistyped at upload, say)
            // may be uploaded again as another kind and version; that frees the old version.
            let naming: Vec<fleetcast_proto::ReleaseId> = store
                .releases()?
                .into_iter()
                .filter(|r| r.artifact.id == artifact)
                .map(|r| r.id)
                .collect();
            if existing.removed_at_ms.is_none() {
                return refused(format!(
                    "these exact bytes are already uploaded as {} {} (artifact {}); an artifact id is its content hash, so it has one kind and version; to upload them as another version, remove that one first (fleetcast artifact remove --kind {} --version {})",
                    existing.kind, existing.version, artifact.short(), existing.kind, existing.version
                ));
            }
            if !naming.is_empty() {
                return refused(format!(
                    "these exact bytes were uploaded as {} {} (artifact {}, since removed), and release(s) {} still name them; remove those releases first (fleetcast release remove), then upload the bytes as another version",
                    existing.kind,
                    existing.version,
                    artifact.short(),
                    naming.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ));
            }
            tracing::info!(artifact = %artifact.short(), from_kind = %existing.kind, from_version = %existing.version,
                to_kind = %kind, to_version = %version, "removed bytes uploaded again as another version");
        }
        let layout = Layout::new(size, chunk_size)
            .map_err(|e| OpError::Refused(format!("cannot upload: {e}")))?;
        if layout.chunks > MAX_UPLOAD_PARTS {
            return refused(format!(
                "cannot upload: {} parts of {chunk_size} bytes is more than {MAX_UPLOAD_PARTS}; use a larger chunk size",
                layout.chunks
            ));
        }
        if let Some(old) = self.staged.remove(&artifact) {
            ctx.files.discard(old.upload);
        }
        let upload = ctx.files.begin_upload(artifact, size, chunk_size)?;
        self.staged.insert(
            artifact,
            Staged {
                upload,
                kind,
                version,
                name,
                notes,
                client: client.to_owned(),
                failed: None,
                touched: Instant::now(),
            },
        );
        Ok(UploadStart::Ready {
            parts: layout.chunks,
            part_size: chunk_size,
        })
    }

    /// Writes one authenticated part from `client`. A part for no upload in progress, for
    /// another client's upload or for a failed one is dropped; a write error other than a
    /// bad index or length (disk full) fails the upload, reported at commit.
    pub async fn part(&mut self, client: &str, header: &FrameHeader, bytes: &[u8]) {
        let Some(staged) = self.staged.get_mut(&header.artifact) else {
            tracing::debug!(client, artifact = %header.artifact.short(), "upload part for no upload in progress dropped");
            return;
        };
        if staged.client != client || staged.failed.is_some() {
            return;
        }
        staged.touched = Instant::now();
        // The write runs on the blocking pool; this loop waits for it (parts arrive in order
        // from one client, and the disk is the limit anyway).
        let written = match staged.upload.part(header.index, bytes.len()) {
            Ok(part) => {
                let bytes = bytes.to_vec();
                match tokio::task::spawn_blocking(move || part.write(&bytes).map(|()| part.index))
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(client, error = %e, "upload write task failed");
                        return;
                    }
                }
            }
            Err(e) => Err(e),
        };
        let Some(staged) = self.staged.get_mut(&header.artifact) else {
            return;
        };
        match written {
            Ok(index) => staged.upload.mark_received(index),
            Err(e) => {
                tracing::warn!(client, artifact = %header.artifact.short(), error = %e, "upload part not stored");
                if matches!(e, ArtifactError::Io { .. }) {
                    staged.failed = Some(e.to_string());
                }
            }
        }
    }

    /// `upload_commit` from `client`: the parts still missing, or the verified artifact,
    /// stored durably. Committing bytes already stored answers `Stored` again (a retry).
    pub async fn commit(
        &mut self,
        ctx: &Ctx,
        client: &str,
        call: calls::UploadCommit,
    ) -> Result<UploadEnd, OpError> {
        let artifact = call.artifact;
        let Some(mut staged) = self.staged.remove(&artifact) else {
            if let Some(info) = ctx.store.artifact(&artifact)? {
                if info.removed_at_ms.is_none() {
                    return Ok(UploadEnd::Stored(info));
                }
            }
            return refused(format!(
                "no upload of artifact {} in progress (start with upload_begin)",
                artifact.short()
            ));
        };
        if staged.client != client {
            self.staged.insert(artifact, staged);
            return refused("this upload belongs to another client");
        }
        if let Some(why) = staged.failed {
            ctx.files.discard(staged.upload);
            return refused(format!("upload failed and was discarded: {why}"));
        }
        let missing = staged.upload.missing();
        if !missing.is_empty() {
            staged.touched = Instant::now();
            self.staged.insert(artifact, staged);
            return Ok(UploadEnd::Missing(missing));
        }
        let Staged {
            upload,
            kind,
            version,
            name,
            notes,
            ..
        } = staged;
        let layout = upload.layout;
        let files = ctx.files.clone();
        tokio::task::spawn_blocking(move || files.commit(upload))
            .await
            .map_err(|e| OpError::Refused(format!("commit task failed: {e}")))??;
        let info = ArtifactInfo {
            id: artifact,
            kind,
            version,
            name,
            size: layout.size,
            chunk_size: layout.chunk_size,
            notes,
            uploaded_at_ms: now_ms(),
            removed_at_ms: None,
        };
        ctx.store.put_artifact(&info)?;
        ctx.store.flush_async().await?;
        tracing::info!(artifact = %artifact.short(), kind = %info.kind, version = %info.version, size = info.size, "artifact stored");
        Ok(UploadEnd::Stored(info))
    }

    /// Drops uploads idle for [`UPLOAD_IDLE`] with their staging files.
    pub fn drop_abandoned(&mut self, files: &ArtifactStore) {
        let idle: Vec<ArtifactId> = self
            .staged
            .iter()
            .filter(|(_, s)| s.touched.elapsed() >= UPLOAD_IDLE)
            .map(|(a, _)| *a)
            .collect();
        for artifact in idle {
            if let Some(s) = self.staged.remove(&artifact) {
                tracing::warn!(artifact = %artifact.short(), client = %s.client, "abandoned upload dropped");
                files.discard(s.upload);
            }
        }
    }

    /// Drops every upload in progress with its staging file (shutdown).
    pub fn discard_all(&mut self, files: &ArtifactStore) {
        for (_, s) in self.staged.drain() {
            files.discard(s.upload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::chunk::FrameType;
    use std::sync::Arc;

    struct Fixture {
        dir: tempfile::TempDir,
        /// Keeps the client's request queue open; never polled.
        _eventloop: rumqttc::EventLoop,
        ctx: Arc<Ctx>,
        uploads: Uploads,
    }

    fn fixture() -> Fixture {
        let (dir, eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        Fixture {
            dir,
            _eventloop: eventloop,
            ctx,
            uploads: Uploads::default(),
        }
    }

    fn bytes(seed: u8) -> Vec<u8> {
        (0..2500u32).map(|i| (i as u8).wrapping_mul(seed)).collect()
    }

    /// `upload_begin` of `data` as app `version`, in parts of 1 KiB.
    fn try_begin(
        f: &mut Fixture,
        client: &str,
        version: &str,
        data: &[u8],
    ) -> Result<UploadStart, OpError> {
        f.uploads.begin(
            &f.ctx,
            client,
            calls::UploadBegin {
                kind: Kind::new("app").unwrap(),
                version: version.into(),
                name: "a.bin".into(),
                size: data.len() as u64,
                artifact: ArtifactId::of(data),
                chunk_size: 1024,
                notes: None,
            },
        )
    }

    /// [`try_begin`], which must answer that the 3 parts are to be sent.
    fn begin(f: &mut Fixture, client: &str, version: &str, data: &[u8]) -> ArtifactId {
        let artifact = ArtifactId::of(data);
        let reply = try_begin(f, client, version, data).unwrap();
        assert!(
            matches!(reply, UploadStart::Ready { parts: 3, .. }),
            "{reply:?}"
        );
        artifact
    }

    async fn send_part(
        f: &mut Fixture,
        client: &str,
        artifact: ArtifactId,
        data: &[u8],
        index: u32,
    ) {
        let header = FrameHeader {
            frame_type: FrameType::UploadPart,
            artifact,
            index,
            total: 3,
        };
        let start = index as usize * 1024;
        let part = &data[start..data.len().min(start + 1024)];
        f.uploads.part(client, &header, part).await;
    }

    async fn commit(
        f: &mut Fixture,
        client: &str,
        artifact: ArtifactId,
    ) -> Result<UploadEnd, OpError> {
        f.uploads
            .commit(&f.ctx, client, calls::UploadCommit { artifact })
            .await
    }

    fn staging_files(f: &Fixture) -> usize {
        std::fs::read_dir(f.dir.path().join("uploads"))
            .unwrap()
            .count()
    }

    #[tokio::test]
    async fn concurrent_uploads_of_different_artifacts_both_commit() {
        let mut f = fixture();
        let (one, two) = (bytes(3), bytes(5));
        let a = begin(&mut f, "fleetcast-op-admin.a", "1.0", &one);
        let b = begin(&mut f, "fleetcast-op-admin.b", "2.0", &two);
        for i in 0..3 {
            send_part(&mut f, "fleetcast-op-admin.a", a, &one, i).await;
            send_part(&mut f, "fleetcast-op-admin.b", b, &two, 2 - i).await;
        }
        // A part for no upload in progress changes nothing.
        send_part(
            &mut f,
            "fleetcast-op-admin.a",
            ArtifactId::of(b"none"),
            &one,
            0,
        )
        .await;
        for (client, id) in [("fleetcast-op-admin.a", a), ("fleetcast-op-admin.b", b)] {
            let reply = commit(&mut f, client, id).await.unwrap();
            assert!(matches!(reply, UploadEnd::Stored(_)), "{reply:?}");
            assert!(f.ctx.files.exists(&id));
        }
        assert_eq!(staging_files(&f), 0);
    }

    #[tokio::test]
    async fn a_removed_artifact_comes_back_only_with_the_same_bytes() {
        let mut f = fixture();
        let data = bytes(3);
        let client = "fleetcast-op-admin.a";
        let a = begin(&mut f, client, "1.0", &data);
        for i in 0..3 {
            send_part(&mut f, client, a, &data, i).await;
        }
        commit(&mut f, client, a).await.unwrap();
        crate::ops::artifacts::remove(
            &f.ctx,
            calls::ArtifactRemove {
                kind: Kind::new("app").unwrap(),
                version: "1.0".into(),
            },
        )
        .await
        .unwrap();
        assert!(!f.ctx.files.exists(&a));
        // Committing it again is no retry of a stored upload: it was removed.
        let err = commit(&mut f, client, a).await.unwrap_err();
        assert!(err.to_string().contains("no upload of artifact"), "{err}");
        // Other bytes under the removed version: refused, versions are immutable.
        let err = try_begin(&mut f, client, "1.0", &bytes(5)).unwrap_err();
        assert!(
            err.to_string()
                .contains("already uploaded with different bytes")
                && err.to_string().contains("since removed"),
            "{err}"
        );
        // The same bytes: uploaded and stored again, no longer removed.
        assert_eq!(begin(&mut f, client, "1.0", &data), a);
        for i in 0..3 {
            send_part(&mut f, client, a, &data, i).await;
        }
        let UploadEnd::Stored(info) = commit(&mut f, client, a).await.unwrap() else {
            panic!("not stored");
        };
        assert_eq!(info.removed_at_ms, None);
        assert_eq!(f.ctx.store.artifact(&a).unwrap(), Some(info));
        assert!(f.ctx.files.exists(&a));
    }

    /// A version mistyped at upload (`v2.4.0`) bound the bytes to it for good, even once
    /// removed, and a vendor-signed image cannot change its bytes. Removed bytes that no release
    /// names may now be uploaded again as another version, which frees the old one; bytes in
    /// use are still refused, with the way out.
    #[tokio::test]
    async fn removed_bytes_no_release_names_can_be_uploaded_as_another_version() {
        let mut f = fixture();
        let data = bytes(3);
        let client = "fleetcast-op-admin.a";
        let app = Kind::new("app").unwrap();
        let a = begin(&mut f, client, "v1.0", &data);
        for i in 0..3 {
            send_part(&mut f, client, a, &data, i).await;
        }
        commit(&mut f, client, a).await.unwrap();
        let err = try_begin(&mut f, client, "1.0", &data).unwrap_err();
        assert!(
            err.to_string()
                .contains("artifact remove --kind app --version v1.0"),
            "{err}"
        );
        crate::ops::artifacts::remove(
            &f.ctx,
            calls::ArtifactRemove {
                kind: app.clone(),
                version: "v1.0".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(begin(&mut f, client, "1.0", &data), a);
        for i in 0..3 {
            send_part(&mut f, client, a, &data, i).await;
        }
        let UploadEnd::Stored(info) = commit(&mut f, client, a).await.unwrap() else {
            panic!("not stored");
        };
        assert_eq!((info.version.as_str(), info.removed_at_ms), ("1.0", None));
        let store = &f.ctx.store;
        assert_eq!(store.artifact_for_version(&app, "1.0").unwrap(), Some(info));
        assert_eq!(store.artifact_for_version(&app, "v1.0").unwrap(), None);
        // The old version is free: other bytes may take it.
        let other = bytes(5);
        begin(&mut f, client, "v1.0", &other);

        // Removed bytes that a release still names keep their version, and the refusal names
        // the release.
        let named = bytes(7);
        let n = begin(&mut f, client, "2.0", &named);
        for i in 0..3 {
            send_part(&mut f, client, n, &named, i).await;
        }
        commit(&mut f, client, n).await.unwrap();
        let mut r = crate::fixtures::release("r-000009", "2.0");
        r.artifact.id = n;
        f.ctx.store.transaction(|tx| tx.put_release(&r)).unwrap();
        crate::ops::artifacts::remove(
            &f.ctx,
            calls::ArtifactRemove {
                kind: app.clone(),
                version: "2.0".into(),
            },
        )
        .await
        .unwrap();
        let err = try_begin(&mut f, client, "2.1", &named).unwrap_err();
        assert!(
            err.to_string()
                .contains("release(s) r-000009 still name them"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_abandoned_upload_is_dropped_with_its_staging_file() {
        let mut f = fixture();
        let data = bytes(7);
        let a = begin(&mut f, "fleetcast-op-admin.a", "1.0", &data);
        send_part(&mut f, "fleetcast-op-admin.a", a, &data, 0).await;
        assert_eq!(staging_files(&f), 1);
        f.uploads.drop_abandoned(&f.ctx.files);
        assert_eq!(f.uploads.len(), 1, "an active upload is kept");
        // The client went away: nothing for longer than UPLOAD_IDLE (moved back, not waited).
        let idle_since = Instant::now()
            .checked_sub(UPLOAD_IDLE + Duration::from_secs(1))
            .unwrap();
        f.uploads.staged.get_mut(&a).unwrap().touched = idle_since;
        f.uploads.drop_abandoned(&f.ctx.files);
        assert!(f.uploads.is_empty());
        assert_eq!(staging_files(&f), 0);
        let err = commit(&mut f, "fleetcast-op-admin.a", a).await.unwrap_err();
        assert!(err.to_string().contains("no upload of artifact"), "{err}");
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_upload_with_a_clear_error() {
        let mut f = fixture();
        let data = bytes(9);
        let artifact = ArtifactId::of(&data);
        // The staging file is /dev/full: every write fails with ENOSPC.
        let staging = f
            .dir
            .path()
            .join("uploads")
            .join(format!("{}.part", artifact.to_hex()));
        std::os::unix::fs::symlink("/dev/full", &staging).unwrap();
        begin(&mut f, "fleetcast-op-admin.a", "1.0", &data);
        for i in 0..3 {
            send_part(&mut f, "fleetcast-op-admin.a", artifact, &data, i).await;
        }
        let err = commit(&mut f, "fleetcast-op-admin.a", artifact)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("upload failed") && text.contains("No space left on device"),
            "{text}"
        );
        assert!(f.uploads.is_empty());
        assert!(!f.ctx.files.exists(&artifact));
    }

    #[tokio::test]
    async fn an_upload_with_more_parts_than_the_platform_tracks_is_refused_before_allocating() {
        let mut f = fixture();
        let err = f
            .uploads
            .begin(
                &f.ctx,
                "fleetcast-op-admin.a",
                calls::UploadBegin {
                    kind: Kind::new("app").unwrap(),
                    version: "9.9".into(),
                    name: "huge.bin".into(),
                    size: (MAX_UPLOAD_PARTS as u64 + 1) * 1024,
                    artifact: ArtifactId::of(b"huge"),
                    chunk_size: 1024,
                    notes: None,
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("larger chunk size"), "{err}");
        assert!(f.uploads.is_empty());
        assert_eq!(staging_files(&f), 0);
    }
}
