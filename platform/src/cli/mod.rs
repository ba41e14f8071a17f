//! The `fleetcast` command line: `serve` runs the platform; every other command is an admin
//! request to a running platform through the broker. Output formatting lives in pure
//! functions (tested below each module); `anyhow` is used only here and in `main`.
//!
//! Layout: [`serve`], [`artifact`], [`release`], [`machines`] (list, provision, revoke),
//! [`rollback`] (rollback, activate), [`identity`] (operators, integrators, audit, events,
//! key rotation), [`table`] (table and time formatting).

pub mod artifact;
pub mod identity;
pub mod machines;
pub mod release;
pub mod rollback;
pub mod serve;
pub mod table;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetcast_broker::admin::AdminClient;
use fleetcast_broker::BrokerUrl;
use fleetcast_proto::admin::{AdminOp, AdminReply};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::Topics;

#[derive(Parser)]
#[command(
    name = "fleetcast",
    version,
    about = "Update a fleet of vending machines over MQTT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the platform (and, without --broker, the embedded MQTT broker).
    Serve(serve::ServeArgs),
    /// Upload and list version files.
    #[command(subcommand)]
    Artifact(artifact::ArtifactCmd),
    /// Create, publish and follow releases.
    #[command(subcommand)]
    Release(release::ReleaseCmd),
    /// List machines with their state.
    Machines(machines::MachinesArgs),
    /// Register machines.
    #[command(subcommand)]
    Machine(machines::MachineCmd),
    /// Roll a machine's or group's version type back to a stable version.
    Rollback(rollback::RollbackArgs),
    /// Install a downloaded `download-only` release now.
    Activate(rollback::ActivateArgs),
    /// Operators: their own credentials and roles (admin only).
    #[command(subcommand)]
    Operator(identity::OperatorCmd),
    /// Integrators: read-only broker credentials (admin only).
    #[command(subcommand)]
    Integrator(identity::IntegratorCmd),
    /// The audit log: every operator action, who, when, and its result (admin only).
    Audit(identity::AuditArgs),
    /// Stored events after an event id (integrators catching up use this or MQTT).
    Events(identity::EventsArgs),
    /// The platform's counters since it started: chunk traffic, stored events.
    Stats(identity::StatsArgs),
    /// The platform's signing key.
    #[command(subcommand)]
    Key(identity::KeyCmd),
    /// Files for an external broker.
    #[command(subcommand)]
    Broker(identity::BrokerCmd),
}

/// How a client command reaches the platform, and as whom.
///
/// Credentials: `--profile FILE` (or `FLEETCAST_PROFILE`), the TOML printed by
/// `fleetcast operator add`; without one, operator `--operator` (default `admin`) with the
/// secret in `--admin-secret-file` (default `./fleetcast-data/admin.secret`, which
/// `fleetcast serve` creates for the first admin) or `FLEETCAST_ADMIN_SECRET`.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Broker the platform listens on [default: the profile's, else mqtt://127.0.0.1:1883].
    #[arg(long, env = "FLEETCAST_BROKER", global = true)]
    pub broker: Option<String>,
    /// CA certificate (PEM) to pin for an mqtts:// broker [default: the profile's, else the
    /// system roots].
    #[arg(long, env = "FLEETCAST_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Operator profile (TOML from `fleetcast operator add`).
    #[arg(long, env = "FLEETCAST_PROFILE", global = true)]
    pub profile: Option<PathBuf>,
    /// Operator name, when no profile is given.
    #[arg(
        long,
        env = "FLEETCAST_OPERATOR",
        default_value = "admin",
        global = true
    )]
    pub operator: String,
    /// File holding the operator's secret (hex), when no profile is given.
    #[arg(long, default_value = "./fleetcast-data/admin.secret", global = true)]
    pub admin_secret_file: PathBuf,
    /// The operator's secret itself (hex); overrides --admin-secret-file.
    #[arg(
        long = "admin-secret",
        env = "FLEETCAST_ADMIN_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub admin_secret: Option<String>,
    #[arg(long, default_value = fleetcast_proto::topics::DEFAULT_PREFIX, global = true)]
    pub topic_prefix: String,
}

