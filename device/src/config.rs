//! `machine.toml`: who the machine is, whom it trusts, where it keeps its files, how it installs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetcast_proto::admin::ProvisionedMachine;
use fleetcast_proto::auth::{PlatformPublicKey, Secret};
use fleetcast_proto::{GroupId, Kind, MachineId};
use serde::{Deserialize, Serialize};

use crate::trust::TrustedKey;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a valid machine config: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// How one kind is installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InstallerConfig {
    /// A/B slots under `{data_dir}/slots/{kind}`, switched atomically, then health-checked.
    Slots {
        /// Run through `sh -c` with `FLEETCAST_VERSION` set; exit 0 means healthy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_cmd: Option<String>,
    },
    /// Runs `cmd` with `{file}` and `{version}` substituted (shell-quoted) through `sh -c`.
    Command { cmd: String },
}

impl Default for InstallerConfig {
    fn default() -> Self {
        InstallerConfig::Slots { health_cmd: None }
    }
}

fn default_prefix() -> String {
    fleetcast_proto::topics::DEFAULT_PREFIX.to_owned()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_broker() -> String {
    fleetcast_broker::client::DEFAULT_BROKER.to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub machine: MachineId,
    #[serde(default)]
    pub groups: Vec<GroupId>,
    pub secret: Secret,
    pub platform_key: PlatformPublicKey,
    /// Generation of `platform_key` in the platform's key chain: 0 for the platform's first key,
    /// higher for a machine provisioned after rotations. Only the starting point: the agent
    /// follows the chain and keeps the newer key in its data dir.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub platform_key_gen: u32,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default = "default_broker")]
    pub broker: String,
    /// The CA certificate (PEM) that signs the broker's TLS certificate, for `mqtts://`
    /// brokers; without it the system's roots are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Local time offset east of UTC, used by `window` policies without an explicit offset.
    #[serde(default)]
    pub utc_offset_minutes: i32,
    /// Kinds not listed use the slots installer without a health check.
    #[serde(default)]
    pub installers: BTreeMap<Kind, InstallerConfig>,
    /// What the machine runs before any update, reported in its state.
    #[serde(default)]
    pub initial_versions: BTreeMap<Kind, String>,
}

impl MachineConfig {
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let config: MachineConfig = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })?;
        config.validate().map_err(|why| ConfigError::Invalid {
            path: path.to_owned(),
            why,
        })?;
        Ok(config)
    }

    /// The broker address, with the pinned CA when `ca_file` is set.
    pub fn broker_url(&self) -> Result<fleetcast_broker::BrokerUrl, String> {
        let url = self
            .broker
            .parse::<fleetcast_broker::BrokerUrl>()
            .map_err(|e| e.to_string())?;
        match &self.ca_file {
            None => Ok(url),
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                url.with_ca(pem)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))
            }
        }
    }

    /// Checks what serde cannot: the broker address (and CA file) and the topic prefix.
    pub fn validate(&self) -> Result<(), String> {
        self.broker_url()?;
        let p = self.topic_prefix.trim_end_matches('/');
        if p.is_empty() || p.contains(['+', '#']) {
            return Err(format!(
                "topic_prefix {:?} must be non-empty and hold no wildcard",
                self.topic_prefix
            ));
        }
        for (kind, v) in &self.initial_versions {
            fleetcast_proto::release::validate_version(v).map_err(|e| format!("{kind}: {e}"))?;
        }
        Ok(())
    }

    pub fn from_provisioned(p: &ProvisionedMachine, broker: &str, data_dir: PathBuf) -> Self {
        Self {
            machine: p.machine.clone(),
            groups: p.groups.clone(),
            secret: p.secret.clone(),
            platform_key: p.platform_key,
            platform_key_gen: p.platform_key_gen,
            topic_prefix: p.topic_prefix.clone(),
            broker: broker.to_owned(),
            ca_file: None,
            data_dir,
            utc_offset_minutes: 0,
            installers: BTreeMap::new(),
            initial_versions: BTreeMap::new(),
        }
    }

    /// The key named in the config, where following the key chain starts.
    pub fn configured_key(&self) -> TrustedKey {
        TrustedKey {
            generation: self.platform_key_gen,
            key: self.platform_key,
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("machine config serializes to TOML")
    }

    pub fn installer_for(&self, kind: &Kind) -> InstallerConfig {
        self.installers.get(kind).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::auth::PlatformKey;

    fn sample() -> MachineConfig {
        let p = ProvisionedMachine {
            machine: MachineId::new("vm-001").unwrap(),
            groups: vec![GroupId::new("a").unwrap()],
            secret: Secret::from_bytes([7; 32]),
            platform_key: PlatformKey::from_seed([1; 32]).public(),
            platform_key_gen: 0,
            topic_prefix: "fleet".into(),
        };
        let mut c = MachineConfig::from_provisioned(&p, "mqtt://127.0.0.1:1883", "/tmp/x".into());
        c.installers.insert(
            Kind::new("firmware").unwrap(),
            InstallerConfig::Command {
                cmd: "/usr/bin/install.sh {file} {version}".into(),
            },
        );
        c.installers.insert(
            Kind::new("app").unwrap(),
            InstallerConfig::Slots {
                health_cmd: Some("true".into()),
            },
        );
        c.initial_versions
            .insert(Kind::new("app").unwrap(), "1.0.0".into());
        c
    }

    #[test]
    fn a_config_round_trips_through_toml() {
        let c = sample();
        let text = c.to_toml();
        assert!(text.contains("type = \"command\""), "{text}");
        let back: MachineConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn defaults_fill_the_prefix_broker_and_installers() {
        let c = sample();
        let text = format!(
            "machine = \"vm-9\"\nsecret = \"{}\"\nplatform_key = \"{}\"\ndata_dir = \"/d\"\n",
            c.secret.to_hex(),
            c.platform_key.to_hex()
        );
        let c: MachineConfig = toml::from_str(&text).unwrap();
        assert_eq!(c.topic_prefix, "fleet");
        assert_eq!(c.platform_key_gen, 0);
        assert_eq!(c.broker, "mqtt://127.0.0.1:1883");
        assert_eq!(
            c.installer_for(&Kind::new("app").unwrap()),
            InstallerConfig::Slots { health_cmd: None }
        );
    }

    #[test]
    fn a_machine_provisioned_after_rotations_names_its_key_generation() {
        let mut c = sample();
        c.platform_key_gen = 3;
        let text = c.to_toml();
        assert!(text.contains("platform_key_gen = 3"), "{text}");
        let back: MachineConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.configured_key().generation, 3);
        assert_eq!(back.configured_key().key, c.platform_key);
    }

    #[test]
    fn a_bad_file_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine.toml");
        std::fs::write(&path, "machine = \"a/b\"").unwrap();
        let err = MachineConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("machine.toml"), "{err}");
    }
}
