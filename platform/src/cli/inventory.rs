//! `fleetcast versions` and `fleetcast history`, and the paging that `fleetcast machines`
//! shares with them.

use std::fmt::Write;

use clap::Args;
use fleetcast_proto::admin::{TargetRecord, VersionReport};
use fleetcast_proto::calls::{self, Call, Page};
use fleetcast_proto::{Kind, MachineId, ReleaseId};

use super::{print_json, table, ClientArgs};

#[derive(Args)]
pub struct VersionsArgs {
    /// The version type (app, firmware, ...).
    #[arg(long)]
    pub kind: Kind,
    /// Compare with this release [default: the newest published release of --kind].
    #[arg(long)]
    pub release: Option<ReleaseId>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct HistoryArgs {
    #[arg(long)]
    pub machine: MachineId,
    /// Only releases of this version type.
    #[arg(long)]
    pub kind: Option<Kind>,
    /// Only the newest N releases [default: all].
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    #[arg(long)]
    pub json: bool,
}

/// Asks for pages until the platform says there are no more (or `wanted` items came): `op`
/// builds the call for a cursor (None: from the start) and a page size, `page` takes the
/// page out of its reply.
pub async fn fetch_all<Q: Call, C, T>(
    client: &ClientArgs,
    wanted: Option<u32>,
    op: impl Fn(Option<C>, Option<u32>) -> Q,
    page: impl Fn(Q::Reply) -> Page<T, Option<C>>,
) -> anyhow::Result<Vec<T>> {
    let admin = client.connect().await?;
    let mut all: Vec<T> = Vec::new();
    let mut cursor = None;
    let result = loop {
        let left = wanted.map(|w| w.saturating_sub(all.len() as u32));
        if left == Some(0) {
            break Ok(());
        }
        let Page { items, next, more } = match admin.call(op(cursor.take(), left)).await {
            Ok(r) => page(r),
            Err(e) => break Err(e.into()),
        };
        all.extend(items);
        // A page that names no cursor cannot be continued, whatever it says.
        match next {
            Some(next) if more => cursor = Some(next),
            _ => break Ok(()),
        }
    };
    admin.close().await;
    result.map(|()| all)
}

pub async fn versions(args: VersionsArgs, client: &ClientArgs) -> anyhow::Result<()> {
    let report = client
        .call(calls::Versions {
            kind: args.kind,
            release: args.release,
        })
        .await?;
    if args.json {
        return print_json(&report);
    }
    print!("{}", versions_text(&report));
    Ok(())
}

pub async fn history(args: HistoryArgs, client: &ClientArgs) -> anyhow::Result<()> {
    let machine = args.machine;
    let kind = args.kind;
    let targets = fetch_all(
        client,
        args.limit,
        |before, limit| calls::History {
            machine: machine.clone(),
            kind: kind.clone(),
            before,
            limit,
        },
        |history| history.page,
    )
    .await?;
    if args.json {
        return print_json(&targets);
    }
    print!("{}", history_text(&machine, &targets));
    Ok(())
}

fn percent(n: u32, of: u32) -> String {
    if of == 0 {
        return "-".into();
    }
    format!("{:.1}%", f64::from(n) * 100.0 / f64::from(of))
}

/// The version table and the compliance summary.
pub fn versions_text(r: &VersionReport) -> String {
    let mut out = format!("{} on {} machine(s)", r.kind, r.machines);
    if r.revoked > 0 {
        let _ = write!(out, " ({} revoked, not counted)", r.revoked);
    }
    out.push('\n');
    let mut rows: Vec<Vec<String>> = r
        .versions
        .iter()
        .map(|v| {
            vec![
                v.version.clone(),
                v.machines.to_string(),
                percent(v.machines, r.machines),
            ]
        })
        .collect();
    if r.without > 0 {
        rows.push(vec![
            "(none)".into(),
            r.without.to_string(),
            percent(r.without, r.machines),
        ]);
    }
    out.push_str(&table::render(&["VERSION", "MACHINES", "SHARE"], &rows));
    let Some(c) = &r.compliance else {
        let _ = writeln!(out, "no {} release published yet: no compliance", r.kind);
        return out;
    };
    let _ = writeln!(
        out,
        "compliance with release {} ({} {}):",
        c.release, r.kind, c.version
    );
    let buckets = [
        ("on target", c.on_target),
        ("in progress", c.in_progress),
        ("offline", c.offline),
        ("failed", c.failed),
        ("replaced", c.replaced),
        ("not targeted", c.not_targeted),
    ];
    let width = buckets
        .iter()
        .map(|(_, n)| n.to_string().len())
        .max()
        .unwrap_or(1);
    for (name, n) in buckets {
        let _ = writeln!(out, "  {name:<12}  {n:>width$}  {}", percent(n, r.machines));
    }
    out
}

/// One row per release that reached the machine, newest first.
pub fn history_text(machine: &MachineId, targets: &[TargetRecord]) -> String {
    if targets.is_empty() {
        return format!("no release has targeted {machine}\n");
    }
    let rows: Vec<Vec<String>> = targets
        .iter()
        .map(|t| {
            vec![
                t.release.to_string(),
                t.kind.to_string(),
                t.version.clone(),
                t.phase.to_string(),
                table::time(t.notified_at_ms),
                super::release::step(&t.download),
                super::release::step(&t.upgrade),
                table::time(Some(t.updated_at_ms)),
                t.attempts.to_string(),
                t.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table::render(
        &[
            "RELEASE", "KIND", "VERSION", "RESULT", "NOTIFIED", "DOWNLOAD", "UPGRADE", "UPDATED",
            "ATTEMPTS", "ERROR",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::admin::{Compliance, StepResult, VersionCount};
    use fleetcast_proto::Phase;

    fn report() -> VersionReport {
        VersionReport {
            kind: Kind::new("app").unwrap(),
            machines: 4,
            versions: vec![
                VersionCount {
                    version: "2.9".into(),
                    machines: 1,
                },
                VersionCount {
                    version: "2.10".into(),
                    machines: 2,
                },
            ],
            without: 1,
            revoked: 1,
            compliance: Some(Compliance {
                on_target: 2,
                in_progress: 1,
                failed: 1,
                ..Compliance::new(ReleaseId::new("r-000007").unwrap(), "2.10".into())
            }),
        }
    }

    #[test]
    fn the_versions_table_shows_shares_and_each_compliance_bucket() {
        assert_eq!(
            versions_text(&report()),
            "app on 4 machine(s) (1 revoked, not counted)\n\
             VERSION  MACHINES  SHARE\n\
             2.9      1         25.0%\n\
             2.10     2         50.0%\n\
             (none)   1         25.0%\n\
             compliance with release r-000007 (app 2.10):\n  \
             on target     2  50.0%\n  \
             in progress   1  25.0%\n  \
             offline       0  0.0%\n  \
             failed        1  25.0%\n  \
             replaced      0  0.0%\n  \
             not targeted  0  0.0%\n"
        );
        let none = VersionReport {
            compliance: None,
            machines: 0,
            versions: vec![],
            without: 0,
            revoked: 0,
            ..report()
        };
        assert_eq!(
            versions_text(&none),
            "app on 0 machine(s)\nVERSION  MACHINES  SHARE\n\
             no app release published yet: no compliance\n"
        );
    }

    #[test]
    fn the_history_table_has_one_row_per_release_with_its_times() {
        let mut t = crate::domain::target::new_target(
            &crate::fixtures::release("r-000003", "2.4.1"),
            MachineId::new("vm-001").unwrap(),
            None,
            1_795_608_000_000,
        );
        t.phase = Phase::InstallFailed;
        t.notified_at_ms = Some(1_795_608_001_000);
        t.download = Some(StepResult {
            phase: Phase::Downloaded,
            ok: true,
            at_ms: 1_795_608_002_000,
            error: None,
        });
        t.upgrade = Some(StepResult {
            phase: Phase::InstallFailed,
            ok: false,
            at_ms: 1_795_608_003_000,
            error: Some("exit 1".into()),
        });
        t.attempts = 2;
        t.error = Some("exit 1".into());
        t.updated_at_ms = 1_795_608_004_000;
        let text = history_text(&MachineId::new("vm-001").unwrap(), &[t]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("RELEASE   KIND  VERSION  RESULT"),
            "{text}"
        );
        for cell in [
            "r-000003",
            "app",
            "2.4.1",
            "install_failed",
            "2026-11-25 12:00:01",
            "ok 2026-11-25 12:00:02",
            "failed 2026-11-25 12:00:03",
            "2026-11-25 12:00:04",
            "  2  ",
            "exit 1",
        ] {
            assert!(lines[1].contains(cell), "{cell:?} in {text}");
        }
        assert_eq!(
            history_text(&MachineId::new("vm-9").unwrap(), &[]),
            "no release has targeted vm-9\n"
        );
    }
}
