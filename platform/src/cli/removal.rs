//! `fleetcast release remove`: named releases, or every release but the newest N of each
//! version type (`--keep-latest`). The platform is asked first which of them may go
//! (`release_remove` with `check`), the plan is shown and confirmed, then they are removed in
//! batches of at most [`MAX_RELEASE_REMOVE`] releases and about [`TARGETS_PER_BATCH`] target
//! records, so one request does not keep the platform's admin task for long.

use std::collections::BTreeMap;
use std::fmt::Write;

use anyhow::Context;
use fleetcast_broker::admin::AdminClient;
use fleetcast_proto::admin::{ReleaseInfo, ReleaseRemoval, MAX_RELEASE_REMOVE};
use fleetcast_proto::calls;
use fleetcast_proto::{Kind, ReleaseId};

use super::{confirm, table};
use crate::inventory::release_order;

/// About the most target records one removal request deletes (a release with more goes alone).
pub const TARGETS_PER_BATCH: u64 = 20_000;

pub async fn remove(
    admin: &AdminClient,
    named: Vec<ReleaseId>,
    keep_latest: Option<u32>,
    yes: bool,
) -> anyhow::Result<()> {
    let candidates = match keep_latest {
        None => named,
        Some(n) => older_than_newest(&all_releases(admin).await?, n),
    };
    let mut checked = Vec::new();
    for batch in candidates.chunks(MAX_RELEASE_REMOVE) {
        let answer = admin
            .call(calls::ReleaseRemove {
                releases: batch.to_vec(),
                check: true,
            })
            .await?;
        checked.extend(answer.releases);
    }
    let (going, kept): (Vec<ReleaseRemoval>, Vec<ReleaseRemoval>) =
        checked.into_iter().partition(|r| r.kept.is_none());
    print!("{}", plan_text(&going, &kept));
    if keep_latest.is_none() && !kept.is_empty() {
        anyhow::bail!(
            "nothing was removed: {} of the releases named {} still needed (see above)",
            kept.len(),
            if kept.len() == 1 { "is" } else { "are" }
        );
    }
    if going.is_empty() {
        return Ok(());
    }
    let records: u64 = going.iter().map(|r| u64::from(r.targets)).sum();
    let question = format!(
        "Remove {} release(s) and their {records} per-machine record(s)? Their events stay.",
        going.len()
    );
    if !confirm(&question, yes)? {
        anyhow::bail!("not removed");
    }
    let (mut removed, mut targets) = (0, 0u64);
    for batch in batches(&going) {
        let releases = batch.iter().map(|r| r.release.clone()).collect();
        let done = admin
            .call(calls::ReleaseRemove {
                releases,
                check: false,
            })
            .await
            .with_context(|| {
                format!(
                    "removing releases ({removed} of {} removed before this batch)",
                    going.len()
                )
            })?;
        removed += done.releases.len();
        targets += done
            .releases
            .iter()
            .map(|r| u64::from(r.targets))
            .sum::<u64>();
    }
    println!("removed {removed} release(s) and {targets} per-machine record(s); their events stay");
    Ok(())
}

/// Every release, page by page.
async fn all_releases(admin: &AdminClient) -> anyhow::Result<Vec<ReleaseInfo>> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = admin
            .call(calls::ReleaseQuery {
                after: after.take(),
                limit: None,
            })
            .await?;
        all.extend(page.items);
        match page.next {
            Some(next) if page.more => after = Some(next),
            _ => return Ok(all),
        }
    }
}

/// Every release but the newest `keep` of each kind (newest: made last), oldest first.
pub fn older_than_newest(releases: &[ReleaseInfo], keep: u32) -> Vec<ReleaseId> {
    let mut by_kind: BTreeMap<&Kind, Vec<&ReleaseId>> = BTreeMap::new();
    for r in releases {
        by_kind.entry(&r.kind).or_default().push(&r.id);
    }
    let mut old: Vec<ReleaseId> = Vec::new();
    for ids in by_kind.values_mut() {
        ids.sort_by(|a, b| release_order(a, b));
        let n = ids.len().saturating_sub(keep as usize);
        old.extend(ids[..n].iter().map(|id| (*id).clone()));
    }
    old.sort_by(release_order);
    old
}

