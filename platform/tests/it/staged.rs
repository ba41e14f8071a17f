//! Staged rollouts with real agents (the simulator): a 200-machine rollout with injected
//! failures pauses at the wave the failures predict, with the reason, and resuming finishes it;
//! cancel mid-wave stops it there; a platform restart mid-wave loses nothing; a retry after a
//! resume counts the retried machines' new failures again.

use fleetcast_platform::domain::rollout::order;
use fleetcast_proto::rollout::{RolloutInfo, RolloutState, WavePlan};

use super::*;

async fn rollout_status(admin: &AdminClient, release: &ReleaseId) -> RolloutInfo {
    admin
        .call(calls::RolloutStatus {
            release: release.clone(),
        })
        .await
        .unwrap()
        .rollout
}

/// Polls the rollout until `done` holds.
async fn rollout_until(
    admin: &AdminClient,
    release: &ReleaseId,
    what: &str,
    done: impl Fn(&RolloutInfo) -> bool,
) -> RolloutInfo {
    poll_until(
        E2E_WAIT,
        what,
        || rollout_status(admin, release),
        |r| done(r),
    )
    .await
}

fn ids(range: std::ops::RangeInclusive<usize>) -> Vec<MachineId> {
    range.map(|i| m(&format!("vm-{i:03}"))).collect()
}

/// `rollout resume` (not advancing): the rollout it returns.
async fn resume(admin: &AdminClient, release: &ReleaseId) -> RolloutInfo {
    admin
        .call(calls::RolloutResume {
            release: release.clone(),
            advance: false,
        })
        .await
        .unwrap()
        .rollout
}

/// `release retry --failed`: the machines it retried, sorted.
async fn retry_failed(admin: &AdminClient, release: &ReleaseId) -> Vec<MachineId> {
    let plan = admin
        .call(calls::ReleaseRetry {
            release: release.clone(),
            machines: vec![],
            failed: true,
            groups: vec![],
        })
        .await
        .unwrap();
    let mut retried: Vec<MachineId> = plan.plan.targets.into_iter().map(|(m, _)| m).collect();
    retried.sort();
    retried
}

/// `n` simulated machines in group `fleet` on a platform, online, and a release of app 2.0.0
/// with `policy` created (not published).
struct Fleet {
    broker: BrokerUrl,
    env: Env,
    sims: Sims,
    release: ReleaseId,
}

/// A fleet on a platform on `broker`: `healthy` machines (vm-001...), then `failing` ones that
/// fail the health check of 2.0.0 and roll back.
async fn fleet_on(
    broker: BrokerUrl,
    healthy: usize,
    failing: usize,
    policy: InstallPolicy,
) -> Fleet {
    let env = env(&broker).await;
    let sim = env.dir.path().join("machines");
    let mut sims = Sims::default();
    sims.start(simulated(&env.data_dir, &sim, &broker, healthy, &["fleet"]));
    if failing > 0 {
        sims.start(fleetcast_device::simulate::SimulateOptions {
            start_index: healthy + 1,
            fail_health: vec!["2.0.0".into()],
            ..simulated(&env.data_dir, &sim, &broker, failing, &["fleet"])
        });
    }
    wait_online(&env.admin, healthy + failing).await;
    let (_, release) = app_release(&env.admin, env.dir.path(), "2.0.0", 3_000, 5, policy).await;
    Fleet {
        broker,
        env,
        sims,
        release: release.id,
    }
}

impl Fleet {
    /// Stops the machines, the admin client and the platform.
    async fn stop(self) {
        self.sims.stop().await;
        self.env.admin.close().await;
        self.env.platform.stop().await;
    }
}

