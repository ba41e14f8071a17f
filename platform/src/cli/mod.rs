//! The `fleetcast` command line: `serve` runs the platform; every other command is an admin
//! request to a running platform through the broker. Output formatting lives in pure
//! functions (tested below each module); `anyhow` is used only here and in `main`.
//! docs/cli.md is the user's side: options, credentials, exit codes, JSON schemas.
//!
//! Layout: [`serve`], [`artifact`], [`release`], [`removal`] (`release remove`), [`machines`] (list, provision, revoke),
//! [`inventory`] (versions, history, paged listings),
//! [`rollback`] (rollback, activate), [`identity`] (operators, integrators, audit, events,
//! key rotation), [`profile`] (where credentials come from, the saved profile), [`table`]
//! (table and time formatting).

pub mod artifact;
pub mod db;
pub mod identity;
pub mod inventory;
pub mod machines;
pub mod profile;
pub mod regroup;
pub mod release;
pub mod removal;
pub mod rollback;
pub mod rollout;
pub mod serve;
pub mod table;

pub use profile::Profile;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetcast_broker::admin::AdminClient;
use fleetcast_broker::BrokerUrl;
use fleetcast_proto::calls::Call;
use fleetcast_proto::Topics;

#[derive(Parser)]
#[command(
    name = "fleetcast",
    version,
    about = "Update a fleet of vending machines over MQTT",
    after_help = "Exit status: 0 ok, 1 error, 2 usage error; `release watch`: 3 machines failed, \
                  4 --timeout passed, 5 staged rollout paused. See docs/cli.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub client: ClientArgs,
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
    /// List machines with their state; filters combine (a machine must pass every one given).
    Machines(machines::MachinesArgs),
    /// Register machines.
    #[command(subcommand)]
    Machine(machines::MachineCmd),
    /// Follow and steer a staged rollout (`release publish --waves`): status, pause, resume,
    /// cancel.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Installed versions of a version type across the fleet, and how far the fleet is with
    /// its newest published release.
    Versions(inventory::VersionsArgs),
    /// Every release that targeted a machine, with its result and times, newest first.
    History(inventory::HistoryArgs),
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
    /// Your saved operator profile, and where the CLI finds its credentials.
    #[command(subcommand)]
    Profile(profile::ProfileCmd),
    /// The platform's database: compact it (on its host with the platform stopped, or with
    /// `--online` by the running platform), or back the running platform up.
    #[command(subcommand)]
    Db(db::DbCmd),
}

/// Exit statuses of `fleetcast` (docs/cli.md). clap exits with [`exit::USAGE`] by itself.
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything that went wrong: unreachable platform, refused request, I/O.
    pub const ERROR: u8 = 1;
    /// The command line cannot be right (clap's own errors, and the checks clap cannot make).
    pub const USAGE: u8 = 2;
    /// `release watch`: every machine finished, and some of them failed.
    pub const MACHINES_FAILED: u8 = 3;
    /// `release watch --timeout`: not finished in time.
    pub const TIMED_OUT: u8 = 4;
    /// `release watch`: the release's staged rollout is paused (an operator must act).
    pub const ROLLOUT_PAUSED: u8 = 5;
}

/// An error that ends `fleetcast` with its own exit status (any other error exits with
/// [`exit::ERROR`]).
#[derive(Debug, thiserror::Error)]
pub enum Exit {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    MachinesFailed(String),
    #[error("{0}")]
    TimedOut(String),
    #[error("{0}")]
    RolloutPaused(String),
}

/// A usage error (exit status 2), for what clap's definitions cannot check.
pub fn usage(text: impl Into<String>) -> anyhow::Error {
    Exit::Usage(text.into()).into()
}

/// The exit status for an error `run` returned.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Exit>() {
        Some(Exit::Usage(_)) => exit::USAGE,
        Some(Exit::MachinesFailed(_)) => exit::MACHINES_FAILED,
        Some(Exit::TimedOut(_)) => exit::TIMED_OUT,
        Some(Exit::RolloutPaused(_)) => exit::ROLLOUT_PAUSED,
        None => exit::ERROR,
    }
}

