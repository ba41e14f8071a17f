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
    use fleetcast_proto::acl::Role;

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
    for (name, role) in [("val", Role::Viewer), ("oscar", Role::Operator)] {
        let profile = add_operator(&adm, name, role).await;
        let op = AdminClient::connect_as(&url, Topics::default(), name, profile.secret, WAIT)
            .await
            .unwrap();
        let err = op.call(calls::DbCompact {}).await.unwrap_err();
        assert!(err.to_string().contains("needs admin"), "{name}: {err}");
        op.close().await;
    }
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
