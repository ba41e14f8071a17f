//! The field's faults on the real agent process (issue 8): `kill -9` of `fleetcast-device` at
//! each install step, and a full disk during a download. The platform is the real one (in this
//! process, embedded broker behind the gateway); the machine is the built binary with a slots
//! installer whose health check is a shell script the test steers.
//!
//! After each fault the test checks what an operator would: the `current` slot is complete and
//! hashes to the artifact it claims, and the platform's record (release status, the machine's
//! state, the stored events) says what really happened.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetcast_proto::admin::{AdminOp, AdminReply, TargetRecord};
use fleetcast_proto::{ArtifactId, InstallPolicy, Kind, MachineId, Phase, ReleaseId};

use super::real::{
    agent_bin, artifact_bytes, current_slot, machine_config, wait_for, AgentProcess, RealPlatform,
    WAIT,
};

fn app() -> Kind {
    Kind::new("app").unwrap()
}

/// The health check: counts its runs per version in `health-{version}.count`; the run `n` of
/// a version hangs when `hang-{version}-{n}` exists (after writing its pid to `hanging`, so the
/// test knows the check is under way and can kill it); versions listed in `unhealthy` fail.
const HEALTH_SH: &str = r#"d="$1"; v="$FLEETCAST_VERSION"
n=$(( $(cat "$d/health-$v.count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$d/health-$v.count"
if [ -f "$d/hang-$v-$n" ]; then
    echo $$ > "$d/hanging.tmp" && mv "$d/hanging.tmp" "$d/hanging"
    exec sleep 600
fi
if grep -qx "$v" "$d/unhealthy" 2>/dev/null; then echo "version $v is unhealthy" >&2; exit 1; fi
exit 0
"#;

const V1: &str = "1.1.0";
const V2: &str = "2.0.0";

/// One machine with version `V1` installed into slot a through the real platform.
/// (Fields drop in order: the agent first, then the platform, then the temp dir.)
struct Field {
    agent: Option<AgentProcess>,
    platform: RealPlatform,
    dir: tempfile::TempDir,
    machine: MachineId,
    /// The agent's data dir.
    data: PathBuf,
    config: PathBuf,
    v1: ArtifactId,
}

impl Field {
    /// A machine whose data dir is `data` (a fresh dir under the temp dir when None).
    async fn start(data: Option<PathBuf>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let platform = RealPlatform::start(&dir.path().join("platform")).await;
        let provisioned = platform.provision("vm-field", &["field"]).await;
        let data = data.unwrap_or_else(|| dir.path().join("machine"));
        let script = dir.path().join("health.sh");
        std::fs::write(&script, HEALTH_SH).unwrap();
        let health = format!("sh '{}' '{}'", script.display(), dir.path().display());
        let config = dir.path().join("device.toml");
        let cfg = machine_config(&provisioned, &platform.url, &data, &app(), Some(health));
        std::fs::write(&config, cfg.to_toml()).unwrap();
        let mut field = Self {
            machine: provisioned.machine.clone(),
            data,
            config,
            agent: None,
            v1: ArtifactId::of(b""),
            platform,
            dir,
        };
        field.spawn_agent();
        let (v1, r1) = field.release(V1, 64 * 1024, 1).await;
        field.v1 = v1;
        field.platform.publish(&r1, &field.machine).await;
        field.wait_phase(&r1, Phase::Installed).await;
        assert_eq!(field.current(), ("a".into(), V1.into(), v1));
        field
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn slots(&self) -> PathBuf {
        self.data.join("slots").join("app")
    }

    fn current(&self) -> (String, String, ArtifactId) {
        current_slot(&self.slots())
    }

    fn spawn_agent(&mut self) {
        self.agent = Some(AgentProcess::spawn(
            &agent_bin(),
            &self.config,
            &self.path("agent.log"),
        ));
    }

    fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("the agent runs")
    }

    /// `kill -9` of the agent, and of a health check it left behind (as systemd does when the
    /// unit's main process dies: the rest of its control group is killed before a restart).
    fn kill_agent(&mut self) {
        self.agent().kill9();
        self.agent = None;
        if let Ok(pid) = std::fs::read_to_string(self.path("hanging")) {
            let pid: i32 = pid.trim().parse().unwrap();
            // SAFETY: kill(2) on a pid this test's health check wrote; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::fs::remove_file(self.path("hanging")).unwrap();
        }
    }

    /// Uploads `version` (`len` bytes from `seed`) as a release with the immediate policy.
    async fn release(&self, version: &str, len: usize, seed: u8) -> (ArtifactId, ReleaseId) {
        let bytes = artifact_bytes(len, seed);
        let (artifact, release) = self
            .platform
            .release(
                self.dir.path(),
                &app(),
                version,
                &bytes,
                InstallPolicy::Immediate,
            )
            .await;
        assert_eq!(artifact, ArtifactId::of(&bytes));
        (artifact, release)
    }

    /// The platform's record of this machine for `release` once it is in `phase`; fails with
    /// the record and the agent's log after `WAIT`.
    async fn wait_phase(&self, release: &ReleaseId, phase: Phase) -> TargetRecord {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.platform.status(release).await;
            let t = status
                .targets
                .into_iter()
                .find(|t| t.machine == self.machine);
            match t {
                Some(t) if t.phase == phase => return t,
                last if Instant::now() > deadline => panic!(
                    "{release} did not reach {phase} within {WAIT:?}; the platform's record: \
                     {last:#?}\nthe agent's log:\n{}",
                    std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
                ),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Waits until the platform has the machine online reporting `version` as its app.
    async fn wait_reports(&self, version: &str) {
        self.platform
            .wait_machine(&self.machine, &format!("machine reports {version}"), |m| {
                m.online
                    && m.kinds
                        .get(&app())
                        .is_some_and(|k| k.version.as_deref() == Some(version))
            })
            .await;
    }

    async fn wait_offline(&self) {
        self.platform
            .wait_machine(&self.machine, "machine offline", |m| !m.online)
            .await;
    }

    fn health_runs(&self, version: &str) -> u32 {
        std::fs::read_to_string(self.path(&format!("health-{version}.count")))
            .map(|s| s.trim().parse().unwrap())
            .unwrap_or(0)
    }

    /// The stored events of `release` for this machine in `phase`.
    async fn events_in(&self, release: &ReleaseId, phase: Phase) -> usize {
        self.platform
            .events()
            .await
            .iter()
            .filter(|e| {
                e.machine == self.machine && e.release.as_ref() == Some(release) && e.phase == phase
            })
            .count()
    }
}

/// Killed before the switch, with the inactive slot half filled. The install is held back by a
/// sale in progress (every install waits for the exclusive sale lock), the agent is killed
/// there, and the test leaves in slot b what a crash inside the fill leaves: part of the image
/// in `artifact.tmp` (a copy cut short, where the slots are on another file system than the
/// downloads; on one file system the slot is a hard link, made at once) and no `artifact_id`.
/// The old slot stays current, and on restart the install completes with the whole image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_the_switch_the_old_slot_stays_current_and_the_install_completes_on_restart()
{
    let mut f = Field::start(None).await;
    let sale = std::fs::File::open(f.data.join("sale.lock")).unwrap();
    // SAFETY: flock(2) on a descriptor `sale` keeps open.
    assert_eq!(unsafe { libc::flock(sale.as_raw_fd(), libc::LOCK_SH) }, 0);

    let (v2, r2) = f.release(V2, 1024 * 1024, 2).await;
    f.platform.publish(&r2, &f.machine).await;
    f.wait_phase(&r2, Phase::Installing).await;
    let log = f.path("agent.log");
    wait_for("the install waits for the sale", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("a sale holds the lock"))
    })
    .await;
    assert_eq!(
        f.current(),
        ("a".into(), V1.into(), f.v1),
        "not switched during a sale"
    );
    f.kill_agent();
    drop(sale);

    let slot_b = f.slots().join("b");
    assert!(
        !slot_b.join("artifact_id").exists(),
        "a slot not yet filled must not claim an artifact"
    );
    std::fs::create_dir_all(&slot_b).unwrap();
    std::fs::write(
        slot_b.join("artifact.tmp"),
        &artifact_bytes(1024 * 1024, 2)[..300 * 1024],
    )
    .unwrap();
    assert_eq!(f.current(), ("a".into(), V1.into(), f.v1));

    f.spawn_agent();
    let t = f.wait_phase(&r2, Phase::Installed).await;
    assert!(t.upgrade.as_ref().is_some_and(|u| u.ok), "{t:#?}");
    assert_eq!(f.current(), ("b".into(), V2.into(), v2));
    assert_eq!(f.health_runs(V2), 1);
    f.wait_reports(V2).await;
}

/// Killed right after the switch, while the health check has given no verdict: the new slot
/// is current (and complete). On restart the agent does not assume the verdict: it checks
/// again, and a healthy version is reported installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_switch_the_health_check_runs_again_on_restart() {
    let mut f = Field::start(None).await;
    std::fs::write(f.path(&format!("hang-{V2}-1")), "").unwrap();
    let (v2, r2) = f.release(V2, 200 * 1024, 3).await;
    f.platform.publish(&r2, &f.machine).await;
    let hanging = f.path("hanging");
    wait_for("the health check starts", || hanging.exists()).await;
    assert_eq!(f.current(), ("b".into(), V2.into(), v2), "switched");
    f.kill_agent();
    assert_eq!(f.current(), ("b".into(), V2.into(), v2));

    f.spawn_agent();
    let t = f.wait_phase(&r2, Phase::Installed).await;
    assert!(t.upgrade.as_ref().is_some_and(|u| u.ok), "{t:#?}");
    assert_eq!(f.health_runs(V2), 2, "checked again after the restart");
    assert_eq!(f.current(), ("b".into(), V2.into(), v2));
    f.wait_reports(V2).await;
}

/// Killed during the health check of a version that fails it: on restart the check runs again,
/// fails, and the machine switches back to the old slot and reports `rolled_back`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_a_failing_health_check_the_restarted_agent_rolls_back() {
    let mut f = Field::start(None).await;
    std::fs::write(f.path(&format!("hang-{V2}-1")), "").unwrap();
    std::fs::write(f.path("unhealthy"), format!("{V2}\n")).unwrap();
    let (v2, r2) = f.release(V2, 200 * 1024, 4).await;
    f.platform.publish(&r2, &f.machine).await;
    let hanging = f.path("hanging");
    wait_for("the health check starts", || hanging.exists()).await;
    assert_eq!(f.current(), ("b".into(), V2.into(), v2));
    f.kill_agent();

    f.spawn_agent();
    let t = f.wait_phase(&r2, Phase::RolledBack).await;
    assert!(
        t.error.as_deref().is_some_and(|e| e.contains("unhealthy")),
        "the health check's reason reaches the platform: {t:#?}"
    );
    assert_eq!(f.health_runs(V2), 2);
    assert_eq!(f.current(), ("a".into(), V1.into(), f.v1));
    f.wait_reports(V1).await;
}

/// Killed after the result was reported: nothing is installed or checked again, the platform
/// keeps one `installed` event, and the restarted agent reports the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_report_the_restarted_agent_changes_nothing() {
    let mut f = Field::start(None).await;
    let (v2, r2) = f.release(V2, 200 * 1024, 5).await;
    f.platform.publish(&r2, &f.machine).await;
    f.wait_phase(&r2, Phase::Installed).await;
    f.wait_reports(V2).await;
    f.kill_agent();
    f.wait_offline().await;

    f.spawn_agent();
    f.wait_reports(V2).await;
    // Time for anything the restarted agent might redo.
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.agent().assert_running();
    let t = f.wait_phase(&r2, Phase::Installed).await;
    assert!(t.upgrade.as_ref().is_some_and(|u| u.ok), "{t:#?}");
    assert_eq!(f.health_runs(V2), 1, "not installed again");
    assert_eq!(f.current(), ("b".into(), V2.into(), v2));
    assert_eq!(f.events_in(&r2, Phase::Installed).await, 1);
}

