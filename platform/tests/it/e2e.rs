//! The whole update flow across crates: real broker (embedded rumqttd or Mosquitto), the real
//! platform service with sled in a temp dir, the real operator client, and real machine agents
//! (the simulator) with slot installers writing real files.

use std::collections::BTreeMap;

use super::*;

/// The config of a provisioned machine with its data in `dir/<machine>`.
pub(super) fn machine_config(
    p: &ProvisionedMachine,
    broker: &BrokerUrl,
    dir: &Path,
) -> fleetcast_device::config::MachineConfig {
    fleetcast_device::config::MachineConfig::from_provisioned(
        p,
        &broker.to_string(),
        dir.join(p.machine.as_str()),
    )
}

/// The status of `release` after `quiet` in which nothing is expected to happen.
async fn status_after(admin: &AdminClient, release: &ReleaseId, quiet: Duration) -> ReleaseStatus {
    tokio::time::sleep(quiet).await;
    status(admin, release).await
}

fn assert_all_installed(s: &ReleaseStatus) {
    for t in &s.targets {
        assert_eq!(t.phase, Phase::Installed, "{}: {:?}", t.machine, t);
        let dl = t
            .download
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no download result", t.machine));
        assert!(dl.ok && dl.at_ms > 0, "{}: download {dl:?}", t.machine);
        let up = t
            .upgrade
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no upgrade result", t.machine));
        assert!(
            up.ok && up.at_ms >= dl.at_ms,
            "{}: upgrade {up:?} before download {dl:?}",
            t.machine
        );
        assert!(
            t.notified_at_ms.is_some_and(|n| n <= dl.at_ms),
            "{}: notified {:?}",
            t.machine,
            t.notified_at_ms
        );
    }
}

/// The slot the machine's `current` link points at holds exactly these bytes.
fn assert_active_slot(sim_dir: &Path, machine: &str, expected: &Path) {
    let current = sim_dir
        .join(machine)
        .join("slots")
        .join("app")
        .join("current");
    let slot =
        std::fs::canonicalize(&current).unwrap_or_else(|e| panic!("{}: {e}", current.display()));
    let want = std::fs::read(expected).unwrap();
    let found = std::fs::read_dir(&slot)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .any(|e| std::fs::read(e.path()).map(|b| b == want).unwrap_or(false));
    assert!(
        found,
        "{machine}: active slot {} does not hold {}",
        slot.display(),
        expected.display()
    );
}

async fn machines_versions(admin: &AdminClient) -> BTreeMap<MachineId, Option<String>> {
    machines(admin)
        .await
        .into_iter()
        .map(|mi| {
            let version = mi.kinds.get(&app()).and_then(|k| k.version.clone());
            (mi.id, version)
        })
        .collect()
}

