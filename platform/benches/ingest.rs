//! Benchmark: status ingestion end to end, against raw sled insert + flush of the same records
//! in the same run.
//!
//! fleetcast: `fleetcast serve` (embedded broker, child process); M machines are provisioned
//! (`ing-…`, group `ingest`) and a release of `app` is published to them, so every status event
//! they send names a release that targets them and is stored (at most `INGEST_EVENTS` ≤ 1,000
//! per machine, the platform's per-(machine, release) cap). Then M MQTT clients, each with its
//! own machine credentials, send `downloading` status events with rising progress, MAC'd with
//! the machine's secret exactly as the agent seals them, QoS 1, one unacknowledged message each
//! as the protocol has agents send them. Two runs, each on a fresh platform: one event per
//! message (how events come while a rollout runs: the agent has one waiting at a time;
//! `INGEST_WINDOW` > 1 is for experiments only), and each machine's events as the agent sends
//! a backlog (after being offline, or while the platform is slow to acknowledge): batches of up
//! to `INGEST_BATCH` (default and most 64, protocol.md §6.1) in one message. An event counts
//! when the platform's `StatusAck` (MAC'd with the machine's secret) covering its counter
//! arrives (sent only after the batch holding it was flushed to sled). What is not
//! acknowledged within 2 s is sent again (the platform acknowledges a replay without storing
//! it again), as the agent does. Rate = M × E ÷ (first send → last acknowledgement). The
//! gateway lets one machine send 200 reports (events) at once and 50 a second after that: past
//! 200 events per machine the bench measures that limit, not ingestion.
//!
//! Baseline: a fresh sled database opened as the platform opens its own (its page cache,
//! `store::CACHE_BYTES`; until 2026-11-27 sled's default, 1 GiB, which the platform no longer
//! uses: that row is kept beside it) in a temp dir; the same number of records, each the JSON of the `FleetEvent` the platform stores for
//! such an event, under 8-byte big-endian keys, inserted in batches of `ingest::MAX_BATCH` with
//! one `flush_async` per batch (the platform's largest ingest batch). Run before and after the
//! fleetcast measurement; the better is used. When the platform reports its counters, a second
//! baseline row uses the platform's mean batch size in this run.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::{now_ms, stat_u64, Platform};
use fleetcast_broker::client;
use fleetcast_platform::ingest::MAX_BATCH;
use fleetcast_platform::store::CACHE_BYTES;
use fleetcast_proto::admin::FleetEvent;
use fleetcast_proto::auth::Purpose;
use fleetcast_proto::status::Progress;
use fleetcast_proto::status::MAX_STATUS_BATCH;
use fleetcast_proto::{
    GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId, StatusAck, StatusEvent, Topics,
};
use rumqttc::{Event, Incoming, QoS};
use tokio_util::sync::CancellationToken;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn event(machine: &MachineId, release: &ReleaseId, ctr: u64, total: u64) -> StatusEvent {
    StatusEvent {
        machine: machine.clone(),
        ctr,
        at_ms: now_ms(),
        release: Some(release.clone()),
        kind: Kind::new("app").expect("valid kind"),
        version: "2.0.0".into(),
        phase: Phase::Downloading,
        progress: Some(Progress {
            bytes: ctr * 65536,
            total,
        }),
        attempt: 1,
        error: None,
        detail: None,
    }
}

/// The record the platform stores for `ev` (its `FleetEvent` JSON).
fn record_of(ev: &StatusEvent, id: u64) -> Vec<u8> {
    serde_json::to_vec(&FleetEvent {
        id,
        ..FleetEvent::recorded(ev, now_ms())
    })
    .expect("events serialize")
}

/// Inserts `count` copies of `record` (distinct keys) into a fresh sled db, `batch` per flush,
/// with the platform's sled configuration (its page cache, `store::CACHE_BYTES`) or, with
/// `sled_default`, sled's own (a 1 GiB cache).
async fn sled_baseline(
    root: &Path,
    count: usize,
    record: &[u8],
    batch: usize,
    sled_default: bool,
) -> Result<Duration> {
    let dir = tempfile::tempdir_in(root)?;
    let mut config = sled::Config::new().path(dir.path().join("db"));
    if !sled_default {
        config = config.cache_capacity(CACHE_BYTES);
    }
    let db = config.open()?;
    let tree = db.open_tree("events")?;
    let started = Instant::now();
    let mut id = 0u64;
    while (id as usize) < count {
        let end = (id as usize + batch).min(count) as u64;
        while id < end {
            id += 1;
            tree.insert(id.to_be_bytes(), record)?;
        }
        db.flush_async().await?;
    }
    let elapsed = started.elapsed();
    drop(tree);
    drop(db);
    Ok(elapsed)
}

