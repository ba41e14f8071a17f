//! Installers: put a verified artifact into service.
//!
//! - [`slots`]: A/B slots with an atomic `current` symlink switch and a health check that
//!   switches back on failure (the default).
//! - [`command`]: hand the file to an external command.

pub mod command;
pub mod slots;

use std::path::{Path, PathBuf};

use fleetcast_proto::{ArtifactId, Kind};

use crate::config::InstallerConfig;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Nothing changed: the previous version is still active.
    #[error("install of {kind} {version} failed: {reason}")]
    Failed {
        kind: Kind,
        version: String,
        reason: String,
    },
    /// Switched to the new version, which failed its health check; switched back.
    #[error("{kind} {version} failed its health check and was rolled back: {reason}")]
    Unhealthy {
        kind: Kind,
        version: String,
        reason: String,
    },
    #[error("{kind}: {op} {path}: {error}")]
    Io {
        kind: Kind,
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// How a slots install decides whether the new version is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    None,
    /// Run through `sh -c` with `FLEETCAST_VERSION` set; exit 0 is healthy.
    Shell(String),
    /// Simulated machines: these versions are unhealthy.
    FailVersions(Vec<String>),
}

impl HealthCheck {
    pub async fn check(&self, version: &str) -> Result<(), String> {
        match self {
            HealthCheck::None => Ok(()),
            HealthCheck::FailVersions(bad) if bad.iter().any(|b| b == version) => Err(format!(
                "simulated health check fails for version {version}"
            )),
            HealthCheck::FailVersions(_) => Ok(()),
            HealthCheck::Shell(cmd) => {
                let run = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .env("FLEETCAST_VERSION", version)
                    .kill_on_drop(true)
                    .output();
                match tokio::time::timeout(std::time::Duration::from_secs(120), run).await {
                    Err(_) => Err(format!("health check `{cmd}` timed out")),
                    Ok(Err(e)) => Err(format!("health check `{cmd}` could not run: {e}")),
                    Ok(Ok(out)) if out.status.success() => Ok(()),
                    Ok(Ok(out)) => Err(format!(
                        "health check `{cmd}` exited with {}{}",
                        out.status,
                        tail(&out.stderr)
                    )),
                }
            }
        }
    }
}

/// The last lines of a command's stderr, for error texts.
pub(crate) fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    if lines.is_empty() {
        String::new()
    } else {
        format!(": {}", lines[start..].join(" | "))
    }
}

/// One kind's installer.
#[derive(Debug, Clone)]
pub enum Installer {
    Slots(slots::SlotsInstaller),
    Command(command::CommandInstaller),
}

impl Installer {
    /// `fail_health` overrides the slots health check (simulated machines).
    pub fn from_config(
        config: &InstallerConfig,
        data_dir: &Path,
        kind: &Kind,
        fail_health: Option<&[String]>,
    ) -> Self {
        match config {
            InstallerConfig::Slots { health_cmd } => {
                let health = match (fail_health, health_cmd) {
                    (Some(bad), _) => HealthCheck::FailVersions(bad.to_vec()),
                    (None, Some(cmd)) => HealthCheck::Shell(cmd.clone()),
                    (None, None) => HealthCheck::None,
                };
                Installer::Slots(slots::SlotsInstaller::new(
                    data_dir.join("slots").join(kind.as_str()),
                    kind.clone(),
                    health,
                ))
            }
            InstallerConfig::Command { cmd } => {
                Installer::Command(command::CommandInstaller::new(kind.clone(), cmd.clone()))
            }
        }
    }

    /// Installs `artifact` (the verified file at `path`) as `version`. Idempotent: running it
    /// again after a crash finishes or repeats the same install.
    pub async fn install(
        &self,
        version: &str,
        artifact: ArtifactId,
        path: &Path,
    ) -> Result<(), InstallError> {
        match self {
            Installer::Slots(s) => s.install(version, artifact, path).await,
            Installer::Command(c) => c.install(version, path).await,
        }
    }

    /// Switches back to the previous version, where the installer keeps one.
    pub async fn rollback(&self) -> Result<(), InstallError> {
        match self {
            Installer::Slots(s) => s.rollback().await,
            Installer::Command(c) => Err(InstallError::Failed {
                kind: c.kind().clone(),
                version: String::new(),
                reason: "the command installer keeps no previous version".into(),
            }),
        }
    }
}