/// `going` in requests of at most [`MAX_RELEASE_REMOVE`] releases and [`TARGETS_PER_BATCH`]
/// target records (a release with more alone).
pub fn batches(going: &[ReleaseRemoval]) -> Vec<&[ReleaseRemoval]> {
    let mut out = Vec::new();
    let (mut start, mut records) = (0, 0u64);
    for (i, r) in going.iter().enumerate() {
        let n = u64::from(r.targets);
        let full = i - start == MAX_RELEASE_REMOVE || records + n > TARGETS_PER_BATCH;
        if i > start && full {
            out.push(&going[start..i]);
            (start, records) = (i, 0);
        }
        records += n;
    }
    if start < going.len() {
        out.push(&going[start..]);
    }
    out
}

/// What will go, and what stays with the reason.
pub fn plan_text(going: &[ReleaseRemoval], kept: &[ReleaseRemoval]) -> String {
    let mut out = String::new();
    if going.is_empty() {
        out.push_str("nothing to remove\n");
    } else {
        let records: u64 = going.iter().map(|r| u64::from(r.targets)).sum();
        let _ = writeln!(
            out,
            "to remove: {} release(s), {records} per-machine record(s)",
            going.len()
        );
        let rows: Vec<Vec<String>> = going
            .iter()
            .map(|r| {
                vec![
                    r.release.to_string(),
                    r.kind.to_string(),
                    r.version.clone(),
                    r.targets.to_string(),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &["RELEASE", "KIND", "VERSION", "TARGETS"],
            &rows,
        ));
    }
    if !kept.is_empty() {
        let _ = writeln!(out, "kept: {} release(s) still needed", kept.len());
        for r in kept {
            let why = r.kept.as_deref().unwrap_or_default();
            let _ = writeln!(out, "  {} ({} {}): {why}", r.release, r.kind, r.version);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::release;

    fn of_kind(id: &str, kind: &str) -> ReleaseInfo {
        let mut r = release(id, "1.0");
        r.kind = Kind::new(kind).unwrap();
        r
    }

    fn removal(id: &str, targets: u32) -> ReleaseRemoval {
        ReleaseRemoval {
            release: ReleaseId::new(id).unwrap(),
            kind: Kind::new("app").unwrap(),
            version: "1.0".into(),
            targets,
            kept: None,
        }
    }

    #[test]
    fn keep_latest_keeps_the_newest_of_each_kind_by_the_order_releases_were_made() {
        let all = [
            of_kind("r-999999", "app"),
            of_kind("r-000002", "os"),
            of_kind("r-1000000", "app"),
            of_kind("r-000001", "app"),
            of_kind("r-000003", "os"),
            of_kind("r-000004", "app"),
        ];
        let ids = |v: Vec<ReleaseId>| v.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        // r-1000000 was made after r-999999, though it sorts before it as text; os has two.
        assert_eq!(ids(older_than_newest(&all, 2)), ["r-000001", "r-000004"]);
        assert_eq!(
            ids(older_than_newest(&all, 1)),
            ["r-000001", "r-000002", "r-000004", "r-999999"]
        );
        assert!(older_than_newest(&all, 4).is_empty());
    }

    #[test]
    fn removals_go_in_batches_bounded_by_releases_and_target_records() {
        let sizes = |going: &[ReleaseRemoval]| {
            batches(going)
                .iter()
                .map(|b| b.len())
                .collect::<Vec<usize>>()
        };
        let small: Vec<ReleaseRemoval> = (0..250)
            .map(|i| removal(&format!("r-{i:06}"), 10))
            .collect();
        assert_eq!(sizes(&small), [100, 100, 50]);
        // 12,000 records each: one per request; a release over the bound goes alone.
        let large: Vec<ReleaseRemoval> = [12_000, 12_000, 50_000, 10, 10]
            .iter()
            .enumerate()
            .map(|(i, &n)| removal(&format!("r-{i:06}"), n))
            .collect();
        assert_eq!(sizes(&large), [1, 1, 1, 2]);
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn the_plan_lists_what_goes_and_why_the_others_stay() {
        let mut kept = removal("r-000003", 4);
        kept.kept = Some("it is the current app release of 1 machine (vm-1)".into());
        let text = plan_text(&[removal("r-000001", 2), removal("r-000002", 3)], &[kept]);
        assert_eq!(
            text,
            "to remove: 2 release(s), 5 per-machine record(s)\n\
             RELEASE   KIND  VERSION  TARGETS\n\
             r-000001  app   1.0      2\n\
             r-000002  app   1.0      3\n\
             kept: 1 release(s) still needed\n  \
             r-000003 (app 1.0): it is the current app release of 1 machine (vm-1)\n"
        );
        assert_eq!(plan_text(&[], &[]), "nothing to remove\n");
    }
}
