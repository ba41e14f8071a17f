//! Benchmark: the agent's footprint on a machine (issue 8): resident memory idle and while
//! downloading, and CPU time per MB downloaded, beside a raw MQTT subscriber receiving the same
//! bytes through the same broker in the same run.
//!
//! 1. `fleetcast serve` (child process, embedded broker on a free loopback port), one machine
//!    provisioned, and `fleetcast-device run --config ...` started as that machine (child).
//! 2. Idle: once the machine is online, 3 s to settle, then VmRSS sampled every 100 ms for 5 s.
//! 3. Downloads of FOOTPRINT_SIZES MB (default `50,200`), each its own kind, policy
//!    `download-only` (the file is fetched, verified and kept; nothing is installed). Before each,
//!    the process's peak (VmHWM) is reset (`/proc/PID/clear_refs`); during it VmRSS is sampled
//!    every 100 ms; after it: the peak, the mean sample, and utime+stime from `/proc/PID/stat`
//!    divided by the size. Time: the machine's `downloading` → `downloaded` events.
//! 4. Baseline: this bench binary re-run as a plain rumqttc subscriber (tokio, rumqttc, nothing
//!    else), connected with a second machine's credentials, subscribed QoS 1 to the same
//!    artifact's chunk topic; the bench publishes the same bytes there as 64 KiB QoS 1 messages
//!    as the platform principal, at most 2 MiB ahead of what the subscriber reported (rumqttd
//!    drops a topic's oldest log segment when a publisher outruns a subscriber); the same
//!    measurements on that process.
//!
//! Prints markdown after a `--- results ---` line; scripts/bench.sh records it.

mod common;

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use common::{artifact_bytes, EventFeed, Mem, Platform, Proc};
use fleetcast_broker::client;
use fleetcast_broker::BrokerUrl;
use fleetcast_proto::admin::ProvisionedMachine;
use fleetcast_proto::{GroupId, InstallPolicy, Kind, MachineId, Phase, Topics};
use rumqttc::{Event, Incoming, QoS};

const MSG: usize = 64 * 1024;
/// How far the raw publisher may run ahead of its subscriber.
const RAW_WINDOW: u64 = 2 << 20;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// CPU time (user + system) of a process, in seconds ([`common::cpu_time`]).
fn cpu_seconds(pid: u32) -> Result<f64> {
    common::cpu_time(&pid.to_string())
        .map(|t| t.as_secs_f64())
        .ok_or_else(|| anyhow!("cannot read /proc/{pid}/stat"))
}

/// Resets the process's peak resident size (VmHWM) to its current one.
fn reset_peak(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting VmHWM of {pid}"))
}

/// VmRSS of `pid` every 100 ms until `stop` is set; returns the samples in KiB.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let m = Mem::of(pid);
            if m.rss_kib > 0 {
                samples.push(m.rss_kib);
            }
            std::thread::sleep(SAMPLE_EVERY);
        }
        samples
    })
}

/// What one download (or the raw transfer of the same bytes) cost the receiving process.
#[derive(Debug, Clone, Default)]
struct Transfer {
    mb: f64,
    peak_kib: u64,
    mean_kib: u64,
    cpu_s: f64,
    time: Option<Duration>,
    error: Option<String>,
}

impl Transfer {
    fn failed(mb: f64, e: anyhow::Error) -> Self {
        Self {
            mb,
            error: Some(format!("{e:#}")),
            ..Default::default()
        }
    }
}

/// Mean and peak of 100 ms VmRSS samples, over `within`.
fn idle_rss(pid: u32, within: Duration) -> (u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, stop.clone());
    std::thread::sleep(within);
    stop.store(true, Ordering::SeqCst);
    let s = sampler.join().unwrap_or_default();
    let mean = s.iter().sum::<u64>() / s.len().max(1) as u64;
    (mean, s.iter().copied().max().unwrap_or(0))
}

