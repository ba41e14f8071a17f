//! A fleet in one process: provisions `count` machines through the platform's admin API, writes
//! each one's `machine.toml`, and runs every agent on its own MQTT connection.
//!
//! The simulator never touches a machine it did not create: it records the machines it
//! provisioned in `{data_dir}/simulated.json`. A machine in its records is provisioned again with
//! `rotate` (a new secret; the platform may have been reset since). Any other id is provisioned
//! without `rotate`, which the platform refuses, changing nothing, if the id exists: so
//! `simulate` next to a real `vm-001` fails with the platform's reason instead of taking the
//! real machine's identity over.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcast_broker::admin::{AdminClient, AdminError};
use fleetcast_broker::BrokerUrl;
use fleetcast_proto::admin::{AdminOp, AdminReply, MachineSpec, MAX_PROVISION_BATCH};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::{GroupId, Kind, MachineId, Topics};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentError, AgentOptions};
use crate::config::MachineConfig;
use crate::durable;

/// What the simulator provisioned, in its data dir.
pub const RECORDS: &str = "simulated.json";

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Records {
    /// Every machine this data dir's simulator provisioned.
    machines: BTreeSet<MachineId>,
}

#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub count: usize,
    pub groups: Vec<GroupId>,
    /// Machines are named `{prefix}{index:03}`.
    pub prefix: String,
    pub data_dir: PathBuf,
    /// Where the simulator provisions its machines (as an operator).
    pub broker: String,
    /// Where the machines connect: `broker`, or on Mosquitto the machines' own listener.
    pub machine_broker: String,
    pub topic_prefix: String,
    pub admin_secret: Secret,
    pub initial_versions: BTreeMap<Kind, String>,
    /// Index of the first machine (1 gives `vm-001`).
    pub start_index: usize,
    /// Versions whose health check fails on every simulated machine.
    pub fail_health: Vec<String>,
    /// CA certificate (PEM) to pin for an mqtts:// broker (the CLI's and every machine's).
    pub ca_file: Option<PathBuf>,
    /// Every machine's `keep_alive_secs` (the config's default when `None`): a fleet on slow
    /// links (docs/device.md, "Slow links").
    pub keep_alive_secs: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("bad broker address: {0}")]
    Broker(String),
    #[error("machine name {name:?}: {reason}")]
    MachineName { name: String, reason: String },
    #[error("cannot reach the platform: {0}")]
    Admin(AdminError),
    #[error("provisioning {machine}: {reason}")]
    Provision { machine: String, reason: String },
    #[error("provisioning {first}..{last}: the platform refused: {reason}\n  The simulator provisions only machines it created (recorded in {records}); it never takes over an existing machine. Pick another --prefix (default sim-) or --start-index, or the --data dir of the simulator that created them.")]
    NotOurs {
        first: String,
        last: String,
        reason: String,
        records: PathBuf,
    },
    #[error("cannot read {path}: {error}")]
    Records { path: PathBuf, error: String },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// The group of machine `index` (1-based): round-robin over `groups`.
pub fn group_of(index: usize, groups: &[GroupId]) -> Option<GroupId> {
    (!groups.is_empty()).then(|| groups[(index.max(1) - 1) % groups.len()].clone())
}

/// Open files a simulator of `count` machines needs at its peaks: a socket per machine, and
/// the files its agents open at once besides (the sale lock held through each install, the
/// slot and staging files, the writer's temp files), up to about a third as many again when
/// thousands install together, plus the process's own. Measured on 2026-11-28 under a limit of
/// 20,000: 15,000 machines (7,502 of them installing) peaked at 16,534 descriptors in a
/// half-second sampling and still failed one open ("Too many open files"); 10,000 machines
/// (5,002 installing) all installed (whether any open failed there was not looked at).
pub fn open_files_needed(count: usize) -> u64 {
    let count = count as u64;
    count + count / 3 + 500
}

pub fn machine_name(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:03}")
}

