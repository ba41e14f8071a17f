//! `fleetcast db compact` and `serve --compact`, through the binary: a platform's database
//! compacted (refused while the platform runs) serves on with everything it held.

use std::process::{Child, Command, Output, Stdio};

use super::*;

/// `fleetcast serve`, killed when dropped (a failing test leaves no platform behind).
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_serve(data: &Path, broker: &BrokerUrl, compact: &str, out: &Path) -> Serve {
    let child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["serve", "--data"])
        .arg(data)
        .args(["--broker", &broker.to_string(), "--compact", compact])
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("fleetcast serve starts");
    Serve(child)
}

fn db_compact(data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["db", "compact", "--data"])
        .arg(data)
        .output()
        .unwrap()
}

async fn stop(mut platform: Serve) {
    interrupt(&mut platform.0).await;
}

/// What the platform holds, as an operator and an integrator read it.
async fn held(admin: &AdminClient, releases: &[ReleaseId]) -> serde_json::Value {
    let mut statuses = Vec::new();
    for r in releases {
        let mut s = serde_json::to_value(status(admin, r).await).unwrap();
        // The time of the reading, not of anything stored.
        s["progress"]["updated_at_ms"].take();
        statuses.push(s);
    }
    serde_json::json!({
        "releases": statuses,
        "events": serde_json::to_value(all_events(admin).await).unwrap(),
        "audit": serde_json::to_value(audit(admin).await).unwrap(),
    })
}

async fn database(admin: &AdminClient) -> fleetcast_proto::admin::DatabaseSize {
    let stats = admin.call(calls::Stats {}).await.unwrap();
    stats
        .database
        .expect("a platform on sled says how large its database is")
}

/// A platform (`serve --compact never`) on a broker of its own, with one machine, `vm-001`
/// in group `g`, that installed three releases.
struct Installed {
    _broker: fleetcast_broker::embedded::EmbeddedBroker,
    url: BrokerUrl,
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    out: PathBuf,
    platform: Serve,
    adm: AdminClient,
    vm: Machine,
    releases: Vec<ReleaseId>,
}

async fn three_installed() -> Installed {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("platform");
    let out = dir.path().join("serve.out");
    let platform = spawn_serve(&data_dir, &url, "never", &out);
    let adm = admin(&url, &data_dir).await;
    let mut vm = provision(&adm, &url, "vm-001", &["g"]).await;
    let mut releases = Vec::new();
    for (i, version) in ["1.0", "1.1", "1.2"].into_iter().enumerate() {
        upload(&adm, dir.path(), "a.bin", &data(3000, i as u8), version)
            .await
            .unwrap();
        let r = release(&adm, version, &[], &["g"]).await.release.id;
        for phase in [Phase::Downloading, Phase::Downloaded, Phase::Installed] {
            vm.report_recorded(&adm, &r, version, phase).await;
        }
        releases.push(r);
    }
    Installed {
        _broker: broker,
        url,
        dir,
        data_dir,
        out,
        platform,
        adm,
        vm,
        releases,
    }
}

