//! The agent's Debian package: `scripts/package.sh fleetcast-device` packages the binary this
//! test binary was built with, `scripts/package-check.sh` checks it and extracts it into a
//! scratch root (layout, conffiles, maintainer scripts, `systemd-analyze verify` where
//! available), and the extracted `/usr/bin/fleetcast-device` then runs against the real
//! platform: it connects, installs a release, and stops cleanly on the unit's stop signal.
//!
//! Needs `dpkg-deb` (Debian, Ubuntu); skipped with the reason elsewhere, except under
//! scripts/test.sh (FLEETCAST_REQUIRE_SHELL_TOOLS=1, as in CI), where it must run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleetcast_device::MachineConfig;
use fleetcast_proto::{InstallPolicy, Kind, Phase};

use super::real::{
    agent_bin, artifact_bytes, current_slot, machine_config, AgentProcess, RealPlatform,
};

/// Why the package tests cannot run here, if they cannot.
pub fn missing_package_tools() -> Option<String> {
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = ["dpkg-deb", "dpkg"]
        .into_iter()
        .filter(|t| !found(t))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let why = format!("{} not installed (Debian's dpkg)", missing.join(", "));
    assert!(
        std::env::var("FLEETCAST_REQUIRE_SHELL_TOOLS").is_err(),
        "FLEETCAST_REQUIRE_SHELL_TOOLS is set but {why}"
    );
    Some(why)
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// Builds `package` from the binaries in `bin_dir` into `out` (uncompressed: the test does not
/// need xz's time) and returns the .deb.
fn build_package(package: &str, bin_dir: &Path, out: &Path) -> PathBuf {
    let output = Command::new(scripts().join("package.sh"))
        .arg(package)
        .env("BIN_DIR", bin_dir)
        .env("OUT_DIR", out)
        .env("DEB_COMPRESSION", "none")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "package.sh {package} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let deb = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
    assert!(deb.is_file(), "package.sh printed {deb:?}, not a file");
    deb
}

/// `package-check.sh`: checks the package and extracts it into `root`.
fn check_and_extract(deb: &Path, root: &Path) {
    let output = Command::new(scripts().join("package-check.sh"))
        .arg(deb)
        .arg(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "package-check.sh failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Say so when the unit could not be verified here.
    for line in stdout.lines().filter(|l| l.starts_with("skipped")) {
        eprintln!("{line}");
    }
}

/// Sends SIGINT (the units' KillSignal) and waits up to `within` for a clean exit.
fn stop_with_sigint(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit within {within:?} of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_package_installs_its_files_and_its_binary_updates_a_machine() {
    if let Some(why) = missing_package_tools() {
        eprintln!("skipped: the Debian package test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = agent_bin().parent().unwrap().to_owned();
    let deb = build_package("fleetcast-device", &bin_dir, &dir.path().join("out"));
    let root = dir.path().join("root");
    check_and_extract(&deb, &root);

    // The example config documents every key with the packaged data dir, and still parses.
    let example = root.join("usr/share/doc/fleetcast-device/examples/device.toml");
    let example: MachineConfig = toml::from_str(&std::fs::read_to_string(example).unwrap())
        .unwrap_or_else(|e| panic!("the example device.toml does not parse: {e}"));
    assert_eq!(example.data_dir, Path::new("/var/lib/fleetcast/device"));
    // What device.md tells a field engineer to run on the machine is on the machine.
    for shipped in ["device.md", "examples/sale_lock.c", "examples/sale_lock.py"] {
        let path = root.join("usr/share/doc/fleetcast-device").join(shipped);
        assert!(path.is_file(), "{} is not in the package", path.display());
    }
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/fleetcast-device.service"))
            .unwrap();
    assert!(
        unit.contains(
            "\nExecStart=/usr/bin/fleetcast-device run --config /etc/fleetcast/device.toml\n"
        ) && unit.contains("\nConditionPathExists=/etc/fleetcast/device.toml\n"),
        "{unit}"
    );

    // The installed binary, against the real platform.
    let platform = RealPlatform::start(&dir.path().join("platform")).await;
    let p = platform.provision("vm-pkg", &["lab"]).await;
    let app = Kind::new("app").unwrap();
    let data = dir.path().join("var-lib-fleetcast-device");
    let config = dir.path().join("device.toml");
    std::fs::write(
        &config,
        machine_config(&p, &platform.url, &data, &app, None).to_toml(),
    )
    .unwrap();
    let installed = root.join("usr/bin/fleetcast-device");
    let mut agent = AgentProcess::spawn(&installed, &config, &dir.path().join("agent.log"));
    let bytes = artifact_bytes(300 * 1024, 7);
    let (artifact, release) = platform
        .release(dir.path(), &app, "2.0.0", &bytes, InstallPolicy::Immediate)
        .await;
    platform.publish(&release, &p.machine).await;
    let deadline = Instant::now() + super::real::WAIT;
    loop {
        let s = platform.status(&release).await;
        if s.targets.iter().any(|t| t.phase == Phase::Installed) {
            break;
        }
        agent.assert_running();
        assert!(
            Instant::now() < deadline,
            "the packaged agent did not install: {s:#?}\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        current_slot(&data.join("slots/app")),
        ("a".into(), "2.0.0".into(), artifact)
    );

    // `systemctl stop` sends SIGINT: the agent says goodbye and exits 0.
    let status = stop_with_sigint(agent.child(), Duration::from_secs(10));
    assert!(status.success(), "{status}; {}", agent.log_tail());
    platform
        .wait_machine(&p.machine, "offline after the stop", |m| !m.online)
        .await;
}
