//! `fleetcast artifact upload|list|remove`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use fleetcast_proto::admin::ArtifactInfo;
use fleetcast_proto::calls;
use fleetcast_proto::chunk::DEFAULT_CHUNK_SIZE;
use fleetcast_proto::Kind;
use indicatif::{ProgressBar, ProgressStyle};

use super::{confirm, print_json, table, ClientArgs};

#[derive(Subcommand)]
pub enum ArtifactCmd {
    /// Upload a version file.
    Upload {
        file: PathBuf,
        /// Version type, e.g. app or firmware.
        #[arg(long)]
        kind: Kind,
        #[arg(long)]
        version: String,
        #[arg(long)]
        notes: Option<String>,
        /// Bytes per chunk: a power of two from 1 KiB to 1 MiB.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
    },
    /// List uploaded version files (removed ones too: their bytes are gone, their versions
    /// stay bound to them).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a version file's bytes to free the platform's disk. Refused while any machine
    /// may still fetch it; uploading the same file again restores it.
    Remove {
        #[arg(long)]
        kind: Kind,
        #[arg(long)]
        version: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(cmd: ArtifactCmd, client: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        ArtifactCmd::Upload {
            file,
            kind,
            version,
            notes,
            chunk_size,
        } => {
            // A file that cannot be read is said before connecting: a typo in its path must
            // not read as a connection or credentials problem.
            std::fs::File::open(&file)
                .and_then(|f| f.metadata())
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let admin = client.connect().await?;
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("uploading {}", file.display()));
            let result = admin
                .upload(
                    &file,
                    kind.clone(),
                    version.clone(),
                    notes,
                    chunk_size,
                    |sent, total| {
                        bar.set_length(total);
                        bar.set_position(sent);
                    },
                )
                .await;
            bar.finish_and_clear();
            admin.close().await;
            let info = result
                .with_context(|| format!("uploading {} as {kind} {version}", file.display()))?;
            print!("{}", uploaded(&info));
            Ok(())
        }
        ArtifactCmd::List { json } => {
            let artifacts = client.call(calls::ArtifactList {}).await?;
            if json {
                return print_json(&artifacts);
            }
            print!("{}", list(&artifacts));
            Ok(())
        }
        ArtifactCmd::Remove { kind, version, yes } => {
            let question = format!(
                "Delete the file of {kind} {version}? It can no longer be released or rolled back to until it is uploaded again."
            );
            if !confirm(&question, yes)? {
                anyhow::bail!("not removed");
            }
            let info = client
                .call(calls::ArtifactRemove {
                    kind: kind.clone(),
                    version: version.clone(),
                })
                .await
                .with_context(|| format!("removing {kind} {version}"))?;
            println!(
                "removed {} {} ({}, {}): artifact {}",
                info.kind,
                info.version,
                info.name,
                table::bytes(info.size),
                info.id.short()
            );
            Ok(())
        }
    }
}

pub fn uploaded(info: &ArtifactInfo) -> String {
    format!(
        "uploaded {} {} ({}, {}) as artifact {}\n",
        info.kind,
        info.version,
        info.name,
        table::bytes(info.size),
        info.id
    )
}

pub fn list(artifacts: &[ArtifactInfo]) -> String {
    let rows: Vec<Vec<String>> = artifacts
        .iter()
        .map(|a| {
            vec![
                a.kind.to_string(),
                a.version.clone(),
                a.id.short(),
                table::bytes(a.size),
                a.name.clone(),
                table::time(Some(a.uploaded_at_ms)),
                table::time(a.removed_at_ms),
                a.notes.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table::render(
        &[
            "KIND", "VERSION", "ARTIFACT", "SIZE", "NAME", "UPLOADED", "REMOVED", "NOTES",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::ArtifactId;

    #[test]
    fn the_artifact_list_shows_kind_version_and_short_id() {
        let a = ArtifactInfo {
            id: ArtifactId::of(b"x"),
            kind: Kind::new("app").unwrap(),
            version: "2.4.1".into(),
            name: "app.bin".into(),
            size: 2048,
            chunk_size: 65536,
            notes: None,
            uploaded_at_ms: 0,
            removed_at_ms: None,
        };
        let out = list(std::slice::from_ref(&a));
        let short = a.id.short();
        assert_eq!(
            out,
            format!("KIND  VERSION  ARTIFACT      SIZE     NAME     UPLOADED             REMOVED  NOTES\napp   2.4.1    {short}  2.0 KiB  app.bin  1970-01-01 00:00:00  -\n")
        );
    }
}
