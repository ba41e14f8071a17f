//! scripts/agent.py, a machine agent written in Python from docs/protocol.md alone, against the
//! platform exactly as `fleetcast serve` runs it: rumqttd behind the authorizing gateway, plain
//! mqtt:// on loopback (and, for forged notices, a plain rumqttd without ACLs). If the document
//! is enough to write an agent that interoperates, this passes; each failure here is a gap
//! between the document and the platform.

use super::gateway::{embedded, Embedded};
use super::*;

/// The agent's whole run, and the test's bound on it.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Logs the platform's warnings (a message of the agent it drops, say) into the test's output.
fn platform_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The platform as `serve` runs it and an admin client of it, or `None` (the test is skipped)
/// without python3's MQTT and crypto packages.
async fn python_env() -> Option<(Embedded, AdminClient)> {
    if !super::security::python_with_mqtt() {
        return None;
    }
    platform_warnings();
    let e = embedded().await;
    let admin = super::admin(&e.plain, &e.data_dir).await;
    Some((e, admin))
}

/// Writes the config `fleetcast machine provision` prints for `p` (its data dir under `dir`).
fn machine_config(dir: &Path, p: &ProvisionedMachine, broker: &BrokerUrl) -> PathBuf {
    let data = dir.join(format!("{}-data", p.machine));
    let path = dir.join(format!("{}.toml", p.machine));
    std::fs::write(
        &path,
        fleetcast_platform::cli::machines::config_toml(p, &broker.to_string(), &data),
    )
    .unwrap();
    path
}

/// Starts scripts/agent.py `--once` on `config`, installing into `out`.
fn start_agent(config: &Path, out: &Path) -> tokio::process::Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/agent.py");
    let timeout = (AGENT_TIMEOUT.as_secs() - 5).to_string();
    tokio::process::Command::new("python3")
        .arg(&script)
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(["--once", "--timeout", &timeout])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs")
}

/// Waits for the agent to exit 0 (it does once its install is acknowledged); its stdout lines.
async fn agent_succeeds(child: tokio::process::Child, what: &str) -> String {
    let out = tokio::time::timeout(AGENT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: the agent did not finish within {AGENT_TIMEOUT:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: agent failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{what}: agent log:\n{stderr}");
    stdout
}

/// What the agent wrote for `info`: the installed file, and the installed version it records.
fn installed(out: &Path, info: &ArtifactInfo) -> (Vec<u8>, String) {
    let dir = out.join(info.kind.as_str());
    let bytes = std::fs::read(dir.join(info.id.to_string())).expect("the agent wrote the artifact");
    let current: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("current.json")).unwrap()).unwrap();
    (bytes, current["version"].as_str().unwrap().to_owned())
}

/// Uploads `len` bytes as app `version` in 64 KiB chunks; the bytes and their artifact.
async fn upload_64k(
    admin: &AdminClient,
    dir: &Path,
    version: &str,
    len: usize,
    seed: u8,
) -> (Vec<u8>, ArtifactInfo) {
    let bytes = data(len, seed);
    let path = dir.join(format!("app-{version}.bin"));
    std::fs::write(&path, &bytes).unwrap();
    let info = upload_file(admin, &path, &app(), version, 65536)
        .await
        .unwrap();
    (bytes, info)
}

/// Waits until `machine`'s record for `release` is `installed`.
async fn installed_on(admin: &AdminClient, release: &ReleaseId, machine: &str) -> ReleaseStatus {
    wait_status(admin, release, |s| {
        s.targets
            .iter()
            .any(|t| t.machine.as_str() == machine && t.phase == Phase::Installed)
    })
    .await
}