/// Upload, create, publish to one group + one machine (3 machines), all install, results and
/// times recorded, rollback of one machine; with `restart`, the platform is stopped and started
/// again in the middle of a second rollout, and nothing acknowledged is lost.
async fn whole_flow(broker: BrokerUrl, restart: bool) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let Env {
        dir,
        data_dir: data,
        mut platform,
        admin: admin_client,
    } = env(&broker).await;
    let sim = dir.path().join("machines");

    let mut sims = Sims::default();
    sims.start(simulated(&data, &sim, &broker, 3, &["north", "south"]));
    wait_online(&admin_client, 3).await;

    let stable = artifact_file(dir.path(), "app-1.0.0.bin", 100_000, 1);
    let new = artifact_file(dir.path(), "app-1.1.0.bin", 5 * 65536 + 1, 2);
    upload_app(&admin_client, &stable, "1.0.0").await;
    let info = upload_app(&admin_client, &new, "1.1.0").await;
    assert_eq!(info.size, 5 * 65536 + 1);

    // vm-001 and vm-003 are in "north"; vm-002 is named directly.
    let plan = release(&admin_client, "1.1.0", &["vm-002"], &["north"]).await;
    let r1 = plan.release.id.clone();
    assert_eq!(plan.targets.len(), 3, "{plan:?}");
    let s = until_finished(&admin_client, &r1, 3).await;
    assert_all_installed(&s);
    assert_eq!(s.progress.succeeded, 3);
    for vm in ["vm-001", "vm-002", "vm-003"] {
        assert_active_slot(&sim, vm, &new);
    }
    // The counters saw the transfer: every byte of the artifact went out at least once, and
    // each machine's results (at least notified, downloaded, installed) were stored.
    let stats = admin_client.call(calls::Stats {}).await.unwrap();
    assert!(stats.chunk_bytes_sent >= info.size, "{stats:?}");
    assert!(stats.chunk_requests >= 3, "{stats:?}");
    assert!(stats.status_events_stored >= 9, "{stats:?}");
    assert!(stats.ingest_flushes >= 1, "{stats:?}");
    // An external broker (this rumqttd is one to the platform) has no gateway to count.
    assert_eq!(stats.gateway, None, "{stats:?}");

    // Roll vm-001 back to the stable version; the others keep 1.1.0.
    let plan = rollback(
        &admin_client,
        Target::Machine(m("vm-001")),
        &app(),
        Some("1.0.0"),
    )
    .await;
    assert!(plan.release.rollback);
    let rb = until_finished(&admin_client, &plan.release.id, 1).await;
    assert_all_installed(&rb);
    assert_active_slot(&sim, "vm-001", &stable);
    let versions = machines_versions(&admin_client).await;
    assert_eq!(versions[&m("vm-001")].as_deref(), Some("1.0.0"));
    assert_eq!(versions[&m("vm-002")].as_deref(), Some("1.1.0"));
    assert_eq!(versions[&m("vm-003")].as_deref(), Some("1.1.0"));

    if restart {
        // A bigger release to every machine; stop the platform while it is under way.
        let big = artifact_file(dir.path(), "app-1.2.0.bin", 3 * 1024 * 1024 + 7, 3);
        upload_app(&admin_client, &big, "1.2.0").await;
        let r2 = release(&admin_client, "1.2.0", &[], &["north", "south"])
            .await
            .release
            .id;
        // Wait until at least one machine reported something, so the restart is mid-rollout.
        let before = wait_status_within(&admin_client, &r2, E2E_WAIT, |s| {
            s.targets.iter().any(|t| t.phase != Phase::Pending)
        })
        .await;
        admin_client.close().await;
        platform.stop().await;
        // Down for a while: the machines go on reporting into the platform's persistent session.
        tokio::time::sleep(Duration::from_millis(300)).await;
        platform = start_platform(&broker, &data);
        let admin_client = admin(&broker, &data).await;
        // Everything recorded before the restart is still there.
        let after = status(&admin_client, &r2).await;
        for t in before.targets.iter().filter(|t| t.phase != Phase::Pending) {
            let now = target(&after, t.machine.as_str());
            assert!(
                now.notified_at_ms.is_some(),
                "{}: notified time lost over the restart",
                t.machine
            );
        }
        let s = until_finished(&admin_client, &r2, 3).await;
        assert_all_installed(&s);
        for vm in ["vm-001", "vm-002", "vm-003"] {
            assert_active_slot(&sim, vm, &big);
        }
        // The first rollout's results survived too.
        assert_all_installed(&status(&admin_client, &r1).await);
        admin_client.close().await;
    } else {
        admin_client.close().await;
    }

    sims.stop().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_flow_on_the_embedded_broker_survives_a_platform_restart() {
    let broker = start_on_free_port(|s| s).unwrap();
    whole_flow(broker.url(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_flow_on_mosquitto() {
    let mosq = fleetcast_broker::testing::Mosquitto::start("")
        .expect("mosquitto (apt-get install mosquitto)");
    whole_flow(mosq.url.clone(), true).await;
}

/// A machine that is offline while a release is published gets it when it comes back; a
/// download-only release with the command installer waits for `activate`; a group rollback
/// reaches every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_machine_catches_up_and_download_only_waits_for_activate() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir,
        platform,
        admin: admin_client,
        ..
    } = env(&broker).await;
    let fw = Kind::new("firmware").unwrap();

    // vm-a runs from the start; vm-b is provisioned but offline.
    let agents = CancellationToken::new();
    let installed_log = dir.path().join("installed.log");
    let config = |p: &ProvisionedMachine| {
        let mut c = machine_config(p, &broker, dir.path());
        c.initial_versions = BTreeMap::from([(fw.clone(), "3.0".to_owned())]);
        c.installers.insert(
            fw.clone(),
            fleetcast_device::config::InstallerConfig::Command {
                cmd: format!(
                    "sh -c 'cat {{file}} > /dev/null && echo {} {{version}} >> {}'",
                    p.machine,
                    installed_log.display()
                ),
            },
        );
        c
    };
    let pa = provisioned(&admin_client, "vm-a", &["lab"]).await;
    let pb = provisioned(&admin_client, "vm-b", &["lab"]).await;
    let agent_a = tokio::spawn(fleetcast_device::agent::run(config(&pa), agents.clone()));

    let stable = artifact_file(dir.path(), "fw-3.0.bin", 70_000, 4);
    let new = artifact_file(dir.path(), "fw-3.1.bin", 200_000, 5);
    for (path, version) in [(&stable, "3.0"), (&new, "3.1")] {
        upload_file(&admin_client, path, &fw, version, 65536)
            .await
            .unwrap();
    }
    let release = create_release(&admin_client, &fw, "3.1", InstallPolicy::DownloadOnly)
        .await
        .id;
    publish(&admin_client, &release, &[], &["lab"]).await;

    // vm-a downloads and waits (deferred); vm-b has heard nothing.
    let s = wait_status_within(&admin_client, &release, E2E_WAIT, |s| {
        phase_of(s, "vm-a") == Phase::Deferred
    })
    .await;
    assert_eq!(phase_of(&s, "vm-b"), Phase::Pending);
    let a = target(&s, "vm-a");
    assert!(
        a.download.as_ref().is_some_and(|d| d.ok),
        "deferred after a successful download: {a:?}"
    );
    assert!(
        a.upgrade.is_none(),
        "nothing installed before activate: {a:?}"
    );
    assert!(!installed_log.exists(), "the installer ran before activate");

    // vm-b comes online and catches up from the retained group notice.
    let agent_b = tokio::spawn(fleetcast_device::agent::run(config(&pb), agents.clone()));
    wait_status_within(&admin_client, &release, E2E_WAIT, |s| {
        s.targets.iter().all(|t| t.phase == Phase::Deferred)
    })
    .await;

    // Activate: both install through the command installer.
    admin_client
        .call(calls::Activate {
            release: release.clone(),
            machines: vec![],
            groups: vec![],
        })
        .await
        .unwrap();
    let s = until_finished(&admin_client, &release, 2).await;
    assert_all_installed(&s);
    let log = std::fs::read_to_string(&installed_log).unwrap();
    assert!(
        log.contains("vm-a 3.1") && log.contains("vm-b 3.1"),
        "{log}"
    );

    // Roll the whole group back to 3.0.
    let plan = rollback(&admin_client, Target::Group(g("lab")), &fw, Some("3.0")).await;
    let rb = until_finished(&admin_client, &plan.release.id, 2).await;
    assert_all_installed(&rb);
    let log = std::fs::read_to_string(&installed_log).unwrap();
    assert!(
        log.contains("vm-a 3.0") && log.contains("vm-b 3.0"),
        "{log}"
    );

    admin_client.close().await;
    agents.cancel();
    joined(agent_a, "agent vm-a").await;
    joined(agent_b, "agent vm-b").await;
    platform.stop().await;
}

/// The broker is killed (SIGKILL, nothing persisted) while a machine is downloading and started
/// again on the same port: every client reconnects, the platform re-publishes its desired state,
/// the machine resumes its download and installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_transfer_is_survived() {
    let mut mosq = fleetcast_broker::testing::Mosquitto::start("")
        .expect("mosquitto (apt-get install mosquitto)");
    let broker = mosq.url.clone();
    // Served at 4 MiB/s (first copies paced too), the 48 MiB download takes about 12 s: the
    // agent reports progress (at most every 5 s) well before it ends, and the broker dies
    // mid-transfer.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let platform = start_platform_with(
        &broker,
        &data,
        fleetcast_platform::limits::MachineLimits {
            bytes_per_sec: 4.0 * 1024.0 * 1024.0,
            byte_burst: 4.0 * 1024.0 * 1024.0,
            first_copies_free: false,
            ..Default::default()
        },
    );
    let admin_client = admin(&broker, &data).await;
    let sim = dir.path().join("machines");
    let mut sims = Sims::default();
    sims.start(simulated(&data, &sim, &broker, 1, &["field"]));
    wait_online(&admin_client, 1).await;
    let big = artifact_file(dir.path(), "app-2.0.0.bin", 48 * 1024 * 1024 + 3, 9);
    upload_app(&admin_client, &big, "2.0.0").await;
    let release = release(&admin_client, "2.0.0", &[], &["field"])
        .await
        .release
        .id;
    let downloading = |t: &fleetcast_proto::admin::TargetRecord| {
        t.phase == Phase::Downloading && t.progress.is_some_and(|p| p.bytes > 0)
    };
    let s = wait_status_within(&admin_client, &release, E2E_WAIT, |s| {
        downloading(&s.targets[0]) || s.targets[0].download.is_some()
    })
    .await;
    assert!(
        downloading(&s.targets[0]),
        "the download finished before the broker could be killed: {:?}",
        s.targets[0]
    );
    mosq.kill();
    // The outage: every client loses its connection and retries against a closed port.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mosq.restart().expect("mosquitto restarts on the same port");

    let s = until_finished(&admin_client, &release, 1).await;
    assert_all_installed(&s);
    assert_active_slot(&sim, "vm-001", &big);
    admin_client.close().await;
    sims.stop().await;
    platform.stop().await;
}

