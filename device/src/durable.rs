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
//! Durability: one `fsync` per file, on this thread for a small batch and on `SYNC_THREADS`
//! threads at once for a large one (the disk overlaps them: 1,000 files of 600 bytes took 3.5 s
//! fsynced one after another here, 0.19 s on 8 threads). One `syncfs` per filesystem measured
//! 0.12 s for the same batch, but it also flushes every other process's dirty pages (a build
//! beside a simulator made each batch wait for gigabytes), so it is not used.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use tokio::sync::oneshot;

/// From this many files in one batch, their fsyncs run on [`SYNC_THREADS`] threads.
const PARALLEL_FROM: usize = 16;
const SYNC_THREADS: usize = 8;

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
    /// The staged temp file, by path only: its descriptor is closed once it is fsynced, so a
    /// batch of thousands of files (a simulator's fleet coming online) holds at most one open
    /// file per staging thread, not one per file (15,000 machines ran out of descriptors).
    tmp: Option<tempfile::TempPath>,
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
    if files.len() < PARALLEL_FROM {
        stage_all(&mut files);
    } else {
        let per_thread = files.len().div_ceil(SYNC_THREADS);
        std::thread::scope(|scope| {
            for part in files.chunks_mut(per_thread) {
                scope.spawn(|| stage_all(part));
            }
        });
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

fn stage_all(files: &mut [Pending]) {
    for f in files {
        match stage(&f.path, &f.bytes) {
            Ok(tmp) => f.tmp = Some(tmp),
            Err(e) => f.failed = Some(e),
        }
    }
}

/// The fsynced temp file beside `path` holding `bytes`, closed (removed if dropped unrenamed).
fn stage(path: &Path, bytes: &[u8]) -> std::io::Result<tempfile::TempPath> {
    let dir = dir_of(path);
    std::fs::create_dir_all(dir).map_err(context("create", dir))?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(context("create a temp file in", dir))?;
    tmp.write_all(bytes)
        .map_err(context("write a temp file for", path))?;
    tmp.as_file()
        .sync_all()
        .map_err(context("fsync a temp file for", path))?;
    Ok(tmp.into_temp_path())
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
    async fn a_large_batch_is_synced_on_several_threads_and_every_file_lands() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::start().unwrap();
        let held = w.hold();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..3 * PARALLEL_FROM {
            let w = w.clone();
            let path = dir.path().join(format!("m{i}/agent.json"));
            writes.spawn(async move { w.write(path, i.to_string().into_bytes()).await });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        while let Some(r) = writes.join_next().await {
            r.unwrap().unwrap();
        }
        for i in 0..3 * PARALLEL_FROM {
            let got = std::fs::read(dir.path().join(format!("m{i}/agent.json"))).unwrap();
            assert_eq!(got, i.to_string().into_bytes());
        }
    }

    /// A batch of thousands of files (a simulator's fleet coming online) must not hold a
    /// descriptor per file until the renames: 15,000 simulated machines ran out of them.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_thousands_of_files_keeps_few_descriptors_open() {
        const FILES: usize = 2_000;
        let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::start().unwrap();
        let held = w.hold();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..FILES {
            let w = w.clone();
            let path = dir.path().join(format!("m{}/{i}.json", i % 50));
            writes.spawn(async move { w.write(path, vec![b'x'; 600]).await });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = open_fds();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(open_fds());
                    // The files of a batch stay staged for its whole commit (a second or more).
                    std::thread::sleep(Duration::from_millis(1));
                }
                peak
            })
        };
        drop(held);
        while let Some(r) = writes.join_next().await {
            r.unwrap().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().unwrap();
        assert!(
            peak < before + 200,
            "{} descriptors open at the peak of one batch of {FILES} files, {before} before",
            peak
        );
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
