//! `fleetcast machines`, `fleetcast machine provision` and `revoke` (`groups`: [`super::regroup`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetcast_proto::admin::{
    MachineFilter, MachineInfo, MachineSpec, ProvisionedMachine, MAX_PROVISION_BATCH,
};
use fleetcast_proto::auth::{PlatformPublicKey, Secret};
use fleetcast_proto::calls;
use fleetcast_proto::{GroupId, Kind, MachineId, Phase};
use serde::Serialize;

use super::{parse_list, print_json, table, ClientArgs};

#[derive(Args)]
pub struct MachinesArgs {
    /// Only machines provisioned in this group.
    #[arg(long)]
    pub group: Option<GroupId>,
    /// Only machines that report this version type, or that a release of it reached.
    #[arg(long)]
    pub kind: Option<Kind>,
    /// Only machines with this version installed (of --kind; without --kind, of any kind).
    #[arg(long, value_name = "VERSION")]
    pub version: Option<String>,
    /// Only machines online now.
    #[arg(long, conflicts_with = "offline")]
    pub online: bool,
    /// Only machines not online now.
    #[arg(long)]
    pub offline: bool,
    /// Only machines whose current release of --kind is in this phase in the platform's
    /// records (pending, notified, deferred, downloading, downloaded, download_failed,
    /// installing, installed, install_failed, rolled_back, rejected, cancelled, superseded).
    #[arg(long, requires = "kind")]
    pub phase: Option<Phase>,
    #[arg(long)]
    pub json: bool,
}

impl MachinesArgs {
    pub fn filter(&self) -> MachineFilter {
        MachineFilter {
            group: self.group.clone(),
            kind: self.kind.clone(),
            version: self.version.clone(),
            online: match (self.online, self.offline) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            phase: self.phase,
        }
    }
}

#[derive(Subcommand)]
pub enum MachineCmd {
    /// Register a machine and print its TOML config to stdout; or, with --from-file, register
    /// every machine of a list in batches (one round trip per 1,000) and write one config per
    /// machine into --out-dir. A machine that exists already is refused unless --rotate.
    Provision {
        #[arg(required_unless_present = "from_file", conflicts_with = "from_file")]
        machine: Option<MachineId>,
        /// Comma-separated group ids.
        #[arg(long, conflicts_with = "from_file")]
        groups: Option<String>,
        /// A list of machines: one per line, `machine[,group;group...]`; `#` starts a comment.
        #[arg(long, requires = "out_dir")]
        from_file: Option<PathBuf>,
        /// Write each config as `DIR/<machine>.toml` (mode 0600: each holds a machine's key)
        /// instead of printing it; needed with --from-file.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// `data_dir` written into the config(s) [default: ./fleetcast-device-MACHINE].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Provision machines that exist already: each gets a new secret (and the --groups are
        /// added); the old secret stops working at once and a live session on the embedded
        /// broker is closed. Install the new config on the machine.
        #[arg(long)]
        rotate: bool,
    },
    /// Change the groups of machines, keeping their secrets: --add first, then --remove. Each
    /// one's live session on the embedded broker is closed, so the subscriptions the old
    /// groups granted end, and its agent is told its new groups and follows them: its config
    /// needs no edit (docs/operations.md, "Moving a machine to another group"). Several
    /// machines (named, --members-of, --from-file) are shown and confirmed first, then changed
    /// in requests of 1,000, each all or nothing.
    Groups {
        /// Machine ids.
        #[arg(required_unless_present_any = ["members_of", "from_file"])]
        machines: Vec<MachineId>,
        /// Every machine in this group now (read before the first change).
        #[arg(long, value_name = "GROUP")]
        members_of: Option<GroupId>,
        /// A file of machine ids, one per line; `#` starts a comment.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Comma-separated groups to join.
        #[arg(long, required_unless_present = "remove")]
        add: Option<String>,
        /// Comma-separated groups to leave (each must be one every machine is in).
        #[arg(long)]
        remove: Option<String>,
        /// Do not ask for confirmation (several machines).
        #[arg(long)]
        yes: bool,
    },
    /// Revoke a machine: its secret stops working at once, and on the embedded broker its live
    /// session is closed now (an external broker drops it at its next connect).
    Revoke { machine: MachineId },
}