/// The config of `p` (app 1.0.0 installed, data under `dir`), and a sale that holds the
/// machine's sale lock (a shared flock, as the vending application takes it; util-linux
/// `flock`) until its stdin closes.
async fn serving_a_sale(
    p: &ProvisionedMachine,
    broker: &BrokerUrl,
    dir: &Path,
) -> (fleetcast_device::config::MachineConfig, std::process::Child) {
    let mut config = machine_config(p, broker, dir);
    config.initial_versions = BTreeMap::from([(app(), "1.0.0".to_owned())]);
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let serving = dir.join(format!("{}-serving", p.machine));
    let sale = std::process::Command::new("flock")
        .arg("--shared")
        .arg(config.sale_lock_path())
        .arg("-c")
        .arg(format!("touch '{}' && cat >/dev/null", serving.display()))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("flock(1) from util-linux");
    poll_until(
        WAIT,
        "the sale holds the lock",
        || async { serving.exists() },
        |held| *held,
    )
    .await;
    (config, sale)
}

/// `idle` installs only once the machine stops serving a customer (the vending application holds
/// a shared flock on the sale lock, here with util-linux `flock`); a `window` that is closed now
/// keeps the release downloaded but deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_waits_for_the_machine_to_be_free_and_a_closed_window_defers() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir,
        platform,
        admin: admin_client,
        ..
    } = env(&broker).await;
    let p = provisioned(&admin_client, "vm-i", &[]).await;
    let (config, mut sale) = serving_a_sale(&p, &broker, dir.path()).await;
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(config, agents.clone()));
    wait_online(&admin_client, 1).await;

    let wait_phase = |release: ReleaseId, want: Phase| {
        let admin_client = &admin_client;
        async move {
            wait_status_within(admin_client, &release, E2E_WAIT, |s| {
                s.targets[0].phase == want
            })
            .await
        }
    };

    let v2 = artifact_file(dir.path(), "app-2.0.0.bin", 150_000, 6);
    upload_app(&admin_client, &v2, "2.0.0").await;
    let idle = create_release(&admin_client, &app(), "2.0.0", InstallPolicy::Idle)
        .await
        .id;
    publish(&admin_client, &idle, &["vm-i"], &[]).await;
    let s = wait_phase(idle.clone(), Phase::Deferred).await;
    assert!(
        s.targets[0].download.as_ref().is_some_and(|d| d.ok),
        "downloaded while busy"
    );
    let s = status_after(&admin_client, &idle, Duration::from_millis(1500)).await;
    assert_eq!(
        s.targets[0].phase,
        Phase::Deferred,
        "installed while busy: {:?}",
        s.targets[0]
    );
    drop(sale.stdin.take());
    assert!(sale.wait().unwrap().success());
    let s = wait_phase(idle, Phase::Installed).await;
    assert_all_installed(&s);

    // A window that opens in two hours (UTC): downloaded now, installed later.
    let v3 = artifact_file(dir.path(), "app-3.0.0.bin", 90_000, 7);
    upload_app(&admin_client, &v3, "3.0.0").await;
    let minute = (fleetcast_platform::now_ms() / 60_000 % (24 * 60)) as u32;
    let hhmm = |m: u32| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let policy: InstallPolicy = format!(
        "window:{}-{}@+00:00",
        hhmm(minute + 120),
        hhmm(minute + 180)
    )
    .parse()
    .unwrap();
    let window = create_release(&admin_client, &app(), "3.0.0", policy)
        .await
        .id;
    publish(&admin_client, &window, &["vm-i"], &[]).await;
    let s = wait_phase(window.clone(), Phase::Deferred).await;
    assert!(s.targets[0].download.as_ref().is_some_and(|d| d.ok));
    let s = status_after(&admin_client, &window, Duration::from_millis(1500)).await;
    assert_eq!(
        s.targets[0].phase,
        Phase::Deferred,
        "installed outside its window: {:?}",
        s.targets[0]
    );
    assert!(s.targets[0].upgrade.is_none());
    assert_eq!(
        machines_versions(&admin_client).await[&m("vm-i")].as_deref(),
        Some("2.0.0")
    );

    admin_client.close().await;
    agents.cancel();
    joined(agent, "agent vm-i").await;
    platform.stop().await;
}