// How a client command reaches the platform, and as whom. These options are global: they go
// before or after the subcommand (`fleetcast --broker URL release status R` or
// `fleetcast release status R --broker URL`). Credentials are searched in the order
// [`profile`] documents. (Plain comments: a doc comment here would become every command's
// help text.)
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Client options (before or after the subcommand)")]
pub struct ClientArgs {
    /// Broker the platform listens on [env: FLEETCAST_BROKER] [default: the profile's, else
    /// mqtt://127.0.0.1:1883].
    // FLEETCAST_BROKER is read in code, not by clap: `serve --broker` shares this option, and
    // an environment meant for client commands must not turn `fleetcast serve` into a client
    // of an external broker.
    #[arg(long, global = true, value_name = "URL")]
    pub broker: Option<String>,
    /// CA certificate (PEM) to pin for an mqtts:// broker [default: the profile's, else the
    /// system roots].
    #[arg(long, env = "FLEETCAST_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Operator profile (TOML from `fleetcast operator add`).
    #[arg(long, env = "FLEETCAST_PROFILE", global = true)]
    pub profile: Option<PathBuf>,
    /// Operator name for a secret given without a profile (--admin-secret,
    /// --admin-secret-file, FLEETCAST_DATA, ./fleetcast-data).
    #[arg(
        long,
        env = "FLEETCAST_OPERATOR",
        default_value = fleetcast_broker::admin::BOOTSTRAP_OPERATOR,
        global = true
    )]
    pub operator: String,
    /// File holding the operator's secret (hex) [default: the saved profile, else
    /// $FLEETCAST_DATA/admin.secret, else ./fleetcast-data/admin.secret].
    #[arg(long, global = true, value_name = "FILE")]
    pub admin_secret_file: Option<PathBuf>,
    /// The operator's secret itself (hex); overrides --admin-secret-file.
    #[arg(
        long = "admin-secret",
        env = "FLEETCAST_ADMIN_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub admin_secret: Option<String>,
    /// MQTT topic prefix [default: the profile's, else fleet].
    #[arg(long, global = true)]
    pub topic_prefix: Option<String>,
}

/// Everything a client command needs to reach the platform, resolved from flags, environment
/// and files.
pub struct Resolved {
    pub credentials: profile::Credentials,
    pub broker: String,
    pub ca_file: Option<PathBuf>,
    pub topic_prefix: String,
}

impl Resolved {
    /// What `fleetcast profile show` prints: no secret.
    pub fn describe(&self) -> String {
        let c = &self.credentials;
        let mut out = format!(
            "operator:      {}
",
            c.operator
        );
        if let Some(p) = &c.profile {
            out.push_str(&format!(
                "role:          {}
",
                p.role
            ));
        }
        out.push_str(&format!(
            "credentials:   {}
",
            c.source
        ));
        out.push_str(&format!(
            "broker:        {}
",
            self.broker
        ));
        if let Some(ca) = &self.ca_file {
            out.push_str(&format!(
                "ca file:       {}
",
                ca.display()
            ));
        }
        out.push_str(&format!(
            "topic prefix:  {}
",
            self.topic_prefix
        ));
        out
    }
}

