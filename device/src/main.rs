//! `fleetcast-device`: run one machine agent, or simulate a fleet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetcast_device::{MachineConfig, SimulateOptions};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::{GroupId, Kind};
use tokio_util::sync::CancellationToken;

/// Where the packaged agent's config lives (docs/device.md).
const DEFAULT_CONFIG: &str = "/etc/fleetcast/device.toml";

#[derive(Parser)]
#[command(
    name = "fleetcast-device",
    version,
    about = "fleetcast machine agent and fleet simulator"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once at start; boxing the simulator's options would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the agent of one machine until Ctrl-C.
    Run {
        #[arg(long, default_value = "machine.toml")]
        config: PathBuf,
        /// Overrides the broker in the config, e.g. mqtt://127.0.0.1:1883.
        #[arg(long)]
        broker: Option<String>,
    },
    /// What this machine runs and where it stands, from its config and data dir alone (no
    /// broker needed): versions per kind and the active slot, the job in progress, status
    /// events not yet acknowledged, the last contact with the platform, the last error.
    Status {
        #[arg(long, env = "FLEETCAST_DEVICE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// JSON (docs/schemas/device-status.json) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Provision and run many simulated machines in this process until Ctrl-C.
    Simulate {
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Comma-separated groups, assigned round-robin.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<GroupId>,
        /// Machines are named PREFIX001, PREFIX002, ... The simulator provisions only ids it
        /// created itself (recorded in --data): an id that exists on the platform otherwise,
        /// such as a real machine's, is refused.
        #[arg(long, default_value = "sim-")]
        prefix: String,
        #[arg(long, default_value_t = 1)]
        start_index: usize,
        #[arg(long, default_value = "./fleetcast-sim")]
        data: PathBuf,
        /// The platform's broker, where the simulator provisions its machines as an operator,
        /// as the `fleetcast` CLI finds it.
        #[arg(long, env = "FLEETCAST_BROKER", default_value = fleetcast_broker::client::DEFAULT_BROKER)]
        broker: String,
        /// Where the machines connect, if not to --broker (which provisions them, as an
        /// operator): Mosquitto with fleetcast's generated files has a listener for machines
        /// (docs/mosquitto.md).
        #[arg(long)]
        machine_broker: Option<String>,
        /// File holding the operator secret (hex) [default: $FLEETCAST_DATA/admin.secret, else
        /// ./fleetcast-data/admin.secret, as for the `fleetcast` CLI]. FLEETCAST_ADMIN_SECRET
        /// (hex) takes precedence. (Operator profiles are not read.)
        #[arg(long, value_name = "FILE")]
        admin_secret_file: Option<PathBuf>,
        /// What the machines run before any update, e.g. app=1.0.0,firmware=3.1.
        #[arg(long, value_delimiter = ',')]
        initial: Vec<String>,
        /// Versions whose health check fails (to demonstrate rollback).
        #[arg(long, value_delimiter = ',')]
        fail_health: Vec<String>,
        #[arg(long, default_value = "fleet")]
        topic_prefix: String,
        /// CA certificate (PEM) to pin for an mqtts:// broker.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Every machine's MQTT keep-alive in seconds (10 to 1200; default 30): 120 for a fleet
        /// on links of a few KB/s (docs/device.md, "Slow links").
        #[arg(long, value_parser = clap::value_parser!(u16).range(10..=1200))]
        keep_alive_secs: Option<u16>,
    },
}

fn parse_initial(items: &[String]) -> anyhow::Result<BTreeMap<Kind, String>> {
    let mut out = BTreeMap::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (kind, version) = item
            .split_once('=')
            .with_context(|| format!("--initial {item:?}: expected KIND=VERSION"))?;
        let kind = Kind::new(kind).with_context(|| format!("--initial {item:?}"))?;
        fleetcast_proto::release::validate_version(version)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("--initial {item:?}"))?;
        out.insert(kind, version.to_owned());
    }
    Ok(out)
}

fn admin_secret(file: &Path) -> anyhow::Result<Secret> {
    let hex = std::env::var("FLEETCAST_ADMIN_SECRET").ok();
    fleetcast_broker::admin::load_secret(hex.as_deref(), file).map_err(anyhow::Error::msg)
}

fn ctrl_c_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Run { config, broker } => {
            let mut cfg = MachineConfig::load(&config)?;
            if let Some(warning) = MachineConfig::readable_by_others(&config) {
                tracing::warn!("{warning}");
            }
            if let Some(b) = broker {
                cfg.broker = b;
            }
            fleetcast_device::run(cfg, ctrl_c_token()).await?;
        }
        Cmd::Status { config, json } => {
            fleetcast_broker::sigpipe::end_on_closed_pipe();
            let (cfg, problems) = MachineConfig::load_lenient(&config)?;
            if let Some(warning) = MachineConfig::readable_by_others(&config) {
                eprintln!("warning: {warning}");
            }
            let status = tokio::task::spawn_blocking(move || {
                fleetcast_device::status::collect(&cfg, &config, &problems)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!(
                    "{}",
                    fleetcast_device::status::render_text(
                        &status,
                        fleetcast_device::fsutil::now_ms()
                    )
                );
            }
        }
        Cmd::Simulate {
            count,
            groups,
            prefix,
            start_index,
            data,
            broker,
            machine_broker,
            admin_secret_file,
            initial,
            fail_health,
            topic_prefix,
            ca_file,
            keep_alive_secs,
        } => {
            // One socket per simulated machine, and the files their agents write.
            let needed = fleetcast_device::simulate::open_files_needed(count);
            match fleetcast_broker::fdlimit::raise_open_file_limit() {
                Ok(limit) if limit < needed => eprintln!(
                    "warning: {count} simulated machines need about {needed} open files at their \
                     peaks and this process may open {limit} (ulimit -Hn): machines will fail \
                     to write their state and statuses (\"Too many open files\"); raise the \
                     limit or simulate fewer per process"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
            let opts = SimulateOptions {
                count,
                groups,
                prefix,
                data_dir: data,
                machine_broker: machine_broker.unwrap_or_else(|| broker.clone()),
                broker,
                topic_prefix,
                admin_secret: admin_secret(&admin_secret_file.unwrap_or_else(|| {
                    std::env::var_os("FLEETCAST_DATA")
                        .map_or_else(|| PathBuf::from("./fleetcast-data"), PathBuf::from)
                        .join("admin.secret")
                }))?,
                initial_versions: parse_initial(&initial)?,
                start_index,
                fail_health,
                ca_file,
                keep_alive_secs,
            };
            fleetcast_device::simulate::run(opts, ctrl_c_token()).await?;
        }
    }
    Ok(())
}

/// Blocking-pool threads: file writes of many simulated machines queue here instead of
/// growing the pool to tokio's 512 threads (each with its own malloc arena and stack). One
/// agent has at most a few file operations going at once. In a simulator on two cores, 64
/// runnable writers crowded out the agents' own work (their tokio workers and the durable
/// writer's thread); with 4 (A/B, 2026-11-29, alternating runs): 1,000 machines' rollouts
/// 1.32 s on average against 1.48 s (18 rollouts each), 10,000 machines 33.1 s against 31.6 s
/// in tmpfs and 85.5 s against 95.8 s on disk, onboarding there 8.5 s against 24.9 s.
const MAX_BLOCKING_THREADS: usize = 4;

fn main() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files and pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(Cli::parse())) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
