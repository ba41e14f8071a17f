//! The `fleetcast` binary as an operator runs it, against a real platform: client options on
//! either side of the subcommand, credentials found without flags, typos in targets refused
//! with nothing stored or sent, every `--json` output valid against its schema in
//! docs/schemas/, and `serve` logs without colour codes or routine ERROR lines.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;

use fleetcast_platform::store::{Reads, SledStore};
use serde_json::Value;

use super::*;

/// One run of the binary.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) code: i32,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl Run {
    /// Stdout of a run that must have succeeded.
    pub(super) fn ok(self) -> String {
        assert_eq!(self.code, 0, "failed: {self:#?}");
        self.stdout
    }

    /// Stdout of a successful run, as JSON.
    pub(super) fn json(self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }
}

/// The `fleetcast` binary in an environment of its own: nothing inherited (no FLEETCAST_*,
/// RUST_LOG, or the developer's saved profile), HOME in a temp dir, run in `cwd`.
pub(super) struct Fleetcast {
    home: PathBuf,
    cwd: PathBuf,
    env: Vec<(String, String)>,
}

impl Fleetcast {
    pub(super) fn new(root: &Path) -> Self {
        let (home, cwd) = (root.join("home"), root.join("cwd"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&cwd).unwrap();
        Self {
            home,
            cwd,
            env: vec![],
        }
    }

    /// The same, with `name=value` set.
    pub(super) fn with(&self, name: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        let mut env = self.env.clone();
        env.push((name.into(), value.as_ref().to_string_lossy().into_owned()));
        Self {
            home: self.home.clone(),
            cwd: self.cwd.clone(),
            env,
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"));
        cmd.args(args)
            .env_clear()
            .env("HOME", &self.home)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(Stdio::null());
        cmd
    }

    pub(super) async fn run(&self, args: &[&str]) -> Run {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("fleetcast {args:?} did not finish within 60 s"))
            .expect("fleetcast runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The ids of `fleetcast events --json` output, in order.
fn event_ids(v: Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect()
}

/// Everything the CLI should never have sent or stored, checked in the stopped platform's
/// database: which desired notices (topics) exist, and every release with its seq.
fn stored(data_dir: &Path) -> (BTreeSet<String>, Vec<(String, u64, bool)>) {
    let store = SledStore::open(&data_dir.join("db")).unwrap();
    let topics = store
        .all_desired()
        .unwrap()
        .into_iter()
        .map(|n| n.topic)
        .collect();
    let releases = store
        .releases()
        .unwrap()
        .into_iter()
        .map(|r| (r.id.to_string(), r.seq, r.rollback))
        .collect();
    (topics, releases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_options_work_before_and_after_the_subcommand_and_credentials_need_no_flag() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url().to_string();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&broker.url()).await;
    provisioned(&admin, "vm-001", &["g1"]).await;
    let fc = Fleetcast::new(dir.path());
    let secret_file = admin_secret_path(&data_dir);
    let secret_file = secret_file.to_str().unwrap();

    let before = fc
        .run(&[
            "--broker",
            &url,
            "--admin-secret-file",
            secret_file,
            "machines",
            "--json",
        ])
        .await
        .json();
    let after = fc
        .run(&[
            "machines",
            "--json",
            "--broker",
            &url,
            "--admin-secret-file",
            secret_file,
        ])
        .await
        .json();
    assert_eq!(before[0]["id"], "vm-001");
    assert_eq!(before, after);

    // No credentials anywhere: exit 1, and every place tried is named.
    let none = fc.run(&["--broker", &url, "machines"]).await;
    assert_eq!(none.code, 1, "{none:#?}");
    for place in [
        "--profile",
        "--admin-secret-file",
        ".config/fleetcast/profile.toml",
        "FLEETCAST_DATA",
        "fleetcast-data/admin.secret",
    ] {
        assert!(none.stderr.contains(place), "{place}: {}", none.stderr);
    }
    // The data dir of `fleetcast serve` in FLEETCAST_DATA, the broker in FLEETCAST_BROKER.
    let served = fc
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", &url);
    assert_eq!(served.run(&["machines", "--json"]).await.json(), before);

    // Save a new operator's profile once; then it is who the CLI is, with no flag or env.
    let saved = served
        .run(&[
            "operator",
            "add",
            "alice",
            "--role",
            "viewer",
            "--save-profile",
        ])
        .await
        .ok();
    let profile = fc.home.join(".config/fleetcast/profile.toml");
    assert!(saved.contains(profile.to_str().unwrap()), "{saved}");
    assert!(
        !saved.contains("secret"),
        "the secret is not printed: {saved}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&profile).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(fc.run(&["machines", "--json"]).await.json(), before);
    let as_alice = fc.run(&["audit"]).await;
    assert_eq!(as_alice.code, 1);
    assert!(
        as_alice.stderr.contains("operator alice has role viewer"),
        "{as_alice:#?}"
    );
    let shown = fc.run(&["profile", "show"]).await.ok();
    assert!(
        shown.contains("operator:      alice") && shown.contains("saved profile"),
        "{shown}"
    );
    // The saved profile outranks FLEETCAST_DATA; a flag outranks the saved profile.
    let shown = served.run(&["profile", "show"]).await.ok();
    assert!(shown.contains("alice"), "{shown}");
    let shown = served
        .run(&["profile", "show", "--admin-secret-file", secret_file])
        .await
        .ok();
    assert!(shown.contains("operator:      admin"), "{shown}");
    // A second --save-profile is refused before the operator is created.
    let again = served
        .run(&[
            "--admin-secret-file",
            secret_file,
            "operator",
            "add",
            "bob",
            "--role",
            "viewer",
            "--save-profile",
        ])
        .await;
    assert_eq!(again.code, 1, "{again:#?}");
    assert!(again.stderr.contains("--force"), "{again:#?}");
    let operators = admin.call(calls::OperatorList {}).await.unwrap();
    let names: Vec<&str> = operators.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["admin", "alice"]);

    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_the_targets_publishes_and_stores_nothing_unless_allowed() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    upload(&admin, dir.path(), "a.bin", &data(1500, 3), "1.0")
        .await
        .unwrap();
    provisioned(&admin, "vm-001", &["shanghai"]).await;
    let release = create_release(&admin, &app(), "1.0", InstallPolicy::Immediate).await;
    let r = release.id.as_str();
    let mut observer = peer(&url, "observer").await;
    observer.subscribe("fleet/+/+/release/+").await;
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());

    let typo = fc
        .run(&["release", "publish", r, "--groups", "shanghi", "--yes"])
        .await;
    assert_eq!(typo.code, 1, "{typo:#?}");
    assert!(
        typo.stderr.contains("unknown group(s): shanghi") && typo.stderr.contains("--allow-empty"),
        "{typo:#?}"
    );
    assert!(
        !typo.stdout.contains("target machines"),
        "refused before the plan is shown: {typo:#?}"
    );
    let typo = fc
        .run(&[
            "release",
            "publish",
            r,
            "--groups",
            "shanghai",
            "--machines",
            "vm-0001",
            "--yes",
        ])
        .await;
    assert_eq!(typo.code, 1, "{typo:#?}");
    assert!(typo.stderr.contains("vm-0001"), "{typo:#?}");
    let typo = fc
        .run(&[
            "rollback", "--group", "nogroup", "--kind", "app", "--to", "1.0", "--yes",
        ])
        .await;
    assert_eq!(typo.code, 1, "{typo:#?}");
    assert!(typo.stderr.contains("nogroup"), "{typo:#?}");
    let bad_id = fc
        .run(&["release", "publish", r, "--groups", "a/b", "--yes"])
        .await;
    assert_eq!(
        bad_id.code, 2,
        "a malformed id is a usage error: {bad_id:#?}"
    );

    let sent = observer.drain(Duration::from_millis(500)).await;
    assert!(
        sent.is_empty(),
        "nothing retained: {:?}",
        sent.iter().map(|p| &p.topic).collect::<Vec<_>>()
    );
    // Stop the platform to read its database: nothing was stored either.
    admin.close().await;
    platform.stop().await;
    let (topics, releases) = stored(&data_dir);
    assert!(topics.is_empty(), "{topics:?}");
    assert_eq!(
        releases,
        vec![(r.to_owned(), 0, false)],
        "no rollback release"
    );

    // With --allow-empty both go ahead: the group's notice waits, retained, for its machines.
    let platform = start_platform(&url, &data_dir);
    super::admin(&url, &data_dir).await.close().await;
    let published = fc
        .run(&[
            "release",
            "publish",
            r,
            "--groups",
            "shanghi",
            "--allow-empty",
            "--yes",
        ])
        .await;
    let out = published.ok();
    assert!(out.contains("target machines: 0"), "{out}");
    observer
        .next(|p| p.topic == "fleet/groups/shanghi/release/app")
        .await;
    // Retained: a machine that joins the group later gets it on subscribing.
    let mut later = peer(&url, "later").await;
    later.subscribe("fleet/groups/shanghi/release/app").await;
    assert!(later.next(|_| true).await.retain);
    let rollback = fc
        .run(&[
            "rollback",
            "--group",
            "nogroup",
            "--kind",
            "app",
            "--to",
            "1.0",
            "--yes",
            "--allow-empty",
            "--quiet",
        ])
        .await
        .ok();
    observer
        .next(|p| p.topic == "fleet/groups/nogroup/release/app")
        .await;
    platform.stop().await;
    let (topics, releases) = stored(&data_dir);
    assert_eq!(
        topics,
        BTreeSet::from([
            "fleet/groups/nogroup/release/app".to_owned(),
            "fleet/groups/shanghi/release/app".to_owned()
        ])
    );
    assert_eq!(releases.len(), 2);
    assert_eq!(releases[1].0, rollback.trim());
    assert!(releases.iter().all(|(_, seq, _)| *seq > 0));
}

/// Every schema under docs/schemas/, by file name.
fn schemas() -> BTreeMap<String, Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let schema: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                schema,
            )
        })
        .collect()
}

