//! `fleetcast db`: the platform's database, with the platform stopped.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::table::bytes;
use crate::store::compact::{self, is_due, DUE_GROWTH, DUE_MIN_BYTES};

#[derive(Subcommand)]
pub enum DbCmd {
    /// Copy the database's live data into a fresh one that takes its place (sled keeps what
    /// later writes replace: its file grows to several times its live data). Needs the
    /// platform stopped; `fleetcast serve` does it by itself at start when it is due.
    Compact(CompactArgs),
}

#[derive(Args)]
pub struct CompactArgs {
    /// The platform's data directory (the database is its `db`).
    #[arg(long, env = "FLEETCAST_DATA", default_value = "./fleetcast-data")]
    pub data: PathBuf,
    /// Only say how large the database is, how much of it is live, and whether `serve` would
    /// compact it at its next start; change nothing.
    #[arg(long)]
    pub check: bool,
}

pub async fn run(cmd: DbCmd) -> anyhow::Result<()> {
    match cmd {
        DbCmd::Compact(args) => {
            let db = args.data.join("db");
            let check = args.check;
            tokio::task::spawn_blocking(move || compact_now(&db, check))
                .await
                .context("compaction task")?
        }
    }
}

fn compact_now(db: &std::path::Path, check: bool) -> anyhow::Result<()> {
    if check {
        let (sizes, live) = compact::inspect(db)?;
        println!(
            "{}: {} on disk, {} of keys and values in {} records ({} trees)",
            db.display(),
            bytes(sizes.on_disk),
            bytes(live.bytes),
            live.records,
            live.trees
        );
        match sizes.last {
            Some(last) => println!("last compacted to {}", bytes(last)),
            None => println!("never compacted"),
        }
        let due = is_due(sizes.on_disk, sizes.last);
        println!(
            "`fleetcast serve` {} compact it at its next start (it does from {} on disk, and at {}x the size of its last compaction)",
            if due { "will" } else { "will not" },
            bytes(DUE_MIN_BYTES),
            DUE_GROWTH
        );
        return Ok(());
    }
    println!("compacting {} ...", db.display());
    let r = compact::compact(db)?;
    println!(
        "compacted in {:.1} s: {} -> {} on disk ({} records in {} trees, {} of keys and values, read back and verified)",
        r.took.as_secs_f64(),
        bytes(r.before),
        bytes(r.after),
        r.records,
        r.trees,
        bytes(r.live_bytes)
    );
    Ok(())
}
