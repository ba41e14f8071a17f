//! Sales and installs exclude each other (docs/device.md, the sale/install protocol): real
//! processes running the vending-side examples of docs/examples/ hold the sale lock while a
//! real agent installs releases of every policy; every sale and install interval is recorded
//! with CLOCK_MONOTONIC timestamps, and no two intersect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetcast_device::{AgentOptions, MachineConfig};
use fleetcast_proto::{InstallPolicy, Kind, Phase, ReleaseNotice, StatusEvent};

use super::{eventually, setup, start, Artifact, Platform};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples")
}

/// Whether python3 runs here; without it the test is skipped, unless the test script asks
/// for it (FLEETCAST_REQUIRE_PYTHON).
fn python() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("FLEETCAST_REQUIRE_PYTHON").is_err(),
            "python3 is required"
        );
        eprintln!("SKIPPED: no python3");
    }
    ok
}

/// The C example, compiled into `dir`.
fn compile_c_example(dir: &Path) -> PathBuf {
    let bin = dir.join("sale_lock");
    let out = Command::new("cc")
        .args(["-Wall", "-Werror", "-O2", "-o"])
        .arg(&bin)
        .arg(examples().join("sale_lock.c"))
        .output()
        .expect("cc runs (Rust links with it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// A closed interval of CLOCK_MONOTONIC nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interval {
    start: u64,
    end: u64,
}

impl Interval {
    fn intersects(&self, other: &Interval) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

/// Every (sale, install) pair whose intervals intersect.
fn overlaps(
    sales: &[Interval],
    installs: &[(String, Interval)],
) -> Vec<(Interval, String, Interval)> {
    let mut out = Vec::new();
    for s in sales {
        for (what, i) in installs {
            if s.intersects(i) {
                out.push((*s, what.clone(), *i));
            }
        }
    }
    out
}

#[test]
fn the_overlap_check_finds_an_intersection_and_only_that() {
    let iv = |start, end| Interval { start, end };
    let installs = vec![("app 1.1".to_owned(), iv(100, 200))];
    assert!(overlaps(&[iv(10, 99), iv(201, 300)], &installs).is_empty());
    for sale in [iv(50, 100), iv(150, 160), iv(200, 250), iv(0, 1000)] {
        assert_eq!(overlaps(&[sale], &installs).len(), 1, "{sale:?}");
    }
}

/// Records an install: runs for a while, and logs its interval (monotonic ns) to a file.
const RECORDER: &str = r#"
import sys, time
log, what = sys.argv[1], sys.argv[2]
start = time.monotonic_ns()
time.sleep(0.15)
end = time.monotonic_ns()
with open(log, "a") as f:
    f.write(f"install {what} {start} {end}\n")
"#;

/// A vending application: sales through the Python example's `sale()`, until `stop` exists.
/// Each sale logs its interval and where the app slot's `current` pointed at its start and end.
const SELLER: &str = r#"
import os, random, sys, time
examples, lock, log, current, stop, wait, seed = sys.argv[1:8]
sys.path.insert(0, examples)
from sale_lock import sale, UpdateInProgress
random.seed(int(seed))
def slot():
    try:
        return os.readlink(current)
    except FileNotFoundError:
        return "-"
with open(log, "a", buffering=1) as out:
    while not os.path.exists(stop):
        try:
            with sale(lock, wait=(wait == "wait")):
                start = time.monotonic_ns()
                before = slot()
                time.sleep(random.uniform(0.02, 0.06))
                after = slot()
                end = time.monotonic_ns()
            out.write(f"sale {start} {end} {before} {after}\n")
        except UpdateInProgress:
            out.write("refused\n")
        time.sleep(random.uniform(0.03, 0.09))
"#;

fn fw() -> Kind {
    Kind::new("fw").unwrap()
}

/// vm-001 with an `app` in A/B slots whose health check records its interval, and a `fw`
/// installed by a command that records its own.
fn recording_config(s: &super::Setup, work: &Path) -> MachineConfig {
    let recorder = work.join("record.py");
    std::fs::write(&recorder, RECORDER).unwrap();
    let log = work.join("installs.log");
    let text = format!(
        "machine = \"vm-001\"\nsecret = \"{}\"\nplatform_key = \"{}\"\nbroker = \"{}\"\ndata_dir = {:?}\n\
         [initial_versions]\napp = \"1.0.0\"\n\
         [installers.app]\ntype = \"slots\"\nhealth_cmd = \"python3 {} {} app-$FLEETCAST_VERSION\"\n\
         [installers.fw]\ntype = \"command\"\ncmd = \"python3 {} {} fw-{{version}} && test -s {{file}}\"\n",
        s.secret.to_hex(),
        s.platform.key.public().to_hex(),
        s.url,
        s.machine_dir.display().to_string(),
        recorder.display(),
        log.display(),
        recorder.display(),
        log.display(),
    );
    std::fs::create_dir_all(&s.machine_dir).unwrap();
    let path = work.join("device.toml");
    std::fs::write(&path, text).unwrap();
    MachineConfig::load(&path).unwrap()
}

fn parse_intervals(text: &str, tag: &str) -> Vec<(Vec<String>, Interval)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == tag).then_some(())?;
            let rest: Vec<&str> = w.collect();
            let (what, times) = match tag {
                "install" => (vec![rest[0].to_owned()], &rest[1..3]),
                _ => (
                    rest[2..].iter().map(|s| s.to_string()).collect(),
                    &rest[0..2],
                ),
            };
            let iv = Interval {
                start: times[0].parse().ok()?,
                end: times[1].parse().ok()?,
            };
            Some((what, iv))
        })
        .collect()
}