/// `instance` is valid against `schema` (and `schema` is a valid draft 2020-12 schema).
fn assert_valid(name: &str, schema: &Value, instance: &Value) {
    if let Err(e) = jsonschema::draft202012::meta::validate(schema) {
        panic!("{name} is not a valid 2020-12 schema: {e}");
    }
    let validator = jsonschema::draft202012::new(schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "output does not match {name}:\n{}\n{instance:#}",
        errors.join("\n")
    );
    // Strict: an object the code does not produce (an unknown field) fails.
    let mut extra = instance.clone();
    let object = match &mut extra {
        Value::Array(items) => items.first_mut(),
        other => Some(other),
    }
    .and_then(Value::as_object_mut)
    .unwrap_or_else(|| panic!("{name}: the test needs a non-empty output"));
    object.insert("no_such_field".into(), Value::Bool(true));
    assert!(!validator.is_valid(&extra), "{name} accepts unknown fields");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_output_matches_its_schema_in_docs() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    // A little of everything, so optional fields appear: notes, a window policy with an
    // offset, progress, errors, results with times, a revoked operator's audit trail.
    let file = dir.path().join("app-1.0.bin");
    std::fs::write(&file, data(3000, 9)).unwrap();
    admin
        .upload(
            &file,
            app(),
            "1.0".into(),
            Some("first".into()),
            1024,
            |_, _| {},
        )
        .await
        .unwrap();
    let mut vm1 = provision(&admin, &url, "vm-001", &["g1"]).await;
    let mut vm2 = provision(&admin, &url, "vm-002", &["g1"]).await;
    provisioned(&admin, "vm-003", &[]).await;
    vm1.report_state(&["g1"], 0).await;
    let id = fc
        .run(&[
            "release",
            "create",
            "--kind",
            "app",
            "--version",
            "1.0",
            "--policy",
            "window:02:00-04:00@+08:00",
            "--notes",
            "window rollout",
        ])
        .await
        .ok();
    let release = ReleaseId::new(id.trim()).unwrap();
    let mut outputs: Vec<(&str, &str, Value)> = vec![];
    let plan = fc
        .run(&[
            "release",
            "publish",
            release.as_str(),
            "--groups",
            "g1",
            "--machines",
            "vm-003",
            "--yes",
            "--json",
        ])
        .await
        .json();
    assert_eq!(plan["targets"][2], serde_json::json!(["vm-003", null]));
    outputs.push(("release publish", "plan.json", plan));
    vm1.report(Some(&release), "1.0", Phase::Notified).await;
    let mut downloading = vm1.status(Some(&release), "1.0", Phase::Downloading);
    downloading.progress = Some(Progress {
        bytes: 1024,
        total: 3000,
    });
    vm1.send_status(&downloading).await;
    vm1.report(Some(&release), "1.0", Phase::Downloaded).await;
    vm1.report(Some(&release), "1.0", Phase::Installing).await;
    vm1.report_recorded(&admin, &release, "1.0", Phase::Installed)
        .await;
    let mut downloading = vm2.status(Some(&release), "1.0", Phase::Downloading);
    downloading.progress = Some(Progress {
        bytes: 2048,
        total: 3000,
    });
    vm2.send_status(&downloading).await;
    let mut failed = vm2.status(Some(&release), "1.0", Phase::DownloadFailed);
    failed.error = Some("disk full".into());
    vm2.send_status(&failed).await;
    wait_status(&admin, &release, |s| {
        phase_of(s, "vm-002") == Phase::DownloadFailed
    })
    .await;
    let rollback = fc
        .run(&[
            "rollback",
            "--machine",
            "vm-001",
            "--kind",
            "app",
            "--to",
            "1.0",
            "--yes",
            "--json",
        ])
        .await
        .json();
    let rollback_id = rollback["release"]["id"].as_str().unwrap().to_owned();
    outputs.push(("rollback", "plan.json", rollback));
    // Inventory, before the staged rollout below makes another release current.
    for (what, args, schema) in [
        (
            "machines filtered",
            &[
                "machines",
                "--kind",
                "app",
                "--phase",
                "download_failed",
                "--json",
            ][..],
            "machines.json",
        ),
        (
            "versions",
            &["versions", "--kind", "app", "--json"],
            "versions.json",
        ),
        (
            "history",
            &["history", "--machine", "vm-001", "--json"],
            "history.json",
        ),
        (
            "history of a failure",
            &["history", "--machine", "vm-002", "--kind", "app", "--json"],
            "history.json",
        ),
    ] {
        outputs.push((what, schema, fc.run(args).await.json()));
    }
    // A staged rollout: its publish, then pause (a state with a reason) and status.
    let staged = fc
        .run(&["release", "create", "--kind", "app", "--version", "1.0"])
        .await
        .ok();
    let staged = staged.trim();
    let plan = fc
        .run(&[
            "release",
            "publish",
            staged,
            "--groups",
            "g1",
            "--waves",
            "50%",
            "--wave-timeout",
            "30m",
            "--yes",
            "--json",
        ])
        .await
        .json();
    assert_eq!(
        plan["rollout"]["plan"]["waves_bp"],
        serde_json::json!([5000, 10000])
    );
    outputs.push(("release publish --waves", "plan.json", plan));
    let paused = fc.run(&["rollout", "pause", staged, "--json"]).await.json();
    assert_eq!(paused["state"], "paused");
    outputs.push(("rollout pause", "rollout.json", paused));
    let status = fc
        .run(&["rollout", "status", staged, "--json"])
        .await
        .json();
    assert_eq!(status["tally"]["notified"], 1, "{status}");
    outputs.push(("rollout status", "rollout.json", status));
    let staged_status = fc
        .run(&["release", "status", staged, "--json"])
        .await
        .json();
    assert_eq!(
        (
            &staged_status["staged"]["state"],
            &staged_status["staged"]["notified"],
            &staged_status["staged"]["machines"]
        ),
        (
            &serde_json::json!("paused"),
            &serde_json::json!(1),
            &serde_json::json!(2)
        ),
        "{staged_status}"
    );
    outputs.push((
        "release status of a staged release",
        "release-status.json",
        staged_status,
    ));
    fc.run(&["operator", "add", "val", "--role", "viewer"])
        .await
        .ok();
    fc.run(&["operator", "revoke", "val"]).await.ok();
    fc.run(&["integrator", "add", "erp"]).await.ok();

    for (what, args, schema) in [
        ("machines", &["machines", "--json"][..], "machines.json"),
        (
            "artifact list",
            &["artifact", "list", "--json"],
            "artifacts.json",
        ),
        (
            "release list",
            &["release", "list", "--json"],
            "releases.json",
        ),
        (
            "release status",
            &["release", "status", release.as_str(), "--json"],
            "release-status.json",
        ),
        (
            "release status --summary",
            &["release", "status", release.as_str(), "--summary", "--json"],
            "release-status.json",
        ),
        ("events", &["events", "--json"], "events.json"),
        ("audit", &["audit", "--json"], "audit.json"),
        (
            "operator list",
            &["operator", "list", "--json"],
            "operators.json",
        ),
        (
            "integrator list",
            &["integrator", "list", "--json"],
            "integrators.json",
        ),
        ("stats", &["stats", "--json"], "stats.json"),
        ("db backup", &["db", "backup", "--json"], "backup.json"),
    ] {
        outputs.push((what, schema, fc.run(args).await.json()));
    }
    // `events` shows the newest (100 by default, N with --last N), `--since` reads from an id.
    let all = event_ids(fc.run(&["events", "--since", "0", "--json"]).await.json());
    assert!(all.len() >= 3 && all.len() <= 100, "{all:?}");
    assert_eq!(event_ids(fc.run(&["events", "--json"]).await.json()), all);
    assert_eq!(
        event_ids(fc.run(&["events", "--last", "2", "--json"]).await.json()),
        all[all.len() - 2..]
    );
    assert_eq!(
        event_ids(
            fc.run(&[
                "events",
                "--since",
                &all[0].to_string(),
                "--limit",
                "1",
                "--json"
            ])
            .await
            .json()
        ),
        all[1..2]
    );
    // As text, --summary is the first and last lines of the listing, and `release watch` reads
    // the same counts (vm-003 never answers: it gives up after its timeout).
    let listing = fc.run(&["release", "status", release.as_str()]).await.ok();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.iter().filter(|l| l.starts_with("vm-00")).count(), 3);
    let summary = fc
        .run(&["release", "status", release.as_str(), "--summary"])
        .await
        .ok();
    assert_eq!(
        summary,
        format!("{}\n{}\n", lines[0], lines[lines.len() - 1])
    );
    let watch = fc
        .run(&["release", "watch", release.as_str(), "--timeout", "1"])
        .await;
    assert_eq!(watch.code, 4, "a timeout has its own status: {watch:#?}");
    let counts = "2/3 finished; pending=1 download_failed=1 installed=1";
    assert!(
        watch.stdout.starts_with(&format!("{release}: {counts}\n")),
        "{watch:#?}"
    );
    assert!(
        watch.stderr.contains("not finished after 1 s"),
        "{watch:#?}"
    );
    // A release not published yet has no targets: said so, not "0/0 finished".
    let draft = fc
        .run(&["release", "create", "--kind", "app", "--version", "1.0"])
        .await
        .ok();
    let draft = draft.trim();
    let watch = fc.run(&["release", "watch", draft, "--timeout", "1"]).await;
    assert_eq!(
        watch.stdout,
        format!("{draft}: no target machines yet\n"),
        "{watch:#?}"
    );
    admin.close().await;
    platform.stop().await;

    // The data reached the optional fields the schemas describe.
    let find = |what: &str| &outputs.iter().find(|(w, _, _)| *w == what).unwrap().2;
    let status = find("release status");
    assert!(status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t.get("upgrade").is_some()));
    assert!(status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t.get("error").is_some() && t.get("progress").is_some()));
    assert_eq!(
        status["release"]["policy"]["utc_offset_minutes"],
        serde_json::json!(480)
    );
    // vm-001 installed (3000 bytes), vm-002 failed after 2048, vm-003 never began.
    assert_eq!(
        (
            &status["bytes_done"],
            &status["bytes_total"],
            &status["more"]
        ),
        (
            &serde_json::json!(5048),
            &serde_json::json!(9000),
            &Value::Bool(false)
        )
    );
    let summary = find("release status --summary");
    assert_eq!(summary["targets"], serde_json::json!([]));
    assert_eq!(summary["progress"]["total"], 3);
    assert_eq!(summary["bytes_done"], status["bytes_done"]);
    assert_eq!(summary["more"], true);
    assert_eq!(find("artifact list")[0]["notes"], "first");
    assert_eq!(find("machines").as_array().unwrap().len(), 3);
    let filtered: Vec<&str> = find("machines filtered")
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(filtered, ["vm-002"]);
    // The newest published app release is the rollback of vm-001 to 1.0, which it runs.
    let versions = find("versions");
    assert_eq!(
        versions["versions"],
        serde_json::json!([{"version": "1.0", "machines": 1}])
    );
    assert_eq!(versions["compliance"]["version"], "1.0");
    assert_eq!(versions["compliance"]["on_target"], 1);
    let history = find("history").as_array().unwrap();
    let released: Vec<&str> = history
        .iter()
        .map(|t| t["release"].as_str().unwrap())
        .collect();
    assert_eq!(released, [rollback_id.as_str(), release.as_str()]);
    assert!(history[1].get("upgrade").is_some() && history[1].get("via").is_some());
    assert_eq!(find("history of a failure")[0]["error"], "disk full");
    assert!(find("events")
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.get("error").is_some()));

    let schemas = schemas();
    for (what, name, output) in &outputs {
        let schema = schemas
            .get(*name)
            .unwrap_or_else(|| panic!("no docs/schemas/{name} for {what}"));
        assert_valid(name, schema, output);
    }
    let used: BTreeSet<&str> = outputs.iter().map(|(_, name, _)| *name).collect();
    // device-*.json describe fleetcast-device's output: device/tests/it checks those.
    let files: BTreeSet<&str> = schemas
        .keys()
        .map(String::as_str)
        .filter(|f| !f.starts_with("device-"))
        .collect();
    assert_eq!(used, files, "every schema file is checked by this test");
}