/// Waits until the platform stored `n` events of `release` in `phase` from the machine.
async fn wait_events(f: &Field, release: &ReleaseId, phase: Phase, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = f.events_in(release, phase).await;
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{got} {phase} events of {release} stored, not {n}; the agent's log:\n{}",
            std::fs::read_to_string(f.path("agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A size-limited tmpfs mounted on a path; unmounted (lazily, so it never fails) on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes on `path`, or says why it cannot (not root, no mount
    /// permission in this container, no `mount` command).
    fn mount(path: &Path, size: u64) -> Result<Self, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root, so no tmpfs can be mounted".into());
        }
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    fn resize(&self, size: u64) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Staged downloads of `artifact` left in the data dir.
fn staged(data: &Path, artifact: &ArtifactId) -> Vec<String> {
    let hex = artifact.to_hex();
    std::fs::read_dir(data.join("staging"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&hex))
                .collect()
        })
        .unwrap_or_default()
}

/// The machine's data dir is a 2 MiB file system and the new version is 3 MiB: the download
/// fails with the reason before a byte of it is fetched (its space is reserved first), the old
/// version stays current and running, the partial download is removed, and once there is space
/// the operator's retry succeeds. Needs root (a tmpfs mount);
/// skipped with the reason otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_download_with_the_reason_keeps_the_old_version_and_cleans_up() {
    let mount_dir = tempfile::tempdir().unwrap();
    let data = mount_dir.path().join("data");
    let disk = match Tmpfs::mount(&data, 2 * 1024 * 1024) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: a full disk needs a small file system: {why}");
            return;
        }
    };
    let mut f = Field::start(Some(data.clone())).await;
    let (v2, r2) = f.release(V2, 3 * 1024 * 1024, 6).await;
    let fetched = || async {
        match f.platform.request(AdminOp::Stats).await {
            AdminReply::Stats { stats } => (stats.chunk_requests, stats.chunk_bytes_sent),
            other => panic!("unexpected reply to stats: {other:?}"),
        }
    };
    let before = fetched().await;
    f.platform.publish(&r2, &f.machine).await;

    let t = f.wait_phase(&r2, Phase::DownloadFailed).await;
    assert_eq!(
        fetched().await,
        before,
        "chunks were asked for and sent for an artifact the disk has no room for"
    );
    let error = t.error.clone().unwrap_or_default();
    assert!(
        error.contains("No space left on device"),
        "the reason reaches the platform: {t:#?}"
    );
    assert!(t.download.as_ref().is_some_and(|d| !d.ok), "{t:#?}");
    // The failure is a stored event, not only the machine's latest state: the agent could
    // write it to its outbox although the disk was full.
    wait_events(&f, &r2, Phase::DownloadFailed, 1).await;
    wait_for("the partial download is removed", || {
        staged(&data, &v2).is_empty()
    })
    .await;
    assert!(!data.join("artifacts").join(v2.to_hex()).exists());
    f.agent().assert_running();
    assert_eq!(f.current(), ("a".into(), V1.into(), f.v1));
    f.wait_reports(V1).await;

    // The decision is on disk too: a machine restarted now (the disk still small) does not
    // take up the download it gave up.
    let downloading = f.events_in(&r2, Phase::Downloading).await;
    f.kill_agent();
    f.wait_offline().await;
    f.spawn_agent();
    f.wait_reports(V1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        f.events_in(&r2, Phase::Downloading).await,
        downloading,
        "the restarted agent resumed the download it had given up; its log:\n{}",
        std::fs::read_to_string(f.path("agent.log")).unwrap_or_default()
    );
    f.wait_phase(&r2, Phase::DownloadFailed).await;
    assert!(staged(&data, &v2).is_empty());

    // Space is back: the operator retries the failed machines.
    disk.resize(16 * 1024 * 1024);
    match f
        .platform
        .request(AdminOp::ReleaseRetry {
            release: r2.clone(),
            machines: vec![],
            failed: true,
            groups: vec![],
        })
        .await
    {
        AdminReply::Plan { .. } => {}
        other => panic!("unexpected reply to retry: {other:?}"),
    }
    let t = f.wait_phase(&r2, Phase::Installed).await;
    assert!(t.upgrade.as_ref().is_some_and(|u| u.ok), "{t:#?}");
    assert_eq!(f.current(), ("b".into(), V2.into(), v2));
    assert!(staged(&data, &v2).is_empty());
    f.wait_reports(V2).await;
    // The agent before the mount goes away.
    drop(f);
    drop(disk);
}