/// The agent downloads `bytes` as kind `fp{index}` (download-only).
async fn agent_download(
    p: &Platform,
    dir: &Path,
    index: usize,
    agent: &mut Proc,
    machine: &MachineId,
    raw: &MachineId,
    bytes: &[u8],
) -> Result<(Transfer, fleetcast_proto::ArtifactId)> {
    let mb = bytes.len() as f64 / 1e6;
    let kind = Kind::new(format!("fp{index}"))?;
    let file = dir.join("upload.bin");
    let (artifact, release) = p
        .create_release(&file, bytes, &kind, "1.0.0", InstallPolicy::DownloadOnly)
        .await?;
    std::fs::remove_file(&file)?;
    let mut feed = EventFeed::at_end(p).await?;
    let pid = agent.pid();
    reset_peak(pid)?;
    let cpu0 = cpu_seconds(pid)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, stop.clone());
    // The raw subscriber's machine is a target too, so it may read the artifact's topic later;
    // it runs no agent, so it never asks for anything.
    p.publish(&release, vec![machine.clone(), raw.clone()], vec![])
        .await?;
    let limit = Duration::from_secs(60) + Duration::from_secs_f64(mb);
    let started = Instant::now();
    let (mut downloading, mut downloaded) = (None, None);
    while downloaded.is_none() {
        agent.check_alive()?;
        for e in feed.poll(p).await? {
            if &e.machine != machine || e.release.as_ref() != Some(&release) {
                continue;
            }
            match e.phase {
                Phase::Downloading if downloading.is_none() => downloading = Some(e.at_ms),
                Phase::Downloaded => downloaded = Some(e.at_ms),
                Phase::DownloadFailed => bail!("download failed: {:?}", e.error),
                _ => {}
            }
        }
        if started.elapsed() > limit {
            bail!("no `downloaded` within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cpu = cpu_seconds(pid)? - cpu0;
    let peak = Mem::of(pid).hwm_kib;
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().map_err(|_| anyhow!("sampler panicked"))?;
    let time = match (downloading, downloaded) {
        (Some(a), Some(b)) if b >= a => Some(Duration::from_millis(b - a)),
        _ => None,
    };
    Ok((
        Transfer {
            mb,
            peak_kib: peak,
            mean_kib: samples.iter().sum::<u64>() / samples.len().max(1) as u64,
            cpu_s: cpu,
            time,
            error: None,
        },
        artifact,
    ))
}

/// The raw subscriber process: this binary with FOOTPRINT_RAW_SUB set.
struct RawSub {
    child: std::process::Child,
    received: Arc<AtomicU64>,
    ready: Arc<AtomicBool>,
}

impl Drop for RawSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RawSub {
    fn spawn(url: &BrokerUrl, machine: &ProvisionedMachine, topic: &str) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .env("FOOTPRINT_RAW_SUB", "1")
            .env("FP_URL", url.to_string())
            .env("FP_ID", machine.machine.as_str())
            .env("FP_PASSWORD", machine.secret.mqtt_password())
            .env("FP_TOPIC", topic)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the raw subscriber")?;
        let stdout = child.stdout.take().expect("piped");
        let (received, ready) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (r, ok) = (received.clone(), ready.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
            {
                if line == "ready" {
                    ok.store(true, Ordering::SeqCst);
                } else if let Some(n) = line.strip_prefix("got ") {
                    r.store(n.parse().unwrap_or(0), Ordering::SeqCst);
                }
            }
        });
        Ok(Self {
            child,
            received,
            ready,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the raw subscriber exited ({status})");
        }
        Ok(())
    }

    /// Waits until it subscribed (SUBACK).
    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        while !self.ready.load(Ordering::SeqCst) {
            self.check_alive()?;
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the raw subscriber did not subscribe within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// Publishes `bytes` on `topic` as the platform principal, at most RAW_WINDOW ahead of what
/// `sub` reported, and measures `sub` receiving them.
async fn raw_transfer(
    p: &Platform,
    sub: &mut RawSub,
    topic: &str,
    bytes: &[u8],
) -> Result<Transfer> {
    let mb = bytes.len() as f64 / 1e6;
    let client_id = format!("{}.footprint", fleetcast_proto::acl::PLATFORM_USER);
    let opts = client::options_as(
        &p.url,
        &client_id,
        fleetcast_proto::acl::PLATFORM_USER,
        Some(&p.platform_password()?),
    );
    let (publ, mut el) = client::connect(opts, 64);
    let connected = Arc::new(AtomicBool::new(false));
    let c = connected.clone();
    let driver = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => c.store(true, Ordering::SeqCst),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let result = async {
        let started = Instant::now();
        while !connected.load(Ordering::SeqCst) {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("the raw publisher did not connect");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = sub.pid();
        let base = sub.received.load(Ordering::SeqCst);
        reset_peak(pid)?;
        let cpu0 = cpu_seconds(pid)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_rss(pid, stop.clone());
        let t0 = Instant::now();
        let total = bytes.len() as u64;
        let mut sent = 0u64;
        for part in bytes.chunks(MSG) {
            while sent - (sub.received.load(Ordering::SeqCst) - base) > RAW_WINDOW {
                sub.check_alive()?;
                if t0.elapsed() > Duration::from_secs(120) {
                    bail!(
                        "the raw subscriber stopped at {} of {total} bytes",
                        sub.received.load(Ordering::SeqCst) - base
                    );
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            publ.publish(topic, QoS::AtLeastOnce, false, part.to_vec())
                .await
                .context("raw publish")?;
            sent += part.len() as u64;
        }
        while sub.received.load(Ordering::SeqCst) - base < total {
            sub.check_alive()?;
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the raw subscriber received {} of {total} bytes",
                    sub.received.load(Ordering::SeqCst) - base
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let time = t0.elapsed();
        let cpu = cpu_seconds(pid)? - cpu0;
        let peak = Mem::of(pid).hwm_kib;
        stop.store(true, Ordering::SeqCst);
        let samples = sampler.join().map_err(|_| anyhow!("sampler panicked"))?;
        Ok(Transfer {
            mb,
            peak_kib: peak,
            mean_kib: samples.iter().sum::<u64>() / samples.len().max(1) as u64,
            cpu_s: cpu,
            time: Some(time),
            error: None,
        })
    }
    .await;
    driver.abort();
    result
}

/// The baseline process: subscribe, report bytes received, exit when stdin closes.
async fn raw_subscriber() -> Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} not set"));
    let url: BrokerUrl = var("FP_URL")?.parse()?;
    let (id, password, topic) = (var("FP_ID")?, var("FP_PASSWORD")?, var("FP_TOPIC")?);
    let mut opts = client::options(&url, &id, Some(&password));
    opts.set_clean_session(true);
    let (c, mut el) = client::connect(opts, 64);
    std::thread::spawn(|| {
        // The bench closes stdin when it is done reading this process's counters.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        std::process::exit(0);
    });
    let mut got = 0u64;
    let mut out = std::io::stdout();
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                c.subscribe_many(common::raw_filters(&id, &topic)).await?;
            }
            Ok(Event::Incoming(Incoming::SubAck(_))) => {
                writeln!(out, "ready")?;
                out.flush()?;
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                got += p.payload.len() as u64;
                writeln!(out, "got {got}")?;
                out.flush()?;
            }
            Ok(_) => {}
            Err(e) => bail!("raw subscriber: {e}"),
        }
    }
}

fn sizes() -> Vec<usize> {
    std::env::var("FOOTPRINT_SIZES")
        .unwrap_or_else(|_| "50,200".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

async fn run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = Platform::start(dir.path(), None).await?;
    let group = GroupId::new("footprint")?;
    let ids = [MachineId::new("fp-agent")?, MachineId::new("fp-raw")?];
    let machines = p.provision(&ids, &group).await?;
    let (agent_id, raw_machine) = (&machines[0].machine, &machines[1]);

    let config = dir.path().join("device.toml");
    let cfg = fleetcast_device::MachineConfig::from_provisioned(
        &machines[0],
        &p.url.to_string(),
        dir.path().join("machine"),
    );
    std::fs::write(&config, cfg.to_toml())?;
    let mut agent = Proc::spawn(
        "fleetcast-device run",
        Command::new(common::device_bin()?)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn"),
        dir.path().join("agent.log"),
    )?;
    common::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let ms = p.machines().await?;
            Ok(ms
                .iter()
                .any(|m| &m.id == agent_id && m.online && m.agent_version.is_some())
                .then_some(()))
        },
    )
    .await
    .context("the agent did not come online")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (agent_idle, agent_idle_max) = idle_rss(agent.pid(), Duration::from_secs(5));
    let agent_start_peak = agent.mem().hwm_kib;
    eprintln!("agent idle: {}", mb(agent_idle));

    let mut agent_rows = Vec::new();
    let mut artifacts = Vec::new();
    for (i, size) in sizes().into_iter().enumerate() {
        let bytes = artifact_bytes(size * 1_000_000, 800 + i as u64);
        match agent_download(
            &p,
            dir.path(),
            i,
            &mut agent,
            agent_id,
            &raw_machine.machine,
            &bytes,
        )
        .await
        {
            Ok((t, artifact)) => {
                eprintln!(
                    "agent {size} MB: peak {} cpu {:.2} s",
                    mb(t.peak_kib),
                    t.cpu_s
                );
                agent_rows.push(t);
                artifacts.push((artifact, bytes));
            }
            Err(e) => agent_rows.push(Transfer::failed(size as f64, e)),
        }
    }
    let (agent_after, _) = idle_rss(agent.pid(), Duration::from_secs(2));

    let mut raw_rows = Vec::new();
    let mut raw_idle = (0, 0);
    if let Some((first, _)) = artifacts.first() {
        let topic = Topics::default().artifact_chunks(first);
        let mut sub = RawSub::spawn(&p.url, raw_machine, &topic)?;
        sub.wait_ready().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        raw_idle = idle_rss(sub.pid(), Duration::from_secs(3));
        drop(sub);
        for (artifact, bytes) in &artifacts {
            let topic = Topics::default().artifact_chunks(artifact);
            let mut sub = RawSub::spawn(&p.url, raw_machine, &topic)?;
            let t = match sub.wait_ready().await {
                Ok(()) => raw_transfer(&p, &mut sub, &topic, bytes)
                    .await
                    .unwrap_or_else(|e| Transfer::failed(bytes.len() as f64 / 1e6, e)),
                Err(e) => Transfer::failed(bytes.len() as f64 / 1e6, e),
            };
            eprintln!(
                "raw {:.0} MB: peak {} cpu {:.2} s",
                t.mb,
                mb(t.peak_kib),
                t.cpu_s
            );
            raw_rows.push(t);
        }
    }

    println!("--- results ---");
    println!(
        "One `fleetcast-device run` process (release build, default tuning: 64 KiB chunks, a \
         window of 16) downloading `download-only` releases through `fleetcast serve` (embedded \
         broker, loopback). Raw: a plain rumqttc subscriber process (tokio, rumqttc, nothing \
         else) receiving the same bytes on the same artifact topic as 64 KiB QoS 1 messages \
         from the platform principal, paced to stay at most 2 MiB ahead. Peak = VmHWM over the \
         transfer (reset before it), mean = VmRSS sampled every 100 ms, CPU = utime + stime."
    );
    println!();
    println!("| process | idle RSS (mean of 100 ms samples; max) | peak RSS at start-up |");
    println!("|---|---|---|");
    println!(
        "| fleetcast-device run | {} ({}) | {} |",
        mb(agent_idle),
        mb(agent_idle_max),
        mb(agent_start_peak)
    );
    if raw_idle.0 > 0 {
        println!(
            "| raw rumqttc subscriber | {} ({}) | — |",
            mb(raw_idle.0),
            mb(raw_idle.1)
        );
    }
    println!(
        "| fleetcast-device run, idle again after the downloads | {} | — |",
        mb(agent_after)
    );
    println!();
    println!("| process | size | peak RSS | mean RSS | CPU time | CPU per MB | time | CPU per MB, ratio to raw |");
    println!("|---|---|---|---|---|---|---|---|");
    let row = |who: &str, t: &Transfer, raw: Option<&Transfer>| match &t.error {
        Some(e) => println!(
            "| {who} | {:.0} MB | FAILED: {} | — | — | — | — | — |",
            t.mb,
            e.lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect::<String>()
        ),
        None => println!(
            "| {who} | {:.0} MB | {} | {} | {:.2} s | {:.1} ms | {} | {} |",
            t.mb,
            mb(t.peak_kib),
            mb(t.mean_kib),
            t.cpu_s,
            t.cpu_s * 1000.0 / t.mb,
            t.time
                .map(|d| format!("{:.2} s", d.as_secs_f64()))
                .unwrap_or("—".into()),
            raw.filter(|r| r.error.is_none() && r.cpu_s > 0.0)
                .map(|r| format!("{:.2}", (t.cpu_s / t.mb) / (r.cpu_s / r.mb)))
                .unwrap_or("—".into())
        ),
    };
    for (i, t) in agent_rows.iter().enumerate() {
        row("fleetcast-device run", t, raw_rows.get(i));
    }
    for t in &raw_rows {
        row("raw rumqttc subscriber", t, None);
    }
    let ok: Vec<&Transfer> = agent_rows.iter().filter(|t| t.error.is_none()).collect();
    if let (Some(small), Some(large)) = (ok.first(), ok.last()) {
        if large.mb > small.mb {
            println!();
            println!(
                "Peak RSS {:.0} MB vs {:.0} MB: {:.2}x for {:.1}x the bytes.",
                large.mb,
                small.mb,
                large.peak_kib as f64 / small.peak_kib.max(1) as f64,
                large.mb / small.mb
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if std::env::var_os("FOOTPRINT_RAW_SUB").is_some() {
        if let Err(e) = raw_subscriber().await {
            eprintln!("{e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = common::until_signal(run()).await {
        eprintln!("footprint bench failed: {e:#}");
        std::process::exit(1);
    }
}