impl ClientArgs {
    /// Credentials, broker, CA and topic prefix: each from its flag (or environment), else the
    /// profile the credentials came from, else the default.
    pub fn resolve_in(&self, env: &profile::SearchEnv) -> anyhow::Result<Resolved> {
        let source = profile::locate(self, env)?;
        let credentials = profile::load(source, &self.operator, self)?;
        let from_profile = credentials.profile.as_ref();
        let broker = self
            .broker
            .clone()
            .or_else(|| env.broker.clone())
            .or_else(|| from_profile.and_then(|p| p.broker.clone()))
            .unwrap_or_else(|| fleetcast_broker::client::DEFAULT_BROKER.to_owned());
        let ca_file = self
            .ca_file
            .clone()
            .or_else(|| from_profile.and_then(|p| p.ca_file.clone()));
        let topic_prefix = self
            .topic_prefix
            .clone()
            .or_else(|| from_profile.map(|p| p.topic_prefix.clone()))
            .unwrap_or_else(|| fleetcast_proto::topics::DEFAULT_PREFIX.to_owned());
        Ok(Resolved {
            credentials,
            broker,
            ca_file,
            topic_prefix,
        })
    }

    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        self.resolve_in(&profile::SearchEnv::from_process())
    }

    /// The broker address commands print into configs they write.
    pub fn broker(&self) -> anyhow::Result<String> {
        Ok(self.resolve()?.broker)
    }

    /// Connects, sends one typed call, and disconnects.
    pub async fn call<C: Call>(&self, call: C) -> anyhow::Result<C::Reply> {
        self.call_waiting(call, fleetcast_broker::admin::REQUEST_TIMEOUT)
            .await
    }

    /// [`ClientArgs::call`], waiting up to `timeout` for the answer.
    pub async fn call_waiting<C: Call>(
        &self,
        call: C,
        timeout: Duration,
    ) -> anyhow::Result<C::Reply> {
        let admin = self.connect().await?;
        let reply = admin.call_with_timeout(call, timeout).await;
        admin.close().await;
        Ok(reply?)
    }

    pub async fn connect(&self) -> anyhow::Result<AdminClient> {
        let r = self.resolve()?;
        let mut url = r.broker.parse::<BrokerUrl>()?;
        if let Some(f) = &r.ca_file {
            let pem = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            url = url.with_ca(pem)?;
        }
        let client = AdminClient::connect_as(
            &url,
            Topics::new(&r.topic_prefix),
            &r.credentials.operator,
            r.credentials.secret,
            Duration::from_secs(10),
        )
        .await
        .with_context(|| {
            format!(
                "cannot reach the platform via {url} as operator {} ({})",
                r.credentials.operator, r.credentials.source
            )
        })?;
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
    let client = &cli.client;
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Artifact(cmd) => artifact::run(cmd, client).await,
        Command::Release(cmd) => release::run(cmd, client).await,
        Command::Machines(args) => machines::list(args, client).await,
        Command::Machine(cmd) => machines::run(cmd, client).await,
        Command::Rollout(cmd) => rollout::run(cmd, client).await,
        Command::Versions(args) => inventory::versions(args, client).await,
        Command::History(args) => inventory::history(args, client).await,
        Command::Rollback(args) => rollback::rollback(args, client).await,
        Command::Activate(args) => rollback::activate(args, client).await,
        Command::Operator(cmd) => identity::operator(cmd, client).await,
        Command::Integrator(cmd) => identity::integrator(cmd, client).await,
        Command::Audit(args) => identity::audit(args, client).await,
        Command::Stats(args) => identity::stats(args, client).await,
        Command::Events(args) => identity::events(args, client).await,
        Command::Key(cmd) => identity::key(cmd, client).await,
        Command::Broker(cmd) => identity::broker(cmd, client).await,
        Command::Profile(cmd) => profile::run(cmd, client).await,
        Command::Db(cmd) => db::run(cmd, client).await,
    }
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Comma-separated ids from the command line (a bad one is a usage error).
pub fn parse_list<T: std::str::FromStr>(text: &Option<String>) -> anyhow::Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    let Some(text) = text else { return Ok(vec![]) };
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<T>().map_err(|e| usage(e.to_string())))
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
    fn comma_lists_parse_and_bad_ids_are_usage_errors() {
        let ok: Vec<fleetcast_proto::MachineId> = parse_list(&Some("vm-1, vm-2,".into())).unwrap();
        assert_eq!(ok.len(), 2);
        let err = parse_list::<fleetcast_proto::MachineId>(&Some("vm-1,a/b".into())).unwrap_err();
        assert!(err.to_string().contains("a/b"), "{err}");
        assert_eq!(exit_code(&err), exit::USAGE);
    }

    fn parse(argv: &[&str]) -> Cli {
        Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }

    /// `--yes` goes to every change a script makes, `release retry` included (which asks
    /// nothing: a newcomer's script got clap's "unexpected argument").
    #[test]
    fn release_retry_takes_yes_like_the_other_changes() {
        parse(&[
            "fleetcast",
            "release",
            "retry",
            "r-000001",
            "--failed",
            "--yes",
        ]);
    }

    /// The client options as one comparable line.
    fn client_of(cli: &Cli) -> String {
        format!("{:?}", cli.client)
    }

    #[test]
    fn client_options_go_before_or_after_the_subcommand() {
        let options = [
            "--broker",
            "mqtt://h:1",
            "--profile",
            "/p.toml",
            "--operator",
            "alice",
            "--admin-secret-file",
            "/s",
            "--topic-prefix",
            "t",
            "--ca-file",
            "/ca.pem",
        ];
        let commands: [&[&str]; 6] = [
            &["release", "status", "r-1"],
            &["machines", "--json"],
            &["artifact", "list"],
            &["rollback", "--group", "g", "--kind", "app", "--yes"],
            &["operator", "add", "bob", "--role", "viewer"],
            &["profile", "show"],
        ];
        for command in commands {
            let before: Vec<&str> = ["fleetcast"]
                .iter()
                .chain(&options)
                .chain(command)
                .copied()
                .collect();
            let after: Vec<&str> = ["fleetcast"]
                .iter()
                .chain(command)
                .chain(&options)
                .copied()
                .collect();
            let (b, a) = (parse(&before), parse(&after));
            assert_eq!(client_of(&b), client_of(&a), "{command:?}");
            assert_eq!(b.client.broker.as_deref(), Some("mqtt://h:1"));
            assert_eq!(b.client.operator, "alice");
            assert_eq!(b.client.admin_secret_file, Some(PathBuf::from("/s")));
            assert_eq!(b.client.topic_prefix.as_deref(), Some("t"));
        }
        // Split on both sides, and the later of two wins as clap's usual rule.
        let split = parse(&[
            "fleetcast",
            "--broker",
            "mqtt://h:1",
            "release",
            "status",
            "r-1",
            "--operator",
            "alice",
        ]);
        assert_eq!(split.client.broker.as_deref(), Some("mqtt://h:1"));
        assert_eq!(split.client.operator, "alice");
        assert!(Cli::try_parse_from(["fleetcast", "--no-such", "machines"]).is_err());
    }

    #[test]
    fn serve_takes_its_broker_and_prefix_from_either_side_too() {
        let Command::Serve(a) = parse(&["fleetcast", "--broker", "mqtt://x:1", "serve"]).command
        else {
            panic!()
        };
        assert_eq!(a.broker.as_deref(), Some("mqtt://x:1"));
        let Command::Serve(a) = parse(&["fleetcast", "serve"]).command else {
            panic!()
        };
        assert_eq!((a.broker, a.topic_prefix.as_str()), (None, "fleet"));
    }

    #[test]
    fn serve_keeps_a_million_events_unless_told_and_never_none() {
        let Command::Serve(a) = parse(&["fleetcast", "serve"]).command else {
            panic!()
        };
        assert_eq!(a.keep_events, 1_000_000);
        let Command::Serve(a) = parse(&["fleetcast", "serve", "--keep-events", "500"]).command
        else {
            panic!()
        };
        assert_eq!(a.keep_events, 500);
        let refused = Cli::try_parse_from(["fleetcast", "serve", "--keep-events", "0"]);
        assert!(
            refused.is_err(),
            "keeping no events would lose each one as it is stored"
        );
    }

    #[test]
    fn the_broker_comes_from_the_flag_then_the_environment_then_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("p.toml");
        let key = fleetcast_proto::auth::PlatformKey::from_seed([4; 32]).public();
        std::fs::write(
            &profile,
            format!(
                "operator = \"alice\"\nrole = \"viewer\"\nsecret = \"{}\"\n\
                 platform_key = \"{}\"\ntopic_prefix = \"p\"\nbroker = \"mqtt://profile:1\"\n",
                "ab".repeat(32),
                key.to_hex()
            ),
        )
        .unwrap();
        let with = |argv: &[&str], env_broker: Option<&str>| {
            let mut full = vec!["fleetcast", "--profile", profile.to_str().unwrap()];
            full.extend_from_slice(argv);
            full.push("machines");
            let env = profile::SearchEnv {
                broker: env_broker.map(Into::into),
                ..Default::default()
            };
            let r = parse(&full).client.resolve_in(&env).unwrap();
            (r.broker, r.topic_prefix, r.credentials.operator)
        };
        assert_eq!(
            with(&[], None),
            ("mqtt://profile:1".into(), "p".into(), "alice".into())
        );
        assert_eq!(with(&[], Some("mqtt://env:1")).0, "mqtt://env:1");
        assert_eq!(
            with(
                &["--broker", "mqtt://flag:1", "--topic-prefix", "f"],
                Some("mqtt://env:1")
            ),
            ("mqtt://flag:1".into(), "f".into(), "alice".into())
        );
        // Without a profile: the default broker and prefix, and the --operator name.
        let secret = dir.path().join("admin.secret");
        std::fs::write(&secret, "cd".repeat(32)).unwrap();
        let r = parse(&[
            "fleetcast",
            "machines",
            "--admin-secret-file",
            secret.to_str().unwrap(),
            "--operator",
            "ops",
        ])
        .client
        .resolve_in(&profile::SearchEnv::default())
        .unwrap();
        assert_eq!(
            (
                r.broker.as_str(),
                r.topic_prefix.as_str(),
                r.credentials.operator.as_str()
            ),
            ("mqtt://127.0.0.1:1883", "fleet", "ops")
        );
        assert!(r.describe().contains(secret.to_str().unwrap()));
    }

    #[test]
    fn exit_codes_follow_the_error_kind_through_context() {
        let plain = anyhow::anyhow!("no answer");
        assert_eq!(exit_code(&plain), exit::ERROR);
        let failed = anyhow::Error::from(Exit::MachinesFailed("2 failed".into())).context("watch");
        assert_eq!(exit_code(&failed), exit::MACHINES_FAILED);
        let late = anyhow::Error::from(Exit::TimedOut("not finished".into()));
        assert_eq!(exit_code(&late), exit::TIMED_OUT);
        let paused = anyhow::Error::from(Exit::RolloutPaused("paused".into()));
        assert_eq!(exit_code(&paused), exit::ROLLOUT_PAUSED);
        assert_eq!(exit_code(&usage("name a target")), exit::USAGE);
        let clap_err = Cli::try_parse_from(["fleetcast", "--bogus"]).err().unwrap();
        assert_eq!(clap_err.exit_code(), exit::USAGE as i32);
    }
}