/// Waits until every release in `releases` reached a final phase; returns them.
async fn finals(p: &mut Platform, releases: &[&str]) -> HashMap<String, StatusEvent> {
    let mut done = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while releases.iter().any(|r| !done.contains_key(*r)) {
        let ev = tokio::time::timeout_at(deadline, p.statuses.recv())
            .await
            .unwrap_or_else(|_| panic!("{releases:?} not final within 60 s; final: {done:?}"))
            .unwrap();
        if let Some(r) = ev.release.as_ref().filter(|_| ev.phase.is_final()) {
            done.insert(r.to_string(), ev);
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_racing_installs_of_every_policy_never_overlap_them() {
    if !python() {
        return;
    }
    let mut s = setup().await;
    let work = tempfile::tempdir().unwrap();
    let config = recording_config(&s, work.path());
    let lock = config.sale_lock_path();
    let current = config.data_dir.join("slots/app/current");
    let m = start(config, AgentOptions::default());
    eventually(
        Duration::from_secs(10),
        || lock.exists(),
        || "the agent creates the sale lock".into(),
    )
    .await;

    // Sellers: two Python processes that wait for an install, one that refuses instead, and
    // the C example run again and again.
    let stop = work.path().join("stop");
    let mut sellers: Vec<(Child, PathBuf)> = Vec::new();
    for (i, wait) in ["wait", "wait", "no-wait"].into_iter().enumerate() {
        let log = work.path().join(format!("seller-{i}.log"));
        let child = Command::new("python3")
            .arg("-c")
            .arg(SELLER)
            .arg(examples())
            .args([&lock, &log, &current, &stop])
            .args([wait, &i.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        sellers.push((child, log));
    }
    let c_example = compile_c_example(work.path());
    let c_running = Arc::new(AtomicBool::new(true));
    let c_seller = {
        let (running, lock) = (c_running.clone(), lock.clone());
        std::thread::spawn(move || {
            let mut out = String::new();
            while running.load(Ordering::SeqCst) {
                let o = Command::new(&c_example)
                    .arg(&lock)
                    .arg((20 + rand::random::<u64>() % 20).to_string())
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{o:?}");
                out.push_str(&String::from_utf8_lossy(&o.stdout));
                std::thread::sleep(Duration::from_millis(40 + rand::random::<u64>() % 60));
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Installs while they sell: an app and a fw release per round, one immediate and one idle,
    // the other way round the next round.
    let mut installed = Vec::new();
    for round in 0..3u8 {
        let (app_policy, fw_policy) = if round % 2 == 0 {
            (InstallPolicy::Immediate, InstallPolicy::Idle)
        } else {
            (InstallPolicy::Idle, InstallPolicy::Immediate)
        };
        let app_art = s.platform.add(Artifact::new(20 * 1024, 40 + round));
        let fw_art = s.platform.add(Artifact::new(20 * 1024, 80 + round));
        let (app_r, fw_r) = (format!("r-app-{round}"), format!("r-fw-{round}"));
        let app_v = format!("1.{}.0", round + 1);
        let fw_v = format!("2.{}.0", round + 1);
        s.platform
            .announce(&app_r, &app_v, &app_art, app_policy)
            .await;
        let fw_notice = ReleaseNotice {
            kind: fw(),
            ..s.platform.notice(&fw_r, &fw_v, &fw_art, fw_policy)
        };
        s.platform.publish(&fw_notice).await;
        let done = finals(&mut s.platform, &[&app_r, &fw_r]).await;
        for r in [&app_r, &fw_r] {
            assert_eq!(
                done[r.as_str()].phase,
                Phase::Installed,
                "{:?}",
                done[r.as_str()]
            );
        }
        installed.push(format!("app-{app_v}"));
        installed.push(format!("fw-{fw_v}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&stop, b"").unwrap();
    c_running.store(false, Ordering::SeqCst);
    let mut sales: Vec<(Vec<String>, Interval)> =
        parse_intervals(&c_seller.join().unwrap(), "sale");
    let mut refused = 0;
    for (mut child, log) in sellers {
        let status = child.wait().unwrap();
        assert!(status.success(), "a seller failed: {status}");
        let text = std::fs::read_to_string(&log).unwrap();
        refused += text.lines().filter(|l| *l == "refused").count();
        sales.extend(parse_intervals(&text, "sale"));
    }
    m.stop().await;

    let installs: Vec<(String, Interval)> = parse_intervals(
        &std::fs::read_to_string(work.path().join("installs.log")).unwrap(),
        "install",
    )
    .into_iter()
    .map(|(what, iv)| (what.concat(), iv))
    .collect();
    let mut names: Vec<String> = installs.iter().map(|(w, _)| w.clone()).collect();
    names.sort();
    installed.sort();
    assert_eq!(names, installed, "every install ran once");

    // The proof: no sale intersects an install, and no sale saw the app's slot switch.
    let sale_ivs: Vec<Interval> = sales.iter().map(|(_, iv)| *iv).collect();
    let bad = overlaps(&sale_ivs, &installs);
    assert!(bad.is_empty(), "sales overlapped installs: {bad:?}");
    for (slots, iv) in &sales {
        if let [before, after] = &slots[..] {
            assert_eq!(
                before, after,
                "the app slot switched during the sale {iv:?}"
            );
        }
    }
    // ...and it could have failed: sales ran right up to every install and resumed right after
    // it, so an install that ignored the lock would have met one.
    assert!(sales.len() >= 40, "only {} sales", sales.len());
    let near = Duration::from_secs(2).as_nanos() as u64;
    for (what, i) in &installs {
        assert!(
            sale_ivs
                .iter()
                .any(|s| s.end < i.start && i.start - s.end < near),
            "no sale shortly before {what}"
        );
        assert!(
            sale_ivs
                .iter()
                .any(|s| s.start > i.end && s.start - i.end < near),
            "no sale shortly after {what}"
        );
    }
    eprintln!(
        "{} sales, {refused} refused during an install, {} installs, no overlap",
        sales.len(),
        installs.len()
    );
}

/// A sale of `ms` by the Python example run as a program.
fn long_sale(lock: &Path, ms: u64) -> Child {
    Command::new("python3")
        .arg(examples().join("sale_lock.py"))
        .args(["--ms", &ms.to_string()])
        .arg(lock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn sale_interval(child: Child) -> Interval {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_intervals(&text, "sale")
        .pop()
        .unwrap_or_else(|| panic!("no sale line: {text}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_waits_for_the_sale_in_progress_and_the_state_says_busy() {
    if !python() {
        return;
    }
    let mut s = setup().await;
    let work = tempfile::tempdir().unwrap();
    let config = recording_config(&s, work.path());
    let lock = config.sale_lock_path();
    let m = start(config, AgentOptions::default());
    let state_busy = |p: &Platform| p.state.lock().unwrap().as_ref().map(|st| st.busy);
    eventually(
        Duration::from_secs(10),
        || state_busy(&s.platform) == Some(false),
        || "the first state".into(),
    )
    .await;

    // A sale is in progress: the state says busy; an idle release waits for it...
    let sale = long_sale(&lock, 6000);
    eventually(
        Duration::from_secs(5),
        || state_busy(&s.platform) == Some(true),
        || "busy while a sale holds the lock".into(),
    )
    .await;
    let art = s.platform.add(Artifact::new(20 * 1024, 7));
    s.platform
        .announce("r-idle", "1.1.0", &art, InstallPolicy::Idle)
        .await;
    let seen = s.platform.wait_for("r-idle", Phase::Deferred).await;
    assert_eq!(
        seen.last().and_then(|e| e.detail.as_deref()),
        Some("waiting for idle")
    );
    // ...and so does an immediate one (of another kind): it is `installing`, but its install
    // starts only when the sale ended.
    let art2 = s.platform.add(Artifact::new(20 * 1024, 8));
    let n = ReleaseNotice {
        kind: fw(),
        ..s.platform
            .notice("r-now", "2.0.0", &art2, InstallPolicy::Immediate)
    };
    s.platform.publish(&n).await;
    s.platform.wait_for("r-now", Phase::Installing).await;
    let sale_iv = sale_interval(sale);
    let done = finals(&mut s.platform, &["r-idle", "r-now"]).await;
    assert!(
        done.values().all(|e| e.phase == Phase::Installed),
        "{done:?}"
    );
    let log = std::fs::read_to_string(work.path().join("installs.log")).unwrap();
    for (what, iv) in parse_intervals(&log, "install") {
        assert!(
            iv.start > sale_iv.end,
            "{what:?} ran at {iv:?}, during the sale {sale_iv:?}"
        );
    }
    eventually(
        Duration::from_secs(5),
        || state_busy(&s.platform) == Some(false),
        || "idle once the sale ended".into(),
    )
    .await;

    // The deprecated busy file still counts.
    std::fs::write(m.config.data_dir.join("busy"), b"").unwrap();
    eventually(
        Duration::from_secs(5),
        || state_busy(&s.platform) == Some(true),
        || "busy while the busy file exists".into(),
    )
    .await;
    std::fs::remove_file(m.config.data_dir.join("busy")).unwrap();
    eventually(
        Duration::from_secs(5),
        || state_busy(&s.platform) == Some(false),
        || "idle once the busy file is gone".into(),
    )
    .await;
    m.stop().await;
}
