//! Sales and installs exclude each other through an advisory lock, `flock(2)`, on one file
//! (`sale_lock` in the config, default `{data_dir}/sale.lock`; docs/device.md has the protocol
//! for vending-application developers):
//!
//! - the vending application holds a SHARED lock (`LOCK_SH`) for the whole of a sale; it
//!   chooses to wait for a running install (`LOCK_SH`) or to refuse the customer
//!   (`LOCK_SH | LOCK_NB`, `EWOULDBLOCK`);
//! - the agent holds the EXCLUSIVE lock (`LOCK_EX`) for the whole of every install, the slot
//!   switch and the health check (and the switch back) included. It only ever tries without
//!   blocking, so no thread sleeps in `flock` and shutdown is never held up by a long sale.
//!
//! A flock belongs to an open file description and is released when the last descriptor on it
//! is closed, also when the process dies: a crashed sale or agent never leaves the machine
//! locked. Both sides open the file by path, so it must never be deleted or replaced.
//!
//! Whether a sale is in progress (the `busy` of the machine's state, and what an `idle` install
//! waits for) is read from `/proc/locks` without touching the lock, so the agent's look never
//! refuses a customer. Where `/proc/locks` does not show this file's locks, the agent falls
//! back to a non-blocking exclusive try, released at once.
//!
//! `/proc/locks` lists every lock on the host, and the kernel takes a host-wide lock to write
//! it out. One agent reads it once a tick; a simulator of a thousand agents in one process
//! would read a thousand-line file a thousand times a second (a quarter of its CPU, and every
//! `flock` on the host stalled meanwhile), so it calls [`share_proc_locks_reads`] and its agents
//! share one read for a short while. The lock itself is never cached: a look that is a little
//! old can only delay an install by a tick, since the install still has to take the lock.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often an install waiting for a sale to end tries the lock again.
pub const RETRY_EVERY: Duration = Duration::from_millis(50);

/// How many reads of `/proc/locks` `SaleLock::holders` takes the median of.
const HOLDERS_READS: usize = 5;

/// How many reads of `/proc/locks` learning a lock's name there may take (see
/// `SaleLock::learn_proc_name`).
const LEARN_READS: usize = 8;

/// How many reads of `/proc/locks` a look that sees no sale makes (see
/// `SaleLock::sale_in_progress`).
const LOOK_READS: usize = 3;

/// For how long one read of `/proc/locks` serves the looks of the sale locks made after
/// [`share_proc_locks_reads`] (milliseconds; zero: each look reads it).
static SHARE_FOR_MS: AtomicU64 = AtomicU64::new(0);
/// The last read of `/proc/locks` shared that way.
static SHARED_READ: Mutex<Option<(Instant, Arc<str>)>> = Mutex::new(None);

/// How often an agent whose install does not wait for a sale looks for one (milliseconds; zero:
/// every tick), for the sale locks made after [`look_at_most_every`].
static LOOK_EVERY_MS: AtomicU64 = AtomicU64::new(0);

/// Lets the agents of the sale locks this process makes from now on look for a sale only every
/// `every` while no install of theirs waits for one (the simulator: each look is a task on the
/// blocking pool, and 10,000 machines looking every second were a fifth of its CPU). An install
/// that waits for a sale still looks every tick. An agent on a machine never calls it.
pub fn look_at_most_every(every: Duration) {
    let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    LOOK_EVERY_MS.store(ms, Ordering::Relaxed);
}

/// Lets the sale locks this process makes from now on use a read of `/proc/locks` for up to
/// `fresh` (the simulator: many machines in one process). An agent on a machine never calls it.
pub fn share_proc_locks_reads(fresh: Duration) {
    let ms = u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX);
    SHARE_FOR_MS.store(ms, Ordering::Relaxed);
}

/// `/proc/locks` now, or as read by this process less than `fresh` ago (zero: now).
fn proc_locks_text(fresh: Duration) -> io::Result<Arc<str>> {
    if fresh.is_zero() {
        return Ok(std::fs::read_to_string("/proc/locks")?.into());
    }
    // Held while reading: the looks that come meanwhile wait for this read, not make their own.
    let mut shared = SHARED_READ.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, text)) = &*shared {
        if at.elapsed() < fresh {
            return Ok(text.clone());
        }
    }
    let text: Arc<str> = std::fs::read_to_string("/proc/locks")?.into();
    *shared = Some((Instant::now(), text.clone()));
    Ok(text)
}