/// One machine, a five-chunk artifact (manifest + chunks) released to it directly: the Python
/// agent installs it, the platform records `installed` with the documented phases, and the bytes
/// are the uploaded ones. Then the agent runs again on the same data directory and installs a
/// second release: its counters continue across the restart.
#[tokio::test]
async fn the_python_agent_installs_releases_through_the_gateway() {
    let Some((
        Embedded {
            dir,
            platform,
            plain,
            ..
        },
        admin,
    )) = python_env().await
    else {
        return;
    };
    let (bytes1, info1) = upload_64k(&admin, dir.path(), "1.0.0", 300_000, 3).await;
    let p = provisioned(&admin, "vm-py", &[]).await;
    let config = machine_config(dir.path(), &p, &plain);
    let out = dir.path().join("out");

    let agent = start_agent(&config, &out);
    let r1 = release(&admin, "1.0.0", &["vm-py"], &[]).await.release;
    agent_succeeds(agent, "first release").await;
    let s = installed_on(&admin, &r1.id, "vm-py").await;
    let t = target(&s, "vm-py");
    assert_eq!(t.upgrade.as_ref().map(|u| u.ok), Some(true), "{t:#?}");
    assert_eq!(installed(&out, &info1), (bytes1, "1.0.0".to_owned()));

    // Every phase the agent entered reached the platform as an event, in order.
    let (events, _) = super::security::stored_events(&admin).await;
    let phases: Vec<Phase> = events
        .iter()
        .filter(|e| e.release.as_ref() == Some(&r1.id))
        .map(|e| e.phase)
        .collect();
    assert_eq!(phases.first(), Some(&Phase::Notified), "{phases:?}");
    assert_eq!(
        phases[phases.len() - 3..],
        [Phase::Downloaded, Phase::Installing, Phase::Installed],
        "{phases:?}"
    );

    // A second release, to the agent restarted on the same data directory.
    let (bytes2, info2) = upload_64k(&admin, dir.path(), "1.1.0", 200_000, 4).await;
    let agent = start_agent(&config, &out);
    let r2 = release(&admin, "1.1.0", &["vm-py"], &[]).await.release;
    agent_succeeds(agent, "second release").await;
    installed_on(&admin, &r2.id, "vm-py").await;
    assert_eq!(installed(&out, &info2), (bytes2, "1.1.0".to_owned()));
    let vm = machines(&admin)
        .await
        .into_iter()
        .find(|x| x.id.as_str() == "vm-py")
        .unwrap();
    assert_eq!(
        vm.kinds.get(&app()).and_then(|k| k.version.as_deref()),
        Some("1.1.0"),
        "{vm:#?}"
    );
    assert!(
        !vm.online,
        "a clean shutdown marks the machine offline: {vm:#?}"
    );

    admin.close().await;
    platform.stop().await;
}

/// The machine was provisioned again with `--rotate` while an event waited in its outbox,
/// MAC'd with the old secret, which the platform no longer accepts. Started with the new
/// config, the agent MACs it again with the new secret (protocol.md §6.1, "After a secret
/// change"): it is stored, and the agent's own reports of a release after it. Before, the
/// outbox's head was never acknowledged and `--once` never finished.
#[tokio::test]
async fn the_python_agent_macs_events_queued_under_a_rotated_secret_again() {
    let Some((
        Embedded {
            dir,
            platform,
            plain,
            ..
        },
        admin,
    )) = python_env().await
    else {
        return;
    };
    let old = provisioned(&admin, "vm-py", &[]).await.secret;
    let rotated = provisioned_with(&admin, "vm-py", &[], true).await;
    let config = machine_config(dir.path(), &rotated, &plain);
    // What the agent queued before it had its new config. Its counter is below the ones the
    // agent takes on a fresh data dir (the clock in microseconds).
    let mut queued = StatusEvent {
        detail: Some("queued under the old secret".into()),
        ..super::e2e::notified_event("vm-py", 0)
    };
    queued.ctr = fleetcast_platform::now_ms() * 1000 - 60_000_000;
    let env: serde_json::Value =
        serde_json::from_slice(&old.seal(Purpose::Status, &queued)).unwrap();
    let data = dir.path().join("vm-py-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("outbox.json"),
        serde_json::to_vec(&serde_json::json!([{ "ctr": queued.ctr, "env": env }])).unwrap(),
    )
    .unwrap();
    upload_64k(&admin, dir.path(), "1.0.0", 100_000, 5).await;
    let agent = start_agent(&config, &dir.path().join("out"));
    let r = release(&admin, "1.0.0", &["vm-py"], &[]).await.release;
    agent_succeeds(agent, "after the rotation").await;
    installed_on(&admin, &r.id, "vm-py").await;
    let (events, _) = super::security::stored_events(&admin).await;
    let details: Vec<Option<&str>> = events.iter().map(|e| e.detail.as_deref()).collect();
    assert_eq!(
        details.first().copied().flatten(),
        Some("queued under the old secret"),
        "{events:#?}"
    );
    admin.close().await;
    platform.stop().await;
}

