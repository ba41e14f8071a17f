//! Backups of a running platform (`fleetcast db backup`, the admin op `db_backup`).
//!
//! A backup is a new directory `backups/<UTC time>` of the data dir, laid out as a data dir,
//! so `fleetcast serve --data` that directory starts the platform as it was:
//! - `db/`: the database copied record by record into a fresh sled database, read back and
//!   compared, as a compaction copies;
//! - `platform.key`, `platform.pub`, `key-chain.json`, `admin.secret`: the keys in force;
//! - `artifacts/`: the files of every artifact not removed (its bytes and its manifest), hard
//!   links where the file system allows (the files never change once uploaded, so a link is a
//!   copy that takes no space), copies where it does not (`backups` on another disk).
//!
//! All three are taken with every store write held ([`Store::backup_online`]), so they agree:
//! each artifact record in the copy has its files (an artifact's record is marked removed,
//! and flushed, before its files go), and the keys are the ones the copied notices were signed
//! with. It is built as `backups/.<name>.partial` and renamed into place once every file is on
//! disk, so a directory without the suffix is a whole backup; a partial one a crash left is
//! deleted by the next backup.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::artifacts::ArtifactStore;
use crate::keys::Keys;
use crate::store::compact::CompactError;
use crate::store::Store;

/// The directory of the data dir that holds the backups.
pub const DIR: &str = "backups";
/// The suffix of a backup being made.
const PARTIAL: &str = ".partial";

/// One backup at a time: a second, asked for meanwhile, is refused.
static RUNNING: Mutex<()> = Mutex::new(());

/// What a backup made.
#[derive(Debug)]
pub struct Made {
    pub path: PathBuf,
    pub db: crate::store::compact::Report,
    pub artifact_files: u64,
    pub artifact_bytes: u64,
    /// Artifact files copied because they could not be linked.
    pub artifact_files_copied: u64,
    pub key_gen: u32,
    /// From the hold on writes to its end: the database's copy, the keys and the links.
    pub writes_held: Duration,
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("a backup is being made already; try again when it is done")]
    Running,
    #[error("this platform's store keeps nothing on disk to back up")]
    NoFiles,
    #[error("{step} {path} failed: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Copy(#[from] CompactError),
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BackupError {
    let path = path.to_owned();
    move |source| BackupError::Io { step, path, source }
}

