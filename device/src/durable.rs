//! The group-commit writer: crash-safe small-file writes off the async runtime's threads.
//!
//! One writer per process ([`shared`]; every agent of a simulator uses it), on its own thread.
//! A caller submits `(path, bytes)` and awaits the answer. The thread takes everything pending,
//! writes each file to a temp file in its target directory, makes the temp files durable, renames
//! them into place, fsyncs each distinct directory once, and only then answers every waiter: when
//! [`Writer::write`] returns `Ok`, the bytes are on disk, exactly as after
//! [`crate::fsutil::write_atomic`]. A path submitted again while still pending is written once
//! with the latest bytes; every waiter for it is answered when those are durable.
//!
//! Durability: one `fsync` per file for a small batch; for a large one a single `syncfs` per
//! filesystem, which measured 30x faster here (1,000 files of 600 bytes: 3.5 s fsyncing each,
//! 0.12 s with one `syncfs`). A single machine's agent writes one or two files at a time and
//! never causes a `syncfs` of the whole disk.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use tokio::sync::oneshot;

/// From this many files in one batch, one `syncfs` per filesystem replaces the per-file fsyncs.
const SYNCFS_FROM: usize = 16;

type Answer = oneshot::Sender<std::io::Result<()>>;

struct Request {
    path: PathBuf,
    bytes: Vec<u8>,
    done: Answer,
}

/// A handle on a writer thread; clones share it. The thread ends once every handle is gone and
/// what was submitted is written.
#[derive(Clone)]
pub struct Writer {
    requests: mpsc::Sender<Request>,
    /// Held by the thread while it commits a batch; [`Writer::hold`] takes it to stall the disk.
    committing: Arc<Mutex<()>>,
}

/// The process's writer, started on first use.
pub fn shared() -> &'static Writer {
    static SHARED: OnceLock<Writer> = OnceLock::new();
    SHARED.get_or_init(|| Writer::start().expect("cannot start the durable writer thread"))
}

fn stopped() -> std::io::Error {
    std::io::Error::other("the durable writer thread stopped")
}

impl Writer {
    pub fn start() -> std::io::Result<Self> {
        let (requests, queue) = mpsc::channel();
        let committing = Arc::new(Mutex::new(()));
        let lock = committing.clone();
        std::thread::Builder::new()
            .name("durable-writer".into())
            .spawn(move || run(queue, &lock))?;
        Ok(Self {
            requests,
            committing,
        })
    }