/// A release published to a group before the machine connects: the agent gets the retained
/// notice on the group's topic and installs it.
#[tokio::test]
async fn the_python_agent_installs_a_group_release() {
    let Some((
        Embedded {
            dir,
            platform,
            plain,
            ..
        },
        admin,
    )) = python_env().await
    else {
        return;
    };
    let (bytes, info) = upload_64k(&admin, dir.path(), "2.0.0", 150_000, 9).await;
    let p = provisioned(&admin, "vm-grp", &["shop-1"]).await;
    let config = machine_config(dir.path(), &p, &plain);
    let out = dir.path().join("out");
    let r = release(&admin, "2.0.0", &[], &["shop-1"]).await.release;

    agent_succeeds(start_agent(&config, &out), "group release").await;
    let s = installed_on(&admin, &r.id, "vm-grp").await;
    assert_eq!(
        target(&s, "vm-grp").via.as_ref().map(|g| g.as_str()),
        Some("shop-1")
    );
    assert_eq!(installed(&out, &info), (bytes.clone(), "2.0.0".to_owned()));

    // A machine provisioned into the group after the publish becomes a target at its first state
    // (§6.2) and installs the group's current release.
    let late = provisioned(&admin, "vm-late", &["shop-1"]).await;
    let config = machine_config(dir.path(), &late, &plain);
    let late_out = dir.path().join("late-out");
    agent_succeeds(start_agent(&config, &late_out), "late group member").await;
    let s = installed_on(&admin, &r.id, "vm-late").await;
    assert_eq!(
        target(&s, "vm-late").via.as_ref().map(|g| g.as_str()),
        Some("shop-1")
    );
    assert_eq!(
        installed(&late_out, &info),
        (bytes.clone(), "2.0.0".to_owned())
    );

    // A machine moved into the group while it was offline, its config still naming its old
    // group: the platform tells it its groups (a `groups` command, §5) at its first state, and
    // it installs the group's release.
    let moved = provisioned(&admin, "vm-moved", &["shop-2"]).await;
    let config = machine_config(dir.path(), &moved, &plain);
    admin
        .call(calls::MachineGroups {
            machine: m("vm-moved"),
            add: vec![g("shop-1")],
            remove: vec![g("shop-2")],
        })
        .await
        .unwrap();
    let moved_out = dir.path().join("moved-out");
    agent_succeeds(start_agent(&config, &moved_out), "machine moved offline").await;
    let s = installed_on(&admin, &r.id, "vm-moved").await;
    assert_eq!(
        target(&s, "vm-moved").via.as_ref().map(|g| g.as_str()),
        Some("shop-1")
    );
    assert_eq!(installed(&moved_out, &info), (bytes, "2.0.0".to_owned()));

    admin.close().await;
    platform.stop().await;
}