/// An operator rotates a machine's secret (`machine provision --rotate`, what security.md says to
/// do with a stolen config) before the machine has its new config: it installs a deferred
/// release meanwhile, so its outbox holds events MAC'd with the old secret, which the platform
/// no longer accepts. Started with its new config, it MACs them again and they are stored.
/// Before, the outbox's head never verified again and held every later event back for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_queued_under_a_rotated_secret_are_delivered_with_the_new_one() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir,
        platform,
        admin: admin_client,
        ..
    } = env(&broker).await;
    let p = provisioned(&admin_client, "vm-r", &[]).await;
    let (mut config, mut sale) = serving_a_sale(&p, &broker, dir.path()).await;
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(config.clone(), agents.clone()));
    wait_online(&admin_client, 1).await;
    let v2 = artifact_file(dir.path(), "app-2.0.0.bin", 60_000, 9);
    upload_app(&admin_client, &v2, "2.0.0").await;
    let idle = create_release(&admin_client, &app(), "2.0.0", InstallPolicy::Idle)
        .await
        .id;
    publish(&admin_client, &idle, &["vm-r"], &[]).await;
    wait_status_within(&admin_client, &idle, E2E_WAIT, |s| {
        s.targets[0].phase == Phase::Deferred
    })
    .await;

    // From the rotation on, the platform refuses what the old secret MACs (this broker checks
    // no passwords, so the machine stays connected and keeps sending its outbox's head).
    let fresh = provisioned_with(&admin_client, "vm-r", &[], true).await;
    // The sale ends: the machine installs and queues its reports, MAC'd with the old secret.
    drop(sale.stdin.take());
    assert!(sale.wait().unwrap().success());
    let outbox = config.data_dir.join("outbox.json");
    poll_until(
        WAIT,
        "the install reported into the outbox",
        || async { std::fs::read_to_string(&outbox).unwrap_or_default() },
        |text| text.contains("installed"),
    )
    .await;
    agents.cancel();
    joined(agent, "agent vm-r with the old secret").await;

    config.secret = fresh.secret;
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(config, agents.clone()));
    let s = wait_status_within(&admin_client, &idle, E2E_WAIT, |s| {
        s.targets[0].phase == Phase::Installed
    })
    .await;
    assert_all_installed(&s);
    poll_until(
        WAIT,
        "the outbox emptied",
        || async { std::fs::read_to_string(&outbox).unwrap_or_default() },
        |text| text.trim() == "[]",
    )
    .await;
    admin_client.close().await;
    agents.cancel();
    joined(agent, "agent vm-r with the new secret").await;
    platform.stop().await;
}

