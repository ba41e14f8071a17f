//! `fleetcast-device status`: the technician's view, from the config and data dir alone, as text
//! and as JSON valid against docs/schemas/device-status.json.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetcast_device::{AgentOptions, MachineConfig};
use fleetcast_proto::command::CommandAction;
use fleetcast_proto::{InstallPolicy, Phase};
use serde_json::Value;

use super::{setup, start, Artifact};

fn status(config: &Path, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetcast-device"));
    cmd.args(["status", "--config"]).arg(config);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `instance` is valid against docs/schemas/device-status.json, which refuses unknown fields.
fn assert_valid(instance: &Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas/device-status.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::draft202012::meta::validate(&schema).expect("a valid 2020-12 schema");
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{}\n{instance:#}", errors.join("\n"));
    let mut extra = instance.clone();
    extra["kinds"]["app"]["no_such_field"] = Value::Bool(true);
    assert!(
        !validator.is_valid(&extra),
        "the schema accepts unknown fields"
    );
}

fn write_config(path: &Path, base: &MachineConfig, extra: &str) -> MachineConfig {
    std::fs::write(path, format!("{}{extra}", base.to_toml())).unwrap();
    MachineConfig::load_lenient(path).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_versions_slots_the_job_the_outbox_the_contact_and_the_last_error() {
    let mut s = setup().await;
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("device.toml");
    let config = write_config(
        &path,
        &s.config(),
        "\n[installers.app]\ntype = \"slots\"\nhealth_cmd = \"test \\\"$FLEETCAST_VERSION\\\" != 1.2.0\"\n\
         [installers.fw]\ntype = \"command\"\ncmd = \"test -s {file}\"\n",
    );
    let m = start(config.clone(), AgentOptions::default());
    let a1 = s.platform.add(Artifact::new(30 * 1024, 1));
    s.platform
        .announce("r-1", "1.1.0", &a1, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-1", Phase::Installed).await;
    let a2 = s.platform.add(Artifact::new(30 * 1024, 2));
    s.platform
        .announce("r-2", "1.2.0", &a2, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-2", Phase::RolledBack).await;
    let a3 = s.platform.add(Artifact::new(30 * 1024, 3));
    s.platform
        .announce("r-3", "1.3.0", &a3, InstallPolicy::DownloadOnly)
        .await;
    s.platform.wait_for("r-3", Phase::Deferred).await;
    // The platform stops acknowledging: what the machine reports next waits in its outbox.
    s.platform.control.hold_acks.store(true, Ordering::SeqCst);
    s.platform.command(CommandAction::Report).await;
    tokio::time::timeout(Duration::from_secs(10), s.platform.statuses.recv())
        .await
        .expect("a report")
        .unwrap();
    // A sale in progress.
    let sale = std::fs::File::open(config.sale_lock_path()).unwrap();
    // SAFETY: flock on a descriptor `sale` keeps open.
    assert_eq!(unsafe { libc::flock(sale.as_raw_fd(), libc::LOCK_SH) }, 0);

    let json: Value = serde_json::from_str(&status(&path, true)).unwrap();
    assert_valid(&json);
    let app = &json["kinds"]["app"];
    assert_eq!(app["installer"], "slots");
    assert_eq!(app["installed"]["version"], "1.1.0");
    assert_eq!(app["installed"]["artifact"], a1.id.to_hex());
    assert_eq!(
        app["previous"]["version"], "1.2.0",
        "the rolled-back version"
    );
    assert_eq!(app["slots"]["current"], "a");
    assert_eq!(app["slots"]["a"]["version"], "1.1.0");
    assert_eq!(app["slots"]["b"]["version"], "1.2.0");
    assert_eq!(app["job"]["release"], "r-3");
    assert_eq!(app["job"]["step"], "deferred");
    assert_eq!(app["job"]["policy"], "download-only");
    assert_eq!(app["job"]["waiting_for"], "activate");
    assert_eq!(json["kinds"]["fw"]["installer"], "command");
    assert_eq!(json["last_error"]["phase"], "rolled_back");
    assert_eq!(json["last_error"]["release"], "r-2");
    assert!(
        json["last_error"]["error"]
            .as_str()
            .unwrap()
            .contains("health check"),
        "{json:#}"
    );
    assert!(json["outbox"]["events"].as_u64().unwrap() >= 1, "{json:#}");
    assert!(json["outbox"]["oldest_at_ms"].as_u64().is_some());
    let contact = &json["last_contact"];
    let now = fleetcast_device::fsutil::now_ms();
    let heard = contact["platform_at_ms"]
        .as_u64()
        .expect("heard from the platform");
    assert!(now - heard < 60_000, "{contact}");
    assert!(contact["broker_at_ms"].as_u64().is_some(), "{contact}");
    assert_eq!(json["sale_lock"]["sales"], 1);
    assert_eq!(json["sale_lock"]["installing"], false);
    assert_eq!(json["key_gen"], 0);

    let text = status(&path, false);
    for want in [
        "vm-001",
        "current a (a=1.1.0, b=1.2.0)",
        "r-3 1.3.0 downloaded, deferred, waiting for activate",
        "rolled_back: app 1.2.0 failed its health check",
        "not acknowledged yet",
        "1 sale(s) in progress",
        "last heard 20",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    drop(sale);

    // Without the agent, from what is on disk (status never connects to anything).
    let events_before_stop = json["outbox"]["events"].as_u64().unwrap();
    m.stop().await;
    let json: Value = serde_json::from_str(&status(&path, true)).unwrap();
    assert_valid(&json);
    assert_eq!(json["kinds"]["app"]["installed"]["version"], "1.1.0");
    assert!(json["outbox"]["events"].as_u64().unwrap() >= events_before_stop);
    assert!(json["last_contact"]["platform_at_ms"].as_u64().unwrap() >= heard);
}

#[test]
fn status_of_a_machine_that_never_ran_shows_its_config_problems() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("device.toml");
    let key = fleetcast_proto::auth::PlatformKey::from_seed([5; 32]).public();
    std::fs::write(
        &path,
        format!(
            "machine = \"vm-new\"\nsecret = \"{}\"\nplatform_key = \"{}\"\ndata_dir = \"{}\"\n\
             [initial_versions]\napp = \"2.4.0\"\n\
             [installers.app]\ntype = \"slots\"\nhealth_cmd = \"/opt/nowhere/health-probe\"\n",
            "11".repeat(32),
            key.to_hex(),
            work.path().join("data").display()
        ),
    )
    .unwrap();
    let json: Value = serde_json::from_str(&status(&path, true)).unwrap();
    assert_valid(&json);
    assert_eq!(json["kinds"]["app"]["installed"]["version"], "2.4.0");
    assert!(json["kinds"]["app"].get("slots").is_none());
    assert_eq!(json["outbox"]["events"], 0);
    assert_eq!(json["last_contact"], serde_json::json!({}));
    assert!(json.get("last_error").is_none());
    assert_eq!(json["config_problems"][0]["line"], 9);
    let text = status(&path, false);
    assert!(text.contains("last heard never"), "{text}");
    assert!(
        text.contains("PROBLEM line 9:1: the app health check cannot run"),
        "{text}"
    );
    assert!(!work.path().join("data").exists(), "status wrote nothing");

    // Into a pipe its reader closed (`fleetcast-device status | head -1`): ended by SIGPIPE, as
    // `ls` would be, not a panic with a backtrace on stderr.
    use std::os::unix::process::ExitStatusExt as _;
    // Readable by its owner alone, as a config should be (otherwise status warns on stderr).
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_fleetcast-device"))
        .args(["status", "--config"])
        .arg(&path)
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
    assert_eq!(stderr, "");
}
