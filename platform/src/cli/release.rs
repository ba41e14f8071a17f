//! `fleetcast release create|publish|retry|status|watch|list` (`remove` is in
//! [`super::removal`]).

use std::collections::BTreeMap;
use std::fmt::Write;

use clap::Subcommand;
use fleetcast_broker::admin::{AdminClient, AdminError};
use fleetcast_proto::admin::{
    PlanReport, ReleaseInfo, ReleaseStatus, RolloutProgress, StepResult, MAX_PLAN_PAGE,
    RELEASE_MACHINES_SHOWN,
};
use fleetcast_proto::calls;
use fleetcast_proto::rollout::{parse_share, RolloutState, WavePlan};
use fleetcast_proto::{GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId};

use super::{confirm, parse_list, print_json, table, usage, ClientArgs, Exit};

#[derive(Subcommand)]
pub enum ReleaseCmd {
    /// Describe a release of an uploaded version; prints its id.
    Create {
        #[arg(long)]
        kind: Kind,
        #[arg(long)]
        version: String,
        /// `immediate` | `window:HH:MM-HH:MM[@+HH:MM]` | `idle` | `download-only`
        #[arg(long, default_value = "immediate")]
        policy: InstallPolicy,
        #[arg(long)]
        notes: Option<String>,
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
        /// Publish to groups no machine belongs to yet (refused otherwise: most likely a typo).
        /// Machines that join such a group later get its retained notice.
        #[arg(long)]
        allow_empty: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Show every target machine and topic in the plan, not a summary.
        #[arg(long)]
        list: bool,
        /// Print what was published as JSON on stdout (the plan shown before confirming goes
        /// to stderr).
        #[arg(long)]
        json: bool,
        /// Publish in waves: cumulative shares of the targets, e.g. `1%,10%,50%,100%` (the last
        /// wave always takes everyone left). Which machines go first is fixed by a hash of the
        /// release and machine ids. Follow and steer it with `fleetcast rollout`.
        #[arg(long)]
        waves: Option<String>,
        /// With --waves: the next wave starts once this share of the machines notified so far
        /// installed the release.
        #[arg(long, default_value = "95%", requires = "waves")]
        success_threshold: String,
        /// With --waves: the rollout pauses by itself once more than this share of the machines
        /// notified so far failed.
        #[arg(long, default_value = "5%", requires = "waves")]
        failure_threshold: String,
        /// With --waves: a wave that has not succeeded after this long pauses the rollout
        /// (`90s`, `30m`, `2h`; `0` = wait for ever).
        #[arg(long, default_value = "0", requires = "waves")]
        wave_timeout: String,
    },
    /// Send a release again to machines where it failed (or to named targets): each starts a
    /// new round.
    Retry {
        release: ReleaseId,
        /// Comma-separated machine ids (targets of the release).
        #[arg(long, required_unless_present_any = ["failed", "groups"])]
        machines: Option<String>,
        /// Comma-separated group ids: the release's targets in these groups (with --failed:
        /// only the failed ones among them).
        #[arg(long)]
        groups: Option<String>,
        /// Every target whose last result is a failure.
        #[arg(long)]
        failed: bool,
        #[arg(long)]
        json: bool,
        /// Accepted for scripts that pass --yes to every change; retry asks nothing.
        #[arg(long, hide = true)]
        yes: bool,
    },
    /// Per-machine results of a release (fetched a page at a time), and the counts per phase.
    Status {
        release: ReleaseId,
        #[arg(long)]
        json: bool,
        /// Only the release and its counts, without the per-machine table (one short reply
        /// however many machines the release reached).
        #[arg(long)]
        summary: bool,
    },
    /// Follow a release live until every machine has finished, and a staged rollout of it
    /// has completed or was cancelled (progress bars on a terminal, one line per change
    /// otherwise). Exit status 3 if any machine failed, 4 after --timeout, 5 if the staged
    /// rollout is paused.
    Watch {
        release: ReleaseId,
        /// Give up after this many seconds (0 = never): exit status 4.
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
    /// All releases.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete releases no machine needs any more, with their per-machine records, to keep the
    /// platform's database small (their events stay). Shows what goes and what is kept (with
    /// the reason) and asks first.
    Remove {
        /// Release ids. Refused, nothing removed, if any of them is still needed.
        #[arg(
            required_unless_present = "keep_latest",
            conflicts_with = "keep_latest"
        )]
        releases: Vec<ReleaseId>,
        /// Instead of naming them: every release but the newest N of each version type, except
        /// those still needed (listed with the reason, and kept).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        keep_latest: Option<u32>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(cmd: ReleaseCmd, client: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        ReleaseCmd::Create {
            kind,
            version,
            policy,
            notes,
        } => {
            let release = client
                .call(calls::ReleaseCreate {
                    kind,
                    version,
                    policy,
                    notes,
                })
                .await?;
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
            allow_empty,
            yes,
            list,
            json,
            waves,
            success_threshold,
            failure_threshold,
            wave_timeout,
        } => {
            let machines: Vec<MachineId> = parse_list(&machines)?;
            let groups: Vec<GroupId> = parse_list(&groups)?;
            let waves = waves
                .map(|w| {
                    wave_plan(&w, &success_threshold, &failure_threshold, &wave_timeout)
                        .map_err(|e| usage(e.to_string()))
                })
                .transpose()?;
            if machines.is_empty() && groups.is_empty() {
                return Err(usage("name the targets with --machines and/or --groups"));
            }
            let admin = client.connect().await?;
            let result = async {
                if waves.is_none() {
                    // Refused before the plan and the question, not after the answer (the
                    // platform checks it again when it publishes). No rollout: a refusal here.
                    if let Ok(r) = admin
                        .call(calls::RolloutStatus {
                            release: release.clone(),
                        })
                        .await
                    {
                        crate::domain::release::may_publish_at_once(
                            &release,
                            Some(&r.rollout.state),
                        )?;
                    }
                }
                let ask = calls::ReleasePlan {
                    release: release.clone(),
                    machines: machines.clone(),
                    groups: groups.clone(),
                    allow_empty,
                    after: None,
                    limit: Some(MAX_PLAN_PAGE),
                };
                // The summary needs the first page only (it has every count); --list, all.
                let plan = if list {
                    plan_all(&admin, ask, None).await?
                } else {
                    admin.call(ask).await?
                };
                let text = match &waves {
                    None => plan_text(&plan, &groups, list),
                    Some(w) => {
                        staged_plan_text(&plan, &groups, list, w)
                            + &super::rollout::waves_text(w, plan.target_count())
                    }
                };
                if json {
                    eprint!("{text}");
                } else {
                    print!("{text}");
                }
                if !confirm("Publish?", yes)? {
                    anyhow::bail!("not published");
                }
                let plan = admin
                    .call(calls::ReleasePublish {
                        release,
                        machines,
                        groups,
                        allow_empty,
                        waves,
                    })
                    .await?;
                if json {
                    return print_json(&plan);
                }
                let r = &plan.plan.release;
                if let Some(rollout) = &plan.plan.rollout {
                    println!(
                        "published {} (seq {}) in {} waves: wave 1 sent to {} of {} machine(s); follow it with `fleetcast rollout status {}`",
                        r.id,
                        r.seq,
                        rollout.plan.waves_bp.len(),
                        plan.topic_count(),
                        plan.target_count(),
                        r.id
                    );
                    return Ok(());
                }
                println!(
                    "published {} (seq {}) to {} machine(s)",
                    r.id,
                    r.seq,
                    plan.target_count()
                );
                Ok(())
            }
            .await;
            admin.close().await;
            result
        }
        ReleaseCmd::Retry {
            release,
            machines,
            groups,
            failed,
            json,
            yes: _,
        } => {
            let machines: Vec<MachineId> = parse_list(&machines)?;
            let groups: Vec<GroupId> = parse_list(&groups)?;
            let plan = client
                .call(calls::ReleaseRetry {
                    release,
                    machines,
                    failed,
                    groups,
                })
                .await?;
            if json {
                return print_json(&plan);
            }
            println!("{}", retry_text(&plan));
            Ok(())
        }
        ReleaseCmd::Status {
            release,
            json,
            summary,
        } => {
            let status = if summary {
                client.call(summary_call(release)).await?
            } else {
                let admin = client.connect().await?;
                let status = status_all(&admin, release, None).await;
                admin.close().await;
                status?
            };
            if json {
                return print_json(&status);
            }
            if summary {
                print!("{}", summary_text(&status));
            } else {
                print!("{}", status_text(&status));
            }
            Ok(())
        }
        ReleaseCmd::Watch { release, timeout } => {
            let admin = client.connect().await?;
            let result = watch(&admin, release, timeout).await;
            admin.close().await;
            result
        }
        ReleaseCmd::Remove {
            releases,
            keep_latest,
            yes,
        } => {
            let admin = client.connect().await?;
            let result = super::removal::remove(&admin, releases, keep_latest, yes).await;
            admin.close().await;
            result
        }
        ReleaseCmd::List { json } => {
            let releases = super::inventory::fetch_all(
                client,
                None,
                |after, limit| calls::ReleaseQuery { after, limit },
                |page| page,
            )
            .await?;
            if json {
                return print_json(&releases);
            }
            print!("{}", list_text(&releases));
            Ok(())
        }
    }
}