/// The platform acknowledges a status event with a `StatusAck` MAC'd with the machine's secret
/// only after storing it, and
/// acknowledges a repeat of it again (the machine missed the first ack); a forged one gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_status_is_acknowledged_end_to_end_and_repeats_are_acknowledged_again() {
    use fleetcast_proto::StatusAck;

    let broker = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir: _dir,
        data_dir: data,
        platform,
        admin: admin_client,
    } = env(&broker).await;
    let (p, mut vm) = acked_peer(&broker, &admin_client, "vm-ack").await;
    let topics = Topics::default();
    let status = |ctr: u64| notified_event("vm-ack", ctr);
    let sealed = p.secret.seal(Purpose::Status, &status(7));
    for round in 0..2 {
        vm.publish_acked(&topics.status(&m("vm-ack")), false, sealed.clone())
            .await;
        let ack = next_ack(&p.secret, &mut vm, WAIT)
            .await
            .unwrap_or_else(|| panic!("no ack in round {round}"));
        assert_eq!(
            ack,
            StatusAck {
                machine: m("vm-ack"),
                ctr: 7
            }
        );
    }
    let forged = Secret::from_bytes([9; 32]).seal(Purpose::Status, &status(8));
    vm.publish_acked(&topics.status(&m("vm-ack")), false, forged)
        .await;
    assert_eq!(
        next_ack(&p.secret, &mut vm, Duration::from_millis(1500)).await,
        None,
        "a forged status was acknowledged"
    );
    drop(vm);
    admin_client.close().await;
    platform.stop().await;
    assert_eq!(events_stored_for(&data, "vm-ack"), 1, "stored once");
}

