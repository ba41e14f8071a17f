//! `fleetcast db`: the platform's database: compacted on its host with the platform stopped, or
//! by the running platform (`--online`, an admin request); backed up by the running platform
//! (`backup`, an admin request, [`crate::backup`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::table::bytes;
use crate::store::compact::{self, is_due, DUE_GROWTH, DUE_MIN_BYTES};

#[derive(Subcommand)]
pub enum DbCmd {
    /// Copy the database's live data into a fresh one that takes its place (sled keeps what
    /// later writes replace: its file grows to several times its live data). With the platform
    /// stopped, on its host; with `--online`, by the running platform. `fleetcast serve` does it
    /// by itself when it is due, at start and while it runs.
    Compact(CompactArgs),
    /// Back the running platform up now, into a new directory `backups/<UTC time>` of its data
    /// dir (an admin request, from anywhere the CLI reaches the broker): the database copied
    /// and verified, the keys in force and the artifact files (hard links), laid out as a data
    /// dir, so `fleetcast serve --data` that directory starts the platform as it was. Writes
    /// wait for the copy. It holds every identity's secret: copy it off the host as such.
    Backup(BackupArgs),
}

#[derive(Args)]
pub struct CompactArgs {
    /// The platform's data directory (the database is its `db`).
    #[arg(long, env = "FLEETCAST_DATA", default_value = "./fleetcast-data")]
    pub data: PathBuf,
    /// Only say how large the database is, how much of it is live, and whether `serve` would
    /// compact it at its next start; change nothing.
    #[arg(long, conflicts_with = "online")]
    pub check: bool,
    /// Ask the running platform to compact its database now (an admin request, from anywhere
    /// the CLI reaches the broker; `--data` is not used). Its writes wait for the copy: status
    /// reports are acknowledged, and changes answered, that much later.
    #[arg(long)]
    pub online: bool,
}

#[derive(Args)]
pub struct BackupArgs {
    /// Print what was made as JSON (docs/schemas/backup.json): `path` is where, on the
    /// platform's host.
    #[arg(long)]
    pub json: bool,
}

/// How long `db compact --online` waits for the platform's answer.
const COMPACT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

pub async fn run(cmd: DbCmd, client: &super::ClientArgs) -> anyhow::Result<()> {
    match cmd {
        DbCmd::Compact(args) if args.online => {
            // Writes wait while it copies, and so does the answer: 2.1 s for 82 MiB of live
            // data (10,000 machines, six rollouts), more with more.
            let c = client
                .call_waiting(fleetcast_proto::calls::DbCompact {}, COMPACT_TIMEOUT)
                .await?;
            println!(
                "compacted while in use, writes held for {:.1} s: {} -> {} on disk ({} records, {} of keys and values, read back and verified)",
                c.took_ms as f64 / 1000.0,
                bytes(c.before_bytes),
                bytes(c.after_bytes),
                c.records,
                bytes(c.live_bytes)
            );
            Ok(())
        }
        DbCmd::Backup(args) => {
            let b = client
                .call_waiting(fleetcast_proto::calls::DbBackup {}, COMPACT_TIMEOUT)
                .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&b)?);
                return Ok(());
            }
            let copied = match b.artifact_files_copied {
                0 => "linked".to_owned(),
                n if n == b.artifact_files => "copied".to_owned(),
                n => format!("{n} of them copied, the rest linked"),
            };
            println!(
                "backed up to {} (on the platform's host) in {:.2} s, writes held for {:.2} s:\n  database:  {} records, {} of keys and values, {} on disk, read back and verified\n  keys:      generation {}\n  artifacts: {} files, {} ({copied})\nIt holds every identity's secret: copy it off this host (rsync -a, tar) as secretly as the data dir. To restore, stop `serve` and start it with `--data` on a copy of it (docs/operations.md, Backups).",
                b.path,
                b.took_ms as f64 / 1000.0,
                b.writes_held_ms as f64 / 1000.0,
                b.records,
                bytes(b.live_bytes),
                bytes(b.db_bytes),
                b.key_gen,
                b.artifact_files,
                bytes(b.artifact_bytes),
            );
            Ok(())
        }
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
