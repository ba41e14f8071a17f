//! `fleetcast release create|publish|status|list`.

use std::collections::BTreeSet;
use std::fmt::Write;

use clap::Subcommand;
use fleetcast_proto::admin::{
    AdminOp, AdminReply, PublishPlan, ReleaseInfo, ReleaseStatus, StepResult,
};
use fleetcast_proto::{GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId};

use super::{confirm, parse_list, print_json, table, ClientArgs};

#[derive(Subcommand)]
pub enum ReleaseCmd {
    /// Describe a release of an uploaded version; prints its id.
    Create {
        #[arg(long)]
        kind: Kind,
        #[arg(long)]
        version: String,
        /// immediate | window:HH:MM-HH:MM[@+HH:MM] | idle | download-only
        #[arg(long, default_value = "immediate")]
        policy: InstallPolicy,
        #[arg(long)]
        notes: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the plan, confirm, and send the release notices.
    Publish {
        release: ReleaseId,
        /// Comma-separated machine ids.
        #[arg(long)]
        machines: Option<String>,
        /// Comma-separated group ids.
        #[arg(long)]
        groups: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Per-machine results of a release.
    Status {
        release: ReleaseId,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a release live until every machine has finished (progress bars on a terminal,
    /// one line per change otherwise). Exits non-zero if any machine failed.
    Watch {
        release: ReleaseId,
        /// Give up after this many seconds (0 = never).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// All releases.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn run(cmd: ReleaseCmd) -> anyhow::Result<()> {
    match cmd {
        ReleaseCmd::Create {
            kind,
            version,
            policy,
            notes,
            client,
        } => {
            let reply = client
                .request(AdminOp::ReleaseCreate {
                    kind,
                    version,
                    policy,
                    notes,
                })
                .await;
            let AdminReply::Release { release } = reply? else {
                anyhow::bail!("unexpected reply to release create");
            };
            println!("{}", release.id);
            eprintln!(
                "created {} for {} {} (policy {})",
                release.id, release.kind, release.version, release.policy
            );
            Ok(())
        }
        ReleaseCmd::Publish {
            release,
            machines,
            groups,
            yes,
            client,
        } => {
            let machines: Vec<MachineId> = parse_list(&machines)?;
            let groups: Vec<GroupId> = parse_list(&groups)?;
            if machines.is_empty() && groups.is_empty() {
                anyhow::bail!("name the targets with --machines and/or --groups");
            }
            let admin = client.connect().await?;
            let result = async {
                let plan_reply = admin
                    .request(AdminOp::ReleasePlan {
                        release: release.clone(),
                        machines: machines.clone(),
                        groups: groups.clone(),
                    })
                    .await?;
                let AdminReply::Plan { plan } = plan_reply else {
                    anyhow::bail!("unexpected reply to release plan");
                };
                print!("{}", plan_text(&plan, &groups));
                if !confirm("Publish?", yes)? {
                    anyhow::bail!("not published");
                }
                let AdminReply::Plan { plan } = admin
                    .request(AdminOp::ReleasePublish {
                        release,
                        machines,
                        groups,
                    })
                    .await?
                else {
                    anyhow::bail!("unexpected reply to release publish");
                };
                println!(
                    "published {} (seq {}) to {} machine(s)",
                    plan.release.id,
                    plan.release.seq,
                    plan.targets.len()
                );
                Ok(())
            }
            .await;
            admin.close().await;
            result
        }
        ReleaseCmd::Status {
            release,
            json,
            client,
        } => {
            let reply = client.request(AdminOp::ReleaseStatus { release }).await;
            let AdminReply::ReleaseStatus { status } = reply? else {
                anyhow::bail!("unexpected reply to release status");
            };
            if json {
                return print_json(&status);
            }
            print!("{}", status_text(&status));
            Ok(())
        }
        ReleaseCmd::Watch {
            release,
            timeout,
            client,
        } => {
            let admin = client.connect().await?;
            let result = watch(&admin, release, timeout).await;
            admin.close().await;
            result
        }
        ReleaseCmd::List { json, client } => {
            let reply = client.request(AdminOp::ReleaseList).await;
            let AdminReply::Releases { releases } = reply? else {
                anyhow::bail!("unexpected reply to release list");
            };
            if json {
                return print_json(&releases);
            }
            print!("{}", list_text(&releases));
            Ok(())
        }
    }
}

/// Polls the release's status and shows it until every target is in a final phase.
async fn watch(
    admin: &fleetcast_broker::admin::AdminClient,
    release: ReleaseId,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    let started = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let bar_style = |template: &str| {
        ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> ")
    };
    let machines = multi.add(ProgressBar::new(0));
    machines.set_style(bar_style(
        "{prefix:>10} [{bar:40.green}] {pos}/{len} machines  {msg}",
    ));
    machines.set_prefix("finished");
    let bytes = multi.add(ProgressBar::new(0));
    bytes.set_style(bar_style(
        "{prefix:>10} [{bar:40.cyan}] {bytes}/{total_bytes} ({bytes_per_sec})",
    ));
    bytes.set_prefix("download");
    let mut last_line = String::new();
    loop {
        let AdminReply::ReleaseStatus { status } = admin
            .request(AdminOp::ReleaseStatus {
                release: release.clone(),
            })
            .await?
        else {
            anyhow::bail!("unexpected reply to release status");
        };
        let view = watch_view(&status);
        machines.set_length(view.total);
        machines.set_position(view.finished);
        machines.set_message(view.phases.clone());
        bytes.set_length(view.bytes_total);
        bytes.set_position(view.bytes_done);
        let line = format!(
            "{}: {}/{} finished; {}",
            status.release.id, view.finished, view.total, view.phases
        );
        if !tty && line != last_line {
            println!("{line}");
        }
        last_line = line;
        if view.total > 0 && view.finished == view.total {
            machines.finish();
            bytes.finish();
            println!(
                "{}: all {} machine(s) finished: {} succeeded, {} failed",
                status.release.id, view.total, status.progress.succeeded, status.progress.failed
            );
            if status.progress.failed > 0 {
                anyhow::bail!(
                    "{} machine(s) failed; see `fleetcast release status {}`",
                    status.progress.failed,
                    status.release.id
                );
            }
            return Ok(());
        }
        if timeout_secs > 0 && started.elapsed().as_secs() >= timeout_secs {
            anyhow::bail!(
                "release {release} not finished after {timeout_secs} s: {}",
                view.phases
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// What `release watch` shows of one status snapshot.
#[derive(Debug, PartialEq, Eq)]
pub struct WatchView {
    pub total: u64,
    pub finished: u64,
    /// "installed=3 downloading=2"
    pub phases: String,
    /// Bytes verified by all machines, and the bytes they need in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

pub fn watch_view(status: &ReleaseStatus) -> WatchView {
    let size = status.release.artifact.size;
    let mut bytes_done = 0;
    for t in &status.targets {
        bytes_done += match t.phase {
            Phase::Downloading => t.progress.map(|p| p.bytes.min(size)).unwrap_or(0),
            Phase::Pending
            | Phase::Notified
            | Phase::Rejected
            | Phase::Cancelled
            | Phase::Superseded => 0,
            Phase::DownloadFailed => t.progress.map(|p| p.bytes.min(size)).unwrap_or(0),
            _ => size,
        };
    }
    let phases = status
        .progress
        .phases
        .iter()
        .map(|(phase, n)| format!("{phase}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    WatchView {
        total: status.targets.len() as u64,
        finished: status.targets.iter().filter(|t| t.phase.is_final()).count() as u64,
        phases,
        bytes_done,
        bytes_total: size * status.targets.len() as u64,
    }
}

/// What a publish will send, for the confirmation prompt.
pub fn plan_text(plan: &PublishPlan, groups: &[GroupId]) -> String {
    let r = &plan.release;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "release {}: {} {} (artifact {}, {})",
        r.id,
        r.kind,
        r.version,
        r.artifact.id.short(),
        table::bytes(r.artifact.size)
    );
    let _ = writeln!(
        out,
        "policy:  {}{}",
        r.policy,
        if r.rollback { " (rollback)" } else { "" }
    );
    let _ = writeln!(out, "notices (retained):");
    for t in &plan.topics {
        let _ = writeln!(out, "  {t}");
    }
    let reached: BTreeSet<&GroupId> = plan
        .targets
        .iter()
        .filter_map(|(_, g)| g.as_ref())
        .collect();
    for g in groups {
        if !reached.contains(g) {
            let _ = writeln!(out, "note: no machine is reached only through group {g} (no provisioned members yet, or all named directly); machines that join it later still get the notice");
        }
    }
    let _ = writeln!(out, "target machines ({}):", plan.targets.len());
    let rows: Vec<Vec<String>> = plan
        .targets
        .iter()
        .map(|(m, via)| {
            vec![
                m.to_string(),
                via.as_ref()
                    .map(|g| format!("group {g}"))
                    .unwrap_or_else(|| "direct".into()),
            ]
        })
        .collect();
    for line in table::render(&["MACHINE", "VIA"], &rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

fn step(s: &Option<StepResult>) -> String {
    match s {
        None => "-".into(),
        Some(s) => format!(
            "{} {}",
            if s.ok { "ok" } else { "failed" },
            table::time(Some(s.at_ms))
        ),
    }
}

/// The per-machine table and a summary of counts per phase.
pub fn status_text(status: &ReleaseStatus) -> String {
    let r = &status.release;
    let mut out = format!(
        "release {}: {} {} policy {}{} published {}\n",
        r.id,
        r.kind,
        r.version,
        r.policy,
        if r.rollback { " (rollback)" } else { "" },
        table::time(r.published_at_ms)
    );
    let rows: Vec<Vec<String>> = status
        .targets
        .iter()
        .map(|t| {
            let mut phase = t.phase.to_string();
            if let (Phase::Downloading, Some(p)) = (t.phase, t.progress) {
                if let Some(pct) = (p.bytes * 100).checked_div(p.total) {
                    phase = format!("{phase} {pct}%");
                }
            }
            vec![
                t.machine.to_string(),
                t.via
                    .as_ref()
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                phase,
                table::time(t.notified_at_ms),
                step(&t.download),
                step(&t.upgrade),
                t.attempts.to_string(),
                t.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table::render(
        &[
            "MACHINE", "VIA", "PHASE", "NOTIFIED", "DOWNLOAD", "UPGRADE", "ATTEMPTS", "ERROR",
        ],
        &rows,
    ));
    let p = &status.progress;
    let counts: Vec<String> = p
        .phases
        .iter()
        .map(|(phase, n)| format!("{phase}={n}"))
        .collect();
    let _ = writeln!(
        out,
        "{} machine(s): {}; finished {}, succeeded {}, failed {}",
        p.total,
        if counts.is_empty() {
            "none".into()
        } else {
            counts.join(" ")
        },
        p.finished,
        p.succeeded,
        p.failed
    );
    out
}

pub fn list_text(releases: &[ReleaseInfo]) -> String {
    let rows: Vec<Vec<String>> = releases
        .iter()
        .map(|r| {
            let mut targets: Vec<String> = r.machines.iter().map(|m| m.to_string()).collect();
            targets.extend(r.groups.iter().map(|g| format!("group:{g}")));
            vec![
                r.id.to_string(),
                r.kind.to_string(),
                r.version.clone(),
                format!("{}{}", r.policy, if r.rollback { " rollback" } else { "" }),
                table::time(Some(r.created_at_ms)),
                table::time(r.published_at_ms),
                if targets.is_empty() {
                    "-".into()
                } else {
                    targets.join(",")
                },
            ]
        })
        .collect();
    table::render(
        &[
            "RELEASE",
            "KIND",
            "VERSION",
            "POLICY",
            "CREATED",
            "PUBLISHED",
            "TARGETS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::admin::{RolloutProgress, TargetRecord};
    use std::collections::BTreeMap;

    fn release() -> ReleaseInfo {
        let mut r = crate::fixtures::release("r-000001", "2.4.1");
        r.artifact.size = 2048;
        r.created_at_ms = 1_000;
        r.published_at_ms = Some(2_000);
        r.seq = 3;
        r.machines = vec![MachineId::new("vm-001").unwrap()];
        r.groups = vec![GroupId::new("shanghai").unwrap()];
        r
    }

    #[test]
    fn release_status_shows_each_machine_with_results_and_times() {
        let rec = TargetRecord {
            release: release().id,
            machine: MachineId::new("vm-001").unwrap(),
            kind: Kind::new("app").unwrap(),
            version: "2.4.1".into(),
            via: Some(GroupId::new("shanghai").unwrap()),
            phase: Phase::Installed,
            phase_at_ms: 5_000,
            notified_at_ms: Some(3_000),
            download: Some(StepResult {
                phase: Phase::Downloaded,
                ok: true,
                at_ms: 4_000,
                error: None,
            }),
            upgrade: Some(StepResult {
                phase: Phase::Installed,
                ok: true,
                at_ms: 5_000,
                error: None,
            }),
            error: None,
            attempts: 1,
            progress: None,
            updated_at_ms: 5_000,
        };
        let status = ReleaseStatus {
            release: release(),
            targets: vec![rec],
            progress: RolloutProgress {
                release: release().id,
                kind: Kind::new("app").unwrap(),
                version: "2.4.1".into(),
                total: 1,
                phases: BTreeMap::from([(Phase::Installed, 1)]),
                finished: 1,
                succeeded: 1,
                failed: 0,
                updated_at_ms: 0,
            },
        };
        let expected = "\
release r-000001: app 2.4.1 policy immediate published 1970-01-01 00:00:02
MACHINE  VIA       PHASE      NOTIFIED             DOWNLOAD                0UPGRADE                 ATTEMPTS  ERROR
vm-001   shanghai  installed  1970-01-01 00:00:03  ok 1970-01-01 00:00:04  ok 1970-01-01 00:00:05  1
1 machine(s): installed=1; finished 1, succeeded 1, failed 0
"
        .replace("0UPGRADE", "UPGRADE");
        assert_eq!(status_text(&status), expected);
    }

    #[test]
    fn watch_counts_finished_machines_and_verified_bytes() {
        let target = |m: &str, phase: Phase, bytes: Option<u64>| TargetRecord {
            release: release().id,
            machine: MachineId::new(m).unwrap(),
            kind: Kind::new("app").unwrap(),
            version: "2.4.1".into(),
            via: None,
            phase,
            phase_at_ms: 0,
            notified_at_ms: None,
            download: None,
            upgrade: None,
            error: None,
            attempts: 1,
            progress: bytes.map(|b| fleetcast_proto::status::Progress {
                bytes: b,
                total: 2048,
            }),
            updated_at_ms: 0,
        };
        let status = ReleaseStatus {
            release: release(),
            targets: vec![
                target("vm-001", Phase::Installed, None),
                target("vm-002", Phase::Downloading, Some(1024)),
                target("vm-003", Phase::Pending, None),
            ],
            progress: RolloutProgress {
                release: release().id,
                kind: Kind::new("app").unwrap(),
                version: "2.4.1".into(),
                total: 3,
                phases: BTreeMap::from([
                    (Phase::Pending, 1),
                    (Phase::Downloading, 1),
                    (Phase::Installed, 1),
                ]),
                finished: 1,
                succeeded: 1,
                failed: 0,
                updated_at_ms: 0,
            },
        };
        let view = watch_view(&status);
        assert_eq!(
            view,
            WatchView {
                total: 3,
                finished: 1,
                phases: "pending=1 downloading=1 installed=1".into(),
                bytes_done: 2048 + 1024,
                bytes_total: 3 * 2048,
            }
        );
    }

    #[test]
    fn the_plan_lists_topics_targets_and_groups_without_members() {
        let plan = PublishPlan {
            release: release(),
            topics: vec![
                "fleet/machines/vm-001/release/app".into(),
                "fleet/groups/empty/release/app".into(),
            ],
            targets: vec![(MachineId::new("vm-001").unwrap(), None)],
        };
        let text = plan_text(&plan, &[GroupId::new("empty").unwrap()]);
        assert!(
            text.contains("  fleet/groups/empty/release/app\n"),
            "{text}"
        );
        assert!(text.contains("only through group empty"), "{text}");
        assert!(text.contains("  vm-001   direct\n"), "{text}");
    }
}