/// Backs up the platform whose data dir is `data_dir` into `backups/<name>` ([`name_at`] of
/// `now_ms`, with `-2`, `-3`, ... when that exists): the database of `store`, the keys `keys`
/// returns (read with the writes held), and the artifacts in `files`. Blocks for as long as
/// the copy takes: call it off the async threads.
pub fn make(
    store: &dyn Store,
    files: &ArtifactStore,
    keys: &dyn Fn() -> Arc<Keys>,
    data_dir: &Path,
    now_ms: u64,
) -> Result<Made, BackupError> {
    let start = Instant::now();
    let Ok(_one) = RUNNING.try_lock() else {
        return Err(BackupError::Running);
    };
    let root = data_dir.join(DIR);
    private_dir(&root, true)?;
    delete_partial(&root);
    let name = free_name(&root, &name_at(now_ms));
    let partial = root.join(format!(".{name}{PARTIAL}"));
    private_dir(&partial, false)?;
    let result = fill(store, files, keys, &partial).and_then(|filled| {
        sync_dir(&partial)?;
        let path = root.join(&name);
        fs::rename(&partial, &path).map_err(io_err("renaming into place", &path))?;
        sync_dir(&root)?;
        Ok(Made {
            path,
            took: start.elapsed(),
            ..filled
        })
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

/// The database, keys and artifacts, into `dir`, with every write held.
fn fill(
    store: &dyn Store,
    files: &ArtifactStore,
    keys: &dyn Fn() -> Arc<Keys>,
    dir: &Path,
) -> Result<Made, BackupError> {
    let held = Instant::now();
    let mut links = Links::default();
    let mut key_gen = 0;
    let mut also = || -> Result<(), CompactError> {
        let keys = keys();
        key_gen = keys.generation();
        crate::keys::write_all(dir, &keys).map_err(|e| CompactError::Io {
            step: "writing the keys into",
            path: dir.to_owned(),
            source: io::Error::other(e.to_string()),
        })?;
        links.artifacts(store, files, &dir.join("artifacts"))
    };
    let db = store
        .backup_online(&dir.join("db"), &mut also)
        .ok_or(BackupError::NoFiles)??;
    let writes_held = held.elapsed();
    Ok(Made {
        path: dir.to_owned(),
        db,
        artifact_files: links.files,
        artifact_bytes: links.bytes,
        artifact_files_copied: links.copied,
        key_gen,
        writes_held,
        took: Duration::ZERO,
    })
}

/// The artifact files put into a backup.
#[derive(Default)]
struct Links {
    files: u64,
    bytes: u64,
    copied: u64,
}

impl Links {
    /// Every artifact not removed, its bytes and its manifest, into `to`.
    fn artifacts(
        &mut self,
        store: &dyn Store,
        files: &ArtifactStore,
        to: &Path,
    ) -> Result<(), CompactError> {
        let io = |step: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| CompactError::Io { step, path, source }
        };
        fs::create_dir(to).map_err(io("creating", to))?;
        let artifacts = store.artifacts().map_err(|e| CompactError::Io {
            step: "listing the artifacts for",
            path: to.to_owned(),
            source: io::Error::other(e.to_string()),
        })?;
        for a in artifacts.iter().filter(|a| a.removed_at_ms.is_none()) {
            for from in [files.path(&a.id), files.manifest_path(&a.id)] {
                let Some(name) = from.file_name() else {
                    continue;
                };
                let dest = to.join(name);
                let len = fs::metadata(&from)
                    .map_err(io("reading the artifact file", &from))?
                    .len();
                if fs::hard_link(&from, &dest).is_err() {
                    fs::copy(&from, &dest).map_err(io("copying", &from))?;
                    fs::File::open(&dest)
                        .and_then(|f| f.sync_all())
                        .map_err(io("syncing", &dest))?;
                    self.copied += 1;
                }
                self.files += 1;
                self.bytes += len;
            }
        }
        fs::File::open(to)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", to))
    }
}

/// A backup's name: its UTC time to the second, `2026-11-30T01-05-09Z` (no colons: the name is
/// also a path on file systems and in tools that take a colon for something else).
pub fn name_at(now_ms: u64) -> String {
    use chrono::TimeZone;
    let at = i64::try_from(now_ms).unwrap_or(i64::MAX);
    match chrono::Utc.timestamp_millis_opt(at).single() {
        Some(t) => t.format("%Y-%m-%dT%H-%M-%SZ").to_string(),
        None => format!("at-{now_ms}"),
    }
}

/// `name`, or `name-2`, `name-3`, ... : the first that is not in `root` (two backups within a
/// second).
fn free_name(root: &Path, name: &str) -> String {
    (1..)
        .map(|n| match n {
            1 => name.to_owned(),
            n => format!("{name}-{n}"),
        })
        .find(|n| !root.join(n).exists() && !root.join(format!(".{n}{PARTIAL}")).exists())
        .unwrap_or_else(|| name.to_owned())
}

/// Creates `dir` readable by its owner alone (a backup holds every identity's secret), or
/// with `existing` takes an existing one to 0700.
fn private_dir(dir: &Path, existing: bool) -> Result<(), BackupError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if existing && e.kind() == io::ErrorKind::AlreadyExists => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("making private", dir))
        }
        Err(e) => Err(io_err("creating", dir)(e)),
    }
}

/// Deletes the partial backups a crash left in `root`.
fn delete_partial(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(PARTIAL) {
            match fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), "deleted a backup a crash left unfinished")
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot delete a backup a crash left unfinished")
                }
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_is_named_by_its_utc_second() {
        assert_eq!(name_at(0), "1970-01-01T00-00-00Z");
        // 2026-11-30 01:05:09.750 UTC.
        assert_eq!(name_at(1_796_000_709_750), "2026-11-30T01-05-09Z");
        // A leap day.
        assert_eq!(name_at(951_782_400_000), "2000-02-29T00-00-00Z");
    }

    #[test]
    fn a_second_backup_within_the_second_gets_a_name_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let n = "2026-11-30T01-05-09Z";
        assert_eq!(free_name(dir.path(), n), n);
        fs::create_dir(dir.path().join(n)).unwrap();
        assert_eq!(free_name(dir.path(), n), format!("{n}-2"));
        fs::create_dir(dir.path().join(format!(".{n}-2{PARTIAL}"))).unwrap();
        assert_eq!(free_name(dir.path(), n), format!("{n}-3"));
    }
}