/// The machines passing the filters, fetched a page at a time (the platform filters, so a
/// narrow question about a large fleet is a short answer).
pub async fn list(args: MachinesArgs, client: &ClientArgs) -> anyhow::Result<()> {
    let mut machines = query(client, args.filter()).await?;
    machines.sort_by(|a, b| a.id.cmp(&b.id));
    if args.json {
        return print_json(&machines);
    }
    print!("{}", machines_text(&machines));
    Ok(())
}

/// Every machine passing `filter`, a page at a time (`machine_query`).
pub async fn query(client: &ClientArgs, filter: MachineFilter) -> anyhow::Result<Vec<MachineInfo>> {
    super::inventory::fetch_all(
        client,
        None,
        |after, limit| calls::MachineQuery {
            filter: filter.clone(),
            after,
            limit,
        },
        |page| page,
    )
    .await
}

pub async fn run(cmd: MachineCmd, client: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        MachineCmd::Provision {
            from_file: Some(file),
            out_dir: Some(out_dir),
            data_dir,
            rotate,
            ..
        } => provision_from_file(&file, &out_dir, data_dir, rotate, client).await,
        MachineCmd::Provision {
            machine: Some(machine),
            groups,
            data_dir,
            rotate,
            out_dir,
            ..
        } => {
            let groups: Vec<GroupId> = parse_list(&groups)?;
            let machine = client
                .call(calls::MachineProvision {
                    machine,
                    groups,
                    rotate,
                })
                .await?;
            let data_dir = data_dir.unwrap_or_else(|| {
                PathBuf::from(format!("./fleetcast-device-{}", machine.machine))
            });
            let config = config_toml(&machine, &client.broker()?, &data_dir);
            match out_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    let path = dir.join(format!("{}.toml", machine.machine));
                    crate::keys::write_atomic(&path, config.as_bytes(), 0o600).with_context(
                        || {
                            format!(
                                "{} is provisioned but its config could not be written: its \
                                 secret is lost, provision it again with --rotate",
                                machine.machine
                            )
                        },
                    )?;
                    println!(
                        "provisioned {}; config in {}",
                        machine.machine,
                        path.display()
                    );
                }
                None => print!("{config}"),
            }
            Ok(())
        }
        MachineCmd::Provision { .. } => Err(super::usage(
            "name a machine, or pass --from-file FILE --out-dir DIR",
        )),
        MachineCmd::Groups {
            machines,
            members_of,
            from_file,
            add,
            remove,
            yes,
        } => {
            let selection = super::regroup::Selection {
                machines,
                members_of,
                from_file,
            };
            super::regroup::run(
                selection,
                parse_list(&add)?,
                parse_list(&remove)?,
                yes,
                client,
            )
            .await
        }
        MachineCmd::Revoke { machine } => {
            let message = client.call(calls::MachineRevoke { machine }).await?;
            println!("{message}");
            Ok(())
        }
    }
}

/// Parses a machine list: `machine[,group;group...]` per line, `#` comments, blank lines.
pub fn parse_machine_list(text: &str) -> anyhow::Result<Vec<MachineSpec>> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (line, n) in list_lines(text) {
        let at = || format!("line {n}");
        let (machine, groups) = line.split_once(',').unwrap_or((line, ""));
        // A spreadsheet's header row would otherwise become a machine (`id` in group
        // `groups`), which can be revoked but never removed.
        anyhow::ensure!(
            !(out.is_empty() && is_header(machine, groups)),
            "{}: {line:?} looks like a header row, not a machine: remove it or make it a \
             comment (start it with #)",
            at()
        );
        let machine = MachineId::new(machine.trim()).with_context(at)?;
        let groups = groups
            .split([';', ','])
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(GroupId::new)
            .collect::<Result<Vec<_>, _>>()
            .with_context(at)?;
        anyhow::ensure!(
            seen.insert(machine.clone()),
            "{}: {machine} is listed twice",
            at()
        );
        out.push(MachineSpec { machine, groups });
    }
    Ok(out)
}

/// Whether the first line of a machine list names columns rather than a machine.
fn is_header(machine: &str, groups: &str) -> bool {
    let words = [
        "id",
        "machine",
        "machine_id",
        "machine-id",
        "machines",
        "name",
    ];
    words.contains(&machine.trim().to_ascii_lowercase().as_str())
        && (groups.is_empty()
            || groups.trim().eq_ignore_ascii_case("groups")
            || groups.trim().eq_ignore_ascii_case("group"))
}

