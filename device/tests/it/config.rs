//! A config the agent cannot run with is refused before anything connects, with the file, the
//! line and the fix.

use std::time::Duration;

use fleetcast_proto::auth::PlatformKey;

#[test]
fn a_bad_config_is_refused_before_connecting_with_its_line_and_fix() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("device.toml");
    std::fs::write(
        &config,
        format!(
            "machine = \"vm-cfg\"\nsecret = \"{}\"\nplatform_key = \"{}\"\n\
             broker = \"mqtt://127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\n\
             [installers.firmware]\ntype = \"command\"\ncmd = \"/opt/no-such-vendor/flash {{file}}\"\n",
            "11".repeat(32),
            PlatformKey::from_seed([5; 32]).public().to_hex(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast-device"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            agent.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the agent did not stop: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{}:9:1: ", config.display())),
        "the file and line of cmd: {stderr}"
    );
    assert!(stderr.contains("/opt/no-such-vendor/flash"), "{stderr}");
    assert!(stderr.contains("fix: "), "{stderr}");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the agent connected to the broker with a bad config"
    );
    assert!(
        !dir.path().join("data").exists(),
        "the agent created its data dir with a bad config"
    );
}

/// Every key a config can hold has a row in the configuration reference of docs/device.md.
#[test]
fn every_config_key_is_in_the_reference_in_docs_device_md() {
    use fleetcast_device::{InstallerConfig, MachineConfig};
    use fleetcast_proto::admin::ProvisionedMachine;
    use fleetcast_proto::auth::Secret;
    use fleetcast_proto::{GroupId, Kind, MachineId};

    let p = ProvisionedMachine {
        machine: MachineId::new("vm-001").unwrap(),
        groups: vec![GroupId::new("g").unwrap()],
        secret: Secret::from_bytes([1; 32]),
        platform_key: PlatformKey::from_seed([2; 32]).public(),
        platform_key_gen: 1,
        topic_prefix: "fleet".into(),
    };
    // Every optional key set, so that every key is printed.
    let mut c = MachineConfig::from_provisioned(&p, "mqtt://h:1", "/d".into());
    c.ca_file = Some("/ca.pem".into());
    c.sale_lock = Some("/run/sale.lock".into());
    c.utc_offset_minutes = 60;
    c.initial_versions
        .insert(Kind::new("app").unwrap(), "1.0".into());
    c.installers.insert(
        Kind::new("app").unwrap(),
        InstallerConfig::Slots {
            health_cmd: Some("true".into()),
        },
    );
    c.installers.insert(
        Kind::new("fw").unwrap(),
        InstallerConfig::Command {
            cmd: "x {file}".into(),
        },
    );
    let table: toml::Table = toml::from_str(&c.to_toml()).unwrap();
    let mut keys: Vec<String> = table.keys().cloned().collect();
    for installer in table["installers"].as_table().unwrap().values() {
        keys.extend(
            installer
                .as_table()
                .unwrap()
                .keys()
                .map(|k| format!("installers.KIND.{k}")),
        );
    }
    assert!(keys.len() >= 15, "{keys:?}");
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/device.md"),
    )
    .unwrap();
    let reference = doc
        .split("\n## Configuration")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/device.md has a Configuration section");
    for key in keys {
        assert!(
            reference.contains(&format!("| `{key}` |")),
            "docs/device.md, Configuration, has no row for `{key}`"
        );
    }
}