/// The lock file of one machine.
#[derive(Debug, Clone)]
pub struct SaleLock {
    path: PathBuf,
    /// Exclusive locks this process holds on the file (installs running).
    held: Arc<AtomicUsize>,
    /// How `/proc/locks` names the file, learnt while holding the lock.
    seen_as: Arc<Mutex<Option<ProcId>>>,
    /// How old a shared read of `/proc/locks` a look may use ([`share_proc_locks_reads`]).
    shared_look: Duration,
    /// How often to look while no install waits for a sale ([`look_at_most_every`]).
    look_every: Duration,
}

/// The file as `/proc/locks` names it (`MAJOR:MINOR:INODE`), and the file's identity from
/// `stat` when that was learnt: a replaced file must be learnt again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcId {
    name: String,
    dev: u64,
    ino: u64,
}

/// The flocks held on the lock file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holders {
    /// Sales in progress.
    pub shared: usize,
    /// An install (0 or 1).
    pub exclusive: usize,
}

/// The exclusive lock, held until dropped.
#[derive(Debug)]
pub struct InstallGuard {
    file: File,
    held: Arc<AtomicUsize>,
}

impl Drop for InstallGuard {
    fn drop(&mut self) {
        // The file closes after this, which releases the lock.
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `flock(file, op)`: `Ok(false)` when a non-blocking request would block.
fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

impl SaleLock {
    pub fn new(path: PathBuf) -> Self {
        let shared_look = Duration::from_millis(SHARE_FOR_MS.load(Ordering::Relaxed));
        let look_every = Duration::from_millis(LOOK_EVERY_MS.load(Ordering::Relaxed));
        Self::with_looks(path, shared_look, look_every)
    }

    /// A lock whose looks may use a read of `/proc/locks` up to `fresh` old, shared with every
    /// other such lock of this process, and whose agent looks every `look_every` while no
    /// install waits.
    fn with_looks(path: PathBuf, fresh: Duration, look_every: Duration) -> Self {
        Self {
            path,
            held: Arc::default(),
            seen_as: Arc::default(),
            shared_look: fresh,
            look_every,
        }
    }

    /// Whether its agent should look for a sale now: on every tick while an install waits for
    /// the sale to end, otherwise once [`look_at_most_every`]'s period (zero: every tick) has
    /// passed since the last look, `looked_at`.
    pub fn look_due(&self, install_waits: bool, looked_at: Option<Instant>, now: Instant) -> bool {
        install_waits
            || looked_at.is_none_or(|t| now.saturating_duration_since(t) >= self.look_every)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the file read-only (all `flock` needs, so a file the vending application created
    /// will do), creating it with mode 0644 if it does not exist.
    fn open(&self) -> io::Result<File> {
        let named =
            |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", self.path.display()));
        match File::open(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&self.path)
                .map_err(named),
            other => other.map_err(named),
        }
    }

    /// Creates the file if it does not exist yet (the agent does at start, so the vending
    /// application finds it).
    pub fn create(&self) -> io::Result<()> {
        self.open().map(drop)
    }

    /// The exclusive lock if no sale (and no other install) holds the file now.
    pub fn try_exclusive(&self) -> io::Result<Option<InstallGuard>> {
        let file = self.open()?;
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?
        {
            return Ok(None);
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let guard = InstallGuard {
            file,
            held: self.held.clone(),
        };
        if let Err(e) = self.learn_proc_name(&guard) {
            tracing::debug!(path = %self.path.display(), "/proc/locks cannot show the sale lock: {e}");
        }
        Ok(Some(guard))
    }

    /// Waits for the exclusive lock, trying every [`RETRY_EVERY`]; `None` if `cancel` fires
    /// first.
    pub async fn exclusive(&self, cancel: &CancellationToken) -> io::Result<Option<InstallGuard>> {
        let mut waiting_since = None;
        loop {
            let this = self.clone();
            let tried = tokio::task::spawn_blocking(move || this.try_exclusive())
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))?;
            if let Some(guard) = tried {
                if let Some(since) = waiting_since {
                    let waited: Duration = tokio::time::Instant::now() - since;
                    tracing::info!(path = %self.path.display(), ?waited, "sale lock taken; installing");
                }
                return Ok(Some(guard));
            }
            if waiting_since.is_none() {
                tracing::info!(path = %self.path.display(), "a sale holds the lock; the install waits for it to end");
                waiting_since = Some(tokio::time::Instant::now());
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }

    /// Whether a sale holds the lock now (blocking: reads `/proc/locks`). `None` when it
    /// cannot be told without disturbing an install of this process. A look is advisory: a read
    /// of `/proc/locks` made while other locks change can miss a line (it is read again, up to
    /// `LOOK_READS` times, before "no sale"), and an install never relies on a look (it takes
    /// the lock).
    pub fn sale_in_progress(&self) -> io::Result<Option<bool>> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            // No file: nobody can hold a lock on it. Create it for the application.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create()?;
                return Ok(Some(false));
            }
            Err(e) => return Err(e),
        };
        let known = self
            .seen_as
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match known {
            Some(id) if id.dev == meta.dev() && id.ino == meta.ino() => {
                // A read can skip a line (see `learn_proc_name`): "no sale" from a read of our
                // own is read again. A shared read (the simulator) is taken as it is.
                let reads = if self.shared_look.is_zero() {
                    LOOK_READS
                } else {
                    1
                };
                let mut sale = None;
                for _ in 0..reads {
                    let Ok(text) = proc_locks_text(self.shared_look) else {
                        break;
                    };
                    sale = Some(proc_locks::has_shared(&text, &id.name));
                    if sale == Some(true) {
                        break;
                    }
                }
                if sale.is_some() {
                    return Ok(sale);
                }
            }
            _ => {}
        }
        if self.held.load(Ordering::SeqCst) > 0 {
            // An install of ours holds it: a try would fail for that reason alone.
            return Ok(None);
        }
        // Learn the name (or tell without /proc): a try, released at once.
        Ok(Some(self.try_exclusive()?.is_none()))
    }

    /// Who holds the lock now, as `/proc/locks` names the file by its `stat` device and inode
    /// (blocking; opens nothing, locks nothing: for `fleetcast-device status`). `None` when
    /// the file does not exist or `/proc/locks` cannot be read.
    pub fn holders(&self) -> io::Result<Option<Holders>> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        let name = format!("{major:02x}:{minor:02x}:{}", meta.ino());
        // A read can skip a line while other locks are released (see `learn_proc_name`), and
        // show one twice while others are taken (the rest shifts the other way between the
        // kernel's pages): the median of five reads is right unless three of them are off (by
        // hand, with four threads locking 160 other files: a read off 4-5 % of the time).
        // (It took the read that showed the most, and `status` counted one sale as two while
        // other tests locked files: CI, 2026-11-29.) For display only: whether an install may
        // go on is decided by taking the lock.
        let mut reads = Vec::with_capacity(HOLDERS_READS);
        for _ in 0..HOLDERS_READS {
            let Ok(text) = std::fs::read_to_string("/proc/locks") else {
                break;
            };
            reads.push(proc_locks::holders(&text, &name));
        }
        reads.sort_by_key(|h| (h.shared + h.exclusive, h.exclusive));
        Ok(reads.get(reads.len() / 2).copied())
    }