/// A machine provisioned before a platform key rotation follows the key chain (§3.1) to judge
/// the notice signed with the new key, and a `download_only` release waits (`deferred`) for the
/// signed `activate` command (§5) before it installs.
#[tokio::test]
async fn the_python_agent_follows_a_key_rotation_and_waits_for_activate() {
    let Some((
        Embedded {
            dir,
            platform,
            plain,
            ..
        },
        admin,
    )) = python_env().await
    else {
        return;
    };
    let (bytes, info) = upload_64k(&admin, dir.path(), "3.0.0", 140_000, 11).await;
    let p = provisioned(&admin, "vm-rot", &[]).await;
    assert_eq!(p.platform_key_gen, 0);
    let config = machine_config(dir.path(), &p, &plain);
    let out = dir.path().join("out");
    admin.call(calls::KeyRotate {}).await.unwrap();

    let agent = start_agent(&config, &out);
    let created = create_release(&admin, &app(), "3.0.0", InstallPolicy::DownloadOnly).await;
    publish(&admin, &created.id, &["vm-rot"], &[]).await;
    wait_status_within(&admin, &created.id, AGENT_TIMEOUT, |s| {
        phase_of(s, "vm-rot") == Phase::Deferred
    })
    .await;
    assert!(
        !out.join("app").exists(),
        "nothing installed before activate"
    );
    admin
        .call(calls::Activate {
            release: created.id.clone(),
            machines: vec![],
            groups: vec![],
        })
        .await
        .unwrap();
    agent_succeeds(agent, "download_only release after a key rotation").await;
    installed_on(&admin, &created.id, "vm-rot").await;
    assert_eq!(installed(&out, &info), (bytes, "3.0.0".to_owned()));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("vm-rot-data/agent.json")).unwrap())
            .unwrap();
    assert_eq!(state["current"]["gen"], 1, "{state:#}");
    // The operator sees that it followed: its record carries its state's key generation.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let gen = machines(&admin)
            .await
            .into_iter()
            .find(|m| m.id.as_str() == "vm-rot")
            .map(|m| m.key_gen);
        if gen == Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vm-rot's record: key_gen {gen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    admin.close().await;
    platform.stop().await;
}

/// 1 KiB chunks of a 1.2 MB artifact: a manifest of 38 parts, more than the 32 a request may ask
/// for at once (§7.3, `manifest_parts`), and 1,172 chunks.
#[tokio::test]
async fn the_python_agent_fetches_a_long_manifest_in_windows() {
    let Some((
        Embedded {
            dir,
            platform,
            plain,
            ..
        },
        admin,
    )) = python_env().await
    else {
        return;
    };
    let bytes = data(1_200_000, 21);
    let path = dir.path().join("long.bin");
    std::fs::write(&path, &bytes).unwrap();
    let info = upload_file(&admin, &path, &app(), "5.0.0", 1024)
        .await
        .unwrap();
    let p = provisioned(&admin, "vm-long", &[]).await;
    let config = machine_config(dir.path(), &p, &plain);
    let out = dir.path().join("out");
    let agent = start_agent(&config, &out);
    let r = release(&admin, "5.0.0", &["vm-long"], &[]).await.release;
    agent_succeeds(agent, "long manifest").await;
    installed_on(&admin, &r.id, "vm-long").await;
    assert_eq!(installed(&out, &info), (bytes, "5.0.0".to_owned()));

    admin.close().await;
    platform.stop().await;
}