pub async fn run(opts: SimulateOptions, shutdown: CancellationToken) -> Result<(), SimulateError> {
    let mut url: BrokerUrl =
        opts.broker
            .parse()
            .map_err(|e: fleetcast_broker::client::BrokerUrlError| {
                SimulateError::Broker(e.to_string())
            })?;
    if let Some(ca) = &opts.ca_file {
        let pem = std::fs::read(ca)
            .map_err(|e| SimulateError::Broker(format!("ca file {}: {e}", ca.display())))?;
        url = url
            .with_ca(pem)
            .map_err(|e| SimulateError::Broker(e.to_string()))?;
    }
    // Many machines in one process: one read of /proc/locks serves their sale-lock looks for
    // half a tick (each would otherwise read every machine's lock once a second).
    crate::sale_lock::share_proc_locks_reads(Duration::from_millis(500));
    // And at most 2,000 looks a second in all: each is a task on the blocking pool.
    let count = u64::try_from(opts.count).unwrap_or(u64::MAX);
    crate::sale_lock::look_at_most_every(Duration::from_millis((count / 2).max(1000)));
    let first = opts.start_index;
    let last = first + opts.count.saturating_sub(1);
    let mut machines = Vec::with_capacity(opts.count);
    for i in first..first + opts.count {
        let name = machine_name(&opts.prefix, i);
        let id = MachineId::new(name.clone()).map_err(|e| SimulateError::MachineName {
            name,
            reason: e.to_string(),
        })?;
        machines.push((id, group_of(i - first + 1, &opts.groups)));
    }

    let admin = AdminClient::connect(
        &url,
        Topics::new(&opts.topic_prefix),
        opts.admin_secret.clone(),
        Duration::from_secs(10),
    )
    .await
    .map_err(SimulateError::Admin)?;
    let records_path = opts.data_dir.join(RECORDS);
    let mut records = read_records(&records_path)?;
    let (ours, new): (Vec<_>, Vec<_>) = machines
        .into_iter()
        .partition(|(m, _)| records.machines.contains(m));
    let mut configs = Vec::with_capacity(ours.len() + new.len());
    // Written while the next batch is provisioned, and durable before any agent starts.
    let mut writes = JoinSet::new();
    // New machines first: if the platform refuses one, none of ours was touched yet. One admin
    // round trip per batch, not per machine.
    let batches = new
        .chunks(MAX_PROVISION_BATCH)
        .map(|b| (b, false))
        .chain(ours.chunks(MAX_PROVISION_BATCH).map(|b| (b, true)));
    for (batch, rotate) in batches {
        let op = AdminOp::MachineProvisionBatch {
            machines: batch
                .iter()
                .map(|(machine, group)| MachineSpec {
                    machine: machine.clone(),
                    groups: group.iter().cloned().collect(),
                })
                .collect(),
            rotate,
        };
        let first = batch[0].0.to_string();
        let provisioned = match admin.request(op).await {
            Ok(AdminReply::ProvisionedBatch { machines }) if machines.len() == batch.len() => {
                machines
            }
            Ok(other) => {
                admin.close().await;
                return Err(SimulateError::Provision {
                    machine: first,
                    reason: format!("unexpected reply {other:?}"),
                });
            }
            Err(AdminError::Refused(reason)) if !rotate => {
                admin.close().await;
                return Err(SimulateError::NotOurs {
                    first,
                    last: batch[batch.len() - 1].0.to_string(),
                    reason,
                    records: records_path,
                });
            }
            Err(e) => {
                admin.close().await;
                return Err(SimulateError::Provision {
                    machine: first,
                    reason: e.to_string(),
                });
            }
        };
        if !rotate {
            records
                .machines
                .extend(provisioned.iter().map(|p| p.machine.clone()));
            if let Err(e) = write_records(&records_path, &records).await {
                admin.close().await;
                return Err(e);
            }
        }
        for provisioned in provisioned {
            let dir = opts.data_dir.join(provisioned.machine.as_str());
            let mut config =
                MachineConfig::from_provisioned(&provisioned, &opts.machine_broker, dir.clone());
            config.initial_versions = opts.initial_versions.clone();
            config.ca_file = opts.ca_file.clone();
            if let Some(secs) = opts.keep_alive_secs {
                config.keep_alive_secs = secs;
            }
            let path = dir.join("machine.toml");
            let toml = config.to_toml().into_bytes();
            writes.spawn(async move {
                durable::shared()
                    .write(&path, toml)
                    .await
                    .map_err(|error| SimulateError::Write { path, error })
            });
            configs.push(config);
        }
    }
    admin.close().await;
    while let Some(written) = writes.join_next().await {
        written.map_err(|e| SimulateError::Write {
            path: opts.data_dir.clone(),
            error: std::io::Error::other(e),
        })??;
    }

    let groups: Vec<&str> = opts.groups.iter().map(|g| g.as_str()).collect();
    let range = if opts.count == 0 {
        "none".to_owned()
    } else {
        format!(
            "{}..{}",
            machine_name(&opts.prefix, first),
            machine_name(&opts.prefix, last)
        )
    };
    println!(
        "simulating {} machines ({range}){}",
        opts.count,
        if groups.is_empty() {
            String::new()
        } else {
            format!(" in groups {}", groups.join(","))
        }
    );

    let trimmer = tokio::spawn(fleetcast_broker::memory::return_freed_memory(
        TRIM_EVERY,
        shutdown.clone(),
    ));
    let mut agents = JoinSet::new();
    for config in configs {
        let options = AgentOptions {
            fail_health: Some(opts.fail_health.clone()),
            quiet_connect_failures: true,
            ..Default::default()
        };
        let token = shutdown.clone();
        agents.spawn(agent::run_with(config, options, token));
    }
    let mut first_error = None;
    while let Some(joined) = agents.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("agent stopped: {e}");
                first_error.get_or_insert(e);
            }
            Err(e) => tracing::error!("agent task failed: {e}"),
        }
    }
    trimmer.abort();
    let _ = trimmer.await;
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