    /// Finds the line of `/proc/locks` that is our exclusive lock, so later looks can find the
    /// file's shared locks by its name there.
    fn learn_proc_name(&self, guard: &InstallGuard) -> io::Result<()> {
        let meta = guard.file.metadata()?;
        let known = self
            .seen_as
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if known.is_some_and(|id| id.dev == meta.dev() && id.ino == meta.ino()) {
            return Ok(());
        }
        // Read now, never shared: the line of the lock just taken must be in it. The kernel
        // hands `/proc/locks` out a page at a time and a lock released between two pages shifts
        // the rest, so one read can skip a line (seen: 0.6-10 % of reads while other threads lock
        // and unlock). The lock is ours and held, so a read without it is such a read: read
        // again.
        let mut found = HashSet::new();
        for _ in 0..LEARN_READS {
            let text = std::fs::read_to_string("/proc/locks")?;
            found = proc_locks::exclusive_flocks(&text, std::process::id(), meta.ino());
            if found.len() == 1 {
                break;
            }
        }
        let mut ours = found.into_iter();
        let (Some(name), None) = (ours.next(), ours.next()) else {
            return Err(io::Error::other(format!(
                "no single exclusive flock of this process on the file's inode in {LEARN_READS} \
                 reads of /proc/locks"
            )));
        };
        *self.seen_as.lock().unwrap_or_else(|p| p.into_inner()) = Some(ProcId {
            name,
            dev: meta.dev(),
            ino: meta.ino(),
        });
        Ok(())
    }
}