/// `call` is refused to a viewer and an operator (added as `val` and `oscar`): it needs admin.
async fn refused_below_admin<C>(adm: &AdminClient, url: &BrokerUrl, call: C)
where
    C: fleetcast_proto::calls::Call + Clone,
    C::Reply: std::fmt::Debug,
{
    use fleetcast_proto::acl::Role;
    for (name, role) in [("val", Role::Viewer), ("oscar", Role::Operator)] {
        let profile = add_operator(adm, name, role).await;
        let op = AdminClient::connect_as(url, Topics::default(), name, profile.secret, WAIT)
            .await
            .unwrap();
        let err = op.call(call.clone()).await.unwrap_err();
        assert!(err.to_string().contains("needs admin"), "{name}: {err}");
        op.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_database_serves_on_with_everything_it_held_and_is_not_compacted_in_use() {
    let Installed {
        _broker,
        url,
        dir,
        data_dir,
        out,
        platform,
        adm,
        mut vm,
        releases,
    } = three_installed().await;
    let before = held(&adm, &releases).await;
    let db = database(&adm).await;
    assert!(
        db.on_disk_bytes > 0 && db.compacted_bytes.is_none(),
        "{db:?}"
    );
    assert!(!db.compaction_due, "small: not due ({db:?})");

    // In use: refused, nothing left beside the database.
    let refused = db_compact(&data_dir);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("in use"), "{said}");
    assert!(!data_dir.join("db.compacting").exists());
    adm.close().await;
    stop(platform).await;

    let done = db_compact(&data_dir);
    let said = String::from_utf8_lossy(&done.stdout);
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{said}{err}");
    assert!(said.contains("read back and verified"), "{said}");

    // `--compact always`: compacted again at start, then serving what it held.
    let platform = spawn_serve(&data_dir, &url, "always", &out);
    // Its start's lines (the admin secret is there already, so the client does not wait for
    // the platform).
    let printed = poll_until(
        Duration::from_secs(30),
        "serve prints its database line",
        || std::future::ready(std::fs::read_to_string(&out).unwrap()),
        |p| p.contains("database:"),
    )
    .await;
    assert!(printed.contains("database:        compacted"), "{printed}");
    let adm = admin(&url, &data_dir).await;
    let mut after = held(&adm, &releases).await;
    // The audit log may have grown since (the first reading is audited); what it held is kept.
    let audited = before["audit"].as_array().unwrap().len();
    assert!(audited > 0);
    after["audit"].as_array_mut().unwrap().truncate(audited);
    assert_eq!(after, before);
    // `stats` says when it was compacted (at this start: `--compact always`).
    let db = database(&adm).await;
    assert!(db.compacted_bytes.is_some_and(|b| b > 0), "{db:?}");
    assert!(!db.compaction_due, "{db:?}");
    // The machine's secret came along: its next report, MAC'd with it, is taken.
    upload(&adm, dir.path(), "a.bin", &data(3000, 9), "1.3")
        .await
        .unwrap();
    let r = release(&adm, "1.3", &[], &["g"]).await.release.id;
    vm.report_recorded(&adm, &r, "1.3", Phase::Installed).await;
    adm.close().await;
    stop(platform).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_platform_compacts_its_database_on_an_admins_command_and_serves_on_with_all_of_it(
) {
    use super::cli::Fleetcast;

    let Installed {
        _broker,
        url,
        dir,
        data_dir,
        out,
        platform,
        adm,
        mut vm,
        mut releases,
    } = three_installed().await;

    // Below admin: refused, nothing compacted.
    refused_below_admin(&adm, &url, calls::DbCompact {}).await;
    assert!(database(&adm).await.compacted_bytes.is_none());
    let before = held(&adm, &releases).await;

    // By an operator's command, from the CLI: the platform goes on serving what it held.
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    let said = fc.run(&["db", "compact", "--online"]).await.ok();
    assert!(said.contains("compacted while in use"), "{said}");
    assert!(said.contains("read back and verified"), "{said}");
    let db = database(&adm).await;
    assert!(db.compacted_bytes.is_some_and(|b| b > 0), "{db:?}");
    let mut after = held(&adm, &releases).await;
    let audited = before["audit"].as_array().unwrap().len();
    let audit = after["audit"].as_array_mut().unwrap();
    assert!(
        audit[audited..]
            .iter()
            .any(|e| e.to_string().contains("db_compact")),
        "the compaction is audited: {audit:?}"
    );
    audit.truncate(audited);
    assert_eq!(after, before);

    // Again, sent beside a machine's report: the report is stored and acknowledged. (The
    // database is small, so the two need not overlap; the store's unit test
    // `a_store_in_use_compacts_and_loses_no_write_made_meanwhile` makes writes overlap a
    // compaction and checks that they did.)
    upload(&adm, dir.path(), "a.bin", &data(3000, 7), "1.3")
        .await
        .unwrap();
    let r = release(&adm, "1.3", &[], &["g"]).await.release.id;
    let (compacted, reported) = tokio::join!(
        adm.call(calls::DbCompact {}),
        vm.report_recorded(&adm, &r, "1.3", Phase::Installed)
    );
    let compacted = compacted.unwrap();
    assert!(
        compacted.records > 0 && compacted.after_bytes > 0,
        "{compacted:?}"
    );
    assert_eq!(phase_of(&reported, "vm-001"), Phase::Installed);
    releases.push(r);
    let held_now = held(&adm, &releases).await;
    // The old database's files go once nothing reads them.
    poll_until(
        Duration::from_secs(30),
        "the replaced database is deleted",
        || std::future::ready(data_dir.join("db.old").exists()),
        |exists| !exists,
    )
    .await;
    assert!(!data_dir.join("db.compacting").exists());

    // Restarted, it opens the compacted database with all of it, and the machine's secret
    // and counters came along: its next MAC'd report is taken.
    adm.close().await;
    stop(platform).await;
    let platform = spawn_serve(&data_dir, &url, "never", &out);
    let adm = admin(&url, &data_dir).await;
    let mut again = held(&adm, &releases).await;
    let audited = held_now["audit"].as_array().unwrap().len();
    again["audit"].as_array_mut().unwrap().truncate(audited);
    assert_eq!(again, held_now);
    upload(&adm, dir.path(), "a.bin", &data(3000, 8), "1.4")
        .await
        .unwrap();
    let r = release(&adm, "1.4", &[], &["g"]).await.release.id;
    vm.report_recorded(&adm, &r, "1.4", Phase::Installed).await;
    adm.close().await;
    stop(platform).await;
}

/// `fleetcast db backup`: a running platform backed up into a directory that starts, as a data
/// dir, the platform as it was then; what came after is not in it, and the machine's secret and
/// the rotated key came along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_platform_backs_up_into_a_data_dir_that_starts_as_it_was() {
    use super::cli::Fleetcast;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    let Installed {
        _broker,
        url,
        dir,
        data_dir,
        out,
        platform,
        adm,
        mut vm,
        releases,
    } = three_installed().await;

    // Below admin: refused (a backup holds every identity's secret), nothing made.
    refused_below_admin(&adm, &url, calls::DbBackup {}).await;
    assert!(!data_dir.join("backups").exists());
    adm.call(calls::KeyRotate {}).await.unwrap();
    let before = held(&adm, &releases).await;

    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    let said = fc.run(&["db", "backup"]).await.ok();
    assert!(said.contains("read back and verified"), "{said}");
    assert!(said.contains("generation 1"), "{said}");
    let path = said
        .strip_prefix("backed up to ")
        .and_then(|s| s.split(" (on the platform's host)").next())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("the backup's path: {said}"));
    assert_eq!(path.parent(), Some(data_dir.join("backups").as_path()));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o700, "{}", path.display());
    assert_eq!(mode(&data_dir.join("backups")), 0o700);
    for secret in ["platform.key", "admin.secret"] {
        assert_eq!(mode(&path.join(secret)), 0o600, "{secret}");
        assert_eq!(
            std::fs::read(path.join(secret)).unwrap(),
            std::fs::read(data_dir.join(secret)).unwrap(),
            "{secret}"
        );
    }
    assert_eq!(
        std::fs::read(path.join("key-chain.json")).unwrap(),
        std::fs::read(data_dir.join("key-chain.json")).unwrap()
    );
    // Each artifact's bytes and manifest, linked (the same file, no second copy).
    let mut linked = 0;
    for entry in std::fs::read_dir(path.join("artifacts")).unwrap() {
        let entry = entry.unwrap();
        let live = data_dir.join("artifacts").join(entry.file_name());
        assert_eq!(
            entry.metadata().unwrap().ino(),
            std::fs::metadata(&live).unwrap().ino(),
            "{}",
            live.display()
        );
        linked += 1;
    }
    assert_eq!(
        linked, 6,
        "three artifacts, each its bytes and its manifest"
    );
    assert!(said.contains("6 files"), "{said}");

    // The platform goes on; what it stores now is not in the backup.
    upload(&adm, dir.path(), "a.bin", &data(3000, 7), "1.3")
        .await
        .unwrap();
    let later = release(&adm, "1.3", &[], &["g"]).await.release.id;
    vm.report_recorded(&adm, &later, "1.3", Phase::Installed)
        .await;
    // A second backup has a name of its own.
    let again = adm.call(calls::DbBackup {}).await.unwrap();
    assert_ne!(PathBuf::from(&again.path), path);
    assert!(again.records > 0, "{again:?}");
    adm.close().await;
    stop(platform).await;

    // Started on the backup: what was held then, the rotated key, the machine's secret.
    let platform = spawn_serve(&path, &url, "never", &dir.path().join("restored.out"));
    let adm = admin(&url, &path).await;
    let mut restored = held(&adm, &releases).await;
    let audited = before["audit"].as_array().unwrap().len();
    restored["audit"].as_array_mut().unwrap().truncate(audited);
    assert_eq!(restored, before);
    let err = adm
        .call(calls::ReleaseStatus {
            release: later.clone(),
            after: None,
            limit: None,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown release"), "{err}");
    let stats = adm.call(calls::Stats {}).await.unwrap();
    assert!(stats.database.is_some(), "{stats:?}");
    assert_eq!(
        std::fs::read_to_string(path.join("platform.pub")).unwrap(),
        std::fs::read_to_string(data_dir.join("platform.pub")).unwrap()
    );
    upload(&adm, dir.path(), "a.bin", &data(3000, 8), "1.4")
        .await
        .unwrap();
    let r = release(&adm, "1.4", &[], &["g"]).await.release.id;
    vm.report_recorded(&adm, &r, "1.4", Phase::Installed).await;
    adm.close().await;
    stop(platform).await;
    drop(out);
}

/// `backups` on a disk of its own (a mount, as an operator would put backups elsewhere): the
/// artifacts cannot be linked there, so they are copied; once that disk is full, a backup is
/// refused with the reason, leaves nothing behind, and the platform goes on storing. Needs
/// root (a tmpfs mount); skipped with the reason otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_on_another_disk_copies_the_artifacts_and_one_that_does_not_fit_leaves_nothing() {
    use super::full_disk::SmallDisk;

    let Installed {
        _broker,
        url: _,
        dir: _dir,
        data_dir,
        out: _,
        platform,
        adm,
        mut vm,
        releases,
    } = three_installed().await;
    let disk = match SmallDisk::mount(&data_dir.join("backups"), 16 << 20) {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("skipped: another disk needs a tmpfs mount: {why}");
            adm.close().await;
            stop(platform).await;
            return;
        }
    };
    let made = adm.call(calls::DbBackup {}).await.unwrap();
    assert_eq!(made.artifact_files, 6, "{made:?}");
    assert_eq!(made.artifact_files_copied, 6, "{made:?}");
    let path = PathBuf::from(&made.path);
    for entry in std::fs::read_dir(path.join("artifacts")).unwrap() {
        let entry = entry.unwrap();
        let live = data_dir.join("artifacts").join(entry.file_name());
        assert_eq!(
            std::fs::read(entry.path()).unwrap(),
            std::fs::read(live).unwrap()
        );
    }

    let filler = disk.fill();
    let err = adm.call(calls::DbBackup {}).await.unwrap_err().to_string();
    assert!(err.contains("not enough free space"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&disk.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left.len(),
        2,
        "the first backup and the filler only: {left:?}"
    );
    // The platform stores on.
    vm.report_recorded(&adm, &releases[2], "1.2", Phase::Installed)
        .await;
    std::fs::remove_file(filler).unwrap();
    adm.close().await;
    stop(platform).await;
    drop(disk);
}