/// The wave plan from the command line's shares and timeout.
pub fn wave_plan(
    waves: &str,
    success: &str,
    failure: &str,
    timeout: &str,
) -> anyhow::Result<WavePlan> {
    let waves_bp = waves
        .split(',')
        .map(parse_share)
        .collect::<Result<Vec<u32>, _>>()?;
    let timeout_ms = parse_duration_ms(timeout)?;
    Ok(WavePlan::new(
        waves_bp,
        parse_share(success)?,
        parse_share(failure)?,
        timeout_ms,
    )?)
}

/// `90s`, `30m`, `2h`, `1d`, or a number of seconds; `0` is none.
pub fn parse_duration_ms(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid duration {text:?}: expected e.g. 90s, 30m, 2h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => anyhow::bail!("invalid duration {text:?}: expected e.g. 90s, 30m, 2h"),
    };
    Ok(secs * 1000)
}

/// The release's aggregates without any target record.
fn summary_call(release: ReleaseId) -> calls::ReleaseStatus {
    calls::ReleaseStatus {
        release,
        after: None,
        limit: Some(0),
    }
}

/// The release's status with every target record, asked for in pages of `limit` (None: the
/// platform's default): one status as if the platform had sent it whole (the aggregates are
/// those of the last page, the newest).
pub async fn status_all(
    admin: &fleetcast_broker::admin::AdminClient,
    release: ReleaseId,
    limit: Option<u32>,
) -> Result<ReleaseStatus, fleetcast_broker::admin::AdminError> {
    let mut targets = Vec::new();
    let mut after = None;
    loop {
        let mut page = admin
            .call(calls::ReleaseStatus {
                release: release.clone(),
                after: after.take(),
                limit,
            })
            .await?;
        targets.append(&mut page.targets);
        // A page that names no cursor cannot be continued, whatever it says.
        match page.next.take() {
            Some(next) if page.more => after = Some(next),
            _ => {
                page.targets = targets;
                page.more = false;
                return Ok(page);
            }
        }
    }
}