fn read_records(path: &Path) -> Result<Records, SimulateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SimulateError::Records {
            path: path.to_owned(),
            error: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Records::default()),
        Err(e) => Err(SimulateError::Records {
            path: path.to_owned(),
            error: e.to_string(),
        }),
    }
}

/// Durable before the machines' configs: a machine provisioned but not recorded would be
/// refused (as someone else's) at the next start.
async fn write_records(path: &Path, records: &Records) -> Result<(), SimulateError> {
    let bytes = serde_json::to_vec_pretty(records).expect("records serialize");
    durable::shared()
        .write(path, bytes)
        .await
        .map_err(|error| SimulateError::Write {
            path: path.to_owned(),
            error,
        })
}

/// How often freed heap memory is handed back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    /// The two fleets measured under a limit of 20,000 (the doc of `open_files_needed`): the one
    /// that ran out must be refused, the one that did not must be let through.
    #[test]
    fn open_files_needed_refuses_the_fleet_that_ran_out_and_not_the_one_that_did_not() {
        assert!(open_files_needed(15_000) > 20_000);
        assert!(open_files_needed(10_000) <= 20_000);
    }

    #[test]
    fn machines_get_groups_round_robin_and_padded_names() {
        let g = |s: &str| GroupId::new(s).unwrap();
        let groups = [g("a"), g("b")];
        assert_eq!(group_of(1, &groups), Some(g("a")));
        assert_eq!(group_of(2, &groups), Some(g("b")));
        assert_eq!(group_of(3, &groups), Some(g("a")));
        assert_eq!(group_of(1, &[]), None);
        assert_eq!(machine_name("vm-", 7), "vm-007");
        assert_eq!(machine_name("vm-", 1234), "vm-1234");
    }
}