/// `n` healthy machines on the embedded broker.
async fn fleet(n: usize, policy: InstallPolicy) -> Fleet {
    fleet_on(start_on_free_port(|s| s).unwrap().url(), n, 0, policy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_machines_pause_at_the_wave_failures_predict_and_resume_finishes() {
    // vm-001..vm-180 healthy; vm-181..vm-200 fail the health check of 2.0.0 and roll back.
    let broker = start_on_free_port(|s| s).unwrap().url();
    let f = fleet_on(broker, 180, 20, InstallPolicy::Immediate).await;
    let (admin, release) = (&f.env.admin, &f.release);
    let plan = WavePlan::new(vec![100, 1000, 5000], 9500, 500, 0).unwrap();
    let published = publish_with(admin, release, &[], &["fleet"], Some(plan.clone())).await;
    let r = published
        .rollout
        .expect("a staged publish returns its rollout");
    assert_eq!(published.targets.len(), 200);
    assert_eq!(
        r.order,
        order(release, ids(1..=200)),
        "the documented order"
    );
    assert_eq!(published.topics.len(), 2, "wave 1 is 1% of 200");
    assert!(published
        .topics
        .iter()
        .all(|t| t.starts_with("fleet/machines/")));

    // Where it must pause: the first wave whose share of failing machines passes 5%.
    let failing_ids = ids(181..=200);
    let (pause_wave, wave_end, failing_in_wave) = (0..4)
        .map(|w| {
            let end = plan.cumulative(w, 200);
            let f = r.order[..end]
                .iter()
                .filter(|m| failing_ids.contains(m))
                .count();
            (w, end, f)
        })
        .find(|&(_, end, f)| f * 10_000 > 500 * end)
        .expect("20 of 200 failing is above 5% by the last wave at the latest");
    let paused = rollout_until(admin, release, "rollout paused", |r| {
        matches!(r.state, RolloutState::Paused { .. })
    })
    .await;
    assert_eq!(paused.wave, pause_wave, "{paused:?}");
    let RolloutState::Paused { reason } = &paused.state else {
        unreachable!()
    };
    let prefix = format!("wave {}: ", pause_wave + 1);
    let suffix = format!(" of {wave_end} machines failed");
    assert!(
        reason.starts_with(&prefix)
            && reason.contains(&suffix)
            && reason.ends_with("above the failure threshold 5%"),
        "{reason}"
    );
    let counted: usize = reason[prefix.len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        counted * 10_000 > 500 * wave_end && counted <= failing_in_wave,
        "{reason}"
    );
    // Nobody beyond the paused wave heard of the release.
    let s = status(admin, release).await;
    let notified: Vec<&MachineId> = s.targets.iter().map(|t| &t.machine).collect();
    assert_eq!(notified.len(), wave_end, "{notified:?}");
    assert!(r.order[..wave_end].iter().all(|m| notified.contains(&m)));
    // And it stays paused.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rollout_status(admin, release).await.wave, pause_wave);

    // Resume (accepting the failures each time it pauses again) until it completes.
    for _ in 0..4 {
        let r = rollout_until(admin, release, "rollout paused or completed", |r| {
            matches!(
                r.state,
                RolloutState::Paused { .. } | RolloutState::Completed
            )
        })
        .await;
        if r.state == RolloutState::Completed {
            break;
        }
        assert!(resume(admin, release).await.failures_accepted > 0);
    }
    let done = rollout_until(admin, release, "rollout completed", |r| {
        r.state == RolloutState::Completed
    })
    .await;
    assert_eq!(done.wave, 3);
    let s = until_finished(admin, release, 200).await;
    let count = |p: Phase| s.targets.iter().filter(|t| t.phase == p).count();
    assert_eq!(
        (count(Phase::Installed), count(Phase::RolledBack)),
        (180, 20)
    );
    let whats: Vec<&str> = done.log.iter().map(|t| t.what.as_str()).collect();
    assert_eq!(whats.first(), Some(&"started"));
    assert!(
        whats.contains(&"paused") && whats.contains(&"resumed"),
        "{whats:?}"
    );
    assert!(done
        .log
        .iter()
        .any(|t| t.what == "resumed" && t.by.as_deref() == Some("admin")));

    // Retry the failed ones: each gets the release again (and fails again here).
    assert_eq!(retry_failed(admin, release).await, failing_ids);

    f.stop().await;
}

/// A window that opens in two hours (UTC): machines download now and wait.
fn closed_window() -> InstallPolicy {
    let minute = (fleetcast_platform::now_ms() / 60_000 % (24 * 60)) as u32;
    let hhmm = |m: u32| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    format!(
        "window:{}-{}@+00:00",
        hhmm(minute + 120),
        hhmm(minute + 180)
    )
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_wave_drops_the_release_where_not_installed_and_notifies_no_one_else() {
    // Deferred (downloaded, waiting for its window) is not success: wave 1 never completes.
    let f = fleet(30, closed_window()).await;
    let (admin, release) = (&f.env.admin, &f.release);
    let plan = WavePlan::new(vec![1000, 5000], 9500, 500, 0).unwrap();
    let r = publish_with(admin, release, &[], &["fleet"], Some(plan))
        .await
        .rollout
        .unwrap();
    let first: Vec<MachineId> = r.order[..3].to_vec();
    wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.len() == 3 && s.targets.iter().all(|t| t.phase == Phase::Deferred)
    })
    .await;
    assert_eq!(rollout_status(admin, release).await.wave, 0);

    let cancelled = admin
        .call(calls::RolloutCancel {
            release: release.clone(),
        })
        .await
        .unwrap()
        .rollout;
    let RolloutState::Cancelled { reason } = &cancelled.state else {
        panic!("{:?}", cancelled.state)
    };
    assert!(reason.contains("3 machines told to drop"), "{reason}");
    // The three drop it and say so; nobody else was ever notified.
    let s = wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.iter().all(|t| t.phase == Phase::Cancelled)
    })
    .await;
    let mut got: Vec<MachineId> = s.targets.iter().map(|t| t.machine.clone()).collect();
    got.sort();
    let mut want = first.clone();
    want.sort();
    assert_eq!(got, want);
    // Cancelled for good: resume and a second cancel are refused, and nothing advances.
    let err = admin
        .call(calls::RolloutResume {
            release: release.clone(),
            advance: true,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status(admin, release).await.targets.len(), 3);
    // Their retained notices were cleared: a late subscriber finds none.
    let mut observer = peer(&f.broker, "observer").await;
    observer.subscribe("fleet/machines/+/release/app").await;
    let retained = observer.drain(Duration::from_secs(1)).await;
    assert!(
        retained.iter().all(|p| p.payload.is_empty()),
        "{:?}",
        retained.iter().map(|p| &p.topic).collect::<Vec<_>>()
    );
    assert!(audit(admin)
        .await
        .iter()
        .any(|e| e.action == "rollout_cancel" && e.result == "ok"));

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_restart_mid_wave_loses_nothing_and_the_rollout_finishes() {
    let Fleet {
        broker,
        env:
            Env {
                dir: _dir,
                data_dir,
                platform,
                admin,
            },
        sims,
        release,
    } = fleet(20, InstallPolicy::Immediate).await;
    let plan = WavePlan::new(vec![1000, 5000], 9500, 500, 0).unwrap();
    publish_with(&admin, &release, &[], &["fleet"], Some(plan)).await;
    // Stop the platform at once: wave 1's machines install while it is down.
    admin.close().await;
    platform.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let platform = start_platform(&broker, &data_dir);
    let admin = super::admin(&broker, &data_dir).await;
    let done = rollout_until(&admin, &release, "rollout completed after restart", |r| {
        r.state == RolloutState::Completed
    })
    .await;
    let whats: Vec<&str> = done.log.iter().map(|t| t.what.as_str()).collect();
    assert_eq!(whats, ["started", "advanced", "advanced", "completed"]);
    let s = until_finished(&admin, &release, 20).await;
    assert!(
        s.targets.iter().all(|t| t.phase == Phase::Installed),
        "{s:?}"
    );

    sims.stop().await;
    admin.close().await;
    platform.stop().await;
}

/// A broker restart mid-rollout (Mosquitto without persistence: every retained notice is gone)
/// loses nothing: the platform re-publishes the waves' notices on reconnect and the rollout
/// finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_rollout_loses_nothing_and_the_rollout_finishes() {
    let mut mosq = fleetcast_broker::testing::Mosquitto::start("")
        .expect("mosquitto (apt-get install mosquitto)");
    let broker = mosq.url.clone();
    let f = fleet_on(broker, 20, 0, InstallPolicy::Immediate).await;
    let (admin, release) = (&f.env.admin, &f.release);
    let plan = WavePlan::new(vec![1000, 5000], 9500, 500, 0).unwrap();
    publish_with(admin, release, &[], &["fleet"], Some(plan)).await;
    mosq.restart().expect("mosquitto restarts on the same port");
    let done = rollout_until(
        admin,
        release,
        "rollout completed after a broker restart",
        |r| r.state == RolloutState::Completed,
    )
    .await;
    assert_eq!(done.wave, 2);
    let s = until_finished(admin, release, 20).await;
    assert!(
        s.targets.iter().all(|t| t.phase == Phase::Installed),
        "{s:?}"
    );

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_resume_counts_the_new_rounds_failures_and_pauses_again() {
    // vm-001..vm-008 are provisioned but never come online, so the one wave cannot succeed
    // and the rollout stays running; vm-009 and vm-010 fail the health check of 2.0.0.
    let broker = start_on_free_port(|s| s).unwrap().url();
    let env = env(&broker).await;
    let admin = &env.admin;
    for i in 1..=8 {
        provisioned(admin, &format!("vm-{i:03}"), &["fleet"]).await;
    }
    let mut sims = Sims::default();
    sims.start(fleetcast_device::simulate::SimulateOptions {
        start_index: 9,
        fail_health: vec!["2.0.0".into()],
        ..simulated(
            &env.data_dir,
            &env.dir.path().join("machines"),
            &broker,
            2,
            &["fleet"],
        )
    });
    wait_online(admin, 2).await;
    let (_, release) = app_release(
        admin,
        env.dir.path(),
        "2.0.0",
        3_000,
        5,
        InstallPolicy::Immediate,
    )
    .await;
    let release = &release.id;
    let plan = WavePlan::new(vec![10_000], 9500, 500, 0).unwrap();
    publish_with(admin, release, &[], &["fleet"], Some(plan)).await;
    let paused_reason = |r: &RolloutInfo| match &r.state {
        RolloutState::Paused { reason } => Some(reason.clone()),
        _ => None,
    };
    let first = rollout_until(admin, release, "rollout paused", |r| {
        paused_reason(r).is_some()
    })
    .await;
    let reason = paused_reason(&first).unwrap();
    assert!(reason.contains("2 of 10 machines failed"), "{reason}");

    // Resumed past the two failures: it runs on (eight machines to go) and does not pause
    // for the same two again.
    assert_eq!(resume(admin, release).await.failures_accepted, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rollout_status(admin, release).await.state,
        RolloutState::Running
    );

    // A retry starts a new round for the two: failing again, they count again.
    assert_eq!(retry_failed(admin, release).await, ids(9..=10));
    let second = rollout_until(admin, release, "rollout paused again", |r| {
        paused_reason(r).is_some()
    })
    .await;
    let reason = paused_reason(&second).unwrap();
    assert!(reason.contains("2 of 10 machines failed"), "{reason}");
    let whats: Vec<&str> = second.log.iter().map(|t| t.what.as_str()).collect();
    assert_eq!(
        whats,
        ["started", "paused", "resumed", "paused"],
        "{whats:?}"
    );

    sims.stop().await;
    env.admin.close().await;
    env.platform.stop().await;
}

/// The `fleetcast` binary against `f`'s platform.
fn fleetcast(f: &Fleet) -> super::cli::Fleetcast {
    super::cli::Fleetcast::new(f.env.dir.path())
        .with("FLEETCAST_DATA", &f.env.data_dir)
        .with("FLEETCAST_BROKER", f.broker.to_string())
}

/// `release publish` without waves would send a release in a live staged rollout to every
/// member at once, past the waves, and `rollout cancel` could not take it back: it is refused
/// while the rollout runs or is paused. After a cancel it is the operator's choice, and reaches
/// the machines told to drop it too; waves are then refused over the group notice. `release
/// watch` of the cancelled rollout ends without counting `cancelled` as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_rollout_is_not_published_at_once_and_after_a_cancel_a_plain_publish_reaches_all() {
    // Deferred (waiting for its window) is not success: wave 1 never completes.
    let f = fleet(10, closed_window()).await;
    let (admin, release) = (&f.env.admin, &f.release);
    let fc = fleetcast(&f);
    let r = release.as_str();
    let staged = fc
        .run(&[
            "release", "publish", r, "--groups", "fleet", "--waves", "20%", "--yes",
        ])
        .await;
    let plan = staged.ok();
    assert!(
        plan.contains(
            "notices (retained): one per machine of wave 1, on the machine's own topic: 2 of \
             10 machine(s) now"
        ) && !plan.contains("fleet/groups/"),
        "{plan}"
    );
    wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.len() == 2 && s.targets.iter().all(|t| t.phase == Phase::Deferred)
    })
    .await;

    // Running, then paused: a plain publish is refused, with what to do, and sends nothing.
    for state in ["running", "paused"] {
        if state == "paused" {
            fc.run(&["rollout", "pause", r]).await.ok();
        }
        let plain = fc
            .run(&["release", "publish", r, "--groups", "fleet", "--yes"])
            .await;
        assert_eq!(plain.code, 1, "{plain:#?}");
        // Refused before the plan is shown and the question asked.
        assert_eq!(plain.stdout, "", "{plain:#?}");
        assert!(
            plain
                .stderr
                .contains(&format!("has a {state} staged rollout"))
                && plain.stderr.contains("fleetcast rollout cancel"),
            "{plain:#?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status(admin, release).await.targets.len(), 2);

    // Cancelled: the two drop it; the watch ends, and `cancelled` is no failure.
    fc.run(&["rollout", "cancel", r, "--yes"]).await.ok();
    wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.iter().all(|t| t.phase == Phase::Cancelled)
    })
    .await;
    let watch = fc.run(&["release", "watch", r, "--timeout", "20"]).await;
    assert_eq!(watch.code, 0, "{watch:#?}");
    assert!(
        watch.stdout.contains("all 2 machine(s) finished")
            && watch.stdout.contains("staged rollout cancelled"),
        "{watch:#?}"
    );
    let summary = fc.run(&["release", "status", r, "--summary"]).await.ok();
    assert!(summary.contains("8 of 10 were never notified"), "{summary}");

    // Now a plain publish is the operator's choice: all ten get it, the two cancelled ones in
    // a new round.
    fc.run(&["release", "publish", r, "--groups", "fleet", "--yes"])
        .await
        .ok();
    wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.len() == 10 && s.targets.iter().all(|t| t.phase == Phase::Deferred)
    })
    .await;
    // Waves over the group notice would hold back nobody: refused.
    let again = fc
        .run(&[
            "release", "publish", r, "--groups", "fleet", "--waves", "50%", "--yes",
        ])
        .await;
    assert_eq!(again.code, 1, "{again:#?}");
    assert!(
        again
            .stderr
            .contains("was published to group fleet without waves"),
        "{again:#?}"
    );

    f.stop().await;
}