    /// Replaces `path` with `bytes` atomically and durably. Errors name the step and the path.
    pub async fn write(&self, path: impl Into<PathBuf>, bytes: Vec<u8>) -> std::io::Result<()> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send(Request {
                path: path.into(),
                bytes,
                done,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Stops the writer between batches until the [`Hold`] is dropped: a disk that does not
    /// answer. For tests that prove callers do not wait for the disk on the runtime's threads.
    pub fn hold(&self) -> Hold {
        let (locked_tx, locked) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let lock = self.committing.clone();
        let holder = std::thread::spawn(move || {
            let _commit = lock.lock().unwrap_or_else(|p| p.into_inner());
            let _ = locked_tx.send(());
            let _ = released.recv();
        });
        let _ = locked.recv();
        Hold {
            release: Some(release),
            holder: Some(holder),
        }
    }
}

/// See [`Writer::hold`].
pub struct Hold {
    release: Option<mpsc::Sender<()>>,
    holder: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(holder) = self.holder.take() {
            let _ = holder.join();
        }
    }
}

fn run(queue: mpsc::Receiver<Request>, committing: &Mutex<()>) {
    while let Ok(first) = queue.recv() {
        let _commit = committing.lock().unwrap_or_else(|p| p.into_inner());
        // Everything that arrived while the previous batch was on its way to the disk.
        let mut batch = vec![first];
        batch.extend(queue.try_iter());
        commit(batch);
    }
}

/// One file of a batch: the latest bytes for its path and everyone waiting for them.
struct Pending {
    path: PathBuf,
    bytes: Vec<u8>,
    waiters: Vec<Answer>,
    /// The first failure; later steps are skipped for this file.
    failed: Option<std::io::Error>,
    tmp: Option<tempfile::NamedTempFile>,
}

fn context(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> std::io::Error {
    let path = path.to_owned();
    move |e| std::io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn commit(batch: Vec<Request>) {
    let mut files: Vec<Pending> = Vec::new();
    let mut index: HashMap<PathBuf, usize> = HashMap::new();
    for r in batch {
        match index.get(&r.path) {
            Some(&i) => {
                files[i].bytes = r.bytes;
                files[i].waiters.push(r.done);
            }
            None => {
                index.insert(r.path.clone(), files.len());
                files.push(Pending {
                    path: r.path,
                    bytes: r.bytes,
                    waiters: vec![r.done],
                    failed: None,
                    tmp: None,
                });
            }
        }
    }
    let syncfs = files.len() >= SYNCFS_FROM;
    for f in &mut files {
        match stage(&f.path, &f.bytes, !syncfs) {
            Ok(tmp) => f.tmp = Some(tmp),
            Err(e) => f.failed = Some(e),
        }
    }
    if syncfs {
        sync_filesystems(&mut files);
    }
    let mut dirs: HashMap<PathBuf, Vec<usize>> = HashMap::new();
    for (i, f) in files.iter_mut().enumerate() {
        let Some(tmp) = f.tmp.take() else { continue };
        match tmp.persist(&f.path) {
            Ok(_) => dirs.entry(dir_of(&f.path).to_owned()).or_default().push(i),
            Err(e) => f.failed = Some(context("rename into", &f.path)(e.error)),
        }
    }
    for (dir, members) in dirs {
        if let Err(e) = crate::fsutil::sync_dir(&dir).map_err(context("fsync", &dir)) {
            for i in members {
                files[i].failed = Some(copy_error(&e));
            }
        }
    }
    for f in files {
        for done in f.waiters {
            let _ = done.send(match &f.failed {
                None => Ok(()),
                Some(e) => Err(copy_error(e)),
            });
        }
    }
}

/// The temp file beside `path` holding `bytes`, fsynced when `fsync`.
fn stage(path: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = dir_of(path);
    std::fs::create_dir_all(dir).map_err(context("create", dir))?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(context("create a temp file in", dir))?;
    tmp.write_all(bytes)
        .map_err(context("write a temp file for", path))?;
    if fsync {
        tmp.as_file()
            .sync_all()
            .map_err(context("fsync a temp file for", path))?;
    }
    Ok(tmp)
}

/// One `syncfs` per filesystem the staged files are on; a failure fails every file on it.
fn sync_filesystems(files: &mut [Pending]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let mut done: HashSet<u64> = HashSet::new();
    let mut failed: HashMap<u64, std::io::Error> = HashMap::new();
    let mut device_of = Vec::with_capacity(files.len());
    for f in files.iter_mut() {
        let Some(tmp) = &f.tmp else {
            device_of.push(None);
            continue;
        };
        let dev = match tmp.as_file().metadata() {
            Ok(m) => m.dev(),
            Err(e) => {
                f.failed = Some(context("stat a temp file for", &f.path)(e));
                f.tmp = None;
                device_of.push(None);
                continue;
            }
        };
        device_of.push(Some(dev));
        if done.insert(dev) {
            // SAFETY: syncfs only reads the descriptor, which `tmp` keeps open for the call.
            if unsafe { libc::syncfs(tmp.as_file().as_raw_fd()) } != 0 {
                let e = std::io::Error::last_os_error();
                failed.insert(dev, context("syncfs for", &f.path)(e));
            }
        }
    }
    for (f, dev) in files.iter_mut().zip(device_of) {
        if let Some(e) = dev.and_then(|d| failed.get(&d)) {
            f.failed = Some(copy_error(e));
            f.tmp = None;
        }
    }
}

/// `io::Error` is not `Clone`; every waiter of a failed file gets the same kind and text.
fn copy_error(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_is_on_disk_when_it_returns_and_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::start().unwrap();
        let path = dir.path().join("sub/agent.json");
        w.write(&path, b"one".to_vec()).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        w.write(&path, b"two".to_vec()).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec!["agent.json"], "no temp file is left behind");
    }

    #[tokio::test]
    async fn writes_to_one_path_in_one_batch_coalesce_and_every_waiter_sees_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::start().unwrap();
        let path = dir.path().join("outbox.json");
        let other = dir.path().join("agent.json");
        // Held: all of these wait in one batch.
        let held = w.hold();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..5u8 {
            let (w, path) = (w.clone(), path.clone());
            // A current-thread runtime polls spawned tasks in order: submitted 0, 1, .. 4.
            writes.spawn(async move { w.write(path, vec![b'0' + i]).await });
        }
        let (w2, other2) = (w.clone(), other.clone());
        writes.spawn(async move { w2.write(other2, b"x".to_vec()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !path.exists(),
            "nothing is written while the writer is held"
        );
        drop(held);
        while let Some(r) = writes.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"4");
        assert_eq!(std::fs::read(&other).unwrap(), b"x");
    }

    #[tokio::test]
    async fn a_failed_write_reaches_its_waiter_with_the_path_and_the_others_still_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::start().unwrap();
        // A file where a directory should be: the write cannot create its directory.
        std::fs::write(dir.path().join("blocker"), b"").unwrap();
        let bad = dir.path().join("blocker/agent.json");
        let good = dir.path().join("ok/agent.json");
        let held = w.hold();
        let (a, b) = (w.clone(), w.clone());
        let (bad2, good2) = (bad.clone(), good.clone());
        let failing = tokio::spawn(async move { a.write(bad2, b"1".to_vec()).await });
        let fine = tokio::spawn(async move { b.write(good2, b"2".to_vec()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        let err = failing.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("blocker"), "{err}");
        fine.await.unwrap().unwrap();
        assert_eq!(std::fs::read(&good).unwrap(), b"2");
    }

    #[tokio::test]
    async fn a_large_batch_is_made_durable_with_syncfs_and_every_file_lands() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::start().unwrap();
        let held = w.hold();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..3 * SYNCFS_FROM {
            let w = w.clone();
            let path = dir.path().join(format!("m{i}/agent.json"));
            writes.spawn(async move { w.write(path, i.to_string().into_bytes()).await });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        while let Some(r) = writes.join_next().await {
            r.unwrap().unwrap();
        }
        for i in 0..3 * SYNCFS_FROM {
            let got = std::fs::read(dir.path().join(format!("m{i}/agent.json"))).unwrap();
            assert_eq!(got, i.to_string().into_bytes());
        }
    }

    #[test]
    fn the_runtime_keeps_running_while_the_disk_does_not_answer() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::start().unwrap();
        let held = w.hold();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let path = dir.path().join("agent.json");
        let writer = w.clone();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let write = tokio::spawn(async move { writer.write(path, b"1".to_vec()).await });
                // The only runtime thread must still run this while the write waits.
                let mut ticks = 0;
                while ticks < 5 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    ticks += 1;
                }
                let _ = done_tx.send(ticks);
                write.await.unwrap()
            })
        });
        let ticks = done_rx.recv_timeout(Duration::from_secs(20));
        drop(held);
        assert_eq!(ticks, Ok(5), "the runtime stalled while a write was held");
        runtime.join().unwrap().unwrap();
        assert_eq!(std::fs::read(dir.path().join("agent.json")).unwrap(), b"1");
    }
}
