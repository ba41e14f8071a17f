//! The platform's Debian package: `scripts/package.sh fleetcast` packages the `fleetcast`
//! binary this test binary was built with, `scripts/package-check.sh` checks it and extracts it
//! into a scratch root (layout, conffiles, maintainer scripts, `systemd-analyze verify` where
//! available). Then the extracted binary runs as the unit runs it: `fleetcast serve` with the
//! packaged `FLEETCAST_SERVE_ARGS` (on a free port), the extracted CLI provisions a machine for
//! the agent package's data dir, a real agent joins with that config, and `serve` stops cleanly
//! on the unit's stop signal (SIGINT).
//!
//! Needs `dpkg-deb` (Debian, Ubuntu); skipped with the reason elsewhere, except under
//! scripts/test.sh (FLEETCAST_REQUIRE_SHELL_TOOLS=1, as in CI), where it must run.

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::*;

/// Why the package test cannot run here, if it cannot.
fn missing_package_tools() -> Option<String> {
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

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

/// The output of a command that must succeed.
fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `fleetcast serve`, SIGKILLed on drop unless it was stopped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `KEY=value` from a systemd EnvironmentFile (no quoting used in ours).
fn env_value(file: &str, key: &str) -> Option<String> {
    file.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_package_installs_its_files_and_its_binary_serves_a_machine() {
    if let Some(why) = missing_package_tools() {
        eprintln!("skipped: the Debian package test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_fleetcast"));
    let deb = run_ok(
        Command::new(script("package.sh"))
            .arg("fleetcast")
            .env("BIN_DIR", bin.parent().unwrap())
            .env("OUT_DIR", dir.path().join("out"))
            .env("DEB_COMPRESSION", "none"),
        "package.sh fleetcast",
    );
    let root = dir.path().join("root");
    let checked = run_ok(
        Command::new(script("package-check.sh"))
            .arg(deb.trim())
            .arg(&root),
        "package-check.sh",
    );
    for line in checked.lines().filter(|l| l.starts_with("skipped")) {
        eprintln!("{line}");
    }

    // Run the binary as the unit does, with the packaged arguments on a free port.
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/fleetcast.service")).unwrap();
    assert!(
        unit.contains(
            "\nExecStart=/usr/bin/fleetcast serve --data /var/lib/fleetcast/platform $FLEETCAST_SERVE_ARGS\n"
        ),
        "{unit}"
    );
    let env = std::fs::read_to_string(root.join("etc/fleetcast/platform.env")).unwrap();
    let args = env_value(&env, "FLEETCAST_SERVE_ARGS").expect("platform.env sets the arguments");
    assert_eq!(
        args, "--listen 127.0.0.1:1883",
        "the default stays on loopback"
    );
    let port = client::free_loopback_port().unwrap();
    let args = args.replace(":1883", &format!(":{port}"));
    let installed = root.join("usr/bin/fleetcast");
    let data = dir.path().join("var-lib-fleetcast-platform");
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut serve = Serve(
        Command::new(&installed)
            .arg("serve")
            .arg("--data")
            .arg(&data)
            .args(args.split_whitespace())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let url = BrokerUrl::mqtt("127.0.0.1", port);
    // serve writes its secret before its broker listens: wait for both.
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = serve.0.try_wait() {
            panic!(
                "serve exited ({status}); its log:\n{}",
                std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
            );
        }
        if let Ok(secret) = fleetcast_broker::admin::load_secret(None, &admin_secret_path(&data)) {
            if let Ok(c) = AdminClient::connect(&url, Topics::default(), secret, WAIT).await {
                let answered = c.call(calls::Machines {}).await.is_ok();
                c.close().await;
                if answered {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the packaged serve did not answer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The packaged CLI provisions a machine for the agent package's data dir.
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(&installed);
        cmd.args(args)
            .arg("--broker")
            .arg(url.to_string())
            .env("FLEETCAST_DATA", &data)
            .env("HOME", dir.path())
            .env_remove("FLEETCAST_PROFILE")
            .env_remove("FLEETCAST_ADMIN_SECRET");
        cmd
    };
    let toml_text = run_ok(
        &mut cli(&[
            "machine",
            "provision",
            "vm-pkg",
            "--groups",
            "lab",
            "--data-dir",
            "/var/lib/fleetcast/device",
        ]),
        "fleetcast machine provision",
    );
    let mut config: fleetcast_device::MachineConfig = toml::from_str(&toml_text)
        .unwrap_or_else(|e| panic!("the provisioned config does not parse: {e}\n{toml_text}"));
    assert_eq!(config.data_dir, Path::new("/var/lib/fleetcast/device"));
    // The agent itself runs here, not in /var/lib.
    config.data_dir = dir.path().join("machine");
    let stop = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::run(config, stop.clone()));
    poll_until(
        WAIT,
        "vm-pkg online in the packaged CLI's `machines --json`",
        || async {
            let out = run_ok(&mut cli(&["machines", "--json"]), "fleetcast machines");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v.as_array().unwrap().iter().any(|m| {
                m["id"] == "vm-pkg" && m["online"] == true && m["agent_version"].is_string()
            })
        },
        |&online| online,
    )
    .await;
    stop.cancel();
    joined(agent, "agent").await;

    // `systemctl stop` sends SIGINT: serve flushes and exits 0.
    run_ok(
        Command::new("kill")
            .arg("-INT")
            .arg(serve.0.id().to_string()),
        "kill -INT",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGINT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        status.success(),
        "serve exited with {status}; its log:\n{}",
        std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
    );
}