/// `fleetcast serve` started as a process on a free loopback port, its log (stderr) going to
/// a file as under systemd or `2> log`: not a terminal.
struct LoggedServe {
    serve: tokio::process::Child,
    log: PathBuf,
    data_dir: PathBuf,
    url: BrokerUrl,
    adm: AdminClient,
}

impl LoggedServe {
    async fn start(dir: &Path) -> LoggedServe {
        let data_dir = dir.join("data");
        let log = dir.join("serve.log");
        let port = client::free_loopback_port().unwrap();
        let listen = format!("127.0.0.1:{port}");
        let fc = Fleetcast::new(dir);
        let serve = fc
            .command(&["serve", "--listen", &listen])
            .env("FLEETCAST_DATA", &data_dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            // A failing assertion below must not leave a platform running.
            .kill_on_drop(true)
            .spawn()
            .expect("fleetcast serve starts");
        let url = BrokerUrl::mqtt("127.0.0.1", port);
        // The test's own admin client, once the broker listens.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let adm = loop {
            if data_dir.join("admin.secret").exists() {
                let secret = admin_secret(&data_dir);
                match AdminClient::connect(&url, Topics::default(), secret, WAIT).await {
                    Ok(c) => break c,
                    Err(e) => assert!(
                        tokio::time::Instant::now() < deadline,
                        "serve not reachable: {e}; log: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        LoggedServe {
            serve,
            log,
            data_dir,
            url,
            adm,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Stops it with SIGINT; it must exit cleanly.
    async fn stop(mut self) {
        self.adm.close().await;
        std::process::Command::new("kill")
            .args(["-INT", &self.serve.id().unwrap().to_string()])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), self.serve.wait())
            .await
            .expect("serve stops on SIGINT")
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
}

/// `fleetcast machines | head` on a big fleet: the reader closes the pipe before the command has
/// printed. The command ends as `ls` would (killed by SIGPIPE, nothing on stderr), not with a
/// panic and a backtrace (as it did: a 5,000-machine `scripts/demo.sh` stopped there).
#[tokio::test]
async fn a_command_whose_output_pipe_closes_ends_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("admin.secret");
    std::fs::write(&secret, format!("{:064x}", 7)).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Fleetcast::new(dir.path())
        .command(&[
            "profile",
            "show",
            "--admin-secret-file",
            secret.to_str().unwrap(),
        ])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleetcast runs")
        .wait_with_output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("fleetcast ends")
        .expect("fleetcast runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}, stderr: {stderr}",
        out.status
    );
    assert_eq!(stderr, "", "nothing on stderr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_have_no_colour_codes_and_no_error_for_an_ordinary_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let serve = LoggedServe::start(dir.path()).await;
    let (adm, url, data_dir) = (&serve.adm, &serve.url, &serve.data_dir);
    let fc = Fleetcast::new(dir.path());
    // Clients connect and disconnect: the test's own admin client, then the CLI twice.
    adm.call(calls::Machines {}).await.unwrap();
    let client = fc
        .with("FLEETCAST_DATA", data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    client.run(&["machines"]).await.ok();
    // `serve` runs the embedded broker: its gateway's counters are in the stats (with their
    // schema), and nobody broke a rule.
    let stats = client.run(&["stats", "--json"]).await.json();
    assert_valid("stats.json", &schemas()["stats.json"], &stats);
    let gateway = &stats["gateway"];
    assert!(gateway["connections"].as_u64() >= Some(2), "{stats}");
    assert!(gateway["active"].as_u64() >= Some(1), "{stats}");
    assert_eq!(gateway["violations"].as_u64(), Some(0), "{stats}");
    assert_eq!(gateway["refused"].as_u64(), Some(0), "{stats}");
    client.run(&["stats"]).await.ok();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = serve.log.clone();
    serve.stop().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("INFO") && text.contains("serve connection up"),
        "the log has its usual lines: {text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

/// An attacker holding one machine's config sends what the platform refuses, as fast as it
/// can: 60,000-character values with a forged log line in them, states claiming hundreds of
/// groups. The log gets a few lines about that machine, each one line long and cut, not one
/// line (of the whole value) per message: before, 200 such messages wrote 12 MB of log, and a
/// newline in a value started a line of the attacker's choosing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_machine_cannot_fill_the_platforms_log_or_forge_lines_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let serve = LoggedServe::start(dir.path()).await;
    let mut vm = provision(&serve.adm, &serve.url, "vm-001", &[]).await;
    let before = serve.log_text().len();
    let forged = "2026-11-26T00:00:00.000000Z  INFO fleetcast_platform::ingest: vm-002 installed";
    let phase = format!("x\n{forged}\n{}", "y".repeat(60_000));
    for _ in 0..200 {
        let mut ev = serde_json::to_value(vm.status(None, "1.0", Phase::Notified)).unwrap();
        ev["phase"] = Value::String(phase.clone());
        let sealed = vm.secret.seal(Purpose::Status, &ev);
        vm.send_raw("status", sealed).await;
    }
    let claimed: Vec<String> = (0..500).map(|i| format!("group-{i:04}")).collect();
    let claimed: Vec<&str> = claimed.iter().map(String::as_str).collect();
    for _ in 0..50 {
        vm.publish_state(&claimed, Default::default()).await;
    }
    // An honest report after them: once it is applied, ingest has read everything before it.
    let honest = fleetcast_proto::status::KindState {
        version: Some("0.9".into()),
        ..Default::default()
    };
    vm.publish_state(&[], honest).await;
    poll_until(
        WAIT,
        "the honest state applied",
        || machines(&serve.adm),
        |ms| ms[0].kinds.get(&app()).and_then(|k| k.version.as_deref()) == Some("0.9"),
    )
    .await;
    // Not logged, but counted.
    let stats = serve.adm.call(calls::Stats {}).await.unwrap();
    assert!(stats.reports_dropped >= 200, "{stats:?}");
    let text = serve.log_text();
    let flood = &text[before..];
    assert!(
        !text.lines().any(|l| l.starts_with(forged)),
        "a forged line in the log: {flood}"
    );
    let about_vm: Vec<&str> = flood.lines().filter(|l| l.contains("vm-001")).collect();
    assert!(
        (1..=5).contains(&about_vm.len()),
        "a few lines about the machine, not one per message: {} lines",
        about_vm.len()
    );
    assert!(
        about_vm
            .iter()
            .any(|l| l.contains(&format!("x\\n{forged}\\ny"))),
        "what it sent is shown escaped: {about_vm:#?}"
    );
    assert!(
        flood.len() < 8 * 1024,
        "250 refused messages wrote {} bytes of log",
        flood.len()
    );
    serve.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_provision_refuses_an_existing_machine_unless_rotate() {
    let broker = start_on_free_port(|s| s).unwrap();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&broker.url()).await;
    let first = provisioned(&admin, "vm-001", &["g1"]).await;
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", broker.url().to_string());

    // By mistake: refused, naming the way to do it on purpose, and nothing changes.
    let again = fc
        .run(&["machine", "provision", "vm-001", "--groups", "g2"])
        .await;
    assert_ne!(again.code, 0, "{again:#?}");
    assert!(
        again.stderr.contains("vm-001 is provisioned already") && again.stderr.contains("--rotate"),
        "{again:#?}"
    );
    assert!(again.stdout.is_empty(), "no config printed: {again:#?}");
    let list = dir.path().join("machines.csv");
    std::fs::write(&list, "vm-002,g1\nvm-001\n").unwrap();
    let out_dir = dir.path().join("configs");
    let out_dir_arg = out_dir.to_str().unwrap();
    let batch = fc
        .run(&[
            "machine",
            "provision",
            "--from-file",
            list.to_str().unwrap(),
            "--out-dir",
            out_dir_arg,
        ])
        .await;
    assert_ne!(batch.code, 0, "{batch:#?}");
    assert!(
        batch.stderr.contains("vm-001 is provisioned already"),
        "{batch:#?}"
    );
    let known: Vec<String> = machines(&admin)
        .await
        .into_iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(known, ["vm-001"], "nothing of a refused batch is stored");

    // On purpose: a new secret, the groups added.
    let toml_text = fc
        .run(&[
            "machine",
            "provision",
            "vm-001",
            "--groups",
            "g2",
            "--rotate",
        ])
        .await
        .ok();
    let config: fleetcast_device::config::MachineConfig = toml::from_str(&toml_text).unwrap();
    assert!(config.secret != first.secret, "a new secret");
    assert_eq!(config.groups, vec![g("g1"), g("g2")]);
    fc.run(&[
        "machine",
        "provision",
        "--from-file",
        list.to_str().unwrap(),
        "--out-dir",
        out_dir_arg,
        "--rotate",
    ])
    .await
    .ok();
    assert!(out_dir.join("vm-001.toml").exists() && out_dir.join("vm-002.toml").exists());

    // One machine into a directory: its config in a file of its own (0600), and a second try,
    // refused, leaves that file as it was (`> vm.toml` in a shell empties it first, and with it
    // the only copy of the secret).
    use std::os::unix::fs::PermissionsExt;
    let single = [
        "machine",
        "provision",
        "vm-003",
        "--groups",
        "g1",
        "--out-dir",
        out_dir_arg,
    ];
    let path = out_dir.join("vm-003.toml");
    let said = fc.run(&single).await.ok();
    assert!(said.contains(&path.display().to_string()), "{said}");
    let written = std::fs::read_to_string(&path).unwrap();
    let config: fleetcast_device::config::MachineConfig = toml::from_str(&written).unwrap();
    assert_eq!(config.machine.as_str(), "vm-003");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = fc.run(&single).await;
    assert_ne!(again.code, 0, "{again:#?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), written);
    admin.close().await;
    platform.stop().await;
}

/// `fleetcast events` without arguments shows the newest 100 of a longer log, and says on
/// stderr that older ones exist and how to get them; `--last N` and `--since 0` get more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_shows_the_newest_hundred_of_a_longer_log_and_says_so() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    upload(&admin, dir.path(), "a.bin", &data(3000, 11), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    vm.peer.subscribe("fleet/machines/vm-001/status/ack").await;
    for _ in 0..130 {
        vm.report(Some(&r.id), "1.0", Phase::Downloading).await;
    }
    let last = vm.ctr;
    vm.acked_up_to(last).await;
    let all = event_ids(fc.run(&["events", "--since", "0", "--json"]).await.json());
    assert_eq!(all.len(), 130);
    let default = fc.run(&["events", "--json"]).await;
    assert!(
        default.stderr.contains("the newest 100 events") && default.stderr.contains("--last N"),
        "{default:#?}"
    );
    assert_eq!(event_ids(default.json()), all[30..]);
    let all_of_them = fc.run(&["events", "--last", "500", "--json"]).await;
    assert!(!all_of_them.stderr.contains("newest"), "{all_of_them:#?}");
    assert_eq!(event_ids(all_of_them.json()), all);
    let some = fc.run(&["events", "--last", "50", "--json"]).await;
    assert!(
        some.stderr.contains("the newest 50 events") && some.stderr.contains("--since 0 for all"),
        "{some:#?}"
    );
    assert_eq!(event_ids(some.json()), all[80..]);
    admin.close().await;
    platform.stop().await;
}

/// `artifact remove` as an operator runs it, with a real machine: the version the machine
/// runs is refused with the reason, one it moved past loses its files, a rollback to it is
/// refused until the same file is uploaded again, and then the machine installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_remove_frees_what_no_machine_needs_and_the_same_file_brings_it_back() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&broker).await;
    let p = provisioned(&admin, "vm-001", &["shanghai"]).await;
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(
        super::e2e::machine_config(&p, &broker, dir.path()),
        agents.clone(),
    ));
    let mut files = BTreeMap::new();
    for (version, seed) in [("2.0", 2), ("3.0", 3)] {
        let file = artifact_file(dir.path(), &format!("app-{version}.bin"), 150_000, seed);
        let info = upload_app(&admin, &file, version).await;
        files.insert(version, (file, info.id));
        let r = create_release(&admin, &app(), version, InstallPolicy::Immediate).await;
        publish(&admin, &r.id, &["vm-001"], &[]).await;
        let s = until_finished(&admin, &r.id, 1).await;
        assert_eq!(s.targets[0].phase, Phase::Installed, "{s:#?}");
    }
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", broker.to_string());
    let remove = |version: &'static str| {
        let fc = &fc;
        async move {
            fc.run(&[
                "artifact",
                "remove",
                "--kind",
                "app",
                "--version",
                version,
                "--yes",
            ])
            .await
        }
    };
    let stored = |version: &str| {
        let id = files[version].1.to_hex();
        let dir = data_dir.join("artifacts");
        (
            dir.join(&id).exists(),
            dir.join(format!("{id}.manifest")).exists(),
        )
    };

    // 3.0 is what vm-001 was last sent and runs: kept, with the reason.
    let kept = remove("3.0").await;
    assert_eq!(kept.code, 1, "{kept:#?}");
    assert!(
        kept.stderr.contains("app 3.0 is still needed") && kept.stderr.contains("vm-001"),
        "{kept:#?}"
    );
    assert_eq!(stored("3.0"), (true, true));
    // Without --yes and no terminal to ask on, nothing is removed.
    let unconfirmed = fc
        .run(&["artifact", "remove", "--kind", "app", "--version", "2.0"])
        .await;
    assert_eq!(unconfirmed.code, 1, "{unconfirmed:#?}");
    assert!(unconfirmed.stderr.contains("--yes"), "{unconfirmed:#?}");
    assert_eq!(stored("2.0"), (true, true));

    // 2.0 it moved past: its files go, its record stays, marked.
    let out = remove("2.0").await.ok();
    assert!(out.contains("removed app 2.0"), "{out}");
    assert_eq!(stored("2.0"), (false, false));
    let listed = fc.run(&["artifact", "list", "--json"]).await.json();
    assert_valid("artifacts.json", &schemas()["artifacts.json"], &listed);
    let removed: Vec<(&str, bool)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["version"].as_str().unwrap(),
                a.get("removed_at_ms").is_some(),
            )
        })
        .collect();
    assert_eq!(removed, vec![("2.0", true), ("3.0", false)]);

    // A rollback to it is refused until the same file is uploaded again.
    let back = fc
        .run(&[
            "rollback",
            "--machine",
            "vm-001",
            "--kind",
            "app",
            "--to",
            "2.0",
            "--yes",
        ])
        .await;
    assert_eq!(back.code, 1, "{back:#?}");
    assert!(back.stderr.contains("app 2.0 was removed"), "{back:#?}");
    let file = files["2.0"].0.to_str().unwrap();
    fc.run(&[
        "artifact",
        "upload",
        file,
        "--kind",
        "app",
        "--version",
        "2.0",
    ])
    .await
    .ok();
    assert_eq!(stored("2.0"), (true, true));
    let plan = rollback(&admin, Target::Machine(m("vm-001")), &app(), Some("2.0")).await;
    let s = until_finished(&admin, &plan.release.id, 1).await;
    assert_eq!(s.targets[0].phase, Phase::Installed, "{s:#?}");
    // Now 3.0 is the one nothing needs.
    remove("3.0").await.ok();
    assert_eq!(stored("3.0"), (false, false));

    agents.cancel();
    joined(agent, "agent vm-001").await;
    platform.stop().await;
}

