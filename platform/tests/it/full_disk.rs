//! A full disk under the platform (docs/operations.md, "A full disk"): the platform's data dir is
//! a small tmpfs, filled to the last byte after a release is published; the machines then come
//! online and report. The first store write that cannot be made stops the platform with the
//! reason; started again on the full disk it stops at once with the reason; once space is freed
//! it starts, the machines send what was never acknowledged, and every machine's events are
//! stored exactly once. Needs root (a tmpfs mount); skipped with the reason otherwise.

use std::io::Write;

use super::e2e::machine_config;
use super::*;

const MACHINES: usize = 4;

/// A tmpfs mounted on a directory, unmounted when dropped.
pub(super) struct SmallDisk(pub(super) PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` on `path`, or says why it cannot (not root, no mount
    /// permission here).
    pub(super) fn mount(path: &Path, bytes: u64) -> Result<Self, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root, so no tmpfs can be mounted".into());
        }
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        match out.status.success() {
            true => Ok(Self(path.to_owned())),
            false => Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Writes a file on it until the disk is full; returns its path.
    pub(super) fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0xA5u8; 4096];
        loop {
            match f.write_all(&block).and_then(|_| f.sync_data()) {
                Ok(()) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Waits for the platform to stop by itself; returns its error.
async fn stopped_with_error(p: Platform, within: Duration) -> String {
    let ended = tokio::time::timeout(within, p.task)
        .await
        .unwrap_or_else(|_| panic!("the platform did not stop within {within:?}"));
    match ended.expect("serve task joined") {
        Ok(()) => panic!("the platform stopped without an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_platform_with_the_reason_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let disk = match SmallDisk::mount(&data, 32 * 1024 * 1024) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: a full disk needs a small file system: {why}");
            return;
        }
    };
    let broker = start_on_free_port(|s| s).unwrap().url();
    let platform = start_platform(&broker, &data);
    let adm = admin(&broker, &data).await;
    let mut provisioned_machines = Vec::new();
    for i in 1..=MACHINES {
        provisioned_machines.push(provisioned(&adm, &format!("vm-{i}"), &["lab"]).await);
    }
    let (_, release) = app_release(
        &adm,
        dir.path(),
        "2.0.0",
        200_000,
        3,
        InstallPolicy::Immediate,
    )
    .await;
    let release = release.id;
    // Published while every machine is offline: they find the retained group notice when
    // they come online, after the disk is full.
    publish(&adm, &release, &[], &["lab"]).await;

    let filler = disk.fill();
    let agents = CancellationToken::new();
    let running: Vec<_> = provisioned_machines
        .iter()
        .map(|p| {
            let config = machine_config(p, &broker, dir.path());
            tokio::spawn(fleetcast_device::agent::run(config, agents.clone()))
        })
        .collect();

    // Their first reports cannot be stored: the platform stops, saying why.
    let error = stopped_with_error(platform, Duration::from_secs(60)).await;
    assert!(error.contains("No space left on device"), "{error}");
    // Started again on the full disk, it stops at once, saying why.
    let again = stopped_with_error(start_platform(&broker, &data), Duration::from_secs(30)).await;
    assert!(again.contains("No space left on device"), "{again}");

    // Space freed: it starts, and the machines' reports, kept until acknowledged, come in.
    std::fs::remove_file(filler).unwrap();
    let platform = start_platform(&broker, &data);
    let s = until_finished(&adm, &release, MACHINES).await;
    assert!(
        s.targets.iter().all(|t| t.phase == Phase::Installed),
        "{:?}",
        s.targets
    );
    // Each machine's events, each stored once (a report sent again after the stop is not
    // stored twice), its download and install there.
    let events: Vec<FleetEvent> = all_events(&adm)
        .await
        .into_iter()
        .filter(|e| e.release.as_ref() == Some(&release))
        .collect();
    for p in &provisioned_machines {
        let mine: Vec<&FleetEvent> = events.iter().filter(|e| e.machine == p.machine).collect();
        let once = |phase: Phase| mine.iter().filter(|e| e.phase == phase).count() == 1;
        assert!(
            once(Phase::Downloaded) && once(Phase::Installed),
            "{}: {mine:?}",
            p.machine
        );
        let mut seen = std::collections::HashSet::new();
        for e in &mine {
            let what = (e.phase, e.at_ms, e.attempt, e.progress.map(|p| p.bytes));
            assert!(seen.insert(what), "{}: stored twice: {e:?}", p.machine);
        }
    }

    agents.cancel();
    for agent in running {
        joined(agent, "agent").await;
    }
    adm.close().await;
    platform.stop().await;
    drop(disk);
}

/// `fleetcast db compact` on a disk with less free space than the database's file (what its
/// copy may need at most): refused with the reason before anything is written, the database
/// left whole; once there is room, compacted.
#[test]
fn a_compaction_with_less_free_space_than_the_database_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = match SmallDisk::mount(&dir.path().join("small"), 48 << 20) {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("skipped: a full disk needs a small file system: {why}");
            return;
        }
    };
    let data = disk.0.join("platform");
    let db_path = data.join("db");
    // A database of rewritten records, as a rollout leaves it: mostly dead space.
    let records = {
        let db = sled::open(&db_path).unwrap();
        let machines = db.open_tree("machines").unwrap();
        for round in 0..40u32 {
            for m in 0..200u32 {
                machines
                    .insert(format!("vm-{m:03}"), vec![round as u8; 2000])
                    .unwrap();
            }
            db.flush().unwrap();
        }
        machines.len()
    };
    let compact = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
            .args(["db", "compact", "--data"])
            .arg(&data)
            .output()
            .unwrap()
    };
    // sled changes its files when it opens a database (its recovery, and a new snapshot) and
    // its flusher runs on a moment after a close, so what the compaction's open finds free
    // differed from what was left here (one CI run: the copy went ahead). The disk is filled
    // only once opening changes nothing more: opened, each time once it is no longer locked,
    // three times. Then full, and half of what the compaction compares with (sled's size on disk)
    // given back: room for sled to open the database, not for a copy of its file.
    let settled = || {
        for _ in 0..100 {
            if let Ok(db) = sled::open(&db_path) {
                return db.size_on_disk().unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the database stayed locked");
    };
    settled();
    let on_disk = settled();
    settled();
    assert!(on_disk > 1 << 20, "a database of {on_disk} bytes");
    let filler = disk.fill();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap();
        f.set_len(f.metadata().unwrap().len() - on_disk / 2)
            .unwrap();
    }
    let refused = compact();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(said.contains("not enough free space"), "{said}");
    assert!(said.contains("left as it was"), "{said}");
    assert!(!data.join("db.compacting").exists(), "no partial copy left");
    std::fs::remove_file(filler).unwrap();
    {
        let db = sled::open(&db_path).unwrap();
        assert_eq!(db.open_tree("machines").unwrap().len(), records, "whole");
    }
    let done = compact();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let db = sled::open(&db_path).unwrap();
    assert_eq!(db.open_tree("machines").unwrap().len(), records);
}
