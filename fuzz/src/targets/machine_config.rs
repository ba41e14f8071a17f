//! `machine.toml`, read by the agent at start: TOML parse, then `validate`. What validates is
//! what the agent builds its topics and broker connection from, so that must not panic, and the
//! config must print back (`to_toml`, used by provisioning) to itself.

use std::path::PathBuf;

use fleetcast_device::config::InstallerConfig;
use fleetcast_device::MachineConfig;
use fleetcast_proto::admin::ProvisionedMachine;
use fleetcast_proto::{Kind, Topics};

use crate::family::{platform_key, secret};
use crate::samples::{group, kind, machine};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    let Ok(text) = std::str::from_utf8(data) else {
        return Verdict::Rejected;
    };
    let Ok(config) = toml::from_str::<MachineConfig>(text) else {
        return Verdict::Rejected;
    };
    let printed = config.to_toml();
    let back: MachineConfig = toml::from_str(&printed)
        .unwrap_or_else(|e| panic!("printed config does not parse back: {e}\n{printed}"));
    assert_eq!(back, config, "{printed}");
    let _ = config.installer_for(&kind());
    if config.validate().is_err() {
        return Verdict::Rejected;
    }
    let _ = Topics::new(&config.topic_prefix);
    Verdict::Accepted
}

pub fn seeds() -> Vec<Vec<u8>> {
    let provisioned = ProvisionedMachine {
        machine: machine(),
        groups: vec![group()],
        secret: secret().clone(),
        platform_key: platform_key().public(),
        platform_key_gen: 0,
        topic_prefix: "fleet".into(),
    };
    let minimal = MachineConfig::from_provisioned(
        &provisioned,
        "mqtt://127.0.0.1:1883",
        PathBuf::from("/var/lib/fleetcast"),
    );
    let mut full = minimal.clone();
    full.topic_prefix = "acme/prod".into();
    full.utc_offset_minutes = 480;
    full.installers.insert(
        Kind::new("firmware").expect("valid id"),
        InstallerConfig::Command {
            cmd: "/usr/bin/flash.sh {file} {version}".into(),
        },
    );
    full.installers.insert(
        kind(),
        InstallerConfig::Slots {
            health_cmd: Some("curl -fs localhost:8080/health".into()),
        },
    );
    full.initial_versions.insert(kind(), "2.3.0".into());
    vec![minimal.to_toml().into_bytes(), full.to_toml().into_bytes()]
}