/// Mistakes a newcomer made, each answered with what to check: a file that is not there is
/// named before any connection is tried (it read as "wrong operator name or secret, or no
/// broker there?"), and nothing listening on the broker's port is said as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_file_and_an_absent_platform_are_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_BROKER", format!("mqtt://127.0.0.1:{port}"))
        .with("FLEETCAST_ADMIN_SECRET", "00".repeat(32));
    let missing = dir.path().join("app-2.4.0.bin");
    let run = fc
        .run(&[
            "artifact",
            "upload",
            missing.to_str().unwrap(),
            "--kind",
            "app",
            "--version",
            "2.4.0",
        ])
        .await;
    assert_ne!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr.contains("cannot read") && run.stderr.contains("app-2.4.0.bin"),
        "{run:#?}"
    );
    assert!(!run.stderr.contains("broker"), "{run:#?}");
    let run = fc.run(&["machines"]).await;
    assert_ne!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr.contains("nothing listens there")
            && !run.stderr.contains("wrong operator name or secret"),
        "{run:#?}"
    );
}

/// `serve` on an address something listens on already: says so, and writes nothing (it used to
/// create the data dir, its keys and its database, then stop on the broker's bind with the
/// same error printed three times).
#[tokio::test]
async fn serve_on_a_taken_port_says_so_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("platform");
    let fc = Fleetcast::new(dir.path());
    let run = fc
        .run(&["serve", "--data", data.to_str().unwrap(), "--listen", &addr])
        .await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr.contains(&format!("cannot listen on {addr}"))
            && run
                .stderr
                .contains("another `fleetcast serve` or MQTT broker")
            && run.stderr.matches("in use").count() == 1,
        "{run:#?}"
    );
    assert!(!data.exists(), "nothing written: {run:#?}");
}
