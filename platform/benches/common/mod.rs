//! Shared by the fleet benchmarks (`scale`, `ingest`): child processes that are always killed,
//! `fleetcast serve` started on a free port, admin requests, the event feed, memory readings,
//! and the raw fan-out baseline.
//!
//! Every wait is bounded; every child process is killed (and reaped) when its guard drops,
//! including on an error or a panic; every temp dir is a `tempfile::TempDir`.

#![allow(dead_code)] // each bench uses a different part of this module

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fleetcast_broker::admin::AdminClient;
use fleetcast_broker::client;
use fleetcast_broker::BrokerUrl;
use fleetcast_proto::admin::{
    FleetEvent, MachineInfo, MachineSpec, ProvisionedMachine, MAX_PROVISION_BATCH,
};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::calls::{self, Call};
use fleetcast_proto::{ArtifactId, GroupId, InstallPolicy, Kind, MachineId, ReleaseId, Topics};
use rumqttc::{Event, Incoming, QoS};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Admin requests may queue behind a busy platform; this bounds each one.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `serve` may take to write its secret and answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process, killed and reaped on drop.
pub struct Proc {
    child: Child,
    pub name: &'static str,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { child, name, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has exited (with the tail of its log).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited ({status}); last lines of its log:\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn mem(&self) -> Mem {
        Mem::of(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl Mem {
    pub fn of(pid: u32) -> Self {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Self {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }

    pub fn rss_mb(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn hwm_mb(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat` (`self` for this one);
/// `None` where there is no such file.
pub fn cpu_time(pid: &str) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), closed by the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux's every architecture's ABI.
    Some(std::time::Duration::from_millis(ticks * 10))
}

/// CPU time the processes `pids` have used together; `None` if any cannot be read.
pub fn cpu_of(pids: &[u32]) -> Option<std::time::Duration> {
    pids.iter().map(|p| cpu_time(&p.to_string())).sum()
}

/// The `fleetcast` binary built for this bench; `fleetcast-device` must be built beside it too
/// (scripts/bench.sh does). `BENCH_BIN_DIR` names another directory holding both, to compare
/// builds with the same bench. Why: copying other builds over `target/release/` wrote into the
/// files cargo hard-links there, so cargo, which checks sources and not its outputs, kept
/// running the copies in later recorded benches (2026-11-29).
pub fn fleetcast_bin() -> PathBuf {
    match std::env::var_os("BENCH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir).join("fleetcast"),
        None => PathBuf::from(env!("CARGO_BIN_EXE_fleetcast")),
    }
}

pub fn device_bin() -> Result<PathBuf> {
    let bin = fleetcast_bin()
        .parent()
        .map(|d| d.join("fleetcast-device"))
        .ok_or_else(|| anyhow!("no directory for the fleetcast binary"))?;
    if !bin.is_file() {
        bail!(
            "{} is missing: build it first (cargo build --release -p fleetcast-device)",
            bin.display()
        );
    }
    Ok(bin)
}

pub fn now_ms() -> u64 {
    fleetcast_platform::now_ms()
}

/// A running `fleetcast serve` with an admin connection.
pub struct Platform {
    pub proc: Proc,
    pub data: PathBuf,
    /// Where clients connect (the embedded broker, or the external one).
    pub url: BrokerUrl,
    pub secret_file: PathBuf,
    pub admin: AdminClient,
}

/// `SCALE_MACHINE_RATE`: `serve --machine-rate` (MiB/s of chunks per machine), if set.
pub fn machine_rate() -> Option<String> {
    std::env::var("SCALE_MACHINE_RATE")
        .ok()
        .filter(|v| !v.is_empty())
}

impl Platform {
    /// Starts `fleetcast serve --data DIR/platform` with its embedded broker on a free loopback
    /// port (`external: None`) or on `external`.
    pub async fn start(dir: &Path, external: Option<&BrokerUrl>) -> Result<Self> {
        let data = dir.join("platform");
        let mut last = None;
        for attempt in 0..3 {
            let (url, mut cmd) = match external {
                Some(url) => {
                    let mut cmd = Command::new(fleetcast_bin());
                    cmd.arg("serve")
                        .arg("--data")
                        .arg(&data)
                        .arg("--broker")
                        .arg(url.to_string());
                    (url.clone(), cmd)
                }
                None => {
                    let port = client::free_loopback_port()?;
                    let mut cmd = Command::new(fleetcast_bin());
                    cmd.arg("serve")
                        .arg("--data")
                        .arg(&data)
                        .arg("--listen")
                        .arg(format!("127.0.0.1:{port}"));
                    (BrokerUrl::mqtt("127.0.0.1", port), cmd)
                }
            };
            if let Some(rate) = machine_rate() {
                cmd.arg("--machine-rate").arg(rate);
            }
            let log = dir.join(format!("serve-{attempt}.log"));
            let mut proc = Proc::spawn("fleetcast serve", &mut cmd, log)?;
            match connect_admin(&mut proc, &data, &url).await {
                Ok(admin) => {
                    return Ok(Self {
                        proc,
                        secret_file: fleetcast_platform::admin_secret_path(&data),
                        data,
                        url,
                        admin,
                    })
                }
                // A port taken between choosing and binding it: try another one.
                Err(e) => last = Some(e),
            }
            if external.is_some() {
                break;
            }
        }
        Err(last.expect("at least one attempt"))
    }

    pub fn secret(&self) -> Result<Secret> {
        fleetcast_broker::admin::load_secret(None, &self.secret_file).map_err(|e| anyhow!(e))
    }

    /// The password of the platform principal (`fleetcast-platform`), derived from the data dir
    /// the way `serve` derives it.
    pub fn platform_password(&self) -> Result<String> {
        Ok(fleetcast_platform::load_or_create_keys(&self.data)?.platform_mqtt_password())
    }

    /// Sends one typed call, waiting up to [`ADMIN_TIMEOUT`] (a busy platform answers late),
    /// and takes the reply it calls for.
    pub async fn call<C: Call>(&self, call: C) -> Result<C::Reply> {
        let reply = self
            .admin
            .request_with_timeout(call.into(), ADMIN_TIMEOUT)
            .await
            .with_context(|| format!("admin request {}", C::OP))?;
        C::reply(reply).map_err(|other| {
            anyhow!(
                "unexpected reply to {}: {} (expected {})",
                C::OP,
                calls::reply_name(&other),
                C::REPLY
            )
        })
    }

    /// Uploads `bytes` as `kind` `version` (64 KiB chunks) and creates a release of it.
    pub async fn create_release(
        &self,
        file: &Path,
        bytes: &[u8],
        kind: &Kind,
        version: &str,
        policy: InstallPolicy,
    ) -> Result<(ArtifactId, ReleaseId)> {
        std::fs::write(file, bytes)?;
        let artifact = self
            .admin
            .upload(file, kind.clone(), version.into(), None, 65536, |_, _| {})
            .await
            .with_context(|| format!("uploading {kind} {version}"))?
            .id;
        let release = self
            .call(calls::ReleaseCreate {
                kind: kind.clone(),
                version: version.into(),
                policy,
                notes: None,
            })
            .await?;
        Ok((artifact, release.id))
    }

    pub async fn publish(
        &self,
        release: &ReleaseId,
        machines: Vec<MachineId>,
        groups: Vec<GroupId>,
    ) -> Result<()> {
        let publish = calls::ReleasePublish {
            release: release.clone(),
            machines,
            groups,
            allow_empty: false,
            waves: None,
        };
        self.call(publish).await.map(|_| ())
    }

    /// Every machine, a page at a time (the unpaged `machines` reply of a 10,000-machine fleet
    /// is over the packet limit).
    pub async fn machines(&self) -> Result<Vec<MachineInfo>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .call(calls::MachineQuery {
                    filter: Default::default(),
                    after: after.take(),
                    limit: None,
                })
                .await?;
            all.extend(page.items);
            match page.next {
                Some(next) if page.more => after = Some(next),
                _ => return Ok(all),
            }
        }
    }

    /// Provisions `ids` in `group`, 1,000 per round trip.
    pub async fn provision(
        &self,
        ids: &[MachineId],
        group: &GroupId,
    ) -> Result<Vec<ProvisionedMachine>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(MAX_PROVISION_BATCH) {
            let provision = calls::MachineProvisionBatch {
                machines: batch
                    .iter()
                    .map(|m| MachineSpec {
                        machine: m.clone(),
                        groups: vec![group.clone()],
                    })
                    .collect(),
                rotate: false,
            };
            let machines = self.call(provision).await?;
            if machines.len() != batch.len() {
                bail!(
                    "provisioning {} machines answered {}",
                    batch.len(),
                    machines.len()
                );
            }
            out.extend(machines);
        }
        Ok(out)
    }

    /// `fleetcast stats --json`'s `chunk_bytes_sent` and `status_events_stored`, or None when
    /// this platform has no such command (yet).
    pub fn stats(&self) -> Option<serde_json::Value> {
        let out = Command::new(fleetcast_bin())
            .arg("stats")
            .arg("--json")
            .arg("--admin-secret-file")
            .arg(&self.secret_file)
            .arg("--broker")
            .arg(self.url.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    }
}

pub fn stat_u64(stats: &Option<serde_json::Value>, field: &str) -> Option<u64> {
    stats.as_ref()?.get(field)?.as_u64()
}

async fn connect_admin(proc: &mut Proc, data: &Path, url: &BrokerUrl) -> Result<AdminClient> {
    let secret_path = fleetcast_platform::admin_secret_path(data);
    let started = Instant::now();
    loop {
        proc.check_alive()?;
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "fleetcast serve did not answer within {} s; its log:\n{}",
                START_TIMEOUT.as_secs(),
                proc.log_tail(20)
            );
        }
        if secret_path.exists() {
            if let Ok(secret) = fleetcast_broker::admin::load_secret(None, &secret_path) {
                if let Ok(admin) =
                    AdminClient::connect(url, Topics::default(), secret, Duration::from_secs(5))
                        .await
                {
                    if admin.call(calls::Machines {}).await.is_ok() {
                        return Ok(admin);
                    }
                    admin.close().await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads stored events incrementally (`events_since`).
pub struct EventFeed {
    pub next: u64,
}

impl EventFeed {
    /// Starts after every event stored so far.
    pub async fn at_end(p: &Platform) -> Result<Self> {
        let mut feed = Self { next: 0 };
        feed.poll(p).await?;
        Ok(feed)
    }

    pub async fn poll(&mut self, p: &Platform) -> Result<Vec<FleetEvent>> {
        let mut out = Vec::new();
        loop {
            let page = p
                .call(calls::EventsSince {
                    since: self.next,
                    limit: None,
                })
                .await?;
            out.extend(page.items);
            self.next = page.next;
            if !page.more {
                return Ok(out);
            }
        }
    }
}

/// What the raw fan-out baseline publishes: `payload` on `topic`, as messages of `msg_size`.
pub struct RawSend<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub msg_size: usize,
    /// Where each subscriber stores what it receives, or `None` to only count it. Storing: the
    /// subscriber hashes each message (blake3) and writes it at its offset into a file of its
    /// own in this directory, on its own task (no fsync, no second pass, no report): the least
    /// an updater that verifies and keeps what it downloads does with each byte.
    pub store: Option<&'a Path>,
}

/// Why this process cannot hold a storing fan-out to `n` subscribers, if it cannot: each
/// holds a socket and a file (15,000 of them stopped at this host's 20,000 with 4,986
/// connected).
pub fn storing_does_not_fit(n: usize) -> Option<String> {
    let limit = fleetcast_broker::fdlimit::raise_open_file_limit().unwrap_or(1024);
    let need = 2 * n as u64 + 256;
    (need > limit).then(|| {
        format!("needs about {need} open files (a socket and a file per subscriber); this process may hold {limit}")
    })
}

/// What the raw fan-out baseline reached.
#[derive(Debug, Clone)]
pub struct RawResult {
    pub subscribers: usize,
    /// Subscribers that received every byte.
    pub complete: usize,
    /// Fewest bytes any subscriber received.
    pub min_bytes: usize,
    pub total_bytes: usize,
    /// First publish to the last byte at the last complete subscriber.
    pub time: Duration,
    /// CPU time (user + system) the processes named in `server_pids` used from the first
    /// publish until every subscriber was complete (or the timeout): the broker's side.
    pub server_cpu: Option<Duration>,
    /// CPU time this process used over the same span: the publisher and the subscribers.
    pub clients_cpu: Option<Duration>,
}

impl RawResult {
    pub fn ok(&self) -> bool {
        self.complete == self.subscribers
    }
}

/// The filters a raw subscriber (machine `id`) sends in its one SUBSCRIBE to read an artifact's
/// `topic`: that topic alone. On the embedded broker the gateway serves it, and what the
/// platform principal publishes there through rumqttd reaches the subscribers through the
/// gateway's relay (one rumqttd subscriber, fanned out by the gateway: the path of every
/// notice); a machine may subscribe to nothing rumqttd delivers itself. On Mosquitto it is an
/// ordinary subscription.
pub fn raw_filters(_id: &str, topic: &str) -> Vec<rumqttc::SubscribeFilter> {
    vec![rumqttc::SubscribeFilter::new(
        topic.to_owned(),
        QoS::AtLeastOnce,
    )]
}

/// How far the raw publisher may run ahead of its slowest subscriber: within the embedded
/// gateway's queue per session (`SESSION_QUEUE`, 64 frames of 64 KiB), which drops frames for
/// a session that cannot take them (chunk frames are asked for again; raw bytes are lost).
const RAW_AHEAD: usize = 2 << 20;

/// Raw MQTT through the same broker: every machine in `subs` connects with its own credentials
/// (client id = username = machine id), subscribes QoS 1 to `topic` (see [`raw_filters`]);
/// then one publisher as the platform principal publishes `payload` in `msg_size` messages,
/// QoS 1, not retained, to `topic` (an artifact topic the subscribers may read). Time from
/// the first publish until every subscriber has every byte. Every subscriber's byte count is
/// checked.
///
/// `url` is where the platform publishes, `machine_url` where the subscribers (machines) connect.
#[allow(clippy::too_many_arguments)]
pub async fn raw_fanout(
    url: &BrokerUrl,
    machine_url: &BrokerUrl,
    platform_password: &str,
    subs: &[ProvisionedMachine],
    send: RawSend<'_>,
    timeout: Duration,
    server_pids: &[u32],
) -> Result<RawResult> {
    let RawSend {
        topic,
        payload,
        msg_size,
        store,
    } = send;
    let filter = topic.to_owned();
    let topic = topic.to_owned();
    let total = payload.len();
    let n = subs.len();
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let ready = Arc::new(AtomicUsize::new(0));
    let complete = Arc::new(AtomicUsize::new(0));
    let received: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let last_done: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let connects = Arc::new(Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, m) in subs.iter().enumerate() {
        let id = m.machine.to_string();
        let file = match store {
            Some(dir) => Some(
                std::fs::File::create(dir.join(format!("{id}.raw")))
                    .with_context(|| format!("raw baseline: a file in {}", dir.display()))?,
            ),
            None => None,
        };
        let mut opts = client::options(machine_url, &id, Some(&m.secret.mqtt_password()));
        opts.set_clean_session(true);
        let (c, mut el) = client::connect(opts, 64);
        let (stop, ready, complete, received, last_done, connects, filter, topic) = (
            stop.clone(),
            ready.clone(),
            complete.clone(),
            received.clone(),
            last_done.clone(),
            connects.clone(),
            filter.clone(),
            topic.clone(),
        );
        tasks.spawn(async move {
            let permit = connects.acquire_owned().await;
            let mut permit = Some(permit);
            let mut bytes = 0usize;
            loop {
                let polled = tokio::select! {
                    _ = stop.cancelled() => return,
                    p = el.poll() => p,
                };
                match polled {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = c.try_subscribe_many(raw_filters(&id, &filter));
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        permit.take();
                        ready.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) if p.topic == topic => {
                        if let Some(file) = &file {
                            std::hint::black_box(blake3::hash(&p.payload));
                            if let Err(e) = std::os::unix::fs::FileExt::write_all_at(
                                file,
                                &p.payload,
                                bytes as u64,
                            ) {
                                eprintln!("raw baseline: {id} cannot store what it received: {e}");
                                return;
                            }
                        }
                        bytes += p.payload.len();
                        received[i].store(bytes as u64, Ordering::Relaxed);
                        if bytes == total {
                            *last_done.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(Instant::now());
                            complete.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(_) => {}
                    // rumqttc reconnects on the next poll; a lost session loses messages,
                    // which the byte count shows.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    let setup = Duration::from_secs(30) + Duration::from_millis(10 * n as u64);
    let started = Instant::now();
    while ready.load(Ordering::SeqCst) < n {
        if started.elapsed() > setup {
            bail!(
                "raw baseline: only {} of {n} subscribers connected and subscribed within {} s",
                ready.load(Ordering::SeqCst),
                setup.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let client_id = format!("{}.rawbench", fleetcast_proto::acl::PLATFORM_USER);
    let opts = client::options_as(
        url,
        &client_id,
        fleetcast_proto::acl::PLATFORM_USER,
        Some(platform_password),
    );
    let (publ, mut el) = client::connect(opts, 1024);
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel(1);
    {
        let stop = stop.clone();
        tasks.spawn(async move {
            loop {
                let polled = tokio::select! {
                    _ = stop.cancelled() => return,
                    p = el.poll() => p,
                };
                match polled {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = conn_tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(10), conn_rx.recv())
        .await
        .map_err(|_| anyhow!("raw baseline: the publisher did not connect"))?;

    let cpu_at_start = cpu_of(server_pids).zip(cpu_time("self"));
    let t0 = Instant::now();
    let mut sent = 0;
    for part in payload.chunks(msg_size) {
        // A publisher far ahead of a subscriber loses bytes (rumqttd's full logs and the
        // gateway's full queues drop them; 200 MB to one subscriber lost 5 MB). Stay at most
        // RAW_AHEAD ahead of the slowest; a 1 MiB fan-out is never held.
        while sent > RAW_AHEAD && t0.elapsed() < timeout {
            let slowest = received
                .iter()
                .map(|b| b.load(Ordering::Relaxed) as usize)
                .min()
                .unwrap_or(sent);
            if sent - slowest <= RAW_AHEAD {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        publ.publish(&topic, QoS::AtLeastOnce, false, part.to_vec())
            .await
            .context("raw publish")?;
        sent += part.len();
    }
    while complete.load(Ordering::SeqCst) < n && t0.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu_at_end = cpu_of(server_pids).zip(cpu_time("self"));
    let cpu = cpu_at_start
        .zip(cpu_at_end)
        .map(|((s0, c0), (s1, c1))| (s1.saturating_sub(s0), c1.saturating_sub(c0)));
    // Late bytes after a timeout would not change the verdict.
    let done = complete.load(Ordering::SeqCst);
    let min_bytes = received
        .iter()
        .map(|b| b.load(Ordering::Relaxed) as usize)
        .min()
        .unwrap_or(0);
    let time = last_done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|t| t.duration_since(t0))
        .unwrap_or(t0.elapsed());
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(RawResult {
        subscribers: n,
        complete: done,
        min_bytes,
        total_bytes: total,
        time,
        server_cpu: cpu.map(|(server, _)| server),
        clients_cpu: cpu.map(|(_, clients)| clients),
    })
}

/// Reproducible bytes that do not compress (a 64-bit LCG per position).
pub fn artifact_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Percentile (0..=100) of sorted values, nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Runs `work` until it ends or the process gets SIGINT/SIGTERM; either way everything `work`
/// owns (child processes, temp dirs) is dropped, which kills and removes it.
pub async fn until_signal<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        r = work => r,
        _ = term.recv() => Err(anyhow!("terminated")),
        _ = int.recv() => Err(anyhow!("interrupted")),
    }
}

/// A bounded wait: `step` is polled every `every` until it returns Some or `limit` passes.
pub async fn wait_until<T, F, Fut>(limit: Duration, every: Duration, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = step().await? {
            return Ok(v);
        }
        if started.elapsed() > limit {
            bail!("not reached within {} s", limit.as_secs());
        }
        tokio::time::sleep(every).await;
    }
}
