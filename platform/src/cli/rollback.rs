//! `fleetcast rollback` and `fleetcast activate`.

use clap::{ArgGroup, Args};
use fleetcast_proto::calls;
use fleetcast_proto::{GroupId, Kind, MachineId, ReleaseId, Target};

use super::release::{plan_all, plan_text};
use super::{confirm, parse_list, print_json, ClientArgs};

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).args(["machine", "group"])))]
pub struct RollbackArgs {
    #[arg(long)]
    pub machine: Option<MachineId>,
    #[arg(long)]
    pub group: Option<GroupId>,
    #[arg(long)]
    pub kind: Kind,
    /// Version to go back to (default: the one before the current one).
    #[arg(long)]
    pub to: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Roll back a group no machine belongs to (refused otherwise: most likely a typo).
    #[arg(long)]
    pub allow_empty: bool,
    /// Print only the rollback release's id (for scripts).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
    /// Show every target machine of the rollback, not a summary.
    #[arg(long)]
    pub list: bool,
    /// Print the published rollback (its plan) as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ActivateArgs {
    pub release: ReleaseId,
    /// Comma-separated machine ids (default, without --groups: every target of the release).
    #[arg(long)]
    pub machines: Option<String>,
    /// Comma-separated group ids: the release's targets in these groups (with --machines:
    /// those too).
    #[arg(long)]
    pub groups: Option<String>,
}

pub async fn rollback(args: RollbackArgs, client: &ClientArgs) -> anyhow::Result<()> {
    let target = match (args.machine, args.group) {
        (Some(m), None) => Target::Machine(m),
        (None, Some(g)) => Target::Group(g),
        _ => return Err(super::usage("pass exactly one of --machine and --group")),
    };
    let what = match &args.to {
        Some(v) => format!("Roll {target} {} back to {v}?", args.kind),
        None => format!("Roll {target} {} back to its previous version?", args.kind),
    };
    if !confirm(&what, args.yes)? {
        anyhow::bail!("not rolled back");
    }
    let admin = client.connect().await?;
    let result = async {
        let (machines, groups) = match &target {
            Target::Machine(m) => (vec![m.clone()], vec![]),
            Target::Group(g) => (vec![], vec![g.clone()]),
        };
        let mut plan = admin
            .call(calls::Rollback {
                target,
                kind: args.kind,
                to: args.to,
                allow_empty: args.allow_empty,
            })
            .await?;
        if args.list && plan.more {
            // The rest of the targets, as the rollback release's plan names them now.
            let ask = calls::ReleasePlan {
                release: plan.plan.release.id.clone(),
                machines,
                groups,
                allow_empty: args.allow_empty,
                after: None,
                limit: None,
            };
            plan = plan_all(&admin, ask, Some(plan)).await?;
        }
        anyhow::Ok(plan)
    }
    .await;
    admin.close().await;
    let plan = result?;
    let release = &plan.plan.release;
    if args.quiet {
        println!("{}", release.id);
        return Ok(());
    }
    if args.json {
        return print_json(&plan);
    }
    print!("{}", plan_text(&plan, &release.groups, args.list));
    println!("published rollback {} (seq {})", release.id, release.seq);
    Ok(())
}

pub async fn activate(args: ActivateArgs, client: &ClientArgs) -> anyhow::Result<()> {
    let machines: Vec<MachineId> = parse_list(&args.machines)?;
    let groups: Vec<GroupId> = parse_list(&args.groups)?;
    let message = client
        .call(calls::Activate {
            release: args.release,
            machines,
            groups,
        })
        .await?;
    println!("{message}");
    Ok(())
}
