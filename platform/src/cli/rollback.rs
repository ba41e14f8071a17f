//! `fleetcast rollback` and `fleetcast activate`.

use clap::{ArgGroup, Args};
use fleetcast_proto::admin::{AdminOp, AdminReply};
use fleetcast_proto::{GroupId, Kind, MachineId, ReleaseId, Target};

use super::release::plan_text;
use super::{confirm, parse_list, ClientArgs};

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
    /// Print only the rollback release's id (for scripts).
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct ActivateArgs {
    pub release: ReleaseId,
    /// Comma-separated machine ids (default: every target of the release).
    #[arg(long)]
    pub machines: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn rollback(args: RollbackArgs) -> anyhow::Result<()> {
    let target = match (args.machine, args.group) {
        (Some(m), None) => Target::Machine(m),
        (None, Some(g)) => Target::Group(g),
        _ => anyhow::bail!("pass exactly one of --machine and --group"),
    };
    let what = match &args.to {
        Some(v) => format!("Roll {target} {} back to {v}?", args.kind),
        None => format!("Roll {target} {} back to its previous version?", args.kind),
    };
    if !confirm(&what, args.yes)? {
        anyhow::bail!("not rolled back");
    }
    let reply = args
        .client
        .request(AdminOp::Rollback {
            target,
            kind: args.kind,
            to: args.to,
        })
        .await;
    let AdminReply::Plan { plan } = reply? else {
        anyhow::bail!("unexpected reply to rollback");
    };
    if args.quiet {
        println!("{}", plan.release.id);
        return Ok(());
    }
    print!("{}", plan_text(&plan, &plan.release.groups));
    println!(
        "published rollback {} (seq {})",
        plan.release.id, plan.release.seq
    );
    Ok(())
}

pub async fn activate(args: ActivateArgs) -> anyhow::Result<()> {
    let machines: Vec<MachineId> = parse_list(&args.machines)?;
    let reply = args
        .client
        .request(AdminOp::Activate {
            release: args.release,
            machines,
        })
        .await;
    let AdminReply::Done { message } = reply? else {
        anyhow::bail!("unexpected reply to activate");
    };
    println!("{message}");
    Ok(())
}
