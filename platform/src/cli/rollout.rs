//! `fleetcast rollout status|pause|resume|cancel`: follow and steer a staged rollout (a release
//! published with `--waves`).

use std::fmt::Write;

use clap::Subcommand;
use fleetcast_proto::calls;
use fleetcast_proto::rollout::{
    share_text, RolloutReport, RolloutState, WavePlan, WaveTally, ALL_BP,
};
use fleetcast_proto::ReleaseId;

use super::{confirm, print_json, table, ClientArgs};

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Waves, state, why it is where it is, and every recorded transition.
    Status {
        release: ReleaseId,
        #[arg(long)]
        json: bool,
    },
    /// Start no further wave until `resume` (recorded in the audit log).
    Pause {
        release: ReleaseId,
        #[arg(long)]
        json: bool,
    },
    /// Go on with a paused rollout: the failures so far are accepted and the wave's timer
    /// restarts. With --advance, also on a running rollout: the next wave starts now.
    Resume {
        release: ReleaseId,
        /// Start the next wave now instead of waiting for this one to succeed (a running
        /// rollout too; no failure is accepted then, and the wave's unfinished machines stay
        /// notified).
        #[arg(long)]
        advance: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop for good: no further notices; notified machines that have not begun installing
    /// drop the release and report `cancelled`; installed machines stay as they are.
    Cancel {
        release: ReleaseId,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: RolloutCmd, client: &ClientArgs) -> anyhow::Result<()> {
    let (rollout, json) = match cmd {
        RolloutCmd::Status { release, json } => {
            (client.call(calls::RolloutStatus { release }).await?, json)
        }
        RolloutCmd::Pause { release, json } => {
            (client.call(calls::RolloutPause { release }).await?, json)
        }
        RolloutCmd::Resume {
            release,
            advance,
            json,
        } => (
            client
                .call(calls::RolloutResume { release, advance })
                .await?,
            json,
        ),
        RolloutCmd::Cancel { release, yes, json } => {
            if !confirm(&format!("Cancel the rollout of {release}?"), yes)? {
                anyhow::bail!("not cancelled");
            }
            (client.call(calls::RolloutCancel { release }).await?, json)
        }
    };
    if json {
        return print_json(&rollout);
    }
    print!("{}", rollout_text(&rollout));
    Ok(())
}

/// What a publish with `plan` over `targets` machines will do, for the confirmation.
pub fn waves_text(plan: &WavePlan, targets: usize) -> String {
    let mut out = String::from("waves (cumulative):");
    for w in 0..plan.waves_bp.len() {
        let _ = write!(
            out,
            " {} = {}",
            share_text(plan.waves_bp[w]),
            plan.cumulative(w, targets)
        );
        if w + 1 < plan.waves_bp.len() {
            out.push(',');
        }
    }
    let _ = writeln!(
        out,
        "\nnext wave when {} of those notified installed; pause when more than {} failed{}",
        share_text(plan.success_bp),
        share_text(plan.failure_bp),
        if plan.wave_timeout_ms > 0 {
            format!(" or a wave runs {} s", plan.wave_timeout_ms / 1000)
        } else {
            String::new()
        }
    );
    out
}

/// Why a running wave has not advanced: how its machines stand against the thresholds (the
/// shares are taken over the machines notified so far, less the failures accepted at a
/// resume, as the platform takes them).
pub fn waiting_line(wave: usize, plan: &WavePlan, t: &WaveTally) -> String {
    let counted = t.notified.saturating_sub(t.accepted);
    let share = |part: u32| match counted {
        0 => "0%".to_owned(),
        n => share_text((u64::from(part) * u64::from(ALL_BP) / u64::from(n)) as u32),
    };
    let failures = t.failed.saturating_sub(t.accepted);
    let mut line = format!(
        "wave {}: {} of {counted} machines succeeded ({}), {} {}",
        wave + 1,
        t.succeeded,
        share(t.succeeded),
        if u64::from(t.succeeded) * u64::from(ALL_BP)
            >= u64::from(plan.success_bp) * u64::from(counted)
        {
            "reaching"
        } else {
            "below"
        },
        share_text(plan.success_bp)
    );
    if failures > 0 {
        let _ = write!(
            line,
            "; {failures} failed ({}), pauses above {}",
            share(failures),
            share_text(plan.failure_bp)
        );
    }
    let unfinished = counted.saturating_sub(t.succeeded + failures);
    if unfinished > 0 {
        let _ = write!(line, "; {unfinished} not finished");
    }
    if t.skipped > 0 {
        let _ = write!(
            line,
            "; {} skipped, not counted (revoked or no longer targeted)",
            t.skipped
        );
    }
    line.push('\n');
    line
}

/// How many skipped machines `rollout status` names.
const SKIPPED_NAMED: usize = 10;

pub fn rollout_text(report: &RolloutReport) -> String {
    let mut out = String::new();
    let r = &report.rollout;
    let n = report.targets();
    let state = match &r.state {
        RolloutState::Paused { reason } => format!("paused: {reason}"),
        RolloutState::Cancelled { reason } => format!("cancelled: {reason}"),
        other => other.name().to_owned(),
    };
    let _ = writeln!(out, "rollout of {}: {state}", r.release);
    let skipped = report.skipped();
    let _ = write!(
        out,
        "wave {} of {}: {} of {} machines notified",
        r.wave + 1,
        r.plan.waves_bp.len(),
        r.plan.cumulative(r.wave, n).saturating_sub(skipped),
        n
    );
    if skipped > 0 {
        let mut names: Vec<&str> = r
            .skipped
            .iter()
            .take(SKIPPED_NAMED)
            .map(|m| m.as_str())
            .collect();
        if skipped > names.len() {
            names.push("…");
        }
        let _ = write!(
            out,
            ", {skipped} skipped (revoked or no longer targeted when their wave started): {}",
            names.join(", ")
        );
    }
    out.push('\n');
    if let (RolloutState::Running, Some(t)) = (&r.state, &report.tally) {
        out.push_str(&waiting_line(r.wave, &r.plan, t));
    }
    out.push_str(&waves_text(&r.plan, n));
    if r.failures_accepted > 0 {
        let _ = writeln!(out, "failures accepted at resume: {}", r.failures_accepted);
    }
    let mut rows = Vec::new();
    for t in &r.log {
        rows.push(vec![
            table::time(Some(t.at_ms)),
            (t.wave + 1).to_string(),
            t.what.clone(),
            t.by.clone().unwrap_or_else(|| "-".into()),
            t.reason.clone(),
        ]);
    }
    out.push_str(&table::render(
        &["WHEN", "WAVE", "WHAT", "BY", "WHY"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::rollout::{RolloutInfo, RolloutTransition};
    use fleetcast_proto::MachineId;

    #[test]
    fn a_paused_rollout_says_where_and_why() {
        let plan = WavePlan::new(vec![100, 1000, 5000], 9500, 500, 3_600_000).unwrap();
        let r = RolloutInfo {
            release: ReleaseId::new("r-000007").unwrap(),
            plan: plan.clone(),
            order: (0..200)
                .map(|i| MachineId::new(format!("vm-{i}")).unwrap())
                .collect(),
            wave: 1,
            wave_started_ms: 0,
            state: RolloutState::Paused {
                reason: "wave 2: 2 of 20 machines failed (10%), above the failure threshold 5%"
                    .into(),
            },
            failures_accepted: 0,
            accepted: vec![],
            skipped: vec![],
            log: vec![RolloutTransition {
                at_ms: 1_795_600_000_000,
                wave: 1,
                what: "paused".into(),
                reason: "wave 2: 2 of 20 machines failed".into(),
                by: None,
            }],
        };
        let text = rollout_text(&RolloutReport::new(r.clone()));
        assert!(text.starts_with("rollout of r-000007: paused: wave 2: 2 of 20 machines failed (10%), above the failure threshold 5%\nwave 2 of 4: 20 of 200 machines notified\n"), "{text}");
        assert!(text.contains("waves (cumulative): 1% = 2, 10% = 20, 50% = 100, 100% = 200"));
        assert!(text.contains("or a wave runs 3600 s"));
        assert!(text.contains("paused"));
        let t = WaveTally {
            notified: 100,
            succeeded: 94,
            failed: 3,
            accepted: 0,
            skipped: 0,
        };
        assert_eq!(
            waiting_line(1, &plan, &t),
            "wave 2: 94 of 100 machines succeeded (94%), below 95%; 3 failed (3%), pauses above 5%; 3 not finished\n"
        );
        let mut running = RolloutReport::new(RolloutInfo {
            state: RolloutState::Running,
            ..r.clone()
        })
        .with_tally(t);
        assert!(
            rollout_text(&running)
                .contains("\nwave 2: 94 of 100 machines succeeded (94%), below 95%;"),
            "{}",
            rollout_text(&running)
        );
        running.tally = None;
        assert!(!rollout_text(&running).contains("succeeded"));
        // Skipped machines: named (the first ten) beside the count, and not counted.
        let skipped: Vec<MachineId> = r.order[2..14].to_vec();
        let report = RolloutReport::new(RolloutInfo {
            skipped: skipped.clone(),
            ..r.clone()
        });
        let text = rollout_text(&report);
        let names: Vec<&str> = skipped[..10].iter().map(|m| m.as_str()).collect();
        assert!(
            text.contains(&format!(
                "\nwave 2 of 4: 8 of 200 machines notified, 12 skipped (revoked or no longer \
                 targeted when their wave started): {}, …\n",
                names.join(", ")
            )),
            "{text}"
        );
        let t = WaveTally {
            notified: 6,
            succeeded: 6,
            skipped: 14,
            ..WaveTally::default()
        };
        assert_eq!(
            waiting_line(1, &plan, &t),
            "wave 2: 6 of 6 machines succeeded (100%), reaching 95%; 14 skipped, not counted \
             (revoked or no longer targeted)\n"
        );
        assert_eq!(
            waves_text(&plan, 3),
            "waves (cumulative): 1% = 1, 10% = 2, 50% = 3, 100% = 3\nnext wave when 95% of those notified installed; pause when more than 5% failed or a wave runs 3600 s\n"
        );
    }
}