/// The operator profile file (`fleetcast operator add` prints it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub operator: String,
    pub role: fleetcast_proto::acl::Role,
    pub secret: Secret,
    pub platform_key: fleetcast_proto::auth::PlatformPublicKey,
    pub topic_prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// CA certificate (PEM) to pin for an mqtts:// broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl Profile {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading operator profile {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("operator profile {}", path.display()))
    }
}

impl ClientArgs {
    fn loaded_profile(&self) -> anyhow::Result<Option<Profile>> {
        self.profile.as_deref().map(Profile::load).transpose()
    }

    /// The operator name and secret this command acts with.
    pub fn credentials(&self) -> anyhow::Result<(String, Secret)> {
        if let Some(p) = self.loaded_profile()? {
            return Ok((p.operator, p.secret));
        }
        let secret = fleetcast_broker::admin::load_secret(
            self.admin_secret.as_deref(),
            &self.admin_secret_file,
        )
        .map_err(anyhow::Error::msg)?;
        Ok((self.operator.clone(), secret))
    }

    /// The broker address: the flag or environment, else the profile's, else the default.
    pub fn broker(&self) -> anyhow::Result<String> {
        if let Some(b) = &self.broker {
            return Ok(b.clone());
        }
        Ok(self
            .loaded_profile()?
            .and_then(|p| p.broker)
            .unwrap_or_else(|| fleetcast_broker::client::DEFAULT_BROKER.to_owned()))
    }

    pub fn broker_url(&self) -> anyhow::Result<BrokerUrl> {
        let url = self.broker()?.parse::<BrokerUrl>()?;
        let ca = match &self.ca_file {
            Some(f) => Some(f.clone()),
            None => self.loaded_profile()?.and_then(|p| p.ca_file),
        };
        match ca {
            None => Ok(url),
            Some(f) => {
                let pem = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                Ok(url.with_ca(pem)?)
            }
        }
    }

    /// Connects, sends one request, and disconnects.
    pub async fn request(&self, op: AdminOp) -> anyhow::Result<AdminReply> {
        let admin = self.connect().await?;
        let reply = admin.request(op).await;
        admin.close().await;
        Ok(reply?)
    }

    pub async fn connect(&self) -> anyhow::Result<AdminClient> {
        let url = self.broker_url()?;
        let (operator, secret) = self.credentials()?;
        let client = AdminClient::connect_as(
            &url,
            Topics::new(&self.topic_prefix),
            &operator,
            secret,
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("cannot reach the platform via {url}"))?;
        Ok(client)
    }
}

/// Asks "question [y/N]" on stdin. Without a terminal and without `--yes` it refuses.
pub fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "refusing to continue without confirmation: stdin is not a terminal (pass --yes)"
        );
    }
    eprint!("{question} [y/N] ");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the answer")?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Artifact(cmd) => artifact::run(cmd).await,
        Command::Release(cmd) => release::run(cmd).await,
        Command::Machines(args) => machines::list(args).await,
        Command::Machine(cmd) => machines::run(cmd).await,
        Command::Rollback(args) => rollback::rollback(args).await,
        Command::Activate(args) => rollback::activate(args).await,
        Command::Operator(cmd) => identity::operator(cmd).await,
        Command::Integrator(cmd) => identity::integrator(cmd).await,
        Command::Audit(args) => identity::audit(args).await,
        Command::Stats(args) => identity::stats(args).await,
        Command::Events(args) => identity::events(args).await,
        Command::Key(cmd) => identity::key(cmd).await,
        Command::Broker(cmd) => identity::broker(cmd).await,
    }
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Comma-separated ids from the command line.
pub fn parse_list<T: std::str::FromStr>(text: &Option<String>) -> anyhow::Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    let Some(text) = text else { return Ok(vec![]) };
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<T>().map_err(|e| anyhow::anyhow!("{e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn comma_lists_parse_and_bad_ids_are_reported() {
        let ok: Vec<fleetcast_proto::MachineId> = parse_list(&Some("vm-1, vm-2,".into())).unwrap();
        assert_eq!(ok.len(), 2);
        let err = parse_list::<fleetcast_proto::MachineId>(&Some("vm-1,a/b".into())).unwrap_err();
        assert!(err.to_string().contains("a/b"), "{err}");
    }
}
