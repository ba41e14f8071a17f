//! The whole update flow across crates: real broker (embedded rumqttd or Mosquitto), the real
//! platform service with sled in a temp dir, the real operator client, and real machine agents
//! (the simulator) with slot installers writing real files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetcast_broker::admin::AdminClient;
use fleetcast_broker::BrokerUrl;
use fleetcast_proto::admin::{AdminOp, AdminReply, ArtifactInfo, ReleaseStatus};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::{GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId, Target, Topics};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

fn m(s: &str) -> MachineId {
    MachineId::new(s).unwrap()
}
fn g(s: &str) -> GroupId {
    GroupId::new(s).unwrap()
}
fn app() -> Kind {
    Kind::new("app").unwrap()
}

/// A running platform service on a given broker and data dir; stop() waits for it to end.
struct Platform {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), fleetcast_platform::PlatformError>>,
}

impl Platform {
    async fn start(data: &Path, broker: &BrokerUrl) -> Self {
        let token = CancellationToken::new();
        let opts = fleetcast_platform::ServeOptions {
            data_dir: data.to_owned(),
            broker: broker.clone(),
            embedded_listen: None,
            topic_prefix: "fleet".into(),
        };
        let task = tokio::spawn(fleetcast_platform::serve(opts, token.clone()));
        let secret = fleetcast_platform::admin_secret_path(data);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !secret.exists() {
            assert!(
                Instant::now() < deadline,
                "platform did not create its keys"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { token, task }
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("platform stops within 20 s")
            .expect("platform task did not panic")
            .expect("platform ended cleanly");
    }
}

/// `count` simulated machines (vm-001...) running app 1.0.0, provisioned with the platform in `data`.
fn simulated(
    data: &Path,
    sim: &Path,
    broker: &BrokerUrl,
    count: usize,
    groups: &[&str],
) -> fleetcast_device::simulate::SimulateOptions {
    fleetcast_device::simulate::SimulateOptions {
        count,
        groups: groups.iter().map(|x| g(x)).collect(),
        prefix: "vm-".into(),
        data_dir: sim.to_owned(),
        broker: broker.to_string(),
        topic_prefix: "fleet".into(),
        admin_secret: std::fs::read_to_string(fleetcast_platform::admin_secret_path(data))
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
        initial_versions: BTreeMap::from([(app(), "1.0.0".to_owned())]),
        start_index: 1,
        fail_health: vec![],
    }
}

async fn admin(data: &Path, broker: &BrokerUrl) -> AdminClient {
    let secret: Secret = std::fs::read_to_string(fleetcast_platform::admin_secret_path(data))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    AdminClient::connect(broker, Topics::default(), secret, Duration::from_secs(5))
        .await
        .unwrap()
}

fn artifact_file(dir: &Path, name: &str, size: usize, seed: u8) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

async fn upload(admin: &AdminClient, path: &Path, version: &str) -> ArtifactInfo {
    admin
        .upload(path, app(), version.into(), None, 65536, |_, _| {})
        .await
        .unwrap_or_else(|e| panic!("upload {version}: {e}"))
}

async fn create_release(admin: &AdminClient, version: &str) -> ReleaseId {
    let reply = admin
        .request(AdminOp::ReleaseCreate {
            kind: app(),
            version: version.into(),
            policy: InstallPolicy::Immediate,
            notes: None,
        })
        .await
        .unwrap();
    match reply {
        AdminReply::Release { release } => release.id,
        other => panic!("unexpected {other:?}"),
    }
}

async fn status(admin: &AdminClient, release: &ReleaseId) -> ReleaseStatus {
    match admin
        .request(AdminOp::ReleaseStatus {
            release: release.clone(),
        })
        .await
        .unwrap()
    {
        AdminReply::ReleaseStatus { status } => status,
        other => panic!("unexpected {other:?}"),
    }
}

/// Polls until every target of `release` is in a final phase; returns the last status.
async fn until_finished(
    admin: &AdminClient,
    release: &ReleaseId,
    expect_targets: usize,
) -> ReleaseStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(admin, release).await;
        if s.targets.len() == expect_targets && s.targets.iter().all(|t| t.phase.is_final()) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "release {release} did not finish: {:#?}",
            s.targets
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    match admin.request(AdminOp::Machines).await.unwrap() {
        AdminReply::Machines { machines } => machines
            .into_iter()
            .map(|mi| {
                (
                    mi.id.clone(),
                    mi.kinds.get(&app()).and_then(|k| k.version.clone()),
                )
            })
            .collect(),
        other => panic!("unexpected {other:?}"),
    }
}

async fn wait_online(admin: &AdminClient, count: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let AdminReply::Machines { machines } = admin.request(AdminOp::Machines).await.unwrap() {
            if machines
                .iter()
                .filter(|x| x.online && x.kinds.contains_key(&app()))
                .count()
                >= count
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "machines did not come online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let sim = dir.path().join("machines");
    let mut platform = Platform::start(&data, &broker).await;
    let admin_client = admin(&data, &broker).await;

    let sim_token = CancellationToken::new();
    let sim_opts = simulated(&data, &sim, &broker, 3, &["north", "south"]);
    let sim_task = tokio::spawn(fleetcast_device::simulate::run(sim_opts, sim_token.clone()));
    wait_online(&admin_client, 3).await;

    let stable = artifact_file(dir.path(), "app-1.0.0.bin", 100_000, 1);
    let new = artifact_file(dir.path(), "app-1.1.0.bin", 5 * 65536 + 1, 2);
    upload(&admin_client, &stable, "1.0.0").await;
    let info = upload(&admin_client, &new, "1.1.0").await;
    assert_eq!(info.size, 5 * 65536 + 1);

    // vm-001 and vm-003 are in "north"; vm-002 is named directly.
    let r1 = create_release(&admin_client, "1.1.0").await;
    let plan = match admin_client
        .request(AdminOp::ReleasePublish {
            release: r1.clone(),
            machines: vec![m("vm-002")],
            groups: vec![g("north")],
        })
        .await
        .unwrap()
    {
        AdminReply::Plan { plan } => plan,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(plan.targets.len(), 3, "{plan:?}");
    let s = until_finished(&admin_client, &r1, 3).await;
    assert_all_installed(&s);
    assert_eq!(s.progress.succeeded, 3);
    for vm in ["vm-001", "vm-002", "vm-003"] {
        assert_active_slot(&sim, vm, &new);
    }

    // Roll vm-001 back to the stable version; the others keep 1.1.0.
    let plan = match admin_client
        .request(AdminOp::Rollback {
            target: Target::Machine(m("vm-001")),
            kind: app(),
            to: Some("1.0.0".into()),
        })
        .await
        .unwrap()
    {
        AdminReply::Plan { plan } => plan,
        other => panic!("unexpected {other:?}"),
    };
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
        upload(&admin_client, &big, "1.2.0").await;
        let r2 = create_release(&admin_client, "1.2.0").await;
        admin_client
            .request(AdminOp::ReleasePublish {
                release: r2.clone(),
                machines: vec![],
                groups: vec![g("north"), g("south")],
            })
            .await
            .unwrap();
        // Wait until at least one machine reported something, so the restart is mid-rollout.
        let deadline = Instant::now() + WAIT;
        let before = loop {
            let s = status(&admin_client, &r2).await;
            if s.targets.iter().any(|t| t.phase != Phase::Pending) {
                break s;
            }
            assert!(Instant::now() < deadline, "no machine started on {r2}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        admin_client.close().await;
        platform.stop().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        platform = Platform::start(&data, &broker).await;
        let admin_client = admin(&data, &broker).await;
        // Everything recorded before the restart is still there.
        let after = status(&admin_client, &r2).await;
        for t in before.targets.iter().filter(|t| t.phase != Phase::Pending) {
            let now = after
                .targets
                .iter()
                .find(|a| a.machine == t.machine)
                .expect("target kept");
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

    sim_token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), sim_task).await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_flow_on_the_embedded_broker_survives_a_platform_restart() {
    let broker = fleetcast_broker::embedded::start_on_free_port(|s| s).unwrap();
    whole_flow(broker.url(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_flow_on_mosquitto() {
    let mosq = fleetcast_broker::testing::Mosquitto::start("")
        .expect("mosquitto (apt-get install mosquitto)");
    whole_flow(mosq.url.clone(), true).await;
}

async fn provision(
    admin: &AdminClient,
    machine: &str,
    groups: &[&str],
) -> fleetcast_proto::admin::ProvisionedMachine {
    match admin
        .request(AdminOp::MachineProvision {
            machine: m(machine),
            groups: groups.iter().map(|x| g(x)).collect(),
        })
        .await
        .unwrap()
    {
        AdminReply::Provisioned { machine } => machine,
        other => panic!("unexpected {other:?}"),
    }
}

/// A machine that is offline while a release is published gets it when it comes back; a
/// download-only release with the command installer waits for `activate`; a group rollback
/// reaches every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_machine_catches_up_and_download_only_waits_for_activate() {
    let broker = fleetcast_broker::embedded::start_on_free_port(|s| s)
        .unwrap()
        .url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let platform = Platform::start(&data, &broker).await;
    let admin_client = admin(&data, &broker).await;
    let fw = Kind::new("firmware").unwrap();

    // vm-a runs from the start; vm-b is provisioned but offline.
    let agents = CancellationToken::new();
    let installed_log = dir.path().join("installed.log");
    let config = |p: &fleetcast_proto::admin::ProvisionedMachine| {
        let mut c = fleetcast_device::config::MachineConfig::from_provisioned(
            p,
            &broker.to_string(),
            dir.path().join(p.machine.as_str()),
        );
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
    let pa = provision(&admin_client, "vm-a", &["lab"]).await;
    let pb = provision(&admin_client, "vm-b", &["lab"]).await;
    let agent_a = tokio::spawn(fleetcast_device::agent::run(config(&pa), agents.clone()));

    let stable = artifact_file(dir.path(), "fw-3.0.bin", 70_000, 4);
    let new = artifact_file(dir.path(), "fw-3.1.bin", 200_000, 5);
    for (path, version) in [(&stable, "3.0"), (&new, "3.1")] {
        admin_client
            .upload(path, fw.clone(), version.into(), None, 65536, |_, _| {})
            .await
            .unwrap();
    }
    let release = match admin_client
        .request(AdminOp::ReleaseCreate {
            kind: fw.clone(),
            version: "3.1".into(),
            policy: InstallPolicy::DownloadOnly,
            notes: None,
        })
        .await
        .unwrap()
    {
        AdminReply::Release { release } => release.id,
        other => panic!("unexpected {other:?}"),
    };
    admin_client
        .request(AdminOp::ReleasePublish {
            release: release.clone(),
            machines: vec![],
            groups: vec![g("lab")],
        })
        .await
        .unwrap();

    // vm-a downloads and waits (deferred); vm-b has heard nothing.
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(&admin_client, &release).await;
        let phase = |name: &str| {
            s.targets
                .iter()
                .find(|t| t.machine.as_str() == name)
                .map(|t| t.phase)
        };
        if phase("vm-a") == Some(Phase::Deferred) {
            assert_eq!(phase("vm-b"), Some(Phase::Pending));
            let a = s
                .targets
                .iter()
                .find(|t| t.machine.as_str() == "vm-a")
                .unwrap();
            assert!(
                a.download.as_ref().is_some_and(|d| d.ok),
                "deferred after a successful download: {a:?}"
            );
            assert!(
                a.upgrade.is_none(),
                "nothing installed before activate: {a:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vm-a never deferred: {:?}",
            s.targets
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!installed_log.exists(), "the installer ran before activate");

    // vm-b comes online and catches up from the retained group notice.
    let agent_b = tokio::spawn(fleetcast_device::agent::run(config(&pb), agents.clone()));
    let deadline = Instant::now() + WAIT;
    while status(&admin_client, &release)
        .await
        .targets
        .iter()
        .any(|t| t.phase != Phase::Deferred)
    {
        assert!(Instant::now() < deadline, "vm-b did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Activate: both install through the command installer.
    match admin_client
        .request(AdminOp::Activate {
            release: release.clone(),
            machines: vec![],
        })
        .await
        .unwrap()
    {
        AdminReply::Done { .. } => {}
        other => panic!("unexpected {other:?}"),
    }
    let s = until_finished(&admin_client, &release, 2).await;
    assert_all_installed(&s);
    let log = std::fs::read_to_string(&installed_log).unwrap();
    assert!(
        log.contains("vm-a 3.1") && log.contains("vm-b 3.1"),
        "{log}"
    );

    // Roll the whole group back to 3.0.
    let plan = match admin_client
        .request(AdminOp::Rollback {
            target: Target::Group(g("lab")),
            kind: fw.clone(),
            to: Some("3.0".into()),
        })
        .await
        .unwrap()
    {
        AdminReply::Plan { plan } => plan,
        other => panic!("unexpected {other:?}"),
    };
    let rb = until_finished(&admin_client, &plan.release.id, 2).await;
    assert_all_installed(&rb);
    let log = std::fs::read_to_string(&installed_log).unwrap();
    assert!(
        log.contains("vm-a 3.0") && log.contains("vm-b 3.0"),
        "{log}"
    );

    admin_client.close().await;
    agents.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent_a).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), agent_b).await;
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
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let sim = dir.path().join("machines");
    let platform = Platform::start(&data, &broker).await;
    let admin_client = admin(&data, &broker).await;
    let sim_token = CancellationToken::new();
    let sim_task = tokio::spawn(fleetcast_device::simulate::run(
        simulated(&data, &sim, &broker, 1, &["field"]),
        sim_token.clone(),
    ));
    wait_online(&admin_client, 1).await;
    let big = artifact_file(dir.path(), "app-2.0.0.bin", 48 * 1024 * 1024 + 3, 9);
    upload(&admin_client, &big, "2.0.0").await;
    let release = create_release(&admin_client, "2.0.0").await;
    admin_client
        .request(AdminOp::ReleasePublish {
            release: release.clone(),
            machines: vec![],
            groups: vec![g("field")],
        })
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(&admin_client, &release).await;
        let t = &s.targets[0];
        if t.phase == Phase::Downloading && t.progress.is_some_and(|p| p.bytes > 0) {
            break;
        }
        assert!(
            t.download.is_none(),
            "the download finished before the broker could be killed"
        );
        assert!(Instant::now() < deadline, "no download started: {t:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mosq.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mosq.restart().expect("mosquitto restarts on the same port");

    let s = until_finished(&admin_client, &release, 1).await;
    assert_all_installed(&s);
    assert_active_slot(&sim, "vm-001", &big);
    admin_client.close().await;
    sim_token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), sim_task).await;
    platform.stop().await;
}

/// `idle` installs only once the machine stops serving a customer (the vending application's
/// `busy` file); a `window` that is closed now keeps the release downloaded but deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_waits_for_the_machine_to_be_free_and_a_closed_window_defers() {
    let broker = fleetcast_broker::embedded::start_on_free_port(|s| s)
        .unwrap()
        .url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let platform = Platform::start(&data, &broker).await;
    let admin_client = admin(&data, &broker).await;
    let p = provision(&admin_client, "vm-i", &[]).await;
    let mut config = fleetcast_device::config::MachineConfig::from_provisioned(
        &p,
        &broker.to_string(),
        dir.path().join("vm-i"),
    );
    config.initial_versions = BTreeMap::from([(app(), "1.0.0".to_owned())]);
    let busy = config.data_dir.join("busy");
    std::fs::create_dir_all(&config.data_dir).unwrap();
    std::fs::write(&busy, b"serving").unwrap();
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(config, agents.clone()));
    wait_online(&admin_client, 1).await;

    let publish_with = |version: &'static str, policy: InstallPolicy| {
        let admin_client = &admin_client;
        async move {
            let id = match admin_client
                .request(AdminOp::ReleaseCreate {
                    kind: app(),
                    version: version.into(),
                    policy,
                    notes: None,
                })
                .await
                .unwrap()
            {
                AdminReply::Release { release } => release.id,
                other => panic!("unexpected {other:?}"),
            };
            admin_client
                .request(AdminOp::ReleasePublish {
                    release: id.clone(),
                    machines: vec![m("vm-i")],
                    groups: vec![],
                })
                .await
                .unwrap();
            id
        }
    };
    let wait_phase = |release: ReleaseId, want: Phase| {
        let admin_client = &admin_client;
        async move {
            let deadline = Instant::now() + WAIT;
            loop {
                let s = status(admin_client, &release).await;
                if s.targets[0].phase == want {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "never reached {want}: {:?}",
                    s.targets[0]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    let v2 = artifact_file(dir.path(), "app-2.0.0.bin", 150_000, 6);
    upload(&admin_client, &v2, "2.0.0").await;
    let idle = publish_with("2.0.0", InstallPolicy::Idle).await;
    let s = wait_phase(idle.clone(), Phase::Deferred).await;
    assert!(
        s.targets[0].download.as_ref().is_some_and(|d| d.ok),
        "downloaded while busy"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = status(&admin_client, &idle).await;
    assert_eq!(
        s.targets[0].phase,
        Phase::Deferred,
        "installed while busy: {:?}",
        s.targets[0]
    );
    std::fs::remove_file(&busy).unwrap();
    let s = wait_phase(idle, Phase::Installed).await;
    assert_all_installed(&s);

    // A window that opens in two hours (UTC): downloaded now, installed later.
    let v3 = artifact_file(dir.path(), "app-3.0.0.bin", 90_000, 7);
    upload(&admin_client, &v3, "3.0.0").await;
    let minute = (fleetcast_platform::now_ms() / 60_000 % (24 * 60)) as u32;
    let hhmm = |m: u32| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let policy: InstallPolicy = format!(
        "window:{}-{}@+00:00",
        hhmm(minute + 120),
        hhmm(minute + 180)
    )
    .parse()
    .unwrap();
    let window = publish_with("3.0.0", policy).await;
    let s = wait_phase(window.clone(), Phase::Deferred).await;
    assert!(s.targets[0].download.as_ref().is_some_and(|d| d.ok));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = status(&admin_client, &window).await;
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
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    platform.stop().await;
}

/// The platform acknowledges a status event with a signed `StatusAck` only after storing it, and
/// acknowledges a repeat of it again (the machine missed the first ack); a forged one gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_status_is_acknowledged_end_to_end_and_repeats_are_acknowledged_again() {
    use fleetcast_broker::client::{self, MqttEvent};
    use fleetcast_proto::auth::{PlatformPublicKey, Purpose};
    use fleetcast_proto::{StatusAck, StatusEvent};
    use rumqttc::QoS;

    let broker = fleetcast_broker::embedded::start_on_free_port(|s| s)
        .unwrap()
        .url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let platform = Platform::start(&data, &broker).await;
    let admin_client = admin(&data, &broker).await;
    let p = provision(&admin_client, "vm-ack", &[]).await;
    let public: PlatformPublicKey =
        std::fs::read_to_string(fleetcast_platform::public_key_path(&data))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let topics = Topics::default();
    let stop = CancellationToken::new();
    let (c, el) = client::connect(
        client::options(&broker, "vm-ack", Some(&p.secret.mqtt_password())),
        64,
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(client::drive(el, tx, stop.clone()));
    let mut subscribed = false;
    while !subscribed {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("connects")
            .unwrap()
        {
            MqttEvent::Connected { .. } => c
                .subscribe(topics.status_ack(&m("vm-ack")), QoS::AtLeastOnce)
                .await
                .unwrap(),
            MqttEvent::SubAck(_) => subscribed = true,
            _ => {}
        }
    }
    let status = |ctr: u64| StatusEvent {
        machine: m("vm-ack"),
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
    };
    let sealed = p.secret.seal(Purpose::Status, &status(7));
    for round in 0..2 {
        c.publish(
            topics.status(&m("vm-ack")),
            QoS::AtLeastOnce,
            false,
            sealed.clone(),
        )
        .await
        .unwrap();
        let ack = next_ack(&public, &mut rx, WAIT)
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
    let forged =
        fleetcast_proto::auth::Secret::from_bytes([9; 32]).seal(Purpose::Status, &status(8));
    c.publish(topics.status(&m("vm-ack")), QoS::AtLeastOnce, false, forged)
        .await
        .unwrap();
    assert_eq!(
        next_ack(&public, &mut rx, Duration::from_millis(1500)).await,
        None,
        "a forged status was acknowledged"
    );
    stop.cancel();
    admin_client.close().await;
    platform.stop().await;
    let events = fleetcast_platform::store::Store::open(&data.join("db"))
        .unwrap()
        .events()
        .unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.machine.as_str() == "vm-ack")
            .count(),
        1,
        "stored once"
    );
}

/// The next signed status ack on `rx`, or None after `within`.
async fn next_ack(
    public: &fleetcast_proto::auth::PlatformPublicKey,
    rx: &mut tokio::sync::mpsc::Receiver<fleetcast_broker::client::MqttEvent>,
    within: Duration,
) -> Option<fleetcast_proto::StatusAck> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) | Ok(None) => return None,
            Ok(Some(fleetcast_broker::client::MqttEvent::Publish(p))) => {
                return Some(
                    public
                        .verify(fleetcast_proto::auth::Purpose::StatusAck, &p.payload)
                        .expect("ack is signed by the platform"),
                )
            }
            Ok(Some(_)) => {}
        }
    }
}