/// The lines of a list file that say something, with their numbers (from 1): what precedes
/// a `#`, trimmed; blank lines are skipped.
pub fn list_lines(text: &str) -> impl Iterator<Item = (&str, usize)> {
    text.lines().enumerate().filter_map(|(n, line)| {
        let line = line.split('#').next().unwrap_or("").trim();
        (!line.is_empty()).then_some((line, n + 1))
    })
}

async fn provision_from_file(
    file: &std::path::Path,
    out_dir: &std::path::Path,
    data_dir: Option<PathBuf>,
    rotate: bool,
    client: &ClientArgs,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let specs = parse_machine_list(&text).with_context(|| format!("{}", file.display()))?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let broker = client.broker()?;
    let admin = client.connect().await?;
    let (mut provisioned, mut written) = (0, 0);
    let result: anyhow::Result<()> = async {
        // One batch is applied whole or not at all; a longer list is checked whole first, so a
        // refusal (an id provisioned already, a reserved id) leaves every batch unapplied.
        if specs.len() > MAX_PROVISION_BATCH {
            for batch in specs.chunks(MAX_PROVISION_BATCH) {
                admin
                    .call(calls::MachineProvisionCheck {
                        machines: batch.to_vec(),
                        rotate,
                    })
                    .await
                    .with_context(|| {
                        format!(
                            "{} was checked before provisioning: nothing was provisioned",
                            file.display()
                        )
                    })?;
            }
        }
        for batch in specs.chunks(MAX_PROVISION_BATCH) {
            let machines = admin
                .call(calls::MachineProvisionBatch {
                    machines: batch.to_vec(),
                    rotate,
                })
                .await?;
            provisioned += machines.len();
            for m in machines {
                let dir = data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("./fleetcast-device-{}", m.machine)));
                let path = out_dir.join(format!("{}.toml", m.machine));
                crate::keys::write_atomic(&path, config_toml(&m, &broker, &dir).as_bytes(), 0o600)?;
                written += 1;
            }
        }
        Ok(())
    }
    .await;
    admin.close().await;
    if let Err(e) = result {
        if provisioned == 0 {
            return Err(e);
        }
        return Err(e.context(partly_provisioned(
            &specs,
            provisioned,
            written,
            out_dir,
            rotate,
        )));
    }
    println!(
        "provisioned {written} machine(s); configs in {}",
        out_dir.display()
    );
    Ok(())
}

/// What a `--from-file` run that failed after its first batch was applied did, and how to go
/// on: the machines of `specs` before `provisioned` are provisioned, the configs of those
/// before `written` are in `out_dir`.
fn partly_provisioned(
    specs: &[MachineSpec],
    provisioned: usize,
    written: usize,
    out_dir: &std::path::Path,
    rotate: bool,
) -> String {
    let total = specs.len();
    let mut text = format!(
        "provisioned {provisioned} of {total} machine(s) before this error; the configs of {written} are in {}",
        out_dir.display()
    );
    if written < provisioned {
        text.push_str(&format!(
            "; {} machine(s) from {} on were provisioned but their configs not written: their secrets are lost, provision them again with --rotate",
            provisioned - written,
            specs[written].machine
        ));
    }
    if provisioned < total {
        let again = if rotate {
            "rerun the same command"
        } else {
            "rerun with a file of the remaining lines only, or rerun the whole file with --rotate (which gives the machines provisioned already new secrets)"
        };
        text.push_str(&format!(
            "; the {} from {} on were not provisioned (if the error was a timeout, `fleetcast machines` shows whether the last batch was): {again}",
            total - provisioned,
            specs[provisioned].machine
        ));
    }
    text
}

/// The device's `MachineConfig` keys.
#[derive(Serialize)]
struct MachineConfigToml<'a> {
    machine: &'a MachineId,
    groups: &'a [GroupId],
    secret: &'a Secret,
    platform_key: &'a PlatformPublicKey,
    #[serde(skip_serializing_if = "is_zero")]
    platform_key_gen: u32,
    topic_prefix: &'a str,
    broker: &'a str,
    data_dir: &'a PathBuf,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The machine's config file, as the device agent reads it.