/// A one-chunk `download_only` release in a staged rollout waits for `activate`; cancelling the
/// rollout sends the signed `cancel` command and clears the retained notice: the agent reports
/// `cancelled`, and then installs the next release.
#[tokio::test]
async fn the_python_agent_obeys_a_cancelled_rollout() {
    let Some((
        Embedded {
            dir,
            platform,
            plain,
            ..
        },
        admin,
    )) = python_env().await
    else {
        return;
    };
    upload_64k(&admin, dir.path(), "4.0.0", 50_000, 13).await;
    let p = provisioned(&admin, "vm-c", &[]).await;
    let config = machine_config(dir.path(), &p, &plain);
    let out = dir.path().join("out");
    let agent = start_agent(&config, &out);
    let staged = create_release(&admin, &app(), "4.0.0", InstallPolicy::DownloadOnly).await;
    let waves = fleetcast_proto::rollout::WavePlan {
        waves_bp: vec![10_000],
        success_bp: 10_000,
        failure_bp: 10_000,
        wave_timeout_ms: 0,
    };
    publish_with(&admin, &staged.id, &["vm-c"], &[], Some(waves)).await;
    wait_status_within(&admin, &staged.id, AGENT_TIMEOUT, |s| {
        phase_of(s, "vm-c") == Phase::Deferred
    })
    .await;
    admin
        .call(calls::RolloutCancel {
            release: staged.id.clone(),
        })
        .await
        .unwrap();
    wait_status(&admin, &staged.id, |s| {
        phase_of(s, "vm-c") == Phase::Cancelled
    })
    .await;
    assert!(
        !out.join("app").exists(),
        "a cancelled release is not installed"
    );

    let (bytes, info) = upload_64k(&admin, dir.path(), "4.1.0", 70_000, 14).await;
    let next = release(&admin, "4.1.0", &["vm-c"], &[]).await.release;
    agent_succeeds(agent, "after a cancelled rollout").await;
    installed_on(&admin, &next.id, "vm-c").await;
    assert_eq!(installed(&out, &info), (bytes, "4.1.0".to_owned()));

    admin.close().await;
    platform.stop().await;
}

/// On a broker without ACLs (plain rumqttd, no gateway) anyone may publish on a machine's release
/// topics. A forged notice and a genuine notice copied onto the machine's topic are each
/// reported `rejected` without a release (§3.1), and the genuine notice then installs.
#[tokio::test]
async fn on_an_open_broker_the_python_agent_reports_forged_and_copied_notices() {
    if !super::security::python_with_mqtt() {
        return;
    }
    platform_warnings();
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    let (bytes, info) = upload_64k(&admin, dir.path(), "6.0.0", 100_000, 17).await;
    let p = provisioned(&admin, "vm-open", &[]).await;
    let config = machine_config(dir.path(), &p, &url);
    let out = dir.path().join("out");
    let created = create_release(&admin, &app(), "6.0.0", InstallPolicy::Immediate).await;
    let publish_to = |machines: Vec<MachineId>, groups: Vec<GroupId>| calls::ReleasePublish {
        release: created.id.clone(),
        machines,
        groups,
        allow_empty: true,
        waves: None,
    };
    admin
        .call(publish_to(vec![], vec![g("nobody")]))
        .await
        .unwrap();
    let mut attacker = peer(&url, "attacker").await;
    attacker.subscribe("fleet/groups/nobody/release/app").await;
    let genuine = attacker
        .next(|p| p.topic == "fleet/groups/nobody/release/app")
        .await;
    attacker
        .publish_acked(
            "fleet/machines/vm-open/release/app",
            true,
            genuine.payload.to_vec(),
        )
        .await;
    let forged = format!(r#"{{"body":"{{}}","sig":"{}"}}"#, "00".repeat(64));
    attacker
        .publish_acked(
            "fleet/machines/vm-open/release/firmware",
            true,
            forged.into_bytes(),
        )
        .await;

    // Junk on a topic whose kind is no id (§1): dropped, not reported. A report naming that
    // kind would be malformed, never acknowledged, and would hold the outbox for ever.
    attacker
        .publish_acked(
            "fleet/machines/vm-open/release/bad!kind",
            true,
            b"junk".to_vec(),
        )
        .await;

    let agent = start_agent(&config, &out);
    let rejected = poll_until(
        AGENT_TIMEOUT,
        "both unverified notices reported",
        || async { super::security::stored_events(&admin).await.0 },
        |events| {
            events
                .iter()
                .filter(|e| e.machine.as_str() == "vm-open" && e.phase == Phase::Rejected)
                .count()
                == 2
        },
    )
    .await;
    for e in rejected.iter().filter(|e| e.phase == Phase::Rejected) {
        assert!(e.release.is_none() && e.version.is_empty(), "{e:#?}");
        assert!(e.error.is_some(), "{e:#?}");
    }
    admin
        .call(publish_to(vec![m("vm-open")], vec![]))
        .await
        .unwrap();
    agent_succeeds(agent, "open broker").await;
    installed_on(&admin, &created.id, "vm-open").await;
    assert_eq!(installed(&out, &info), (bytes, "6.0.0".to_owned()));

    admin.close().await;
    platform.stop().await;
}

/// `fleetcast serve` with its embedded broker on plain mqtt://127.0.0.1:`port` (no TLS listener),
/// as [`embedded`] starts it: used to start it again on the same port and data.
fn serve_plain(data_dir: &Path, port: u16) -> Platform {
    let shutdown = CancellationToken::new();
    let opts = ServeOptions {
        data_dir: data_dir.to_owned(),
        broker: BrokerUrl::mqtt("127.0.0.1", port),
        embedded_listen: Some(([127, 0, 0, 1], port).into()),
        tls: None,
        topic_prefix: "fleet".into(),
        limits: Default::default(),
        compaction: Default::default(),
    };
    let task = tokio::spawn(serve(opts, shutdown.clone()));
    Platform { shutdown, task }
}

/// [`serve_plain`] on the port a stopped `serve` listened on. Binding it again right after
/// `stop()` sometimes fails with "address in use" for a moment (seen: < 400 ms), so this tries
/// again for up to 10 s.
async fn serve_again(data_dir: &Path, port: u16) -> Platform {
    let started = tokio::time::Instant::now();
    loop {
        let platform = serve_plain(data_dir, port);
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !platform.task.is_finished() {
            eprintln!("serve restarted after {:?}", started.elapsed());
            return platform;
        }
        let ended = platform.task.await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "serve does not start again: {ended:?}"
        );
    }
}