/// Every machine fails the health check and the failure threshold is 100%: wave 1 finishes
/// (all rolled back) but never succeeds, so the rollout keeps running. `release watch` follows
/// it past that wave (it ended there, exit 3, with "all 2 machine(s) finished"), `release
/// status` and `rollout status` say what is left and why it waits, `rollout resume --advance`
/// starts the next wave of the running rollout (it was refused), and a paused rollout ends the
/// watch with its own status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_watch_follows_a_staged_rollout_and_advance_moves_a_running_one_on() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let env = env(&broker).await;
    let mut sims = Sims::default();
    sims.start(fleetcast_device::simulate::SimulateOptions {
        fail_health: vec!["2.0.0".into()],
        ..simulated(
            &env.data_dir,
            &env.dir.path().join("machines"),
            &broker,
            10,
            &["fleet"],
        )
    });
    wait_online(&env.admin, 10).await;
    let (_, release) = app_release(
        &env.admin,
        env.dir.path(),
        "2.0.0",
        3_000,
        5,
        InstallPolicy::Immediate,
    )
    .await;
    let f = Fleet {
        broker,
        env,
        sims,
        release: release.id,
    };
    let (admin, release) = (&f.env.admin, &f.release);
    let fc = fleetcast(&f);
    let r = release.as_str();
    let plan = WavePlan::new(vec![2000], 9500, 10_000, 0).unwrap();
    publish_with(admin, release, &[], &["fleet"], Some(plan)).await;
    until_finished(admin, release, 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rollout_status(admin, release).await.state,
        RolloutState::Running
    );

    let watch = fc.run(&["release", "watch", r, "--timeout", "2"]).await;
    assert_eq!(watch.code, 4, "a timeout has its own status: {watch:#?}");
    assert!(
        watch.stdout.contains(
            "2/2 finished; rolled_back=2 (staged rollout running, wave 1 of 2: 2 of 10 \
             machines notified)"
        ) && watch.stderr.contains("not finished after 2 s"),
        "{watch:#?}"
    );
    let summary = fc.run(&["release", "status", r, "--summary"]).await.ok();
    assert!(
        summary.contains(
            "staged rollout running in wave 1 of 2: only the 2 machine(s) notified so far are \
             listed; 8 of 10 are not notified yet"
        ),
        "{summary}"
    );
    let why = fc.run(&["rollout", "status", r]).await.ok();
    assert!(
        why.contains(
            "wave 1: 0 of 2 machines succeeded (0%), below 95%; 2 failed (100%), pauses above \
             100%"
        ),
        "{why}"
    );

    // A plain resume of a running rollout says what would work; --advance does it.
    let resume = fc.run(&["rollout", "resume", r]).await;
    assert_eq!(resume.code, 1, "{resume:#?}");
    assert!(
        resume.stderr.contains(&format!(
            "`fleetcast rollout resume {r} --advance` starts the next wave now"
        )),
        "{resume:#?}"
    );
    fc.run(&["rollout", "resume", r, "--advance"]).await.ok();
    let s = until_finished(admin, release, 10).await;
    assert!(s.targets.iter().all(|t| t.phase == Phase::RolledBack));
    let advanced = rollout_status(admin, release).await;
    assert_eq!(
        (advanced.wave, advanced.state, advanced.failures_accepted),
        (1, RolloutState::Running, 0)
    );

    // Paused: the watch says so and ends with its own status.
    fc.run(&["rollout", "pause", r]).await.ok();
    let watch = fc.run(&["release", "watch", r]).await;
    assert_eq!(watch.code, 5, "{watch:#?}");
    assert!(
        watch.stderr.contains("is paused: paused by admin"),
        "{watch:#?}"
    );
    // Completed: every machine finished, all failed.
    fc.run(&["rollout", "resume", r, "--advance"]).await.ok();
    let watch = fc.run(&["release", "watch", r, "--timeout", "20"]).await;
    assert_eq!(watch.code, 3, "{watch:#?}");
    assert!(
        watch.stdout.contains("all 10 machine(s) finished")
            && watch.stdout.contains("staged rollout completed"),
        "{watch:#?}"
    );

    f.stop().await;
}

