//! Benchmark: a fleet of simulated machines on one `fleetcast serve` (issue 6), each number
//! beside a baseline measured in the same run.
//!
//! Per fleet size N (`SCALE_SIZES`, default `100,1000`), in one fresh data dir:
//! 1. `fleetcast serve` starts (embedded broker on a free loopback port, or `--broker` on a
//!    Mosquitto started for the run when `SCALE_BROKER=mosquitto`); its RSS is read.
//! 2. Raw fan-out baseline: N extra machines (`raw-…`, group `rawbench`) are provisioned, connect
//!    as plain rumqttc subscribers, and the platform principal publishes the rollout's artifact
//!    bytes as 64 KiB QoS 1 messages; time until every subscriber has every byte (checked per
//!    subscriber). Then they disconnect. This runs before the simulated fleet starts, so the
//!    broker never holds 2 N connections.
//! 3. Onboarding: one `fleetcast-device simulate --count N` process; time from its start until
//!    every machine is online with its first state.
//! 4. Rollouts (`SCALE_ROLLOUTS`, default 10 at N = 1,000 and 1 otherwise) of a 1 MiB artifact
//!    (`SCALE_ARTIFACT_KIB` sets another size; `scripts/bench.sh soak`): upload, create,
//!    publish to the fleet's groups; time from the publish request until the last `installed`
//!    event (platform clock); notice → `notified` latency per machine; platform egress, and
//!    on the embedded broker the chunk frames its gateway wrote to machines against what they
//!    needed, from `fleetcast stats --json`; RSS of `serve` and the simulator after each; the CPU time of
//!    the server side (`serve`, and Mosquitto when it is the broker) and of the simulator from
//!    the publish to the last `installed`, beside the raw baseline's (the server side's, and
//!    the bench process's for its subscribers) over its transfer.
//! 5. With the simulator stopped, the raw fan-out once more, each subscriber also hashing and
//!    storing what it receives where the simulated machines keep their data: the least any
//!    updater that keeps a verified copy does with the bytes, as a second baseline (not run
//!    when a socket and a file per subscriber would not fit this process's open files).
//! 6. Before that, with the simulator stopped and the database as the rollouts left it:
//!    `fleetcast db backup` while `serve` runs, how long its writes waited, beside `cp -a` of
//!    the same database's files (what a stop-and-copy backup copies) in the same run.
//!
//! `SCALE_DOWNLOAD_MB=200` instead runs one machine and one artifact of that size (item 7's
//! shape) and reports the machine's `downloading` → `downloaded` time beside raw pub/sub of the
//! same bytes to one subscriber, as `SCALE_DOWNLOAD_RUNS` (default 3) pairs, each in a fresh
//! `serve`, with the median of their ratios: at 200 MB both take about 0.3 s, and the ratio of
//! single runs moved from 0.57 to 0.89 between three runs in a row (2026-11-27, Mosquitto).
//!
//! Prints markdown after a `--- results ---` line; scripts/bench.sh records it. `SCALE_SVG=path`
//! also writes a plot.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{
    artifact_bytes, cpu_of, now_ms, percentile, raw_fanout, stat_u64, storing_does_not_fit,
    EventFeed, Mem, Platform, Proc, RawResult, RawSend,
};
use fleetcast_broker::mosquitto::{mosquitto_files, BrokerIdentity, MosquittoFiles};
use fleetcast_broker::testing::Mosquitto;
use fleetcast_broker::BrokerUrl;
use fleetcast_proto::acl::{Principal, Role};
use fleetcast_proto::admin::ProvisionedMachine;
use fleetcast_proto::calls;
use fleetcast_proto::chunk::{Layout, DEFAULT_CHUNK_SIZE};
use fleetcast_proto::{GroupId, InstallPolicy, Kind, MachineId, Phase, Topics};

const MSG: usize = 64 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum BrokerKind {
    Embedded,
    Mosquitto,
}

impl BrokerKind {
    fn label(self) -> &'static str {
        match self {
            BrokerKind::Embedded => "embedded rumqttd (behind the gateway)",
            BrokerKind::Mosquitto => "Mosquitto (external, fleetcast's generated files: machines on a listener of their own, everyone else on another)",
        }
    }
}