/// The platform (and its embedded broker) restarts while the agent downloads: the agent
/// reconnects, subscribes again, asks again for what it lacks, and finishes; its retained notice,
/// delivered again, is not taken for a new one.
#[tokio::test]
async fn the_python_agent_finishes_a_download_across_a_platform_restart() {
    if !super::security::python_with_mqtt() {
        return;
    }
    platform_warnings();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let port = client::free_loopback_port().unwrap();
    let url = BrokerUrl::mqtt("127.0.0.1", port);
    let platform = serve_plain(&data_dir, port);
    let admin = super::admin(&url, &data_dir).await;
    let bytes = data(2_000_000, 23);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &bytes).unwrap();
    let info = upload_file(&admin, &path, &app(), "7.0.0", 1024)
        .await
        .unwrap();
    let p = provisioned(&admin, "vm-r", &[]).await;
    let config = machine_config(dir.path(), &p, &url);
    let out = dir.path().join("out");
    let agent = start_agent(&config, &out);
    let r = release(&admin, "7.0.0", &["vm-r"], &[]).await.release;
    let s = wait_status_within(&admin, &r.id, AGENT_TIMEOUT, |s| {
        phase_of(s, "vm-r") != Phase::Pending && phase_of(s, "vm-r") != Phase::Notified
    })
    .await;
    assert_eq!(phase_of(&s, "vm-r"), Phase::Downloading, "{s:#?}");
    admin.close().await;
    platform.stop().await;
    let platform = serve_again(&data_dir, port).await;
    let admin = super::admin(&url, &data_dir).await;

    let log = agent_succeeds(agent, "across a restart").await;
    assert_eq!(log.lines().count(), 1, "one install: {log}");
    let s = installed_on(&admin, &r.id, "vm-r").await;
    assert_eq!(target(&s, "vm-r").attempts, 1, "{s:#?}");
    assert_eq!(installed(&out, &info), (bytes, "7.0.0".to_owned()));

    admin.close().await;
    platform.stop().await;
}