pub fn config_toml(p: &ProvisionedMachine, broker: &str, data_dir: &PathBuf) -> String {
    let cfg = MachineConfigToml {
        machine: &p.machine,
        groups: &p.groups,
        secret: &p.secret,
        platform_key: &p.platform_key,
        platform_key_gen: p.platform_key_gen,
        topic_prefix: &p.topic_prefix,
        broker,
        data_dir,
    };
    format!(
        "# fleetcast machine config for {}. Keep it secret: it holds the machine's key.\n{}",
        p.machine,
        toml::to_string(&cfg).expect("config serializes")
    )
}

pub fn machines_text(machines: &[MachineInfo]) -> String {
    let rows: Vec<Vec<String>> = machines
        .iter()
        .map(|m| {
            let versions: Vec<String> = m
                .kinds
                .iter()
                .map(|(k, s)| format!("{k}={}", s.version.as_deref().unwrap_or("-")))
                .collect();
            let groups: Vec<String> = m.groups.iter().map(|g| g.to_string()).collect();
            vec![
                m.id.to_string(),
                // A revoked machine can never connect again: said here, not only in --json.
                match (m.revoked_at_ms, m.online) {
                    (Some(_), _) => "revoked",
                    (None, true) => "yes",
                    (None, false) => "no",
                }
                .into(),
                table::time(m.last_seen_ms),
                if groups.is_empty() {
                    "-".into()
                } else {
                    groups.join(",")
                },
                if versions.is_empty() {
                    "-".into()
                } else {
                    versions.join(" ")
                },
                if m.busy { "busy" } else { "idle" }.into(),
                m.key_gen.to_string(),
            ]
        })
        .collect();
    table::render(
        &[
            "MACHINE",
            "ONLINE",
            "LAST SEEN",
            "GROUPS",
            "VERSIONS",
            "BUSY",
            "KEY GEN",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::status::KindState;

    #[test]
    fn the_machine_table_shows_versions_per_kind() {
        let mut m = MachineInfo {
            id: MachineId::new("vm-001").unwrap(),
            groups: vec![GroupId::new("shanghai").unwrap()],
            provisioned_at_ms: 0,
            online: true,
            last_seen_ms: Some(3_000),
            agent_version: None,
            busy: false,
            kinds: Default::default(),
            revoked_at_ms: None,
            key_gen: 1,
        };
        m.kinds.insert(
            Kind::new("app").unwrap(),
            KindState {
                version: Some("2.4.1".into()),
                ..Default::default()
            },
        );
        m.kinds.insert(
            Kind::new("firmware").unwrap(),
            KindState {
                version: Some("1.0".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            machines_text(std::slice::from_ref(&m)),
            "MACHINE  ONLINE  LAST SEEN            GROUPS    VERSIONS                BUSY  KEY GEN\n\
             vm-001   yes     1970-01-01 00:00:03  shanghai  app=2.4.1 firmware=1.0  idle  1\n"
        );
        m.online = false;
        m.revoked_at_ms = Some(4000);
        let row = machines_text(&[m]).lines().nth(1).unwrap().to_owned();
        assert!(row.starts_with("vm-001   revoked  "), "{row}");
    }

    #[test]
    fn a_list_failing_after_its_first_batch_says_what_was_provisioned_and_how_to_go_on() {
        let specs: Vec<MachineSpec> = (1..=2500)
            .map(|i| MachineSpec {
                machine: MachineId::new(format!("vm-{i:04}")).unwrap(),
                groups: vec![],
            })
            .collect();
        let dir = std::path::Path::new("/tmp/configs");
        let text = partly_provisioned(&specs, 2000, 2000, dir, false);
        for want in [
            "provisioned 2000 of 2500 machine(s) before this error",
            "the configs of 2000 are in /tmp/configs",
            "the 500 from vm-2001 on were not provisioned",
            "--rotate",
        ] {
            assert!(text.contains(want), "{want} missing: {text}");
        }
        let lost = partly_provisioned(&specs, 1000, 999, dir, true);
        assert!(
            lost.contains(
                "1 machine(s) from vm-1000 on were provisioned but their configs not written"
            ),
            "{lost}"
        );
        assert!(lost.contains("rerun the same command"), "{lost}");
    }

    fn machines_args(argv: &[&str]) -> Result<MachinesArgs, clap::Error> {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(["fleetcast", "machines"].iter().chain(argv))?;
        match cli.command {
            crate::cli::Command::Machines(args) => Ok(args),
            _ => panic!("not machines"),
        }
    }

    #[test]
    fn machine_filters_combine_and_a_phase_needs_a_kind() {
        let args = machines_args(&[
            "--group",
            "shanghai",
            "--kind",
            "app",
            "--version",
            "2.4.1",
            "--offline",
            "--phase",
            "install_failed",
        ])
        .unwrap();
        assert_eq!(
            args.filter(),
            MachineFilter {
                group: Some(GroupId::new("shanghai").unwrap()),
                kind: Some(Kind::new("app").unwrap()),
                version: Some("2.4.1".into()),
                online: Some(false),
                phase: Some(Phase::InstallFailed),
            }
        );
        assert_eq!(
            machines_args(&[]).unwrap().filter(),
            MachineFilter::default()
        );
        assert_eq!(
            machines_args(&["--online"]).unwrap().filter().online,
            Some(true)
        );
        for bad in [
            &["--phase", "installed"][..],
            &["--online", "--offline"],
            &["--kind", "app", "--phase", "finished"],
            &["--group", "a/b"],
        ] {
            assert!(machines_args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_machine_list_reads_ids_and_groups_and_names_the_bad_line() {
        let specs = parse_machine_list(
            "# shop list\nvm-001,shanghai;north\n\nvm-002\nvm-003, beijing # new\n",
        )
        .unwrap();
        let got: Vec<(String, Vec<String>)> = specs
            .iter()
            .map(|s| {
                (
                    s.machine.to_string(),
                    s.groups.iter().map(|g| g.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("vm-001".into(), vec!["shanghai".into(), "north".into()]),
                ("vm-002".into(), vec![]),
                ("vm-003".into(), vec!["beijing".into()]),
            ]
        );
        let err = parse_machine_list("vm-1\nvm/2\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let err = parse_machine_list("vm-1\nvm-1,g\n").unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    /// A header row (as a spreadsheet exports it) was provisioned as machine `id` in group
    /// `groups`; it is refused, naming the line, and a commented one is fine.
    #[test]
    fn a_machine_lists_header_row_is_refused_not_provisioned() {
        for header in ["id,groups", "Machine,Groups", "machine_id", "# c\nid,group"] {
            let err = parse_machine_list(&format!("{header}\nvm-1,g\n")).unwrap_err();
            assert!(err.to_string().contains("header row"), "{header}: {err}");
        }
        let specs = parse_machine_list("# id,groups\nvm-1,g\n").unwrap();
        assert_eq!(specs.len(), 1);
        // Only the first line can be a header: a machine may be called `name` further down.
        assert_eq!(parse_machine_list("vm-1\nname,g\n").unwrap().len(), 2);
    }

    #[test]
    fn the_provisioned_config_has_the_device_keys() {
        let p = ProvisionedMachine {
            machine: MachineId::new("vm-001").unwrap(),
            groups: vec![GroupId::new("g").unwrap()],
            secret: Secret::from_bytes([1; 32]),
            platform_key: fleetcast_proto::auth::PlatformKey::from_seed([2; 32]).public(),
            platform_key_gen: 3,
            topic_prefix: "fleet".into(),
        };
        let text = config_toml(&p, "mqtt://127.0.0.1:1883", &PathBuf::from("/var/lib/vm"));
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["machine"].as_str(), Some("vm-001"));
        assert_eq!(v["groups"][0].as_str(), Some("g"));
        assert_eq!(v["secret"].as_str(), Some(p.secret.to_hex().as_str()));
        assert_eq!(
            v["platform_key"].as_str(),
            Some(p.platform_key.to_hex().as_str())
        );
        assert_eq!(v["topic_prefix"].as_str(), Some("fleet"));
        assert_eq!(v["platform_key_gen"].as_integer(), Some(3));
        assert_eq!(v["broker"].as_str(), Some("mqtt://127.0.0.1:1883"));
        assert_eq!(v["data_dir"].as_str(), Some("/var/lib/vm"));
        // The device agent reads exactly this file: the two sides cannot drift apart.
        let loaded: fleetcast_device::config::MachineConfig = toml::from_str(&text).unwrap();
        assert_eq!(
            loaded,
            fleetcast_device::config::MachineConfig::from_provisioned(
                &p,
                "mqtt://127.0.0.1:1883",
                PathBuf::from("/var/lib/vm")
            )
        );
    }
}