struct Run {
    time: Duration,
    /// CPU time `serve` and this process (the machines' clients) used over the run.
    serve_cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
    events: usize,
    resent: u64,
    payload_bytes: usize,
    /// Status messages sent (a batch counts once), re-sent ones included.
    messages: u64,
    /// The platform's counters over the run.
    stored: Option<u64>,
    flushes: Option<u64>,
}

/// How the bench's machines send their events.
#[derive(Clone, Copy)]
struct Mode {
    /// Events in flight per machine (one message each).
    window: usize,
    /// Events per message, one message in flight (1: single events, `window` in flight).
    batch: usize,
}

async fn fleetcast_ingest(
    p: &Platform,
    machines: usize,
    per_machine: usize,
    mode: Mode,
) -> Result<Run> {
    let Mode { window, batch } = mode;
    let group = GroupId::new("ingest")?;
    let ids: Vec<MachineId> = (1..=machines)
        .map(|i| MachineId::new(format!("ing-{i:04}")))
        .collect::<Result<_, _>>()?;
    let provisioned = p.provision(&ids, &group).await?;
    let (_, release) = p
        .create_release(
            &p.data.join("../ingest-app.bin"),
            &common::artifact_bytes(65536, 7),
            &Kind::new("app")?,
            "2.0.0",
            InstallPolicy::DownloadOnly,
        )
        .await?;
    p.publish(&release, ids.clone(), vec![]).await?;
    let topics = Topics::default();
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let go = CancellationToken::new();
    let ready = Arc::new(AtomicUsize::new(0));
    let complete = Arc::new(AtomicUsize::new(0));
    let resent = Arc::new(AtomicU64::new(0));
    let messages = Arc::new(AtomicU64::new(0));
    let last_done: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let total = per_machine as u64;
    let payload_bytes = provisioned[0]
        .secret
        .seal(Purpose::Status, &event(&ids[0], &release, 1, total * 65536))
        .len();
    let mut tasks = tokio::task::JoinSet::new();
    for m in provisioned {
        let me = m.machine.clone();
        let mut opts = client::options(&p.url, me.as_str(), Some(&m.secret.mqtt_password()));
        opts.set_clean_session(true);
        let (c, mut el) = client::connect(opts, window * 2 + 16);
        let ack_topic = topics.status_ack(&me);
        let status_topic = topics.status(&me);
        let (stop, go, ready, complete, resent, last_done, release, messages) = (
            stop.clone(),
            go.clone(),
            ready.clone(),
            complete.clone(),
            resent.clone(),
            last_done.clone(),
            release.clone(),
            messages.clone(),
        );
        tasks.spawn(async move {
            let (mut sent, mut acked) = (0u64, 0u64);
            let mut last_progress = Instant::now();
            let mut started = false;
            // Events `from..=to` in one message: one envelope, or a batch as the agent sends its
            // backlog (protocol.md §6.1).
            let send = |from: u64, to: u64| {
                let seal = |ctr: u64| {
                    m.secret
                        .seal(Purpose::Status, &event(&me, &release, ctr, total * 65536))
                };
                let payload = if from == to {
                    seal(from)
                } else {
                    let items: Vec<Vec<u8>> = (from..=to).map(seal).collect();
                    [b"[".to_vec(), items.join(&b","[..]), b"]".to_vec()].concat()
                };
                messages.fetch_add(1, Ordering::Relaxed);
                c.try_publish(&status_topic, QoS::AtLeastOnce, false, payload)
                    .is_ok()
            };
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = go.cancelled(), if !started => {
                        started = true;
                        last_progress = Instant::now();
                    }
                    _ = tick.tick() => {
                        // Unacknowledged for 2 s: send the window again, as the agent would.
                        if started && acked < total && last_progress.elapsed() > Duration::from_secs(2) {
                            if batch > 1 {
                                if sent > acked && send(acked + 1, sent) {
                                    resent.fetch_add(sent - acked, Ordering::Relaxed);
                                }
                            } else {
                                for ctr in acked + 1..=sent {
                                    if send(ctr, ctr) {
                                        resent.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            last_progress = Instant::now();
                        }
                    }
                    polled = el.poll() => match polled {
                        Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                            let _ = c.try_subscribe(ack_topic.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Incoming::SubAck(_))) => {
                            ready.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Incoming::Publish(p))) if p.topic == ack_topic => {
                            if let Ok(ack) = m.secret.open::<StatusAck>(Purpose::StatusAck, &p.payload) {
                                if ack.ctr > acked && ack.ctr <= sent {
                                    acked = ack.ctr;
                                    last_progress = Instant::now();
                                    if acked == total {
                                        *last_done.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                                        complete.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    },
                }
                if batch > 1 {
                    let to = total.min(acked + batch as u64);
                    if started && sent == acked && sent < total && send(acked + 1, to) {
                        sent = to;
                    }
                }
                while batch == 1
                    && started
                    && sent < total
                    && sent - acked < window as u64
                    && send(sent + 1, sent + 1)
                {
                    sent += 1;
                }
            }
        });
    }
    let setup = Duration::from_secs(30);
    let t = Instant::now();
    while ready.load(Ordering::SeqCst) < machines {
        if t.elapsed() > setup {
            bail!(
                "only {} of {machines} clients connected and subscribed",
                ready.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = machines * per_machine;
    let limit = Duration::from_secs(60) + Duration::from_millis(events as u64);
    let serve_pid = p.proc.pid().to_string();
    let cpu0 = (common::cpu_time(&serve_pid), common::cpu_time("self"));
    eprintln!("ingest: {machines} clients subscribed, sending {events} events");
    let t0 = Instant::now();
    go.cancel();
    while complete.load(Ordering::SeqCst) < machines {
        if t0.elapsed() > limit {
            bail!(
                "only {} of {machines} machines had all {per_machine} events acknowledged after {} s",
                complete.load(Ordering::SeqCst),
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = last_done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or_else(Instant::now);
    let cpu1 = (common::cpu_time(&serve_pid), common::cpu_time("self"));
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(Run {
        time: end.duration_since(t0),
        serve_cpu: cpu1.0.zip(cpu0.0).map(|(b, a)| b.saturating_sub(a)),
        bench_cpu: cpu1.1.zip(cpu0.1).map(|(b, a)| b.saturating_sub(a)),
        events,
        resent: resent.load(Ordering::Relaxed),
        payload_bytes,
        messages: messages.load(Ordering::Relaxed),
        stored: None,
        flushes: None,
    })
}

async fn run() -> Result<()> {
    // One event in flight per machine, as the protocol has agents send them (§6.1): the load
    // comes from many machines, as in a fleet. (Eight in flight, the default until 2026-11-27,
    // let a cumulative ack cover an event that had been lost: 28-32 of 50,000 acknowledged
    // and never stored.) 25 events each stay inside the gateway's report burst (200, then 50 a
    // second per machine): the rate measured is the platform's, not one machine's limit.
    let machines = env_usize("INGEST_MACHINES", 2000).max(1);
    let per_machine = env_usize("INGEST_EVENTS", 25).clamp(1, 1000);
    let window = env_usize("INGEST_WINDOW", 1).max(1);
    let count = machines * per_machine;
    let root = std::env::temp_dir();
    let sample = event(
        &MachineId::new("ing-0001")?,
        &ReleaseId::new("r-000001")?,
        123,
        per_machine as u64 * 65536,
    );
    let record = record_of(&sample, 12345);
    let base1 = sled_baseline(&root, count, &record, MAX_BATCH, false).await?;
    eprintln!(
        "sled baseline: {count} records in {:.2} s",
        base1.as_secs_f64()
    );

    let batch = env_usize("INGEST_BATCH", MAX_STATUS_BATCH).clamp(2, MAX_STATUS_BATCH);
    let modes = [
        (
            format!("one event per message, {window} in flight per machine (events as they come during a rollout)"),
            Mode { window, batch: 1 },
        ),
        (
            format!("each machine's {per_machine} events sent as the agent sends a backlog: batches of up to {batch}, one in flight"),
            Mode { window: 1, batch },
        ),
    ];
    let mut runs = Vec::new();
    for (label, mode) in modes {
        runs.push((
            label,
            ingest_once(&root, machines, per_machine, mode).await?,
        ));
    }
    let base2 = sled_baseline(&root, count, &record, MAX_BATCH, false).await?;
    let base = base1.min(base2);
    let base_default = sled_baseline(&root, count, &record, MAX_BATCH, true).await?;
    let mean_batch = runs[0]
        .1
        .stored
        .zip(runs[0].1.flushes)
        .filter(|(_, f)| *f > 0)
        .map(|(s, f)| s as f64 / f as f64);
    let base_mean = match mean_batch {
        Some(b) => Some((
            b,
            sled_baseline(&root, count, &record, (b.round() as usize).max(1), false).await?,
        )),
        None => None,
    };

    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!("--- results ---");
    println!(
        "{machines} machines × {per_machine} status events ({} B MAC'd payload, {} B stored record).",
        runs[0].1.payload_bytes,
        record.len(),
    );
    println!();
    println!("| what | events | time | events/s | ratio to sled |");
    println!("|---|---|---|---|---|");
    println!(
        "| raw sled: insert + `flush_async` per {MAX_BATCH} records, fresh db, the platform's sled configuration (best of 2) | {count} | {:.2} s | {:.0} | 1.00 |",
        base.as_secs_f64(),
        rate(base)
    );
    println!(
        "| raw sled, the same with sled's default configuration (1 GiB cache) | {count} | {:.2} s | {:.0} | {:.2} |",
        base_default.as_secs_f64(),
        rate(base_default),
        rate(base_default) / rate(base)
    );
    if let Some((b, d)) = base_mean {
        println!(
            "| raw sled, one flush per {:.0} records (the platform's mean batch with one event per message) | {count} | {:.2} s | {:.0} | {:.2} |",
            b.round().max(1.0),
            d.as_secs_f64(),
            rate(d),
            rate(d) / rate(base)
        );
    }
    for (label, run) in &runs {
        println!(
            "| fleetcast, {label}: sent, verified, stored, flushed, `StatusAck` received | {} | {:.2} s | {:.0} | {:.2} |",
            run.events,
            run.time.as_secs_f64(),
            rate(run.time),
            rate(run.time) / rate(base)
        );
    }
    println!();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (label, run) in &runs {
        let mut line = format!(
            "- {label}: {} status messages ({} events re-sent after 2 s without an ack)",
            run.messages, run.resent
        );
        if let (Some(serve), Some(bench)) = (run.serve_cpu, run.bench_cpu) {
            line += &format!(
                "; CPU ({cores} cores: {:.1} core-seconds available): `serve` {:.2} s ({:.0} µs per event), the bench's {machines} clients {:.2} s ({:.0} µs per event: sealing events, verifying acks)",
                cores as f64 * run.time.as_secs_f64(),
                serve.as_secs_f64(),
                serve.as_secs_f64() * 1e6 / count as f64,
                bench.as_secs_f64(),
                bench.as_secs_f64() * 1e6 / count as f64,
            );
        }
        match (run.stored, run.flushes) {
            (Some(s), Some(f)) => {
                line += &format!("; `fleetcast stats`: {s} events stored in {f} ingest flushes.")
            }
            _ => line += "; platform counters n/a.",
        }
        println!("{line}");
    }
    Ok(())
}

/// One fleetcast run on a fresh platform.
async fn ingest_once(root: &Path, machines: usize, per_machine: usize, mode: Mode) -> Result<Run> {
    let dir = tempfile::tempdir_in(root)?;
    let mut p = Platform::start(dir.path(), None).await?;
    let stats_before = p.stats();
    let result = fleetcast_ingest(&p, machines, per_machine, mode).await;
    let stats_after = p.stats();
    p.proc.check_alive()?;
    p.admin.close().await;
    drop(p.proc);
    drop(dir);
    let mut run = result?;
    let delta = |f: &str| {
        stat_u64(&stats_after, f)
            .zip(stat_u64(&stats_before, f))
            .map(|(a, b)| a.saturating_sub(b))
    };
    run.stored = delta("status_events_stored");
    run.flushes = delta("ingest_flushes");
    Ok(run)
}

#[tokio::main]
async fn main() {
    if let Err(e) = common::until_signal(run()).await {
        eprintln!("ingest bench failed: {e:#}");
        std::process::exit(1);
    }
}