/// One rollout's outcome.
#[derive(Debug, Clone, Default)]
struct Rollout {
    installed: usize,
    failed: usize,
    /// Publish request → last `installed` event stored (platform clock), when all installed.
    time: Option<Duration>,
    /// How long we waited when not all installed.
    waited: Duration,
    notified_ms: Vec<u64>,
    /// First `downloading` → `downloaded` (machine clock), for the one-machine download.
    download: Option<Duration>,
    egress_bytes: Option<u64>,
    /// Chunk and manifest frames the embedded broker's gateway wrote to machines' queues (one
    /// per machine per frame: the broadcast's copies and those sent again).
    chunk_frames: Option<u64>,
    serve: Mem,
    sim: Mem,
    /// CPU time (user + system) from the publish until the last `installed` was seen: `serve`
    /// (and Mosquitto when it is the broker), and the simulator.
    server_cpu: Option<Duration>,
    sim_cpu: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
struct SizeResult {
    n: usize,
    artifact: usize,
    error: Option<String>,
    raw: Option<RawResult>,
    raw_error: Option<String>,
    /// The same fan-out, each subscriber also hashing and storing what it receives.
    raw_stored: Option<RawResult>,
    raw_stored_error: Option<String>,
    /// Why the storing fan-out was not run.
    raw_stored_skipped: Option<String>,
    onboarding: Option<Duration>,
    onboarded: usize,
    serve_before: Mem,
    serve_after_raw: Mem,
    serve_idle: Mem,
    sim_idle: Mem,
    rollouts: Vec<Rollout>,
    backup: Option<Result<BackupResult, String>>,
}

/// `db backup` of the database the rollouts left, beside `cp -a` of its files.
#[derive(Debug, Clone)]
struct BackupResult {
    on_disk: u64,
    records: u64,
    writes_held: Duration,
    cp: Duration,
}

/// The rollouts' artifact: 1 MiB, or `SCALE_ARTIFACT_KIB` (many rollouts at 10,000 machines
/// need a small one: each simulated machine keeps two slots and a staging file).
fn artifact_len() -> usize {
    std::env::var("SCALE_ARTIFACT_KIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|k| *k > 0)
        .map_or(1 << 20, |k| k << 10)
}

/// "1 MiB", "64 KiB": how the tables name an artifact's size.
fn size_label(bytes: usize) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

fn sizes() -> Vec<usize> {
    std::env::var("SCALE_SIZES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().replace('_', "").parse().ok())
        .filter(|n| *n > 0)
        .collect()
}

/// Starts Mosquitto with fleetcast's files for the platform and the bootstrap operator (the
/// only identities before `serve` first runs), creating the platform's keys in `data` first
/// exactly as `serve` would.
fn start_mosquitto(data: &Path) -> Result<Mosquitto> {
    let keys = fleetcast_platform::load_or_create_keys(data)?;
    let ids = [
        BrokerIdentity {
            principal: Principal::Platform,
            password: keys.platform_mqtt_password(),
        },
        BrokerIdentity {
            principal: Principal::Operator {
                name: fleetcast_broker::admin::BOOTSTRAP_OPERATOR.into(),
                role: Role::Admin,
            },
            password: keys.admin.mqtt_password(),
        },
    ];
    let files = mosquitto_files(&Topics::default(), &ids)?;
    Mosquitto::start_with_files(&files).context("starting mosquitto")
}

/// What `fleetcast broker mosquitto-config` writes (the same admin op, page by page), loaded
/// into Mosquitto with a SIGHUP: needed after every provisioning.
async fn reload_mosquitto(m: &Mosquitto, p: &Platform) -> Result<()> {
    let (mut passwd, mut acl, mut after) = (String::new(), String::new(), None);
    loop {
        let page = p
            .call(calls::MosquittoConfig {
                after: after.take(),
                limit: Some(fleetcast_proto::admin::MAX_MOSQUITTO_PAGE),
            })
            .await?;
        passwd.push_str(&page.passwd);
        acl.push_str(&page.acl);
        match page.next {
            Some(next) if page.more => after = Some(next),
            _ => break,
        }
    }
    m.rewrite_files(&MosquittoFiles { passwd, acl })?;
    m.reload()?;
    Ok(())
}

fn groups_for(n: usize) -> Vec<GroupId> {
    let all = ["g1", "g2"];
    all[..n.clamp(1, 2)]
        .iter()
        .map(|g| GroupId::new(*g).expect("valid group"))
        .collect()
}

async fn run_size(
    n: usize,
    artifact: usize,
    rollouts: usize,
    broker: BrokerKind,
    root: &Path,
) -> SizeResult {
    let mut r = SizeResult {
        n,
        artifact,
        ..Default::default()
    };
    let dir = match tempfile::tempdir_in(root) {
        Ok(d) => d,
        Err(e) => {
            r.error = Some(format!("a temporary directory in {}: {e}", root.display()));
            return r;
        }
    };
    if let Err(e) = fleet(&mut r, rollouts, broker, dir.path()).await {
        let kept = keep_logs(dir.path(), n);
        r.error = Some(format!("{e:#}"));
        eprintln!("N={n}: {e:#} ({kept})");
    } else if std::env::var_os("SCALE_KEEP_LOGS").is_some() {
        eprintln!("N={n}: {}", keep_logs(dir.path(), n));
    }
    r
}

/// When each phase's events were made (machine clock) and stored (platform clock), in ms after
/// the publish request; the same host, so one clock. Says where a rollout's time goes.
#[derive(Default)]
struct Timeline(Vec<(Phase, Vec<u64>, Vec<u64>)>);

impl Timeline {
    fn add(&mut self, phase: Phase, made: u64, stored: u64, published: u64) {
        let i = match self.0.iter().position(|(p, ..)| *p == phase) {
            Some(i) => i,
            None => {
                self.0.push((phase, Vec::new(), Vec::new()));
                self.0.len() - 1
            }
        };
        self.0[i].1.push(made.saturating_sub(published));
        self.0[i].2.push(stored.saturating_sub(published));
    }

    /// Per phase: count, made p50/max, stored p50/max (seconds).
    fn summary(&mut self) -> String {
        let secs = |v: &mut Vec<u64>| {
            v.sort_unstable();
            (
                v[v.len() / 2] as f64 / 1000.0,
                v[v.len() - 1] as f64 / 1000.0,
            )
        };
        self.0
            .sort_by_key(|(_, made, _)| made.iter().min().copied());
        self.0
            .iter_mut()
            .map(|(phase, made, stored)| {
                let n = made.len();
                let (m50, mmax) = secs(made);
                let (s50, smax) = secs(stored);
                format!("{phase:?} ×{n} made {m50:.2}/{mmax:.2} stored {s50:.2}/{smax:.2}")
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The `installed` events stored over 2 s after their machine made them (delay in ms, machine):
/// how many, the median and the longest delays, and the five slowest machines.
fn late_summary(late: &mut [(u64, String)]) -> String {
    if late.is_empty() {
        return String::new();
    }
    late.sort_unstable();
    let secs = |ms: u64| ms as f64 / 1000.0;
    let slowest: Vec<String> = late
        .iter()
        .rev()
        .take(5)
        .map(|(ms, m)| format!("{m} {:.1} s", secs(*ms)))
        .collect();
    format!(
        "; {} `installed` stored over 2 s after the machine made it (median {:.1} s, longest {}) ",
        late.len(),
        secs(late[late.len() / 2].0),
        slowest.join(", ")
    )
}

/// Copies the logs of a failed run (`serve`, the simulator; of any run with `SCALE_KEEP_LOGS`
/// set) out of its temporary directory, which is removed, to `target/bench-failed/scale-N/`;
/// says where, or why not.
fn keep_logs(dir: &Path, n: usize) -> String {
    let to = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-failed")
        .join(format!("scale-{n}"));
    let copy = || -> std::io::Result<usize> {
        std::fs::create_dir_all(&to)?;
        let mut copied = 0;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log") {
                std::fs::copy(&path, to.join(path.file_name().unwrap_or_default()))?;
                copied += 1;
            }
        }
        Ok(copied)
    };
    match copy() {
        Ok(copied) => format!("{copied} logs kept in {}", to.display()),
        Err(e) => format!("logs not kept: {e}"),
    }
}

/// Where simulated machines keep their data: `SCALE_SIM_DIR`, else /dev/shm when it exists
/// (`SCALE_SIM_DIR=disk` keeps them beside the platform's data).
fn sim_root() -> Option<PathBuf> {
    match std::env::var("SCALE_SIM_DIR") {
        Ok(d) if d == "disk" => None,
        Ok(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()),
    }
}

/// [`sim_root`] for a fleet of `n`: from [`DISK_FROM`] machines on, on disk unless
/// `SCALE_SIM_DIR` says otherwise (10,000 machines kept about 20 GB of artifacts and slots,
/// which in tmpfs, beside the simulator's own peak of 10 GB, ran this 24 GB host out of memory;
/// since slots are hard links it is about 10 GB, which fitted once with little room to spare).
/// On one disk the agents' fsyncs wait behind those writes: compare with `SCALE_SIM_DIR=/dev/shm`
/// (docs/capacity-notes.md, "Limits, as they were found").
fn sim_root_for(n: usize) -> Option<PathBuf> {
    if n >= DISK_FROM && std::env::var_os("SCALE_SIM_DIR").is_none() {
        return None;
    }
    sim_root()
}

const DISK_FROM: usize = 10_000;

/// One fleet of `r.n` machines, its files in `dir` (removed by the caller).
async fn fleet(r: &mut SizeResult, rollouts: usize, broker: BrokerKind, dir: &Path) -> Result<()> {
    let n = r.n;
    let mosquitto = match broker {
        BrokerKind::Mosquitto => Some(start_mosquitto(&dir.join("platform"))?),
        BrokerKind::Embedded => None,
    };
    let mut p = Platform::start(dir, mosquitto.as_ref().map(|m| &m.url)).await?;
    eprintln!("N={n}: platform up on {}", p.url);
    // The server side whose CPU is read: `serve`, and the broker when it is another process.
    let server_pids: Vec<u32> = std::iter::once(p.proc.pid())
        .chain(mosquitto.as_ref().map(Mosquitto::pid))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.serve_before = p.proc.mem();

    // Every rollout's artifact, and the raw baseline sends the first one's bytes.
    let payloads: Vec<Vec<u8>> = (0..rollouts.max(1))
        .map(|i| artifact_bytes(r.artifact, (n * 100 + i + 1) as u64))
        .collect();

    // 2. Raw fan-out through the same broker, before the fleet starts. From 10,000 machines on
    // it runs after the rollouts, with the simulator stopped: both at once would need 20,000
    // descriptors in `serve` (one per session), this host's hard limit. (Right after 10,000 raw
    // sessions ended, only 4,936 of 10,000 simulated machines once came online with a state:
    // the platform's inbound log was 1 MiB and lost first states, fixed since.)
    let raw_last = n >= RAW_LAST_FROM;
    let mut raw = None;
    if !raw_last {
        let bench = raw_setup(r, &p, mosquitto.as_ref(), dir).await?;
        raw_run(r, &p, &bench, None, &server_pids).await?;
        r.serve_after_raw = p.proc.mem();
        raw = Some(bench);
    }

    // 3. Onboarding. The simulated machines keep their data in memory (tmpfs) when the host
    // has one: a real fleet has a disk per machine, not one disk for all of them, and 1,000
    // agents writing and fsyncing 1 GiB to one disk would measure that disk.
    let sim_dir = match sim_root_for(n) {
        Some(root) => tempfile::tempdir_in(root)?,
        None => tempfile::tempdir_in(dir)?,
    };
    let groups = groups_for(n);
    let group_list: Vec<&str> = groups.iter().map(|g| g.as_str()).collect();
    let mut cmd = Command::new(common::device_bin()?);
    cmd.arg("simulate")
        .arg("--count")
        .arg(n.to_string())
        .arg("--groups")
        .arg(group_list.join(","))
        .arg("--prefix")
        .arg("vm-")
        .arg("--data")
        .arg(sim_dir.path())
        .arg("--broker")
        .arg(p.url.to_string())
        .arg("--machine-broker")
        .arg(
            mosquitto
                .as_ref()
                .map_or_else(|| p.url.to_string(), |m| m.machine_url.to_string()),
        )
        .arg("--admin-secret-file")
        .arg(&p.secret_file)
        .arg("--initial")
        .arg("app=1.0.0");
    let started = Instant::now();
    let mut sim = Proc::spawn("fleetcast-device simulate", &mut cmd, dir.join("sim.log"))?;
    let limit = Duration::from_secs(30) + Duration::from_millis(20 * n as u64);
    let every = Duration::from_millis(if n > 2000 { 1000 } else { 500 });
    let mut reloaded = mosquitto.is_none();
    loop {
        sim.check_alive()?;
        p.proc.check_alive()?;
        let machines = p.machines().await?;
        let ours: Vec<_> = machines
            .iter()
            .filter(|m| m.id.as_str().starts_with("vm-"))
            .collect();
        if !reloaded && ours.len() >= n {
            // Mosquitto knows a machine only once its files are regenerated.
            reload_mosquitto(mosquitto.as_ref().expect("mosquitto"), &p).await?;
            reloaded = true;
        }
        r.onboarded = ours
            .iter()
            .filter(|m| m.online && m.agent_version.is_some())
            .count();
        if r.onboarded >= n {
            r.onboarding = Some(started.elapsed());
            break;
        }
        if started.elapsed() > limit {
            bail!(
                "onboarding: {} of {n} machines online with a state after {} s",
                r.onboarded,
                limit.as_secs()
            );
        }
        tokio::time::sleep(every).await;
    }
    eprintln!(
        "N={n}: onboarded in {:.1} s",
        r.onboarding.unwrap_or_default().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.serve_idle = p.proc.mem();
    r.sim_idle = sim.mem();

    // 4. Rollouts. One feed for all of them, reading only what is new: reading the whole
    // event log before each rollout (to find its end) kept every event page sled read in
    // `serve`'s memory, and `serve` grew by the log's size, a rollout's worth each time
    // (docs/capacity-notes.md, "Memory over many rollouts").
    let app = Kind::new("app")?;
    let mut feed = EventFeed::at_end(&p).await?;
    for (i, bytes) in payloads.iter().enumerate() {
        let version = format!("2.{}.0", i + 1);
        let (_, release) = p
            .create_release(
                &dir.join(format!("app-{version}.bin")),
                bytes,
                &app,
                &version,
                InstallPolicy::Immediate,
            )
            .await?;
        // What came since the last rollout ended (its machines' late events), skipped.
        feed.poll(&p).await?;
        let stats_before = p.stats();
        let cpu_before = cpu_of(&server_pids).zip(cpu_of(&[sim.pid()]));
        let published_ms = now_ms();
        p.publish(&release, vec![], groups.clone()).await?;
        let limit = Duration::from_secs(60)
            + Duration::from_millis(120 * n as u64)
            + Duration::from_secs((r.artifact >> 20) as u64);
        let mut installed: HashMap<MachineId, u64> = HashMap::new();
        let mut failed: HashSet<MachineId> = HashSet::new();
        let mut notified: HashMap<MachineId, u64> = HashMap::new();
        let (mut dl_start, mut dl_end) = (None, None);
        let mut late: Vec<(u64, String)> = Vec::new();
        let mut timeline = Timeline::default();
        let started = Instant::now();
        loop {
            for e in feed.poll(&p).await? {
                if e.release.as_ref() != Some(&release) {
                    continue;
                }
                timeline.add(e.phase, e.at_ms, e.recorded_at_ms, published_ms);
                match e.phase {
                    Phase::Installed => {
                        // Same host, same clock: a status stored seconds after the machine
                        // made it waited in the agent, or was lost on the way and sent again
                        // (agent::RESEND_AFTER, 10 s).
                        if e.recorded_at_ms > e.at_ms + 2000 {
                            late.push((e.recorded_at_ms - e.at_ms, e.machine.to_string()));
                        }
                        installed.insert(e.machine, e.recorded_at_ms);
                    }
                    Phase::Notified => {
                        notified.entry(e.machine).or_insert(e.at_ms);
                    }
                    Phase::Downloading => {
                        dl_start.get_or_insert(e.at_ms);
                    }
                    Phase::Downloaded => dl_end = Some(e.at_ms),
                    ph if ph.is_failure() => {
                        failed.insert(e.machine);
                    }
                    _ => {}
                }
            }
            if installed.len() + failed.len() >= n || started.elapsed() > limit {
                break;
            }
            sim.check_alive()?;
            tokio::time::sleep(every).await;
        }
        let cpu_after = cpu_of(&server_pids).zip(cpu_of(&[sim.pid()]));
        let cpu = cpu_before
            .zip(cpu_after)
            .map(|((s0, m0), (s1, m1))| (s1.saturating_sub(s0), m1.saturating_sub(m0)));
        let stats_after = p.stats();
        let mut notified_ms: Vec<u64> = notified
            .values()
            .map(|at| at.saturating_sub(published_ms))
            .collect();
        notified_ms.sort_unstable();
        let all = installed.len() >= n;
        let rollout = Rollout {
            installed: installed.len(),
            failed: failed.len(),
            time: all.then(|| {
                let last = installed.values().copied().max().unwrap_or(published_ms);
                Duration::from_millis(last.saturating_sub(published_ms))
            }),
            waited: started.elapsed(),
            notified_ms,
            download: dl_start
                .zip(dl_end)
                .map(|(s, e)| Duration::from_millis(e.saturating_sub(s))),
            egress_bytes: stat_u64(&stats_after, "chunk_bytes_sent")
                .zip(stat_u64(&stats_before, "chunk_bytes_sent"))
                .map(|(a, b)| a.saturating_sub(b)),
            chunk_frames: gateway_u64(stats_after.as_ref(), "chunk_frames_delivered")
                .zip(gateway_u64(stats_before.as_ref(), "chunk_frames_delivered"))
                .map(|(a, b)| a.saturating_sub(b)),
            serve: p.proc.mem(),
            sim: sim.mem(),
            server_cpu: cpu.map(|(server, _)| server),
            sim_cpu: cpu.map(|(_, sim)| sim),
        };
        eprintln!(
            "N={n}: rollout {} — {} installed, {} failed, {}{}",
            i + 1,
            rollout.installed,
            rollout.failed,
            rollout
                .time
                .map(|t| format!("{:.1} s", t.as_secs_f64()))
                .unwrap_or_else(|| format!("not all after {:.0} s", rollout.waited.as_secs_f64())),
            late_summary(&mut late)
        );
        eprintln!("N={n}: rollout {} timeline: {}", i + 1, timeline.summary());
        eprintln!(
            "N={n}: rollout {} counters: {}",
            i + 1,
            counter_deltas(stats_before.as_ref(), stats_after.as_ref())
        );
        r.rollouts.push(rollout);
        if !all {
            break; // a stuck fleet: the next rollout would measure the backlog
        }
    }
    drop(sim);
    tokio::time::sleep(Duration::from_secs(if raw_last { 5 } else { 1 })).await;
    r.backup = Some(backup_run(&p, dir).await.map_err(|e| format!("{e:#}")));
    let raw = match raw {
        Some(bench) => bench,
        None => {
            let bench = raw_setup(r, &p, mosquitto.as_ref(), dir).await?;
            raw_run(r, &p, &bench, None, &server_pids).await?;
            r.serve_after_raw = p.proc.mem();
            bench
        }
    };
    raw_stored_run(r, &p, &raw, dir, &server_pids).await?;
    p.admin.close().await;
    drop(p.proc);
    drop(mosquitto);
    Ok(())
}

/// `fleetcast db backup` of the running platform (its simulator stopped), then `cp -a` of the
/// same database's files; both copies deleted after.
async fn backup_run(p: &Platform, dir: &Path) -> Result<BackupResult> {
    let stats = p.call(calls::Stats {}).await?;
    let on_disk = stats.database.map_or(0, |d| d.on_disk_bytes);
    let made = p.call(calls::DbBackup {}).await?;
    let to = dir.join("db-copied");
    let started = Instant::now();
    let status = Command::new("cp")
        .arg("-a")
        .arg(p.data.join("db"))
        .arg(&to)
        .status()
        .context("running cp")?;
    let cp = started.elapsed();
    let _ = std::fs::remove_dir_all(&to);
    let _ = std::fs::remove_dir_all(&made.path);
    if !status.success() {
        bail!("cp -a of the database failed: {status}");
    }
    eprintln!(
        "backup: {} records, writes held {} ms, {} of database on disk copied by cp in {} ms",
        made.records,
        made.writes_held_ms,
        on_disk,
        cp.as_millis()
    );
    Ok(BackupResult {
        on_disk,
        records: made.records,
        writes_held: Duration::from_millis(made.writes_held_ms),
        cp,
    })
}

/// What the platform counted during a rollout (`fleetcast stats`, after minus before): where
/// its chunk requests and frames went, and what the embedded broker's gateway dropped.
fn counter_deltas(before: Option<&serde_json::Value>, after: Option<&serde_json::Value>) -> String {
    const COUNTERS: [&str; 13] = [
        "chunk_requests",
        "chunk_requests_refused",
        "chunk_frames_sent",
        "chunk_frames_unneeded",
        "chunk_bytes_broadcast",
        "status_events_stored",
        "status_events_resent",
        "gateway.frames_delivered",
        "gateway.chunk_frames_delivered",
        "gateway.frames_dropped",
        "gateway.frames_already_queued",
        "gateway.frames_recently_written",
        "gateway.closed_unread",
    ];
    let (Some(before), Some(after)) = (before, after) else {
        return "`fleetcast stats` did not answer".into();
    };
    let get = |v: &serde_json::Value, name: &str| {
        name.split('.')
            .try_fold(v, |v, part| v.get(part))
            .and_then(serde_json::Value::as_u64)
    };
    COUNTERS
        .iter()
        .filter_map(|name| {
            let (a, b) = (get(after, name)?, get(before, name)?);
            Some(format!("{name} {}", a.saturating_sub(b)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fleet sizes from which the raw baseline runs after the rollouts (see `fleet`).
const RAW_LAST_FROM: usize = 10_000;

/// The raw fan-out baseline: N extra machines (`raw-…`) subscribe to an artifact topic released
/// to them and the platform principal publishes the bytes through the same broker. These are
/// its subscribers (in group `rawbench`) and what they are sent.
struct RawBench {
    machines: Vec<ProvisionedMachine>,
    /// Where they connect (on Mosquitto, the machines' listener).
    machine_url: BrokerUrl,
    topic: String,
    bytes: Vec<u8>,
    timeout: Duration,
}

async fn raw_setup(
    r: &SizeResult,
    p: &Platform,
    mosquitto: Option<&Mosquitto>,
    dir: &Path,
) -> Result<RawBench> {
    let n = r.n;
    let raw_group = GroupId::new("rawbench")?;
    let raw_ids: Vec<MachineId> = (1..=n)
        .map(|i| MachineId::new(format!("raw-{i:05}")))
        .collect::<Result<_, _>>()?;
    let machines = p.provision(&raw_ids, &raw_group).await?;
    if let Some(m) = mosquitto {
        reload_mosquitto(m, p).await?;
    }
    // The raw bytes travel on an artifact topic, which the broker sizes for bulk (a machine's
    // own and group topics get small logs) and which a machine may read only for an artifact
    // released to it: so the raw group gets a real release of an artifact of the same size.
    let bytes = artifact_bytes(r.artifact, (n * 100) as u64);
    let (raw_artifact, raw_release) = p
        .create_release(
            &dir.join("rawbench.bin"),
            &bytes,
            &Kind::new("rawbench")?,
            "1.0",
            InstallPolicy::DownloadOnly,
        )
        .await?;
    p.publish(&raw_release, vec![], vec![raw_group.clone()])
        .await?;
    Ok(RawBench {
        machines,
        machine_url: mosquitto.map_or_else(|| p.url.clone(), |m| m.machine_url.clone()),
        topic: Topics::default().artifact_chunks(&raw_artifact),
        bytes,
        timeout: Duration::from_secs(30 + (n * r.artifact / (50 << 20)) as u64),
    })
}

/// One raw fan-out to `raw`'s subscribers, storing what they receive in `store` or only
/// counting it; its result goes into `r`.
async fn raw_run(
    r: &mut SizeResult,
    p: &Platform,
    raw: &RawBench,
    store: Option<&Path>,
    server_pids: &[u32],
) -> Result<()> {
    let n = r.n;
    let result = raw_fanout(
        &p.url,
        &raw.machine_url,
        &p.platform_password()?,
        &raw.machines,
        RawSend {
            topic: &raw.topic,
            payload: &raw.bytes,
            msg_size: MSG,
            store,
        },
        raw.timeout,
        server_pids,
    )
    .await;
    let what = match store {
        Some(_) => "raw fan-out, storing",
        None => "raw fan-out",
    };
    if let Ok(x) = &result {
        eprintln!(
            "N={n}: {what} {:.2} s, {} of {n} complete",
            x.time.as_secs_f64(),
            x.complete
        );
    }
    let (ok, err) = match result {
        Ok(x) => (Some(x), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    match store {
        Some(_) => (r.raw_stored, r.raw_stored_error) = (ok, err),
        None => (r.raw, r.raw_error) = (ok, err),
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// The fan-out again with each subscriber storing what it receives where the simulated
/// machines keep their data: what receiving the artifact costs a fleet that keeps it, before
/// anything fleetcast adds. Run last, after the rollouts and with the simulator stopped, so
/// that it changes none of the memory readings.
async fn raw_stored_run(
    r: &mut SizeResult,
    p: &Platform,
    raw: &RawBench,
    dir: &Path,
    server_pids: &[u32],
) -> Result<()> {
    if let Some(why) = storing_does_not_fit(r.n) {
        r.raw_stored_skipped = Some(why);
        return Ok(());
    }
    let root = sim_root_for(r.n).unwrap_or_else(|| dir.to_owned());
    let stored = tempfile::tempdir_in(&root)
        .with_context(|| format!("a directory in {}", root.display()))?;
    raw_run(r, p, raw, Some(stored.path()), server_pids).await
}

// ---------- output ----------

fn mb(m: Mem) -> String {
    if m.rss_kib == 0 {
        return "—".into();
    }
    format!("{:.0} MB", m.rss_mb())
}

fn raw_cell(r: &SizeResult) -> String {
    raw_result_cell(&r.raw, &r.raw_error)
}

fn raw_result_cell(raw: &Option<RawResult>, error: &Option<String>) -> String {
    match (raw, error) {
        (Some(raw), _) if raw.ok() => format!("{:.2} s", raw.time.as_secs_f64()),
        (Some(raw), _) => format!(
            "FAILED: {} of {} subscribers got every byte (fewest: {} of {} bytes)",
            raw.complete, raw.subscribers, raw.min_bytes, raw.total_bytes
        ),
        (None, Some(e)) => format!("FAILED: {e}"),
        (None, None) => "not run".into(),
    }
}

fn rollout_cell(n: usize, ro: Option<&Rollout>) -> String {
    match ro {
        None => "not run".into(),
        Some(ro) => match ro.time {
            Some(t) => format!("{:.2} s", t.as_secs_f64()),
            None => format!(
                "FAILED: {} of {n} installed, {} failed, after {:.0} s",
                ro.installed,
                ro.failed,
                ro.waited.as_secs_f64()
            ),
        },
    }
}

fn ratio(a: Option<Duration>, base: Option<&RawResult>) -> String {
    match (a, base) {
        (Some(a), Some(b)) if b.ok() && !b.time.is_zero() => {
            format!("{:.1}", a.as_secs_f64() / b.time.as_secs_f64())
        }
        _ => "—".into(),
    }
}

fn egress_cell(ro: Option<&Rollout>, artifact: usize) -> String {
    match ro.and_then(|r| r.egress_bytes) {
        Some(b) => format!("{:.2}", b as f64 / artifact as f64),
        None => "n/a".into(),
    }
}

/// A counter of the gateway's in `fleetcast stats --json` (embedded broker only).
fn gateway_u64(stats: Option<&serde_json::Value>, field: &str) -> Option<u64> {
    stats?.get("gateway")?.get(field)?.as_u64()
}

/// Chunk frames written to the machines ÷ what they needed (one copy of each frame of the
/// artifact each): 1.00 is a broadcast that reached every machine once and nothing sent again.
fn delivered_cell(ro: Option<&Rollout>, n: usize, artifact: usize) -> String {
    // A one-chunk artifact needs no manifest (protocol.md §7.1): its chunk is checked against
    // the artifact id.
    let needed = Layout::new(artifact as u64, DEFAULT_CHUNK_SIZE).map(|l| {
        let manifest = if l.chunks > 1 { l.manifest_parts() } else { 0 };
        u64::from(l.chunks + manifest) * n as u64
    });
    match (ro.and_then(|r| r.chunk_frames), needed) {
        (Some(sent), Ok(needed)) if needed > 0 => format!("{:.2}", sent as f64 / needed as f64),
        _ => "n/a".into(),
    }
}

fn latency_cell(ro: Option<&Rollout>) -> String {
    let Some(ro) = ro else { return "—".into() };
    match (
        percentile(&ro.notified_ms, 50.0),
        percentile(&ro.notified_ms, 99.0),
    ) {
        (Some(p50), Some(p99)) => format!(
            "{:.2} s / {:.2} s ({} machines)",
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
            ro.notified_ms.len()
        ),
        _ => "—".into(),
    }
}

fn print_fleet(results: &[SizeResult], broker: BrokerKind) {
    let artifact = results.first().map_or(1 << 20, |r| r.artifact);
    let (art, messages) = (size_label(artifact), artifact.div_ceil(MSG));
    println!("Broker: {}. Artifact {art} (64 KiB chunks), policy `immediate`, groups g1,g2. Raw fan-out: the same {art} as {messages} × 64 KiB QoS 1 from the platform principal to N plain rumqttc subscribers (machines `raw-…` in group `rawbench`, on an artifact topic released to them; on the embedded broker through rumqttd and the gateway's relay), run after `serve` started and before the simulated fleet (from {RAW_LAST_FROM} machines on: after the rollouts, with the simulator stopped), every subscriber's byte count checked. Simulated machines' data: {}{}.", broker.label(), sim_root().map_or_else(|| "on disk beside the platform's (SCALE_SIM_DIR=disk)".to_owned(), |d| format!("in {} (tmpfs: a fleet has a disk per machine; SCALE_SIM_DIR=disk for one shared disk)", d.display())), if std::env::var_os("SCALE_SIM_DIR").is_none() { format!(" (from {DISK_FROM} machines on: on disk)") } else { " (SCALE_SIM_DIR set: for every size)".to_owned() });
    println!();
    println!("| machines | onboarding (provision + connect + first state) | raw fan-out {art} | fleetcast rollout {art} (publish → all `installed`) | ratio to raw | notice → `notified` p50 / p99 | platform egress ÷ artifact | chunk frames written to machines ÷ needed |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in results {
        let first = r.rollouts.first();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.n,
            match (r.onboarding, &r.error) {
                (Some(d), _) => format!("{:.1} s", d.as_secs_f64()),
                (None, Some(_)) => format!("FAILED: {} of {} online", r.onboarded, r.n),
                (None, None) => "—".into(),
            },
            raw_cell(r),
            rollout_cell(r.n, first),
            ratio(first.and_then(|f| f.time), r.raw.as_ref()),
            latency_cell(first),
            egress_cell(first, r.artifact),
            delivered_cell(first, r.n, r.artifact),
        );
    }
    for r in results {
        if let Some(e) = &r.error {
            println!();
            println!("N = {}: stopped with an error: `{}`", r.n, one_line(e));
        }
    }
    print_stored(results);
    print_backup(results);
    println!();
    println!("| machines | `serve` RSS before | after the raw baseline | idle with N machines | per idle machine | after rollout 1 (VmHWM) | simulator idle | per simulated machine | simulator after rollout 1 (VmHWM) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let first = r.rollouts.first();
        let per = |a: Mem, b: Mem| {
            if a.rss_kib == 0 || b.rss_kib == 0 {
                return "—".to_string();
            }
            format!(
                "{:.0} KiB",
                (a.rss_kib as f64 - b.rss_kib as f64) / r.n as f64
            )
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.n,
            mb(r.serve_before),
            mb(r.serve_after_raw),
            mb(r.serve_idle),
            // The raw baseline ran last from RAW_LAST_FROM machines on: idle is then measured
            // against `serve` before anything.
            per(
                r.serve_idle,
                if r.n >= RAW_LAST_FROM {
                    r.serve_before
                } else {
                    r.serve_after_raw
                }
            ),
            first
                .map(|f| format!("{} ({:.0} MB)", mb(f.serve), f.serve.hwm_mb()))
                .unwrap_or("—".into()),
            mb(r.sim_idle),
            if r.sim_idle.rss_kib == 0 {
                "—".into()
            } else {
                format!("{:.0} KiB", r.sim_idle.rss_kib as f64 / r.n as f64)
            },
            first
                .map(|f| format!("{} ({:.0} MB)", mb(f.sim), f.sim.hwm_mb()))
                .unwrap_or("—".into()),
        );
    }
    print_cpu(results, broker);
    for r in results.iter().filter(|r| r.rollouts.len() > 1) {
        println!();
        println!(
            "Rollouts in a row to {} machines ({} each):",
            r.n,
            size_label(r.artifact)
        );
        println!();
        println!("| rollout | publish → all `installed` | notified p50 / p99 | egress ÷ artifact | `serve` RSS (VmHWM) | simulator RSS (VmHWM) | CPU: server side / simulator |");
        println!("|---|---|---|---|---|---|---|");
        for (i, ro) in r.rollouts.iter().enumerate() {
            println!(
                "| {} | {} | {} | {} | {} ({:.0} MB) | {} ({:.0} MB) | {} / {} |",
                i + 1,
                rollout_cell(r.n, Some(ro)),
                latency_cell(Some(ro)),
                egress_cell(Some(ro), r.artifact),
                mb(ro.serve),
                ro.serve.hwm_mb(),
                mb(ro.sim),
                ro.sim.hwm_mb(),
                cpu_cell(ro.server_cpu),
                cpu_cell(ro.sim_cpu),
            );
        }
        if let (Some(a), Some(b)) = (r.rollouts.first(), r.rollouts.last()) {
            println!();
            let target = if r.n == 1000 {
                "target: within 10 %"
            } else {
                "issue 6's target, at 1,000 machines: within 10 %"
            };
            let later = r.rollouts.len().saturating_sub(1).max(1) as f64;
            println!(
                "`serve` RSS after rollout {} vs after rollout 1: {:+.0} % ({target}); {:+.1} MB per rollout after the first.",
                r.rollouts.len(),
                (b.serve.rss_kib as f64 / a.serve.rss_kib.max(1) as f64 - 1.0) * 100.0,
                (b.serve.rss_kib as f64 - a.serve.rss_kib as f64) / 1024.0 / later
            );
        }
    }
}

/// `db backup` while `serve` runs, against `cp -a` of the same files.
fn print_backup(results: &[SizeResult]) {
    println!();
    println!("Backup while `serve` runs: `fleetcast db backup` after the rollouts (simulator stopped), how long the platform's writes waited (the database copied record by record into a fresh one, read back and compared; keys; artifacts linked), beside `cp -a` of the same database's files in the same run (what a stop-and-copy backup copies; `serve` idle meanwhile).");
    println!();
    println!("| machines | rollouts before it | database on disk | records | writes held | `cp -a` of its files | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for r in results {
        let cells = match &r.backup {
            None => "not run | | | | |".to_owned(),
            Some(Err(e)) => format!("FAILED: {e} | | | | |"),
            Some(Ok(b)) => format!(
                "{:.1} MiB | {} | {:.2} s | {:.2} s | {:.1}x",
                b.on_disk as f64 / f64::from(1 << 20),
                b.records,
                b.writes_held.as_secs_f64(),
                b.cp.as_secs_f64(),
                b.writes_held.as_secs_f64() / b.cp.as_secs_f64().max(0.001)
            ),
        };
        println!("| {} | {} | {cells} |", r.n, r.rollouts.len());
    }
}

/// The rollout against a raw fan-out whose subscribers also keep what they receive: how much
/// of the rollout's time is what storing a verified copy on every machine costs this host
/// (with the fleet on its cores) and how much is fleetcast's own.
fn print_stored(results: &[SizeResult]) {
    println!();
    println!("Receiving and keeping: the same raw fan-out, each subscriber also hashing every message (blake3) and writing it at its offset into a file of its own where the simulated machines keep their data (no fsync, no final hash, no install, no report), run after the rollouts with the simulator stopped.");
    println!();
    println!("| machines | raw fan-out | raw fan-out, storing | its receivers' CPU | fleetcast rollout 1 | ratio to raw | ratio to raw, storing |");
    println!("|---|---|---|---|---|---|---|");
    for r in results {
        let first = r.rollouts.first().and_then(|f| f.time);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.n,
            raw_cell(r),
            match &r.raw_stored_skipped {
                Some(why) => format!("not run: {why}"),
                None => raw_result_cell(&r.raw_stored, &r.raw_stored_error),
            },
            cpu_cell(r.raw_stored.as_ref().and_then(|x| x.clients_cpu)),
            rollout_cell(r.n, r.rollouts.first()),
            ratio(first, r.raw.as_ref()),
            ratio(first, r.raw_stored.as_ref()),
        );
    }
}

fn cpu_cell(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn cpu_ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.1}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "—".into(),
    }
}

/// Where the CPU went while the bytes moved, in the raw fan-out and in the first rollout: the
/// server side against the server side, the receivers against the receivers. The rollout's
/// wall-clock ratio mixes the two on a host where both share the cores; a real fleet brings a
/// CPU per machine, so the server side's ratio is what an operator's server pays.
fn print_cpu(results: &[SizeResult], broker: BrokerKind) {
    let server = match broker {
        BrokerKind::Embedded => "`serve` (its embedded broker included)",
        BrokerKind::Mosquitto => "`serve` and Mosquitto",
    };
    println!();
    println!("CPU time (user + system, seconds of one core) while the artifact moved. Server side: {server}. Receivers: in the raw fan-out the bench process (its N plain subscribers and the publisher), in the rollout the simulator (its N agents requesting, verifying, writing, installing and reporting). Raw: first publish → every subscriber complete; rollout: publish → the last `installed` seen (polled every 0.5-1 s).");
    println!();
    println!("| machines | server side: raw fan-out | server side: rollout 1 | ratio | receivers: raw fan-out | simulator: rollout 1 | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for r in results {
        let (raw, first) = (r.raw.as_ref(), r.rollouts.first());
        let (raw_server, raw_clients) = (
            raw.and_then(|x| x.server_cpu),
            raw.and_then(|x| x.clients_cpu),
        );
        let (ro_server, ro_sim) = (
            first.and_then(|f| f.server_cpu),
            first.and_then(|f| f.sim_cpu),
        );
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.n,
            cpu_cell(raw_server),
            cpu_cell(ro_server),
            cpu_ratio(ro_server, raw_server),
            cpu_cell(raw_clients),
            cpu_cell(ro_sim),
            cpu_ratio(ro_sim, raw_clients),
        );
    }
}

fn print_download(runs: &[SizeResult], broker: BrokerKind) {
    let Some(first) = runs.first() else {
        return;
    };
    let mbytes = first.artifact as f64 / 1e6;
    let budget = match common::machine_rate() {
        Some(rate) => {
            format!("per-machine byte budget raised to {rate} MiB/s with `--machine-rate`")
        }
        None => "default per-machine byte budget: the machine's first copy of each chunk at once, 64 MiB/s for chunks asked for again".into(),
    };
    println!("Broker: {}. One simulated machine, one artifact of {:.0} MB through `fleetcast serve` (child process, {budget}); raw: the same bytes as 64 KiB QoS 1 messages from the platform principal to one subscriber, paced to stay at most 2 MiB ahead of it, run just before the machine started.{}", broker.label(), mbytes, if runs.len() > 1 { format!(" {} pairs, each with a `serve` of its own; the ratio is the median of the pairs'.", runs.len()) } else { String::new() });
    println!();
    println!("| what | size | time | throughput | ratio to raw |");
    println!("|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let pair = if runs.len() > 1 {
            format!(" (pair {})", i + 1)
        } else {
            String::new()
        };
        let raw_ok = r.raw.as_ref().filter(|x| x.ok());
        match raw_ok {
            Some(raw) => println!(
                "| raw rumqttc pub/sub, 64 KiB QoS 1{pair} | {mbytes:.0} MB | {:.2} s | {:.1} MB/s | 1.00 |",
                raw.time.as_secs_f64(),
                mbytes / raw.time.as_secs_f64()
            ),
            None => println!(
                "| raw rumqttc pub/sub, 64 KiB QoS 1{pair} | {mbytes:.0} MB | {} | — | — |",
                raw_cell(r)
            ),
        }
        let ro = r.rollouts.first();
        match ro.and_then(|ro| ro.download) {
            Some(d) => {
                let ratio = raw_ok.map(|raw| raw.time.as_secs_f64() / d.as_secs_f64());
                ratios.extend(ratio);
                println!(
                    "| fleetcast download (`downloading` → `downloaded`, machine clock){pair} | {mbytes:.0} MB | {:.2} s | {:.1} MB/s | {} |",
                    d.as_secs_f64(),
                    mbytes / d.as_secs_f64(),
                    ratio.map(|x| format!("{x:.2}")).unwrap_or("—".into())
                )
            }
            None => println!(
                "| fleetcast download{pair} | {mbytes:.0} MB | FAILED: {} | — | — |",
                r.error
                    .as_deref()
                    .map(one_line)
                    .unwrap_or_else(|| rollout_cell(1, ro))
            ),
        }
    }
    if runs.len() > 1 {
        ratios.sort_by(f64::total_cmp);
        let shown: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
        // The middle one, or the mean of the middle two for an even count.
        let n = ratios.len();
        let median = (n > 0).then(|| (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0);
        match median.as_ref() {
            // Any failed pair makes the median FAILED: a median of the pairs that finished
            // would hide the failure.
            Some(median) if ratios.len() == runs.len() => println!(
                "| **median ratio of the {} pairs** ({}) | | | | **{median:.2}** |",
                runs.len(),
                shown.join(", ")
            ),
            _ => println!(
                "| median ratio | | FAILED: {} of {} pairs finished ({}) | | — |",
                ratios.len(),
                runs.len(),
                shown.join(", ")
            ),
        }
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
}

/// A plotted line: name, colour, (fleet size, value) points.
type Series = (&'static str, &'static str, Vec<(usize, Option<f64>)>);

/// Rollout time (fleetcast and raw) and `serve` RSS against fleet size, as a hand-written SVG.
fn plot_svg(results: &[SizeResult]) -> String {
    let pts: Vec<&SizeResult> = results.iter().filter(|r| r.n > 0).collect();
    let (w, h, pad) = (360.0, 240.0, 50.0);
    let xs: Vec<f64> = pts.iter().map(|r| (r.n as f64).log10()).collect();
    let (xmin, xmax) = (
        xs.iter().cloned().fold(f64::INFINITY, f64::min),
        xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    );
    let xspan = if xmax > xmin { xmax - xmin } else { 1.0 };
    let x_at = |n: usize, ox: f64| ox + pad + ((n as f64).log10() - xmin) / xspan * (w - 2.0 * pad);
    let mut svg = String::new();
    svg.push_str(&format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        2.0 * w + 20.0,
        h + 40.0
    ));
    svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panel = |svg: &mut String, ox: f64, title: &str, unit: &str, series: &[Series]| {
        let ymax = series
            .iter()
            .flat_map(|(_, _, s)| s.iter().filter_map(|(_, v)| *v))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1;
        let y_at = |v: f64| h - pad + 20.0 - v / ymax * (h - 2.0 * pad);
        svg.push_str(&format!(
            r#"<text x="{}" y="16" font-size="13">{title}</text>"#,
            ox + pad
        ));
        // axes
        svg.push_str(&format!(
            r#"<line x1="{x0}" y1="{yb}" x2="{x1}" y2="{yb}" stroke="black"/><line x1="{x0}" y1="{yb}" x2="{x0}" y2="{yt}" stroke="black"/>"#,
            x0 = ox + pad,
            x1 = ox + w - pad,
            yb = y_at(0.0),
            yt = y_at(ymax)
        ));
        for k in 0..=4 {
            let v = ymax * k as f64 / 4.0;
            svg.push_str(&format!(
                r#"<text x="{}" y="{}" text-anchor="end">{:.1}</text>"#,
                ox + pad - 4.0,
                y_at(v) + 4.0,
                v
            ));
        }
        svg.push_str(&format!(
            r#"<text x="{}" y="{}" text-anchor="middle">{unit}</text>"#,
            ox + 14.0,
            y_at(ymax) - 8.0
        ));
        for r in &pts {
            svg.push_str(&format!(
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                x_at(r.n, ox),
                y_at(0.0) + 14.0,
                r.n
            ));
        }
        svg.push_str(&format!(
            r#"<text x="{}" y="{}" text-anchor="middle">machines (log scale)</text>"#,
            ox + w / 2.0,
            y_at(0.0) + 28.0
        ));
        for (k, (name, color, s)) in series.iter().enumerate() {
            let line: Vec<String> = s
                .iter()
                .filter_map(|(n, v)| v.map(|v| format!("{:.1},{:.1}", x_at(*n, ox), y_at(v))))
                .collect();
            svg.push_str(&format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                line.join(" ")
            ));
            for p in &line {
                let (x, y) = p.split_once(',').expect("x,y");
                svg.push_str(&format!(
                    r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#
                ));
            }
            svg.push_str(&format!(
                r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
                ox + pad + 8.0,
                34.0 + 13.0 * k as f64
            ));
        }
    };
    let series_time = [
        (
            "fleetcast rollout (publish → all installed)",
            "#c0392b",
            pts.iter()
                .map(|r| {
                    (
                        r.n,
                        r.rollouts
                            .first()
                            .and_then(|f| f.time)
                            .map(|t| t.as_secs_f64()),
                    )
                })
                .collect(),
        ),
        (
            "raw fan-out of the same bytes",
            "#2471a3",
            pts.iter()
                .map(|r| {
                    (
                        r.n,
                        r.raw
                            .as_ref()
                            .filter(|x| x.ok())
                            .map(|x| x.time.as_secs_f64()),
                    )
                })
                .collect(),
        ),
    ];
    let artifact = results.first().map_or(1 << 20, |r| r.artifact);
    let title = format!("{} rollout time", size_label(artifact));
    panel(&mut svg, 0.0, &title, "s", &series_time);
    let series_mem = [
        (
            "serve RSS idle with N machines",
            "#2471a3",
            pts.iter()
                .map(|r| {
                    (
                        r.n,
                        (r.serve_idle.rss_kib > 0).then(|| r.serve_idle.rss_mb()),
                    )
                })
                .collect(),
        ),
        (
            "serve RSS after rollout 1",
            "#c0392b",
            pts.iter()
                .map(|r| (r.n, r.rollouts.first().map(|f| f.serve.rss_mb())))
                .collect(),
        ),
    ];
    panel(
        &mut svg,
        w + 20.0,
        "fleetcast serve memory",
        "MB",
        &series_mem,
    );
    svg.push_str("</svg>\n");
    svg
}

async fn run() -> Result<()> {
    let broker = match std::env::var("SCALE_BROKER").as_deref() {
        Ok("mosquitto") => BrokerKind::Mosquitto,
        _ => BrokerKind::Embedded,
    };
    if broker == BrokerKind::Mosquitto && fleetcast_broker::testing::mosquitto_binary().is_none() {
        println!("--- results ---");
        println!("Skipped: `mosquitto` is not installed (apt-get install mosquitto).");
        return Ok(());
    }
    let root: PathBuf = std::env::temp_dir();
    if let Some(mbytes) = std::env::var("SCALE_DOWNLOAD_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let runs = std::env::var("SCALE_DOWNLOAD_RUNS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(3)
            .max(1);
        let mut results = Vec::new();
        for _ in 0..runs {
            results.push(run_size(1, mbytes * 1_000_000, 1, broker, &root).await);
        }
        println!("--- results ---");
        print_download(&results, broker);
        return Ok(());
    }
    let artifact = artifact_len();
    let mut results = Vec::new();
    for n in sizes() {
        // Ten rollouts in a row at 1,000 (item 3), one elsewhere, unless `SCALE_ROLLOUTS` asks.
        let rollouts = match std::env::var("SCALE_ROLLOUTS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(r) => r,
            None if n == 1000 => 10,
            None => 1,
        };
        results.push(run_size(n, artifact, rollouts.max(1), broker, &root).await);
    }
    println!("--- results ---");
    print_fleet(&results, broker);
    if let Ok(path) = std::env::var("SCALE_SVG") {
        std::fs::write(&path, plot_svg(&results)).with_context(|| format!("writing {path}"))?;
        eprintln!("plot written to {path}");
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = common::until_signal(run()).await {
        eprintln!("scale bench failed: {e:#}");
        std::process::exit(1);
    }
}