/// Polls the release's status and shows it until every target is in a final phase and, for
/// a staged rollout, until the rollout is no longer running ([`watch_next`]).
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
    // A bar of length 0 is drawn full ("0/0"): until there is something to count, each says
    // what it waits for instead.
    let (counting_machines, counting_bytes) = (
        bar_style("{prefix:>10} [{bar:40.green}] {pos}/{len} machines  {msg}"),
        bar_style("{prefix:>10} [{bar:40.cyan}] {bytes}/{total_bytes} ({bytes_per_sec})"),
    );
    let waiting = || bar_style("{prefix:>10} {msg}");
    let machines = multi.add(ProgressBar::new(0).with_style(waiting()));
    machines.set_prefix("finished");
    let bytes = multi.add(ProgressBar::new(0).with_style(waiting()));
    bytes.set_prefix("download");
    let mut last_line = String::new();
    loop {
        let status = admin.call(summary_call(release.clone())).await?;
        let view = watch_view(&status);
        if view.machines == 0 {
            machines.set_message("no machine targeted yet");
        } else {
            machines.set_style(counting_machines.clone());
            machines.set_message(view.phases.clone());
        }
        machines.set_length(view.machines);
        machines.set_position(view.finished);
        if view.bytes_total == 0 {
            bytes.set_message("no machine downloading yet");
        } else {
            bytes.set_style(counting_bytes.clone());
        }
        bytes.set_length(view.bytes_total);
        bytes.set_position(view.bytes_done);
        let line = watch_line(&status, &view);
        if !tty && line != last_line {
            println!("{line}");
        }
        last_line = line;
        match watch_next(&status, &view) {
            WatchNext::Wait => {}
            WatchNext::Paused { reason } => {
                machines.abandon();
                bytes.abandon();
                return Err(Exit::RolloutPaused(format!(
                    "the staged rollout of {release} is paused: {reason}; nothing more is sent \
                     until `fleetcast rollout resume {release}` (`fleetcast rollout status \
                     {release}` shows it)"
                ))
                .into());
            }
            WatchNext::Finished { failed } => {
                machines.finish();
                bytes.finish();
                println!("{}", finished_text(&status, &view));
                if failed > 0 {
                    return Err(Exit::MachinesFailed(format!(
                        "{failed} machine(s) failed; see `fleetcast release status {}`",
                        status.release.id
                    ))
                    .into());
                }
                return Ok(());
            }
        }
        if timeout_secs > 0 && started.elapsed().as_secs() >= timeout_secs {
            // Which machines, so the operator can look at them (a machine provisioned but never
            // started stays `pending` for ever, and watch would name only the count).
            let waiting = match status_all(admin, release.clone(), None).await {
                Ok(all) => unfinished_text(&all.targets),
                Err(_) => String::new(),
            };
            return Err(Exit::TimedOut(format!(
                "release {release} not finished after {timeout_secs} s: {}{waiting}",
                view.phases
            ))
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// The machines of `targets` not in a final phase, for a watch that timed out: at most ten,
/// each with its phase, and what `pending` means.
fn unfinished_text(targets: &[fleetcast_proto::admin::TargetRecord]) -> String {
    const SHOWN: usize = 10;
    let waiting: Vec<&fleetcast_proto::admin::TargetRecord> =
        targets.iter().filter(|t| !t.phase.is_final()).collect();
    if waiting.is_empty() {
        return String::new();
    }
    let mut text = format!("\nnot finished ({}):", waiting.len());
    for t in waiting.iter().take(SHOWN) {
        text.push_str(&format!(" {} ({})", t.machine, t.phase));
    }
    if waiting.len() > SHOWN {
        text.push_str(&format!(" and {} more", waiting.len() - SHOWN));
    }
    if waiting.iter().any(|t| t.phase == Phase::Pending) {
        text.push_str(
            "\n`pending`: the machine has not taken the notice yet, because it is offline or has \
             never connected (`fleetcast machines` shows when it was last seen); it gets the \
             release when it connects",
        );
    }
    text
}

/// What `release watch` shows of one status snapshot.
#[derive(Debug, PartialEq, Eq)]
pub struct WatchView {
    pub total: u64,
    /// Final, or (a `download-only` release) downloaded and waiting for `activate`.
    pub finished: u64,
    /// Of `finished`: downloaded and waiting for `activate` (`download-only` only).
    pub waiting: u64,
    /// Of `finished`: failed, not counting machines an operator's cancel stopped.
    pub failed: u64,
    /// What the machines bar counts to: the targets, or while a staged rollout still runs (or
    /// is paused), every machine of the rollout.
    pub machines: u64,
    /// "installed=3 downloading=2"
    pub phases: String,
    /// Bytes verified by all machines, and the bytes they need in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// The view of a status page: everything comes from the aggregates over all targets, so the
/// page itself may be empty (`watch` asks for none).
pub fn watch_view(status: &ReleaseStatus) -> WatchView {
    let p = &status.progress;
    let phases = p
        .phases
        .iter()
        .map(|(phase, n)| format!("{phase}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    let count = |phase: Phase| u64::from(p.phases.get(&phase).copied().unwrap_or(0));
    // A download-only release waits, `deferred`, for `activate`: done as far as watching goes.
    // Why: counted as not finished, `release watch` of one never ended (a review from an
    // operator's side, 2026-11-29). The staged rollout counts it as a success the same way.
    let waiting = match status.release.policy {
        InstallPolicy::DownloadOnly => count(Phase::Deferred),
        _ => 0,
    };
    let total = u64::from(p.total);
    let machines = match &status.staged {
        Some(s) if !s.state.is_finished() => total.max(u64::from(s.machines)),
        _ => total,
    };
    WatchView {
        total,
        finished: u64::from(p.finished) + waiting,
        waiting,
        // `cancelled` is an operator's doing (a rollout's cancel), not a machine's failure.
        failed: u64::from(p.failed).saturating_sub(count(Phase::Cancelled)),
        machines,
        phases,
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
    }
}

/// What `release watch` does after a snapshot.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchNext {
    /// Poll again.
    Wait,
    /// Every machine finished (and a staged rollout completed or was cancelled): `failed` of
    /// them failed.
    Finished { failed: u64 },
    /// The staged rollout is paused: nothing more happens until an operator acts.
    Paused { reason: String },
}

/// Whether the watch goes on. A staged rollout has target records only for the machines
/// notified so far, so while it runs the watch goes on however many of those finished. Why:
/// it printed "all 20 machine(s) finished" and ended for a 2,000-machine rollout after its
/// first wave (a review from an operator's side, 2026-11-29).
pub fn watch_next(status: &ReleaseStatus, view: &WatchView) -> WatchNext {
    match status.staged.as_ref().map(|s| &s.state) {
        Some(RolloutState::Running) => return WatchNext::Wait,
        Some(RolloutState::Paused { reason }) => {
            return WatchNext::Paused {
                reason: reason.clone(),
            }
        }
        Some(RolloutState::Completed | RolloutState::Cancelled { .. }) | None => {}
    }
    if view.total > 0 && view.finished == view.total {
        WatchNext::Finished {
            failed: view.failed,
        }
    } else {
        WatchNext::Wait
    }
}

/// One line of `release watch` without a terminal.
pub fn watch_line(status: &ReleaseStatus, view: &WatchView) -> String {
    let id = &status.release.id;
    let mut line = if view.total == 0 {
        // Before its publish (or while a publish is counting its targets).
        format!("{id}: no target machines yet")
    } else {
        format!(
            "{id}: {}/{} finished; {}",
            view.finished, view.total, view.phases
        )
    };
    if let Some(s) = &status.staged {
        let _ = write!(
            line,
            " (staged rollout {}, wave {} of {}: {} of {} machines notified)",
            s.state.name(),
            s.wave + 1,
            s.waves,
            s.notified,
            s.machines
        );
    }
    line
}

/// The last line of a `release watch` that saw every machine finish.
fn finished_text(status: &ReleaseStatus, view: &WatchView) -> String {
    let id = &status.release.id;
    let mut text = format!(
        "{id}: all {} machine(s) finished: {} succeeded, {} failed{}",
        view.total,
        status.progress.succeeded,
        failed_text(&status.progress),
        match view.waiting {
            0 => String::new(),
            n => format!("; {n} downloaded, waiting for `fleetcast activate {id}`"),
        }
    );
    if let Some(s) = &status.staged {
        match &s.state {
            RolloutState::Cancelled { reason } => {
                let _ = write!(text, "; staged rollout cancelled: {reason}");
            }
            _ => {
                let _ = write!(text, "; staged rollout {}", s.state.name());
            }
        }
    }
    text
}

/// The plan `ask` names, every page of its targets joined into one (`first`: its first page,
/// when already at hand), as if the platform had sent it whole. Pages are of `ask.limit`
/// targets (None: the platform's most).
pub async fn plan_all(
    admin: &AdminClient,
    mut ask: calls::ReleasePlan,
    first: Option<PlanReport>,
) -> Result<PlanReport, AdminError> {
    ask.limit.get_or_insert(MAX_PLAN_PAGE);
    let mut plan = match first {
        Some(p) => p,
        None => admin.call(ask.clone()).await?,
    };
    // A page that names no cursor cannot be continued, whatever it says.
    while let (Some(next), true) = (plan.next.take(), plan.more) {
        ask.after = Some(next);
        let mut page = admin.call(ask.clone()).await?;
        plan.plan.targets.append(&mut page.plan.targets);
        plan.next = page.next;
        plan.more = page.more;
    }
    plan.more = false;
    Ok(plan)
}

/// Machines `release retry` names; the others are counted.
pub const RETRY_SHOWN: usize = 20;

/// What `release retry` says it did.
pub fn retry_text(plan: &PlanReport) -> String {
    let names: Vec<&str> = plan
        .plan
        .targets
        .iter()
        .take(RETRY_SHOWN)
        .map(|(m, _)| m.as_str())
        .collect();
    let total = plan.target_count();
    let more = match total.saturating_sub(names.len()) {
        0 => String::new(),
        n => format!(" and {n} more (`fleetcast release status` lists them)"),
    };
    format!(
        "sent {} again (seq {}) to {total} machine(s): {}{more}",
        plan.plan.release.id,
        plan.plan.release.seq,
        names.join(", ")
    )
}

/// How many topics and target machines a plan shows before "and N more" (`--list`: all).
pub const PLAN_SHOWN: usize = 10;

/// What a publish will send, for the confirmation prompt: the release, the retained notices,
/// and the target machines, counted per group; the first [`PLAN_SHOWN`] topics and machines
/// are listed, or all that `plan` holds with `list` (every target once [`plan_all`] fetched
/// them; the platform names the first [`fleetcast_proto::admin::PLAN_TOPICS_SHOWN`] topics).
pub fn plan_text(report: &PlanReport, groups: &[GroupId], list: bool) -> String {
    plan_text_of(report, groups, list, None)
}

/// [`plan_text`] for a publish in waves: a staged publish sends no group notice, only one
/// notice per machine of the first wave (each on its machine's topic), so the plan's group
/// topics are not what will be sent and are not listed.
pub fn staged_plan_text(
    report: &PlanReport,
    groups: &[GroupId],
    list: bool,
    waves: &WavePlan,
) -> String {
    plan_text_of(report, groups, list, Some(waves))
}

fn plan_text_of(
    report: &PlanReport,
    groups: &[GroupId],
    list: bool,
    waves: Option<&WavePlan>,
) -> String {
    let plan = &report.plan;
    let r = &plan.release;
    let shown = if list { usize::MAX } else { PLAN_SHOWN };
    let more = |out: &mut String, listed: usize, total: usize| {
        let listed = listed.min(shown);
        if total > listed {
            let hint = if list {
                "not listed"
            } else {
                "--list shows all"
            };
            let _ = writeln!(out, "  and {} more ({hint})", total - listed);
        }
    };
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
    match waves {
        None => {
            let _ = writeln!(out, "notices (retained): {}", report.topic_count());
            for t in plan.topics.iter().take(shown) {
                let _ = writeln!(out, "  {t}");
            }
            more(&mut out, plan.topics.len(), report.topic_count());
        }
        Some(w) => {
            let total = report.target_count();
            let _ = writeln!(
                out,
                "notices (retained): one per machine of wave 1, on the machine's own topic: {} of \
                 {total} machine(s) now, the others' as their waves start (no group notice)",
                w.cumulative(0, total)
            );
        }
    }
    let per_group: BTreeMap<Option<GroupId>, u32> = report
        .per_group()
        .into_iter()
        .map(|c| (c.group, c.machines))
        .collect();
    for g in groups {
        if !per_group.contains_key(&Some(g.clone())) {
            let _ = writeln!(out, "note: no machine is reached only through group {g} (no provisioned members yet, or all named directly); machines that join it later still get the notice");
        }
    }
    let total = report.target_count();
    let _ = writeln!(out, "target machines: {total}");
    if let Some(n) = report.newer_installed.filter(|n| *n > 0) {
        let _ = writeln!(
            out,
            "warning: {n} of them report a newer {} than {}: they will reject it as a downgrade (to go back to an older version, use `fleetcast rollback`)",
            r.kind, r.version
        );
    }
    let width = total.to_string().len();
    // Groups by name, then the machines named directly.
    let mut counts: Vec<(Option<GroupId>, u32)> = per_group.into_iter().collect();
    let direct_first = counts.first().is_some_and(|(g, _)| g.is_none());
    counts.rotate_left(usize::from(direct_first));
    for (via, n) in counts {
        let _ = match via {
            Some(g) => writeln!(out, "  {n:>width$}  via group {g}"),
            None => writeln!(out, "  {n:>width$}  named directly"),
        };
    }
    if plan.targets.is_empty() {
        return out;
    }
    let rows: Vec<Vec<String>> = plan
        .targets
        .iter()
        .take(shown)
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
    more(&mut out, plan.targets.len(), total);
    out
}

/// A step result as `ok 2026-11-25 12:00:03`, or `-`.
pub(super) fn step(s: &Option<StepResult>) -> String {
    match s {
        None => "-".into(),
        Some(s) => format!(
            "{} {}",
            if s.ok { "ok" } else { "failed" },
            table::time(Some(s.at_ms))
        ),
    }
}

/// The release line, the per-machine table and a summary of counts per phase.
pub fn status_text(status: &ReleaseStatus) -> String {
    let mut out = release_line(&status.release) + &staged_line(status);
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
            // Why it waits, as the machine said.
            if let (Phase::Deferred, Some(why)) = (t.phase, &t.detail) {
                phase = format!("{phase} ({why})");
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
    out.push_str(&counts_line(&status.progress));
    out
}

/// `release status --summary`: the release line and the counts, without the table.
pub fn summary_text(status: &ReleaseStatus) -> String {
    release_line(&status.release) + &staged_line(status) + &counts_line(&status.progress)
}

/// For a release published in waves, which machines its records cover: only those notified so
/// far, so the counts below are not the whole rollout's while it runs. Empty otherwise.
fn staged_line(status: &ReleaseStatus) -> String {
    let Some(s) = &status.staged else {
        return String::new();
    };
    let id = &status.release.id;
    let left = s.machines.saturating_sub(s.notified + s.skipped);
    let wave = format!("wave {} of {}", s.wave + 1, s.waves);
    let line = match &s.state {
        RolloutState::Completed => format!(
            "staged rollout completed ({wave}): every machine of it was notified{}\n",
            if s.skipped > 0 { " or skipped" } else { "" }
        ),
        RolloutState::Cancelled { .. } => format!(
            "staged rollout cancelled in {wave}: only the {} machine(s) notified by then are \
             listed; {left} of {} were never notified (`fleetcast rollout status {id}`)\n",
            s.notified, s.machines
        ),
        RolloutState::Running | RolloutState::Paused { .. } => format!(
            "staged rollout {} in {wave}: only the {} machine(s) notified so far are listed; \
             {left} of {} are not notified yet (`fleetcast rollout status {id}`)\n",
            s.state.name(),
            s.notified,
            s.machines
        ),
    };
    match s.skipped {
        0 => line,
        n => format!(
            "{line}skipped, never notified: {n} machine(s) revoked or no longer targeted when \
             their wave started\n"
        ),
    }
}

fn release_line(r: &ReleaseInfo) -> String {
    format!(
        "release {}: {} {} policy {}{} published {}\n",
        r.id,
        r.kind,
        r.version,
        r.policy,
        if r.rollback { " (rollback)" } else { "" },
        table::time(r.published_at_ms)
    )
}

/// How many failed, saying how many of them an operator cancelled (`failed` counts every final
/// phase but `installed` and `superseded`, protocol.md §9: a cancelled machine did not fail).
fn failed_text(p: &RolloutProgress) -> String {
    match p.phases.get(&Phase::Cancelled).copied().unwrap_or(0) {
        0 => p.failed.to_string(),
        n if n == p.failed => format!("{n} (all cancelled by an operator)"),
        n => format!("{} ({n} of them cancelled by an operator)", p.failed),
    }
}

fn counts_line(p: &RolloutProgress) -> String {
    let counts: Vec<String> = p
        .phases
        .iter()
        .map(|(phase, n)| format!("{phase}={n}"))
        .collect();
    format!(
        "{} machine(s): {}; finished {}, succeeded {}, failed {}\n",
        p.total,
        if counts.is_empty() {
            "none".into()
        } else {
            counts.join(" ")
        },
        p.finished,
        p.succeeded,
        failed_text(p)
    )
}

pub fn list_text(releases: &[ReleaseInfo]) -> String {
    let rows: Vec<Vec<String>> = releases
        .iter()
        .map(|r| {
            // The platform names at most the first RELEASE_MACHINES_SHOWN: past that, a count.
            let mut targets: Vec<String> = if r.machines.len() >= RELEASE_MACHINES_SHOWN {
                vec![format!("{}+ machines", r.machines.len())]
            } else {
                r.machines.iter().map(|m| m.to_string()).collect()
            };
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
    use fleetcast_proto::admin::{PublishPlan, TargetRecord};
    use fleetcast_proto::rollout::StagedProgress;

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

    /// A watch that times out names the machines it waited for (at most ten) and says what
    /// `pending` means: a target provisioned but never started kept it waiting, unnamed.
    #[test]
    fn a_timed_out_watch_names_the_unfinished_machines() {
        let target = |i: usize, phase: Phase| TargetRecord {
            release: release().id,
            machine: MachineId::new(format!("vm-{i:03}")).unwrap(),
            kind: Kind::new("app").unwrap(),
            version: "2.4.1".into(),
            via: None,
            phase,
            phase_at_ms: 0,
            notified_at_ms: None,
            download: None,
            upgrade: None,
            error: None,
            detail: None,
            attempts: 0,
            progress: None,
            updated_at_ms: 0,
        };
        let mut targets = vec![target(1, Phase::Installed), target(2, Phase::Pending)];
        targets.extend((3..=14).map(|i| target(i, Phase::Downloading)));
        let text = unfinished_text(&targets);
        assert!(
            text.contains("not finished (13): vm-002 (pending) vm-003 (downloading)"),
            "{text}"
        );
        assert!(text.contains("and 3 more"), "{text}");
        assert!(text.contains("never connected"), "{text}");
        assert!(!text.contains("vm-001"), "{text}");
        assert_eq!(unfinished_text(&targets[..1]), "");
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
            detail: None,
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
            next: None,
            more: false,
            bytes_done: 2048,
            bytes_total: 2048,
            staged: None,
        };
        let expected = "\
release r-000001: app 2.4.1 policy immediate published 1970-01-01 00:00:02
MACHINE  VIA       PHASE      NOTIFIED             DOWNLOAD                0UPGRADE                 ATTEMPTS  ERROR
vm-001   shanghai  installed  1970-01-01 00:00:03  ok 1970-01-01 00:00:04  ok 1970-01-01 00:00:05  1
1 machine(s): installed=1; finished 1, succeeded 1, failed 0
"
        .replace("0UPGRADE", "UPGRADE");
        assert_eq!(status_text(&status), expected);
        // A deferred install shows why it waits, as the machine said.
        let mut waiting = status.clone();
        waiting.targets[0].phase = Phase::Deferred;
        waiting.targets[0].detail = Some("waiting for window 02:00-04:00".into());
        let text = status_text(&waiting);
        assert!(
            text.contains("deferred (waiting for window 02:00-04:00)"),
            "{text}"
        );
        // --summary: the same first and last lines, no table (so no page of targets needed).
        let summary = ReleaseStatus {
            targets: vec![],
            ..status
        };
        assert_eq!(
            summary_text(&summary),
            "\
release r-000001: app 2.4.1 policy immediate published 1970-01-01 00:00:02
1 machine(s): installed=1; finished 1, succeeded 1, failed 0
"
        );
    }

    #[test]
    fn machines_an_operator_cancelled_are_named_among_the_failed() {
        let progress = |phases: &[(Phase, u32)], failed: u32| RolloutProgress {
            release: release().id,
            kind: Kind::new("app").unwrap(),
            version: "2.4.1".into(),
            total: phases.iter().map(|(_, n)| n).sum(),
            phases: phases.iter().copied().collect(),
            finished: failed,
            succeeded: 0,
            failed,
            updated_at_ms: 0,
        };
        assert_eq!(
            counts_line(&progress(&[(Phase::Cancelled, 2)], 2)),
            "2 machine(s): cancelled=2; finished 2, succeeded 0, failed 2 (all cancelled by an operator)\n"
        );
        assert_eq!(
            failed_text(&progress(
                &[(Phase::Cancelled, 2), (Phase::RolledBack, 1)],
                3
            )),
            "3 (2 of them cancelled by an operator)"
        );
        assert_eq!(failed_text(&progress(&[(Phase::RolledBack, 1)], 1)), "1");
    }

    #[test]
    fn watch_shows_the_aggregates_of_all_targets_from_a_page_without_any() {
        let status = ReleaseStatus {
            release: release(),
            targets: vec![],
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
            next: None,
            more: true,
            bytes_done: 2048 + 1024,
            bytes_total: 3 * 2048,
            staged: None,
        };
        let view = watch_view(&status);
        assert_eq!(
            view,
            WatchView {
                total: 3,
                finished: 1,
                waiting: 0,
                failed: 0,
                machines: 3,
                phases: "pending=1 downloading=1 installed=1".into(),
                bytes_done: 2048 + 1024,
                bytes_total: 3 * 2048,
            }
        );
    }

    /// A staged rollout's first wave of 20 machines, all finished (one installed, one
    /// cancelled if `cancelled`), with the rollout in `state`.
    fn staged_status(state: RolloutState, cancelled: bool) -> ReleaseStatus {
        let r = release();
        let mut phases = BTreeMap::from([(Phase::Installed, 19)]);
        phases.insert(
            if cancelled {
                Phase::Cancelled
            } else {
                Phase::Installed
            },
            if cancelled { 1 } else { 20 },
        );
        ReleaseStatus {
            progress: RolloutProgress {
                release: r.id.clone(),
                kind: Kind::new("app").unwrap(),
                version: "2.4.1".into(),
                total: 20,
                phases,
                finished: 20,
                succeeded: if cancelled { 19 } else { 20 },
                failed: u32::from(cancelled),
                updated_at_ms: 0,
            },
            release: r,
            targets: vec![],
            next: None,
            more: true,
            bytes_done: 0,
            bytes_total: 0,
            staged: Some(StagedProgress {
                state,
                wave: 0,
                waves: 3,
                notified: 20,
                skipped: 0,
                machines: 2000,
            }),
        }
    }

    /// Before, the watch of a 2,000-machine staged rollout ended after its first wave: "all 20
    /// machine(s) finished", exit 0.
    #[test]
    fn watch_follows_a_running_staged_rollout_past_its_finished_wave() {
        let running = staged_status(RolloutState::Running, false);
        let view = watch_view(&running);
        assert_eq!((view.finished, view.total, view.machines), (20, 20, 2000));
        assert_eq!(watch_next(&running, &view), WatchNext::Wait);
        assert_eq!(
            watch_line(&running, &view),
            "r-000001: 20/20 finished; installed=20 (staged rollout running, wave 1 of 3: 20 \
             of 2000 machines notified)"
        );
        let paused = staged_status(
            RolloutState::Paused {
                reason: "paused by ops".into(),
            },
            false,
        );
        assert_eq!(
            watch_next(&paused, &watch_view(&paused)),
            WatchNext::Paused {
                reason: "paused by ops".into()
            }
        );
        let completed = staged_status(RolloutState::Completed, false);
        assert_eq!(
            watch_next(&completed, &watch_view(&completed)),
            WatchNext::Finished { failed: 0 }
        );
        assert!(staged_line(&running).contains("1980 of 2000 are not notified yet"));
    }

    #[test]
    fn watch_counts_machines_a_cancel_stopped_as_no_failure() {
        let cancelled = staged_status(
            RolloutState::Cancelled {
                reason: "cancelled by ops in wave 1".into(),
            },
            true,
        );
        let view = watch_view(&cancelled);
        assert_eq!(
            view.machines, 20,
            "a cancelled rollout notifies no one else"
        );
        assert_eq!(
            watch_next(&cancelled, &view),
            WatchNext::Finished { failed: 0 }
        );
        let text = finished_text(&cancelled, &view);
        assert!(
            text.ends_with(
                "19 succeeded, 1 (all cancelled by an operator) failed; staged rollout \
                 cancelled: cancelled by ops in wave 1"
            ),
            "{text}"
        );
        assert!(
            staged_line(&cancelled).contains("1980 of 2000 were never notified"),
            "{}",
            staged_line(&cancelled)
        );
    }

    /// Machines of a `download-only` release end `deferred`, waiting for `activate`: for the
    /// watch they are done, and it says what they wait for. Before, it never ended.
    #[test]
    fn watch_counts_a_download_only_release_waiting_for_activate_as_done() {
        let mut r = release();
        r.policy = InstallPolicy::DownloadOnly;
        let status = |release: ReleaseInfo| ReleaseStatus {
            release,
            targets: vec![],
            progress: RolloutProgress {
                release: r.id.clone(),
                kind: Kind::new("app").unwrap(),
                version: "2.4.1".into(),
                total: 3,
                phases: BTreeMap::from([(Phase::Deferred, 2), (Phase::DownloadFailed, 1)]),
                finished: 1,
                succeeded: 0,
                failed: 1,
                updated_at_ms: 0,
            },
            next: None,
            more: true,
            bytes_done: 0,
            bytes_total: 0,
            staged: None,
        };
        let view = watch_view(&status(r.clone()));
        assert_eq!((view.finished, view.waiting), (3, 2));
        // Any other policy's `deferred` waits for its window or for the machine to be idle.
        let view = watch_view(&status(release()));
        assert_eq!((view.finished, view.waiting), (1, 0));
    }

    #[test]
    fn the_plan_lists_topics_targets_and_groups_without_members() {
        let plan = PlanReport::from(PublishPlan {
            release: release(),
            topics: vec![
                "fleet/machines/vm-001/release/app".into(),
                "fleet/groups/empty/release/app".into(),
            ],
            targets: vec![(MachineId::new("vm-001").unwrap(), None)],
            rollout: None,
        });
        let text = plan_text(&plan, &[GroupId::new("empty").unwrap()], false);
        assert!(
            text.contains("  fleet/groups/empty/release/app\n"),
            "{text}"
        );
        assert!(text.contains("only through group empty"), "{text}");
        assert!(text.contains("  vm-001   direct\n"), "{text}");
    }

    /// A plan to `n` machines: every third named directly, the others via group a or b.
    fn plan_to(n: usize) -> PlanReport {
        let targets: Vec<(MachineId, Option<GroupId>)> = (1..=n)
            .map(|i| {
                let via = match i % 3 {
                    0 => None,
                    1 => Some(GroupId::new("a").unwrap()),
                    _ => Some(GroupId::new("b").unwrap()),
                };
                (MachineId::new(format!("vm-{i:05}")).unwrap(), via)
            })
            .collect();
        let mut topics: Vec<String> = vec![
            "fleet/groups/a/release/app".into(),
            "fleet/groups/b/release/app".into(),
        ];
        topics.extend(
            targets
                .iter()
                .filter(|(_, via)| via.is_none())
                .map(|(m, _)| format!("fleet/machines/{m}/release/app")),
        );
        PlanReport::from(PublishPlan {
            release: release(),
            topics,
            targets,
            rollout: None,
        })
    }

    #[test]
    fn a_staged_plan_says_one_notice_per_machine_of_wave_1_and_lists_no_group_topic() {
        let plan = plan_to(200);
        let waves = WavePlan::new(vec![100, 1000, 5000], 9500, 500, 0).unwrap();
        let text = staged_plan_text(&plan, &groups_ab(), false, &waves);
        assert!(
            text.contains(
                "notices (retained): one per machine of wave 1, on the machine's own topic: 2 of \
                 200 machine(s) now, the others' as their waves start (no group notice)\n"
            ),
            "{text}"
        );
        assert!(!text.contains("fleet/groups/"), "{text}");
        assert!(text.contains("target machines: 200\n"), "{text}");
    }

    fn groups_ab() -> Vec<GroupId> {
        vec![GroupId::new("a").unwrap(), GroupId::new("b").unwrap()]
    }

    #[test]
    fn a_plan_to_30_machines_counts_them_per_group_and_lists_the_first_ten() {
        let plan = plan_to(30);
        let text = plan_text(&plan, &groups_ab(), false);
        let expected_head = "\
release r-000001: app 2.4.1 (artifact XXXX, 2.0 KiB)
policy:  immediate
notices (retained): 12
  fleet/groups/a/release/app
  fleet/groups/b/release/app
  fleet/machines/vm-00003/release/app
";
        let head: String = text.lines().take(6).map(|l| format!("{l}\n")).collect();
        assert_eq!(
            head,
            expected_head.replace("XXXX", &plan.plan.release.artifact.id.short())
        );
        assert!(
            text.contains("  and 2 more (--list shows all)\ntarget machines: 30\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "target machines: 30\n  10  via group a\n  10  via group b\n  10  named directly\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  MACHINE   VIA\n  vm-00001  group a\n  vm-00002  group b\n  vm-00003  direct\n"
            ),
            "{text}"
        );
        assert!(text.contains("vm-00010"), "{text}");
        assert!(!text.contains("vm-00011"), "{text}");
        assert!(
            text.ends_with("  vm-00010  group a\n  and 20 more (--list shows all)\n"),
            "{text}"
        );
        assert!(!text.contains("only through group"), "{text}");

        let all = plan_text(&plan, &groups_ab(), true);
        assert!(all.contains("vm-00030"), "{all}");
        assert!(!all.contains("more (--list"), "{all}");
        assert_eq!(all.lines().filter(|l| l.contains("  vm-")).count(), 30);
    }

    #[test]
    fn a_plan_to_10000_machines_stays_a_screenful_unless_listed() {
        let plan = plan_to(10_000);
        let text = plan_text(&plan, &groups_ab(), false);
        assert!(
            text.lines().count() <= 35,
            "{} lines:\n{text}",
            text.lines().count()
        );
        assert!(
            text.contains(
                "target machines: 10000\n   3334  via group a\n   3333  via group b\n   3333  named directly\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  and 9990 more (--list shows all)\n"),
            "{text}"
        );
        assert!(
            text.contains("  and 3325 more (--list shows all)\n"),
            "{text}"
        );
        let all = plan_text(&plan, &groups_ab(), true);
        assert_eq!(
            all.lines().filter(|l| l.starts_with("  vm-")).count(),
            10_000
        );
        assert_eq!(
            all.lines().filter(|l| l.starts_with("  fleet/")).count(),
            2 + 3333
        );
    }
}