/// During wave 1, one machine of wave 2 is moved out of the release's group and another is
/// revoked; so is a machine of wave 1 that was notified but never answered (offline). Wave 1
/// stops waiting for that one (100 % success threshold: the others are all of it now), wave 2
/// notifies neither of its two, and the rollout completes on the others. `rollout status`
/// shows the two as skipped (text and `--json`); the revoked wave-1 machine keeps its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_that_left_the_release_mid_rollout_are_skipped_and_the_wave_completes() {
    let broker = start_on_free_port(|s| s).unwrap().url();
    let env = env(&broker).await;
    let admin = &env.admin;
    let (_, release) = app_release(
        admin,
        env.dir.path(),
        "2.0.0",
        3_000,
        5,
        InstallPolicy::Immediate,
    )
    .await;
    let release = &release.id;
    // Wave 1 is order[..5], wave 2 order[5..]. order[0], order[5], order[6] are provisioned
    // but offline; every other machine is a simulated agent.
    let order = order(release, ids(1..=10));
    let (silent, moved, revoked) = (&order[0], &order[5], &order[6]);
    let sim = env.dir.path().join("machines");
    let mut sims = Sims::default();
    for (i, id) in ids(1..=10).iter().enumerate() {
        if [silent, moved, revoked].contains(&id) {
            provisioned(admin, id.as_str(), &["fleet"]).await;
        } else {
            sims.start(fleetcast_device::simulate::SimulateOptions {
                start_index: i + 1,
                ..simulated(&env.data_dir, &sim, &broker, 1, &["fleet"])
            });
        }
    }
    wait_online(admin, 7).await;
    let plan = WavePlan::new(vec![5000], 10_000, 10_000, 0).unwrap();
    publish_with(admin, release, &[], &["fleet"], Some(plan)).await;
    // Wave 1's four agents install; the silent one holds the wave at 100 %.
    wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.len() == 5
            && s.targets
                .iter()
                .filter(|t| t.phase == Phase::Installed)
                .count()
                == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rollout_status(admin, release).await.wave, 0);

    admin
        .call(calls::MachineGroups {
            machine: moved.clone(),
            add: vec![g("depot")],
            remove: vec![g("fleet")],
        })
        .await
        .unwrap();
    revoke(admin, revoked.as_str()).await;
    revoke(admin, silent.as_str()).await;

    let done = rollout_until(admin, release, "rollout completed", |r| {
        r.state == RolloutState::Completed
    })
    .await;
    let mut skipped = done.skipped.clone();
    skipped.sort();
    let mut want = vec![moved.clone(), revoked.clone()];
    want.sort();
    assert_eq!(skipped, want, "{done:?}");
    // Seven agents installed; the silent one's record stays as it was.
    let s = wait_status_within(admin, release, E2E_WAIT, |s| {
        s.targets.len() == 8
            && s.targets
                .iter()
                .all(|t| (&t.machine == silent) != (t.phase == Phase::Installed))
    })
    .await;
    let recorded: Vec<&MachineId> = s.targets.iter().map(|t| &t.machine).collect();
    assert!(
        !recorded.contains(&moved) && !recorded.contains(&revoked),
        "{recorded:?}"
    );
    assert!(
        recorded.contains(&silent),
        "notified before it was revoked: its record stays"
    );
    // No notice on their own topics either.
    let mut observer = peer(&broker, "observer").await;
    observer.subscribe("fleet/machines/+/release/app").await;
    let retained = observer.drain(Duration::from_secs(1)).await;
    let topics: Vec<&str> = retained
        .iter()
        .filter(|p| !p.payload.is_empty())
        .map(|p| p.topic.as_str())
        .collect();
    assert_eq!(topics.len(), 8, "{topics:?}");
    for m in [moved, revoked] {
        assert!(
            !topics.contains(&format!("fleet/machines/{m}/release/app").as_str()),
            "{topics:?}"
        );
    }

    let fc = super::cli::Fleetcast::new(env.dir.path())
        .with("FLEETCAST_DATA", &env.data_dir)
        .with("FLEETCAST_BROKER", broker.to_string());
    let text = fc.run(&["rollout", "status", release.as_str()]).await.ok();
    assert!(
        text.contains(
            "wave 2 of 2: 8 of 10 machines notified, 2 skipped (revoked or no longer targeted \
             when their wave started): "
        ),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &fc.run(&["rollout", "status", release.as_str(), "--json"])
            .await
            .ok(),
    )
    .unwrap();
    assert_eq!(json["skipped_total"], 2, "{json}");
    assert_eq!(json["skipped"].as_array().map(Vec::len), Some(2), "{json}");
    assert_eq!(
        (&json["tally"]["notified"], &json["tally"]["skipped"]),
        (&serde_json::json!(7), &serde_json::json!(3)),
        "{json}"
    );

    sims.stop().await;
    env.admin.close().await;
    env.platform.stop().await;
}