/// Reading `/proc/locks` lines, e.g. `3: FLOCK  ADVISORY  READ  1234 fd:01:393228 0 EOF` (a
/// waiter has `->` after the number).
mod proc_locks {
    use std::collections::HashSet;

    struct Line<'a> {
        flock: bool,
        waiting: bool,
        write: bool,
        pid: u32,
        file: &'a str,
    }

    fn parse(line: &str) -> Option<Line<'_>> {
        let mut words = line.split_whitespace().skip(1).peekable();
        let waiting = words.next_if_eq(&"->").is_some();
        let class = words.next()?;
        let _advisory = words.next()?;
        let mode = words.next()?;
        let pid = words.next()?.parse().ok()?;
        let file = words.next()?;
        Some(Line {
            flock: class == "FLOCK",
            waiting,
            write: mode == "WRITE",
            pid,
            file,
        })
    }

    /// The names of the files on which `pid` holds an exclusive flock, among those with inode
    /// `ino`.
    pub fn exclusive_flocks(text: &str, pid: u32, ino: u64) -> HashSet<String> {
        text.lines()
            .filter_map(parse)
            .filter(|l| l.flock && !l.waiting && l.write && l.pid == pid)
            .filter(|l| l.file.rsplit(':').next().and_then(|i| i.parse().ok()) == Some(ino))
            .map(|l| l.file.to_owned())
            .collect()
    }

    /// The flocks held (not waited for) on `file`.
    pub fn holders(text: &str, file: &str) -> super::Holders {
        let mut h = super::Holders::default();
        for l in text.lines().filter_map(parse) {
            if l.flock && !l.waiting && l.file == file {
                if l.write {
                    h.exclusive += 1;
                } else {
                    h.shared += 1;
                }
            }
        }
        h
    }

    /// Whether someone holds a shared flock on `file`.
    pub fn has_shared(text: &str, file: &str) -> bool {
        text.lines()
            .filter_map(parse)
            .any(|l| l.flock && !l.waiting && !l.write && l.file == file)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const SAMPLE: &str = "\
1: POSIX  ADVISORY  READ 77 fd:01:500 0 EOF
2: FLOCK  ADVISORY  WRITE 42 fd:01:393228 0 EOF
2: -> FLOCK  ADVISORY  READ 43 fd:01:393228 0 EOF
3: FLOCK  ADVISORY  READ 44 fd:01:393229 0 EOF
4: OFDLCK ADVISORY  READ -1 fd:01:393228 0 EOF
";

        #[test]
        fn a_waiting_shared_lock_or_another_kind_of_lock_is_not_a_sale() {
            assert!(!has_shared(SAMPLE, "fd:01:393228"));
            assert!(has_shared(SAMPLE, "fd:01:393229"));
            assert!(
                !has_shared(SAMPLE, "fd:01:500"),
                "a POSIX lock is not a flock"
            );
        }

        #[test]
        fn our_exclusive_lock_is_found_by_pid_and_inode() {
            let found = exclusive_flocks(SAMPLE, 42, 393228);
            assert_eq!(found.into_iter().collect::<Vec<_>>(), ["fd:01:393228"]);
            assert!(exclusive_flocks(SAMPLE, 42, 393229).is_empty());
            assert!(exclusive_flocks(SAMPLE, 44, 393229).is_empty(), "shared");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/locks` is one list for the whole host: the test that churns locks on purpose runs
    /// alone (write), the tests that assert on looks beside each other (read).
    static PROC_LOCKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

    fn looking() -> std::sync::RwLockReadGuard<'static, ()> {
        PROC_LOCKS.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A sale: a shared lock on its own open file description, as another process would hold.
    fn sale(path: &Path) -> File {
        let f = File::open(path).unwrap();
        assert!(flock(&f, libc::LOCK_SH | libc::LOCK_NB).unwrap());
        f
    }

    #[test]
    fn a_sale_keeps_installs_out_and_an_install_keeps_sales_out() {
        let dir = tempfile::tempdir().unwrap();
        let lock = SaleLock::new(dir.path().join("sale.lock"));
        lock.create().unwrap();
        let s = sale(lock.path());
        assert!(lock.try_exclusive().unwrap().is_none());
        drop(s);
        let install = lock
            .try_exclusive()
            .unwrap()
            .expect("no sale: the lock is free");
        let f = File::open(lock.path()).unwrap();
        assert!(
            !flock(&f, libc::LOCK_SH | libc::LOCK_NB).unwrap(),
            "a sale started during an install"
        );
        drop(install);
        assert!(flock(&f, libc::LOCK_SH | libc::LOCK_NB).unwrap());
    }

    /// Simulated machines share one read of `/proc/locks` for a while: a sale that began
    /// after the read is seen once the read is older than that, and the install still has to
    /// take the lock (never cached).
    #[test]
    fn looks_may_share_a_recent_read_of_proc_locks() {
        let _alone = looking();
        let fresh = Duration::from_millis(400);
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let [a, b] = [0, 1]
            .map(|i| SaleLock::with_looks(dirs[i].path().join("sale.lock"), fresh, Duration::ZERO));
        for lock in [&a, &b] {
            lock.create().unwrap();
            drop(lock.try_exclusive().unwrap().unwrap());
        }
        let read_at = Instant::now();
        assert_eq!(a.sale_in_progress().unwrap(), Some(false));
        let s = sale(b.path());
        if read_at.elapsed() < fresh / 2 {
            assert_eq!(
                b.sale_in_progress().unwrap(),
                Some(false),
                "b used a's read, made before the sale"
            );
        }
        assert!(
            b.try_exclusive().unwrap().is_none(),
            "the lock is never cached"
        );
        std::thread::sleep(fresh);
        assert_eq!(b.sale_in_progress().unwrap(), Some(true), "read again");
        drop(s);
    }

    /// A simulator's agents look less often, except while an install waits for a sale to end;
    /// an agent on a machine looks on every tick.
    #[test]
    fn an_agent_looks_at_its_lock_as_often_as_its_process_allows_unless_an_install_waits() {
        let path = PathBuf::from("/nonexistent/sale.lock");
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let every_tick = SaleLock::with_looks(path.clone(), Duration::ZERO, Duration::ZERO);
        assert!(every_tick.look_due(false, None, t0));
        assert!(
            every_tick.look_due(false, Some(t0), at(1000)),
            "the next tick"
        );
        assert!(
            every_tick.look_due(false, Some(t0), t0),
            "zero: every time asked"
        );
        let sim = SaleLock::with_looks(path, Duration::ZERO, Duration::from_secs(5));
        assert!(sim.look_due(false, None, t0), "the first look at once");
        for tick in 1..5 {
            assert!(
                !sim.look_due(false, Some(t0), at(tick * 1000)),
                "tick {tick}"
            );
        }
        assert!(sim.look_due(false, Some(t0), at(5000)));
        assert!(
            sim.look_due(true, Some(t0), at(1000)),
            "an install waits: every tick"
        );
    }

    #[test]
    fn a_sale_in_progress_is_seen_without_taking_the_lock() {
        let _alone = looking();
        let dir = tempfile::tempdir().unwrap();
        let lock = SaleLock::new(dir.path().join("sale.lock"));
        assert_eq!(lock.sale_in_progress().unwrap(), Some(false), "no file yet");
        assert!(lock.path().exists(), "created for the application");
        // Learnt from /proc/locks on this machine (Linux).
        drop(lock.try_exclusive().unwrap().unwrap());
        assert!(
            lock.seen_as.lock().unwrap().is_some(),
            "/proc/locks shows the file"
        );
        assert_eq!(lock.sale_in_progress().unwrap(), Some(false));
        let s = sale(lock.path());
        assert_eq!(lock.sale_in_progress().unwrap(), Some(true));
        let h = lock.holders().unwrap().expect("/proc/locks names the file");
        assert_eq!((h.shared, h.exclusive), (1, 0));
        // The look did not take the lock: a second sale with LOCK_NB is never refused.
        for _ in 0..200 {
            let other = File::open(lock.path()).unwrap();
            assert!(flock(&other, libc::LOCK_SH | libc::LOCK_NB).unwrap());
            assert_eq!(lock.sale_in_progress().unwrap(), Some(true));
        }
        drop(s);
        assert_eq!(lock.sale_in_progress().unwrap(), Some(false));
        // An install of ours is not a sale.
        let install = lock.try_exclusive().unwrap().unwrap();
        assert_eq!(lock.sale_in_progress().unwrap(), Some(false));
        assert_eq!(lock.holders().unwrap().unwrap().exclusive, 1);
        drop(install);
    }

    /// A read of `/proc/locks` can skip a line while other locks come and go (the kernel hands
    /// it out a page at a time); learning reads again rather than give up on `/proc`.
    #[test]
    fn the_name_is_learnt_while_other_locks_come_and_go() {
        let _alone = PROC_LOCKS.write().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn: Vec<_> = (0..3)
            .map(|t| {
                let files: Vec<File> = (0..40)
                    .map(|i| File::create(dir.path().join(format!("other-{t}-{i}"))).unwrap())
                    .collect();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for f in &files {
                            assert!(flock(f, libc::LOCK_EX | libc::LOCK_NB).unwrap());
                        }
                        for f in &files {
                            assert!(flock(f, libc::LOCK_UN).unwrap());
                        }
                    }
                })
            })
            .collect();
        let mut unlearnt = 0;
        for i in 0..400 {
            let lock = SaleLock::new(dir.path().join(format!("sale-{i}.lock")));
            drop(lock.try_exclusive().unwrap().unwrap());
            if lock.seen_as.lock().unwrap().is_none() {
                unlearnt += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in churn {
            t.join().unwrap();
        }
        assert_eq!(
            unlearnt, 0,
            "locks whose /proc/locks name was not learnt, of 400"
        );
    }

    #[test]
    fn a_replaced_lock_file_is_learnt_again() {
        let _alone = looking();
        let dir = tempfile::tempdir().unwrap();
        let lock = SaleLock::new(dir.path().join("sale.lock"));
        drop(lock.try_exclusive().unwrap().unwrap());
        std::fs::remove_file(lock.path()).unwrap();
        lock.create().unwrap();
        let s = sale(lock.path());
        assert_eq!(lock.sale_in_progress().unwrap(), Some(true));
        drop(s);
        assert_eq!(lock.sale_in_progress().unwrap(), Some(false));
    }

    #[tokio::test]
    async fn an_install_waits_for_the_sale_to_end_and_gives_up_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let lock = SaleLock::new(dir.path().join("sale.lock"));
        lock.create().unwrap();
        let s = sale(lock.path());
        let cancel = CancellationToken::new();
        let (l, c) = (lock.clone(), cancel.clone());
        let waiting = tokio::spawn(async move { l.exclusive(&c).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "installed during a sale");
        drop(s);
        let guard = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the install starts once the sale ended")
            .unwrap()
            .unwrap();
        assert!(guard.is_some());
        // While it holds the lock, another install waits, until shutdown.
        let (l, c) = (lock.clone(), cancel.clone());
        let second = tokio::spawn(async move { l.exclusive(&c).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!second.is_finished());
        cancel.cancel();
        assert!(second.await.unwrap().unwrap().is_none());
    }
}