/// A batch of status events (an agent sending its backlog, protocol.md §6.1) is taken event by
/// event: stored and acknowledged with its newest counter, a replayed event in it acknowledged
/// and not stored again, a forged event ending it (what came before is kept), and a batch over
/// 64 events or an empty one refused whole, unanswered.
#[tokio::test]
async fn a_batch_of_status_events_is_taken_event_by_event_and_stops_at_a_forged_one() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir: _dir,
        data_dir: data,
        platform,
        admin: admin_client,
    } = env(&broker).await;
    let (p, mut vm) = acked_peer(&broker, &admin_client, "vm-batch").await;
    let topic = Topics::default().status(&m("vm-batch"));
    let sealed = |secret: &Secret, ctr: u64| {
        let ev = notified_event("vm-batch", ctr);
        String::from_utf8(secret.seal(Purpose::Status, &ev)).unwrap()
    };
    let batch = |items: Vec<String>| format!("[{}]", items.join(",")).into_bytes();
    let mine = |ctrs: std::ops::RangeInclusive<u64>| -> Vec<String> {
        ctrs.map(|c| sealed(&p.secret, c)).collect()
    };
    let acked = |ack: Option<fleetcast_proto::StatusAck>| ack.map(|a| a.ctr);

    vm.publish_acked(&topic, false, batch(mine(1..=3))).await;
    assert_eq!(acked(next_ack(&p.secret, &mut vm, WAIT).await), Some(3));
    // Event 5 is forged: 4 is kept and acknowledged, 5 and 6 are not taken.
    let forged = sealed(&Secret::from_bytes([9; 32]), 5);
    let items = vec![sealed(&p.secret, 4), forged, sealed(&p.secret, 6)];
    vm.publish_acked(&topic, false, batch(items)).await;
    assert_eq!(acked(next_ack(&p.secret, &mut vm, WAIT).await), Some(4));
    let quiet = Duration::from_millis(1500);
    assert_eq!(acked(next_ack(&p.secret, &mut vm, quiet).await), None);
    // Sent again from the outbox head: 3 is a replay (acknowledged, not stored), 5 and 6 new.
    vm.publish_acked(&topic, false, batch(mine(3..=6))).await;
    assert_eq!(acked(next_ack(&p.secret, &mut vm, WAIT).await), Some(6));
    // Too many, or none: refused whole, no answer.
    for refused in [batch(mine(7..=71)), b"[]".to_vec()] {
        vm.publish_acked(&topic, false, refused).await;
        assert_eq!(acked(next_ack(&p.secret, &mut vm, quiet).await), None);
    }
    drop(vm);
    admin_client.close().await;
    platform.stop().await;
    assert_eq!(
        events_stored_for(&data, "vm-batch"),
        6,
        "events 1 to 6, each once"
    );
}

/// A `notified` status event of `machine` with counter `ctr` and no release (stored, applied
/// to no record).
pub(super) fn notified_event(machine: &str, ctr: u64) -> StatusEvent {
    StatusEvent {
        machine: m(machine),
        ctr,
        at_ms: fleetcast_platform::now_ms(),
        release: None,
        kind: app(),
        version: "1.0".into(),
        phase: Phase::Notified,
        progress: None,
        attempt: 1,
        error: None,
        detail: None,
    }
}

/// A machine `name` provisioned on the platform of `admin`, connected to `broker` with its
/// credentials and subscribed to its status acks.
async fn acked_peer(
    broker: &BrokerUrl,
    admin: &AdminClient,
    name: &str,
) -> (ProvisionedMachine, Peer) {
    let p = provisioned(admin, name, &[]).await;
    let mut vm = peer_with(broker, name, Some(&p.secret.mqtt_password())).await;
    vm.subscribe(&Topics::default().status_ack(&m(name))).await;
    (p, vm)
}

