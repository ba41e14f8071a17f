//! A/B slots: `{root}/a` and `{root}/b` each hold `artifact`, `version` and `artifact_id`;
//! `{root}/current` is a symlink to the active slot, replaced atomically (new symlink, rename).
//! Install writes the inactive slot, switches, health-checks, and switches back on failure.

use std::path::{Path, PathBuf};

use fleetcast_proto::{ArtifactId, Kind};

use super::{HealthCheck, InstallError};
use crate::fsutil::{sync_dir, write_atomic};

const SLOTS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
pub struct SlotsInstaller {
    root: PathBuf,
    kind: Kind,
    health: HealthCheck,
}

impl SlotsInstaller {
    pub fn new(root: PathBuf, kind: Kind, health: HealthCheck) -> Self {
        Self { root, kind, health }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
        let (kind, path) = (self.kind.clone(), path.to_owned());
        move |error| InstallError::Io {
            kind,
            op,
            path,
            error,
        }
    }

    /// The active slot's name, if any.
    pub fn active(&self) -> Option<&'static str> {
        let target = std::fs::read_link(self.root.join("current")).ok()?;
        SLOTS.into_iter().find(|s| target == Path::new(s))
    }

    fn slot_artifact(&self, slot: &str) -> Option<ArtifactId> {
        std::fs::read_to_string(self.root.join(slot).join("artifact_id"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn other(slot: &str) -> &'static str {
        if slot == "a" {
            "b"
        } else {
            "a"
        }
    }

    fn switch_to(&self, slot: &str) -> Result<(), InstallError> {
        let tmp = self.root.join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        #[cfg(unix)]
        std::os::unix::fs::symlink(slot, &tmp).map_err(self.io("create symlink", &tmp))?;
        #[cfg(not(unix))]
        compile_error!("the slots installer needs symlinks (unix)");
        let current = self.root.join("current");
        std::fs::rename(&tmp, &current).map_err(self.io("rename", &current))?;
        sync_dir(&self.root).map_err(self.io("fsync", &self.root))
    }

    fn clear_current(&self) -> Result<(), InstallError> {
        let current = self.root.join("current");
        match std::fs::remove_file(&current) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io("remove", &current)(e)),
        }
        sync_dir(&self.root).map_err(self.io("fsync", &self.root))
    }

    fn fill_slot(
        &self,
        slot: &str,
        version: &str,
        artifact: ArtifactId,
        file: &Path,
    ) -> Result<(), InstallError> {
        let dir = self.root.join(slot);
        std::fs::create_dir_all(&dir).map_err(self.io("create", &dir))?;
        // Mark the slot invalid first, so a crash mid-copy never leaves a slot that claims
        // an artifact it does not hold.
        let id_file = dir.join("artifact_id");
        match std::fs::remove_file(&id_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io("remove", &id_file)(e)),
        }
        let tmp = dir.join("artifact.tmp");
        // A leftover of a crash may be a link to `file` itself: copying onto it would
        // truncate the downloaded artifact.
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io("remove", &tmp)(e)),
        }
        link_or_copy(file, &tmp).map_err(self.io("copy artifact to", &tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(self.io("fsync", &tmp))?;
        let dest = dir.join("artifact");
        std::fs::rename(&tmp, &dest).map_err(self.io("rename", &dest))?;
        write_atomic(&dir.join("version"), version.as_bytes())
            .map_err(self.io("write", &dir.join("version")))?;
        write_atomic(&id_file, artifact.to_hex().as_bytes()).map_err(self.io("write", &id_file))?;
        Ok(())
    }

    pub async fn install(
        &self,
        version: &str,
        artifact: ArtifactId,
        file: &Path,
    ) -> Result<(), InstallError> {
        let this = self.clone();
        let (v, f) = (version.to_owned(), file.to_owned());
        // Returns the slot to switch back to if the health check fails.
        let switched = tokio::task::spawn_blocking(move || this.install_blocking(&v, artifact, &f))
            .await
            .map_err(|e| InstallError::Failed {
                kind: self.kind.clone(),
                version: version.to_owned(),
                reason: format!("install task failed: {e}"),
            })??;
        if let Err(reason) = self.health.check(version).await {
            self.off_runtime(move |this| match switched {
                Some(back) => this.switch_to(back),
                // Nothing was current before this install (the machine ran its shipped
                // version): restore exactly that, so the unhealthy version is not left active.
                None => this.clear_current(),
            })
            .await?;
            return Err(InstallError::Unhealthy {
                kind: self.kind.clone(),
                version: version.to_owned(),
                reason,
            });
        }
        Ok(())
    }

    fn install_blocking(
        &self,
        version: &str,
        artifact: ArtifactId,
        file: &Path,
    ) -> Result<Option<&'static str>, InstallError> {
        std::fs::create_dir_all(&self.root).map_err(self.io("create", &self.root))?;
        let active = self.active();
        if let Some(active) = active {
            if self.slot_artifact(active) == Some(artifact) {
                // A re-run after a crash past the switch: only the health check is left.
                let other = Self::other(active);
                return Ok(self.slot_artifact(other).map(|_| other));
            }
        }
        let target = active.map_or("a", Self::other);
        if self.slot_artifact(target) != Some(artifact) {
            if !file.exists() {
                return Err(InstallError::Failed {
                    kind: self.kind.clone(),
                    version: version.to_owned(),
                    reason: format!("artifact file {} is missing", file.display()),
                });
            }
            self.fill_slot(target, version, artifact, file)
                .map_err(|e| InstallError::Failed {
                    kind: self.kind.clone(),
                    version: version.to_owned(),
                    reason: e.to_string(),
                })?;
        }
        self.switch_to(target)?;
        Ok(active)
    }

    /// Runs `work` (file system calls) on the blocking pool, not on the runtime's threads.
    async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Self) -> Result<T, InstallError> + Send + 'static,
    ) -> Result<T, InstallError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || work(&this))
            .await
            .unwrap_or_else(|e| Err(self.io("switch", &self.root)(std::io::Error::other(e))))
    }

    /// Makes the other slot active, if it holds anything.
    pub async fn rollback(&self) -> Result<(), InstallError> {
        self.off_runtime(Self::rollback_blocking).await
    }

    fn rollback_blocking(&self) -> Result<(), InstallError> {
        let Some(active) = self.active() else {
            return Err(InstallError::Failed {
                kind: self.kind.clone(),
                version: String::new(),
                reason: "no active slot".into(),
            });
        };
        let other = Self::other(active);
        if self.slot_artifact(other).is_none() {
            return Err(InstallError::Failed {
                kind: self.kind.clone(),
                version: String::new(),
                reason: format!("slot {other} is empty"),
            });
        }
        self.switch_to(other)
    }
}

