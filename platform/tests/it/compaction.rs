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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_database_serves_on_with_everything_it_held_and_is_not_compacted_in_use() {
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