/// How many events of `machine` the platform stored in `data` (read once it has stopped).
fn events_stored_for(data: &std::path::Path, machine: &str) -> usize {
    use fleetcast_platform::store::Reads;
    fleetcast_platform::store::SledStore::open(&data.join("db"))
        .unwrap()
        .events()
        .unwrap()
        .iter()
        .filter(|e| e.machine.as_str() == machine)
        .count()
}

/// The next status ack `vm` receives, MAC'd with its `secret`, or None after `within`.
async fn next_ack(
    secret: &Secret,
    vm: &mut Peer,
    within: Duration,
) -> Option<fleetcast_proto::StatusAck> {
    let p = vm.next_within(within, |_| true).await?;
    Some(
        secret
            .open(Purpose::StatusAck, &p.payload)
            .expect("ack is MAC'd with the machine's secret"),
    )
}

/// A forged, unsigned retained notice on a group's release topic, naming the release that is
/// about to be published: the real agents report it rejected *without* that release, so no
/// record is touched, and the genuine release then installs everywhere. On a broker that
/// enforces nothing (the worst case).
#[tokio::test]
async fn a_forged_group_notice_falsifies_no_record_and_the_real_release_installs() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir: data,
        platform,
        admin,
    } = env(&url).await;
    let sim = dir.path().join("machines");
    let mut sims = Sims::default();
    sims.start(simulated(&data, &sim, &url, 3, &["north"]));
    wait_online(&admin, 3).await;
    let (new, created) = app_release(
        &admin,
        dir.path(),
        "1.1.0",
        3 * 65536,
        4,
        InstallPolicy::Immediate,
    )
    .await;

    // The attacker's notice: the real release id and artifact, a huge seq, no valid signature.
    let forged = ReleaseNotice {
        release: created.id.clone(),
        seq: 1_000_000,
        target: Target::Group(g("north")),
        kind: app(),
        version: "1.1.0".into(),
        artifact: created.artifact.clone(),
        policy: InstallPolicy::Immediate,
        rollback: false,
        issued_at_ms: 0,
    };
    let envelope = serde_json::json!({
        "body": serde_json::to_string(&forged).unwrap(),
        "sig": "00".repeat(64),
    });
    let mut attacker = peer(&url, "vm-evil").await;
    attacker
        .publish_acked(
            "fleet/groups/north/release/app",
            true,
            serde_json::to_vec(&envelope).unwrap(),
        )
        .await;
    // Every machine reports the forgery, without the release it claims.
    let rejected = poll_until(
        E2E_WAIT,
        "three rejections of the forged notice",
        || async {
            let (events, _) = super::security::stored_events(&admin).await;
            events
                .into_iter()
                .filter(|e| e.phase == Phase::Rejected)
                .collect::<Vec<_>>()
        },
        |r| r.len() >= 3,
    )
    .await;
    assert!(rejected.iter().all(|e| e.release.is_none()), "{rejected:?}");

    let plan = publish(&admin, &created.id, &[], &["north"]).await;
    assert_eq!(plan.targets.len(), 3);
    let s = until_finished(&admin, &created.id, 3).await;
    assert_all_installed(&s);
    for vm in ["vm-001", "vm-002", "vm-003"] {
        assert_active_slot(&sim, vm, &new);
    }
    assert_eq!(
        s.release.artifact.id,
        ArtifactId::of(&std::fs::read(&new).unwrap())
    );
    sims.stop().await;
    admin.close().await;
    platform.stop().await;
}