/// Puts `file` at `dest` as a hard link where both are on one file system, else as a copy.
///
/// Why a link: the downloaded artifact is complete and never written again (a download ends by
/// renaming its part file into place, and a new one of the same artifact makes a new file), so
/// the slot can share its bytes. Copying them wrote the whole image a second time on every
/// install: on a machine, that much flash wear again; in the simulator, a sixth of its CPU in
/// a 1,000-machine rollout (perf: `fill_slot`'s copy). Slots on a partition of their own get a
/// copy, as before.
fn link_or_copy(file: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(file, dest) {
        Ok(()) => Ok(()),
        Err(_) => std::fs::copy(file, dest).map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(health: HealthCheck) -> (tempfile::TempDir, SlotsInstaller) {
        let dir = tempfile::tempdir().unwrap();
        let s = SlotsInstaller::new(
            dir.path().join("slots/app"),
            Kind::new("app").unwrap(),
            health,
        );
        (dir, s)
    }

    fn artifact(dir: &Path, bytes: &[u8]) -> (ArtifactId, PathBuf) {
        let p = dir.join(hex::encode(&blake3::hash(bytes).as_bytes()[..4]));
        std::fs::write(&p, bytes).unwrap();
        (ArtifactId::of(bytes), p)
    }

    #[tokio::test]
    async fn installs_alternate_slots_and_switch_current() {
        let (dir, s) = setup(HealthCheck::None);
        let (a1, p1) = artifact(dir.path(), b"one");
        s.install("1", a1, &p1).await.unwrap();
        assert_eq!(s.active(), Some("a"));
        let (a2, p2) = artifact(dir.path(), b"two");
        s.install("2", a2, &p2).await.unwrap();
        assert_eq!(s.active(), Some("b"));
        assert_eq!(
            std::fs::read(s.root().join("current/artifact")).unwrap(),
            b"two"
        );
        // Idempotent re-run.
        s.install("2", a2, &p2).await.unwrap();
        assert_eq!(s.active(), Some("b"));
        s.rollback().await.unwrap();
        assert_eq!(
            std::fs::read(s.root().join("current/version")).unwrap(),
            b"1"
        );
    }

    #[tokio::test]
    async fn an_unhealthy_version_is_switched_back() {
        let (dir, s) = setup(HealthCheck::Shell(
            "test \"$FLEETCAST_VERSION\" != 2".into(),
        ));
        let (a1, p1) = artifact(dir.path(), b"one");
        s.install("1", a1, &p1).await.unwrap();
        let (a2, p2) = artifact(dir.path(), b"two");
        let err = s.install("2", a2, &p2).await.unwrap_err();
        assert!(matches!(err, InstallError::Unhealthy { .. }), "{err}");
        assert_eq!(s.active(), Some("a"));
    }

    #[tokio::test]
    async fn an_unhealthy_first_install_does_not_stay_current() {
        // The machine runs its shipped version outside the slots; the first slots install
        // fails its health check, so there is no slot to switch back to.
        let (dir, s) = setup(HealthCheck::Shell("false".into()));
        let (a1, p1) = artifact(dir.path(), b"one");
        let err = s.install("1", a1, &p1).await.unwrap_err();
        assert!(matches!(err, InstallError::Unhealthy { .. }), "{err}");
        assert_eq!(s.active(), None);
        assert!(std::fs::symlink_metadata(s.root().join("current")).is_err());
    }

    #[tokio::test]
    async fn a_missing_artifact_fails_before_switching() {
        let (dir, s) = setup(HealthCheck::None);
        let err = s
            .install("1", ArtifactId::of(b"x"), &dir.path().join("nope"))
            .await
            .unwrap_err();
        assert!(matches!(err, InstallError::Failed { .. }), "{err}");
        assert_eq!(s.active(), None);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_slot_shares_the_downloaded_file_and_a_crash_leftover_does_not_truncate_it() {
        use std::os::unix::fs::MetadataExt;
        let (dir, s) = setup(HealthCheck::None);
        let (a1, p1) = artifact(dir.path(), b"one");
        s.install("1", a1, &p1).await.unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(&s.root().join("a/artifact")),
            ino(&p1),
            "one file system: the slot is a link, not a second copy"
        );
        // A crash between the link and its rename leaves `artifact.tmp` linked to the
        // download of the next install; that install must not write through it.
        let (a2, p2) = artifact(dir.path(), b"two, longer than one");
        std::fs::create_dir_all(s.root().join("b")).unwrap();
        std::fs::hard_link(&p2, s.root().join("b/artifact.tmp")).unwrap();
        s.install("2", a2, &p2).await.unwrap();
        assert_eq!(std::fs::read(&p2).unwrap(), b"two, longer than one");
        assert_eq!(
            std::fs::read(s.root().join("current/artifact")).unwrap(),
            b"two, longer than one"
        );
    }

    #[tokio::test]
    async fn a_slot_on_another_file_system_gets_a_copy() {
        // /dev/shm is tmpfs where it exists; the temp dir usually is not. Where both are one
        // file system this has nothing to show and says so.
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("no /dev/shm: nothing to check");
            return;
        };
        let (dir, _) = setup(HealthCheck::None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
            if dev(other.path()) == dev(dir.path()) {
                eprintln!("/dev/shm and the temp dir are one file system: nothing to check");
                return;
            }
        }
        let s = SlotsInstaller::new(
            other.path().join("slots/app"),
            Kind::new("app").unwrap(),
            HealthCheck::None,
        );
        let (a1, p1) = artifact(dir.path(), b"one");
        s.install("1", a1, &p1).await.unwrap();
        assert_eq!(
            std::fs::read(s.root().join("current/artifact")).unwrap(),
            b"one"
        );
    }
}