/// The simulator never takes over a machine it did not create: next to a real, connected
/// `vm-001` it refuses to start with `--prefix vm-` and provisions nothing, so the real machine
/// keeps its secret and its session; under its own prefix it runs, and runs again after a
/// restart on the same data dir (its own machines get new secrets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_never_takes_over_a_machine_it_did_not_create() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir,
        data_dir: data,
        platform,
        admin: admin_client,
    } = env(&broker).await;
    let real = provisioned(&admin_client, "vm-001", &["north"]).await;
    let mut vm = peer_with(&broker, "vm-001", Some(&real.secret.mqtt_password())).await;
    let sim = dir.path().join("machines");
    let err = fleetcast_device::simulate::run(
        simulated(&data, &sim, &broker, 3, &["north"]),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("vm-001 is provisioned already") && err.contains("--prefix"),
        "{err}"
    );
    let ids =
        |ms: Vec<MachineInfo>| -> Vec<String> { ms.iter().map(|m| m.id.to_string()).collect() };
    assert_eq!(ids(machines(&admin_client).await), ["vm-001"]);
    assert!(!sim.join("vm-002").exists());
    vm.publish_acked("fleet/machines/vm-001/online", true, b"true".to_vec())
        .await;

    let own = || fleetcast_device::simulate::SimulateOptions {
        prefix: "sim-".into(),
        ..simulated(&data, &sim, &broker, 2, &["north"])
    };
    for _start in 0..2 {
        let token = CancellationToken::new();
        let task = tokio::spawn(fleetcast_device::simulate::run(own(), token.clone()));
        poll_until(
            E2E_WAIT,
            "sim-001 and sim-002 online",
            || machines(&admin_client),
            |ms| {
                ms.iter()
                    .filter(|m| m.id.as_str().starts_with("sim-") && m.online)
                    .count()
                    == 2
            },
        )
        .await;
        token.cancel();
        joined(task, "simulator").await;
        poll_until(
            E2E_WAIT,
            "the simulated machines offline",
            || machines(&admin_client),
            |ms| {
                ms.iter()
                    .all(|m| !(m.id.as_str().starts_with("sim-") && m.online))
            },
        )
        .await;
    }
    let mut all = ids(machines(&admin_client).await);
    all.sort();
    assert_eq!(all, ["sim-001", "sim-002", "vm-001"]);
    vm.publish_acked("fleet/machines/vm-001/online", true, b"true".to_vec())
        .await;
    admin_client.close().await;
    platform.stop().await;
}

/// `activate --groups` and `release retry --groups` reach the release's targets in the group
/// alone (before, only `--machines` named targets, one id at a time); a group holding no
/// target is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_and_retry_by_group_reach_that_groups_targets_only() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let env = env(&broker).await;
    let admin = &env.admin;
    let sim = env.dir.path().join("machines");
    let mut sims = Sims::default();
    sims.start(simulated(&env.data_dir, &sim, &broker, 3, &["north"]));
    sims.start(fleetcast_device::simulate::SimulateOptions {
        start_index: 4,
        ..simulated(&env.data_dir, &sim, &broker, 3, &["south"])
    });
    wait_online(admin, 6).await;
    let (_, release) = app_release(
        admin,
        env.dir.path(),
        "2.0.0",
        3_000,
        5,
        InstallPolicy::DownloadOnly,
    )
    .await;
    let release = &release.id;
    publish(admin, release, &[], &["north", "south"]).await;
    wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.len() == 6 && s.targets.iter().all(|t| t.phase == Phase::Deferred)
    })
    .await;
    let fc = super::cli::Fleetcast::new(env.dir.path())
        .with("FLEETCAST_DATA", &env.data_dir)
        .with("FLEETCAST_BROKER", broker.to_string());
    let r = release.as_str();

    let sent = fc.run(&["activate", r, "--groups", "north"]).await.ok();
    assert_eq!(
        sent,
        format!("activate {r} sent to 3 machine(s): vm-001, vm-002, vm-003\n")
    );
    let s = wait_status_within(admin, release, E2E_WAIT, |s| {
        ["vm-001", "vm-002", "vm-003"]
            .iter()
            .all(|m| phase_of(s, m) == Phase::Installed)
    })
    .await;
    for m in ["vm-004", "vm-005", "vm-006"] {
        assert_eq!(phase_of(&s, m), Phase::Deferred, "{m}");
    }
    let s = status_after(admin, release, Duration::from_secs(1)).await;
    for m in ["vm-004", "vm-005", "vm-006"] {
        assert_eq!(phase_of(&s, m), Phase::Deferred, "{m} stays waiting");
    }

    let typo = fc.run(&["activate", r, "--groups", "nort"]).await;
    assert_eq!(typo.code, 1, "{typo:#?}");
    assert!(
        typo.stderr
            .contains(&format!("no target of release {r} is in group nort")),
        "{typo:#?}"
    );
    let retried = fc
        .run(&["release", "retry", r, "--groups", "south", "--json"])
        .await
        .json();
    let mut named: Vec<&str> = retried["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t[0].as_str().unwrap())
        .collect();
    named.sort();
    assert_eq!(named, ["vm-004", "vm-005", "vm-006"]);
    // Nothing in north failed: nothing to retry there.
    let none = fc
        .run(&["release", "retry", r, "--failed", "--groups", "north"])
        .await;
    assert_eq!(none.code, 1, "{none:#?}");
    assert!(none.stderr.contains("has no failed machines"), "{none:#?}");

    sims.stop().await;
    env.admin.close().await;
    env.platform.stop().await;
}
