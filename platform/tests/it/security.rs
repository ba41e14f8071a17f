//! Attacks by a client holding one machine's credentials (or any broker access), on a broker
//! that enforces nothing: the message layer alone must make each fail, and a legitimate
//! rollout must still complete around it. The embedded broker's ACLs are tested in `gateway`.

use super::*;
use fleetcast_proto::acl::Role;
use fleetcast_proto::admin::{AdminReply, AuditEntry, ResponseEnvelope};
use fleetcast_proto::chunk::{encode_frame, encode_upload_frame, FrameHeader};
use fleetcast_proto::events::{EventBatch, EventsRequest};
use fleetcast_proto::keychain::KeyChain;

/// Every payload `spy` has seen, as text (lossy) for searching.
async fn seen_text(spy: &mut Peer) -> String {
    spy.drain(Duration::from_millis(300))
        .await
        .iter()
        .map(|p| format!("{} {}\n", p.topic, String::from_utf8_lossy(&p.payload)))
        .collect()
}

/// Creates integrator `name`.
pub(super) async fn add_integrator(
    admin: &AdminClient,
    name: &str,
) -> fleetcast_proto::admin::IntegratorProfile {
    admin
        .call(calls::IntegratorAdd {
            name: name.into(),
            rotate: false,
        })
        .await
        .unwrap()
}

/// Every stored event (one page of up to 500), and whether more follow.
pub(super) async fn stored_events(admin: &AdminClient) -> (Vec<FleetEvent>, bool) {
    let page = admin
        .call(calls::EventsSince {
            since: 0,
            limit: None,
        })
        .await
        .unwrap();
    (page.items, page.more)
}

/// Installs `release` on `vm` through the reports a machine sends, and waits for the record.
pub(super) async fn install(
    admin: &AdminClient,
    vm: &mut Machine,
    release: &ReleaseId,
    version: &str,
) {
    for phase in [
        Phase::Notified,
        Phase::Downloading,
        Phase::Downloaded,
        Phase::Installing,
    ] {
        vm.report(Some(release), version, phase).await;
    }
    vm.report_recorded(admin, release, version, Phase::Installed)
        .await;
}

#[tokio::test]
async fn a_reader_of_everything_learns_no_secret_while_identities_are_created() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let mut spy = peer(&url, "vm-spy").await;
    spy.subscribe("#").await;
    let vm = provisioned(&admin, "vm-001", &["g"]).await;
    let operator = add_operator(&admin, "bob", Role::Operator).await;
    let integrator = add_integrator(&admin, "erp").await;
    let text = seen_text(&mut spy).await;
    assert!(
        text.contains("fleet/admin/"),
        "the spy saw the admin traffic"
    );
    for (what, secret) in [
        ("machine secret", vm.secret.to_hex()),
        ("machine broker password", vm.secret.mqtt_password()),
        ("operator secret", operator.secret.to_hex()),
        ("integrator password", integrator.password.clone()),
        (
            "admin secret",
            std::fs::read_to_string(admin_secret_path(&data_dir))
                .unwrap()
                .trim()
                .to_owned(),
        ),
    ] {
        assert!(
            !text.contains(&secret),
            "{what} crossed the broker in clear"
        );
    }
    // What was handed out works: the machine's secret is the one the platform checks.
    assert_eq!(vm.platform_key, public_key(&data_dir));
    upload(&admin, dir.path(), "a.bin", &data(3000, 1), "1.0")
        .await
        .unwrap();
    let mut m1 = connected(&admin, &url, vm).await;
    let r = release(&admin, "1.0", &[], &["g"]).await.release;
    install(&admin, &mut m1, &r.id, "1.0").await;
    admin.close().await;
    platform.stop().await;
}

#[tokio::test]
async fn forged_admin_responses_are_ignored_and_the_real_answer_is_used() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir: _dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    // The attacker answers every request first: sealed with its own key, and as a plain error.
    let mut attacker = peer(&url, "vm-evil").await;
    attacker.subscribe("fleet/admin/+/request").await;
    let forger = tokio::spawn(async move {
        let evil = Secret::from_bytes([9; 32]);
        let mut forged = 0u32;
        while let Some(p) = attacker.next_within(Duration::from_secs(3), |_| true).await {
            let client = p.topic.split('/').nth(2).unwrap().to_owned();
            let id = fleetcast_proto::auth::peek_body::<serde_json::Value>(&p.payload).unwrap()
                ["id"]
                .as_u64()
                .unwrap();
            let fake = fleetcast_proto::admin::AdminResponse::ok(
                id,
                0,
                AdminReply::Done {
                    message: "forged".into(),
                },
            );
            for env in [
                ResponseEnvelope {
                    id,
                    sealed: Some(evil.seal_box(Purpose::AdminResponse, &client, &fake)),
                    unverified_error: None,
                },
                ResponseEnvelope {
                    id,
                    sealed: None,
                    unverified_error: Some("forged refusal".into()),
                },
            ] {
                let topic = format!("fleet/admin/{client}/response");
                attacker
                    .client
                    .publish(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&env).unwrap(),
                    )
                    .await
                    .unwrap();
            }
            forged += 1;
        }
        forged
    });
    let provisioned = provisioned(&admin, "shop-101", &[]).await;
    assert_eq!(
        provisioned.platform_key,
        public_key(&data_dir),
        "the config pins the real platform key"
    );
    let machines = machines(&admin).await;
    assert_eq!(machines.len(), 1);
    admin.close().await;
    platform.stop().await;
    assert!(forger.await.unwrap() >= 2, "the attacker did answer");
}

#[tokio::test]
async fn forged_progress_and_events_do_not_verify_and_integrators_catch_up_on_what_they_missed() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let key = public_key(&data_dir);
    let integrator = add_integrator(&admin, "erp").await;
    upload(&admin, dir.path(), "a.bin", &data(3000, 2), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r = release(&admin, "1.0", &["vm-001"], &[]).await.release;

    // A forged retained progress, unsigned and signed by another key: neither verifies.
    let mut attacker = peer(&url, "vm-evil").await;
    let forged = RolloutProgress {
        release: r.id.clone(),
        kind: app(),
        version: "1.0".into(),
        total: 50,
        phases: Default::default(),
        finished: 50,
        succeeded: 50,
        failed: 0,
        updated_at_ms: u64::MAX,
    };
    let topic = format!("fleet/rollouts/{}/progress", r.id);
    let other = fleetcast_proto::auth::PlatformKey::from_seed([5; 32]);
    for payload in [
        serde_json::to_vec(&forged).unwrap(),
        other.sign(Purpose::Progress, &forged),
        // A genuine event's signature does not make it progress either.
        other.sign(Purpose::Event, &forged),
    ] {
        attacker.publish_acked(&topic, true, payload.clone()).await;
        assert!(key
            .verify::<RolloutProgress>(Purpose::Progress, &payload)
            .is_err());
    }

    // Events stored while no integrator listened.
    install(&admin, &mut vm, &r.id, "1.0").await;
    let mut watcher = peer(&url, "watcher").await;
    watcher.subscribe(&topic).await;
    // Progress is published at most every 500 ms: the retained one may still be from before
    // the install, the final one follows within that.
    let progress = loop {
        let p = watcher.next(|p| p.topic == topic).await;
        let progress: RolloutProgress =
            key.verify(Purpose::Progress, &p.payload)
                .unwrap_or_else(|e| {
                    panic!("the retained progress after the rollout is the platform's: {e}")
                });
        if progress.finished == 1 {
            break progress;
        }
    };
    assert_eq!(progress.succeeded, 1);

    // The integrator asks for everything after id 0, then after the last id it got.
    let client = integrator.username.clone();
    let mut int = peer_with(&url, &client, Some(&integrator.password)).await;
    let answers = format!("fleet/integrators/{client}/events");
    int.subscribe(&answers).await;
    let ask = |since: u64| {
        serde_json::to_vec(&EventsRequest {
            since,
            limit: Some(3),
        })
        .unwrap()
    };
    let mut got: Vec<FleetEvent> = Vec::new();
    let mut since = 0;
    loop {
        let req = ask(since);
        int.publish_acked(&format!("{answers}/get"), false, req)
            .await;
        let p = int.next(|p| p.topic == answers).await;
        let batch: EventBatch = key.verify(Purpose::EventBatch, &p.payload).unwrap();
        assert_eq!(
            (batch.client.as_str(), batch.since),
            (client.as_str(), since)
        );
        assert!(batch.events.len() <= 3);
        got.extend(batch.events);
        since = batch.next;
        if !batch.more {
            break;
        }
    }
    let phases: Vec<Phase> = got.iter().map(|e| e.phase).collect();
    assert_eq!(
        phases,
        [
            Phase::Notified,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Installing,
            Phase::Installed
        ]
    );
    assert!(
        got.windows(2).all(|w| w[0].id + 1 == w[1].id),
        "ids increase by one"
    );
    // The operator CLI's view is the same.
    let (events, more) = stored_events(&admin).await;
    assert_eq!((events, more), (got, false));
    // Someone who is not a registered integrator gets no answer.
    let mut stranger = peer(&url, "fleetcast-int-nobody").await;
    stranger
        .subscribe("fleet/integrators/fleetcast-int-nobody/events")
        .await;
    stranger
        .publish_acked(
            "fleet/integrators/fleetcast-int-nobody/events/get",
            false,
            ask(0),
        )
        .await;
    assert!(stranger
        .next_within(Duration::from_millis(500), |_| true)
        .await
        .is_none());
    admin.close().await;
    platform.stop().await;
}

#[tokio::test]
async fn junk_frames_on_an_operators_upload_topic_do_not_break_the_upload() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    let bytes = data(200_000, 3);
    let artifact = ArtifactId::of(&bytes);
    let mut attacker = peer(&url, "vm-evil").await;
    attacker.subscribe("fleet/admin/+/request").await;
    let topic = format!("fleet/admin/{}/upload", admin.client_id());
    let junk = tokio::spawn(async move {
        // Wait for the upload to begin, then flood its topic with parts that look right.
        attacker.next(|_| true).await;
        let evil = Secret::from_bytes([9; 32]);
        for index in 0..200u32 {
            let header = FrameHeader {
                frame_type: FrameType::UploadPart,
                artifact,
                index: index % 196,
                total: 196,
            };
            let payload = if index % 2 == 0 {
                encode_frame(&header, &[0xAA; 1024])
            } else {
                encode_upload_frame(&evil, &header, &[0xBB; 1024])
            };
            attacker
                .client
                .publish(&topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    });
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &bytes).unwrap();
    let info = admin
        .upload(&path, app(), "1.0".into(), None, 1024, |_, _| {})
        .await
        .expect("the upload completes despite the junk");
    assert_eq!(info.id, artifact);
    junk.await.unwrap();
    admin.close().await;
    platform.stop().await;
}

#[tokio::test]
async fn machines_get_chunks_only_of_their_releases_and_cannot_flood_the_event_store() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    let one = upload(&admin, dir.path(), "a.bin", &data(3000, 4), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let mut other = provision(&admin, &url, "vm-002", &[]).await;
    let r = release(&admin, "1.0", &["vm-002"], &[]).await.release;
    let chunks = "fleet/machines/vm-001/chunks";
    vm.peer.subscribe(chunks).await;
    vm.request_chunks(one.id, false, vec![(0, 1)]).await;
    let p = vm.peer.next(|p| p.topic == chunks).await;
    // MAC'd with vm-001's secret (protocol.md §7.2).
    let frame = fleetcast_proto::chunk::open_error_frame(&vm.secret, &p.payload)
        .expect("an error frame MAC'd for vm-001");
    let (h, reason) = decode_frame(frame).unwrap();
    assert_eq!(
        (h.frame_type, reason),
        (FrameType::Error, &b"unknown artifact"[..]),
        "an artifact not released to the machine looks unknown"
    );
    // 150 events naming a release that does not target vm-001: acknowledged, never stored.
    // (Fewer than a machine's report burst: on a broker other than the embedded one the
    // platform drops a machine's reports past it, `limits::EXTERNAL_REPORTS`.)
    let acks = "fleet/machines/vm-001/status/ack";
    vm.peer.subscribe(acks).await;
    for _ in 0..150 {
        vm.report(Some(&r.id), "1.0", Phase::Installed).await;
    }
    let last_ctr = vm.ctr;
    vm.acked_up_to(last_ctr).await;
    install(&admin, &mut other, &r.id, "1.0").await;
    let (events, _) = stored_events(&admin).await;
    assert!(
        events.iter().all(|e| e.machine.as_str() == "vm-002"),
        "nothing vm-001 said about a release that is not its own was kept"
    );
    assert_eq!(events.len(), 5);
    let s = status(&admin, &r.id).await;
    assert_eq!(s.targets.len(), 1);
    assert_eq!(phase_of(&s, "vm-002"), Phase::Installed);
    admin.close().await;
    platform.stop().await;
}

#[tokio::test]
async fn viewers_change_nothing_revoked_identities_stop_working_and_every_action_is_audited() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    upload(&admin, dir.path(), "a.bin", &data(3000, 5), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r = create_release(&admin, &app(), "1.0", InstallPolicy::Immediate).await;
    let operator = add_operator(&admin, "val", Role::Viewer).await;
    let viewer = AdminClient::connect_as(
        &url,
        Topics::default(),
        "val",
        operator.secret.clone(),
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(machines(&viewer).await.len(), 1, "a viewer reads");
    let publish = calls::ReleasePublish {
        release: r.id.clone(),
        machines: vec![m("vm-001")],
        groups: vec![],
        allow_empty: false,
        waves: None,
    };
    let err = viewer.call(publish.clone()).await.unwrap_err();
    assert!(err.to_string().contains("role viewer"), "{err}");
    // Identities are an admin's: a viewer can neither cut an integrator off nor move a machine.
    add_integrator(&admin, "erp").await;
    let err = viewer
        .call(calls::IntegratorRevoke { name: "erp".into() })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs admin"), "{err}");
    let err = viewer
        .call(calls::MachineGroups {
            machine: m("vm-001"),
            add: vec![g("north")],
            remove: vec![],
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs admin"), "{err}");
    assert_eq!(admin.call(calls::IntegratorList {}).await.unwrap().len(), 1);
    assert!(machines(&admin).await[0].groups.is_empty());
    assert_eq!(
        status(&admin, &r.id).await.targets.len(),
        0,
        "nothing was published"
    );
    // Someone with the viewer's name but another key gets nothing done.
    let impostor = AdminClient::connect_as(
        &url,
        Topics::default(),
        "val",
        Secret::from_bytes([1; 32]),
        WAIT,
    )
    .await
    .unwrap();
    let err = impostor.call(calls::Machines {}).await.unwrap_err();
    assert!(matches!(err, AdminError::Unverified(_)), "{err}");
    impostor.close().await;
    // The operator revokes the viewer and the machine.
    admin
        .call(calls::OperatorRevoke { name: "val".into() })
        .await
        .unwrap();
    let err = viewer.call(calls::Machines {}).await.unwrap_err();
    assert!(matches!(err, AdminError::Unverified(_)), "{err}");
    viewer.close().await;
    admin.call(publish.clone()).await.unwrap();
    revoke(&admin, "vm-001").await;
    // A revoked machine is no target any more, and what it reports changes nothing.
    let again = admin.call(publish).await.unwrap_err();
    assert!(
        matches!(&again, AdminError::Refused(why) if why.contains("revoked: vm-001")),
        "{again}"
    );
    vm.report(Some(&r.id), "1.0", Phase::Installed).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        phase_of(&status(&admin, &r.id).await, "vm-001"),
        Phase::Pending,
        "a revoked machine's report changes nothing"
    );
    let summary: Vec<(String, String, bool)> = audit(&admin)
        .await
        .iter()
        .map(|e: &AuditEntry| (e.operator.clone(), e.action.clone(), e.result == "ok"))
        .collect();
    for want in [
        ("admin", "upload_begin", true),
        ("admin", "operator_add", true),
        ("val", "release_publish", false),
        ("val", "integrator_revoke", false),
        ("val", "machine_groups", false),
        ("admin", "operator_revoke", true),
        ("admin", "machine_revoke", true),
        ("admin", "release_publish", true),
    ] {
        assert!(
            summary.contains(&(want.0.into(), want.1.into(), want.2)),
            "audit lacks {want:?}: {summary:?}"
        );
    }
    assert!(
        !summary.iter().any(|(_, a, _)| a == "machines"),
        "reads are not audited"
    );
    admin.close().await;
    platform.stop().await;
}

#[tokio::test]
async fn a_rotated_key_is_announced_under_the_old_one_and_signs_every_desired_notice() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let first = public_key(&data_dir);
    upload(&admin, dir.path(), "a.bin", &data(3000, 6), "1.0")
        .await
        .unwrap();
    let _vm = provision(&admin, &url, "vm-001", &[]).await;
    release(&admin, "1.0", &["vm-001"], &[]).await;
    let mut watcher = peer(&url, "watcher").await;
    watcher.subscribe("fleet/platform/keys").await;
    watcher.subscribe("fleet/machines/vm-001/release/app").await;
    let _ = watcher.drain(Duration::from_millis(200)).await;
    admin.call(calls::KeyRotate {}).await.unwrap();
    let chain = watcher.next(|p| p.topic == "fleet/platform/keys").await;
    let chain = KeyChain::parse(&chain.payload).unwrap();
    let (generation, newest) = chain.follow(0, first).unwrap();
    assert_eq!(generation, 1);
    assert_eq!(newest, public_key(&data_dir), "platform.pub is the new key");
    assert_ne!(newest, first);
    let p = watcher
        .next(|p| p.topic == "fleet/machines/vm-001/release/app")
        .await;
    let notice: ReleaseNotice = newest
        .verify(Purpose::Release, &p.payload)
        .expect("the desired notice is re-signed with the new key");
    assert_eq!(notice.version, "1.0");
    assert!(first
        .verify::<ReleaseNotice>(Purpose::Release, &p.payload)
        .is_err());
    // A restart keeps the new key.
    platform.stop().await;
    let platform = start_platform(&url, &data_dir);
    let admin2 = super::admin(&url, &data_dir).await;
    assert_eq!(public_key(&data_dir), newest);
    admin2.close().await;
    admin.close().await;
    platform.stop().await;
}

/// Whether `python3` with paho-mqtt and cryptography is here. `scripts/test.sh` installs them
/// and sets FLEETCAST_REQUIRE_PYTHON=1, so in CI a missing one fails instead of skipping.
pub(super) fn python_with_mqtt() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt.client, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("FLEETCAST_REQUIRE_PYTHON").is_err(),
            "python3 with paho-mqtt and cryptography is required (pip install paho-mqtt cryptography)"
        );
        eprintln!("SKIPPED: python3 with paho-mqtt and cryptography is not installed");
    }
    ok
}

/// Runs scripts/integrator.py `--once` (with `args`) as a new integrator "erp" of the platform
/// at `url`, in `dir`: the events it printed, each as JSON, and the last id it kept.
async fn integrator_catch_up(
    admin: &AdminClient,
    url: &BrokerUrl,
    dir: &Path,
    args: &[&str],
) -> (Vec<serde_json::Value>, String) {
    let integrator = add_integrator(admin, "erp").await;
    run_python_integrator(&integrator, url, dir, args).await
}

/// Runs scripts/integrator.py `--once` (with `args`) with `integrator`'s profile, its state
/// in `dir`: the events it printed, each as JSON, and the last id it kept.
async fn run_python_integrator(
    integrator: &fleetcast_proto::admin::IntegratorProfile,
    url: &BrokerUrl,
    dir: &Path,
    args: &[&str],
) -> (Vec<serde_json::Value>, String) {
    let cfg = dir.join(format!("{}.toml", integrator.name));
    std::fs::write(
        &cfg,
        fleetcast_platform::cli::identity::integrator_toml(integrator, &url.to_string()),
    )
    .unwrap();
    let state = dir.join(format!("{}.state", integrator.name));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/integrator.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&cfg)
        .args(["--state".as_ref(), state.as_os_str()])
        .arg("--once")
        .args(args)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the script ends")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("event").cloned())
        .collect();
    let kept = std::fs::read_to_string(&state).unwrap().trim().to_owned();
    (events, kept)
}

#[tokio::test]
async fn the_documented_python_integrator_catches_up_and_verifies_every_event() {
    if !python_with_mqtt() {
        return;
    }
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    python_integrator_sees_one_install(&admin, &url, dir.path()).await;
    admin.close().await;
    platform.stop().await;
}

/// The phases of the five events of one install ([`install`]), in order.
const INSTALL_PHASES: [&str; 5] = [
    "notified",
    "downloading",
    "downloaded",
    "installing",
    "installed",
];

/// vm-001 installs app 1.0 through the platform at `url`: five events stored.
async fn one_install(admin: &AdminClient, url: &BrokerUrl, dir: &Path) {
    upload(admin, dir, "a.bin", &data(3000, 7), "1.0")
        .await
        .unwrap();
    let mut vm = provision(admin, url, "vm-001", &[]).await;
    let r = release(admin, "1.0", &["vm-001"], &[]).await.release;
    install(admin, &mut vm, &r.id, "1.0").await;
}

/// One machine installs one release through the platform at `url`; then scripts/integrator.py
/// catches up and shows its five events, each verified, and keeps the last id.
pub(super) async fn python_integrator_sees_one_install(
    admin: &AdminClient,
    url: &BrokerUrl,
    dir: &Path,
) {
    one_install(admin, url, dir).await;
    let (events, kept) = integrator_catch_up(admin, url, dir, &[]).await;
    let phases: Vec<&str> = events.iter().filter_map(|e| e["phase"].as_str()).collect();
    assert_eq!(phases, INSTALL_PHASES);
    assert_eq!(kept, "5");
}

/// Key rotations after an integrator got its profile: scripts/integrator.py follows the
/// retained key chain from the profile's generation and verifies what the newest key signed
/// (its catch-up batch); a profile issued after the rotations names the newest key with its
/// generation (`platform_key_gen`), without which a client can follow nothing. Before, the
/// profile had no generation and the script checked everything with the profile's key alone,
/// so after a rotation it verified nothing and gave up.
#[tokio::test]
async fn the_python_integrator_follows_key_rotations_from_its_profiles_generation() {
    if !python_with_mqtt() {
        return;
    }
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let before = erp_before_two_rotations(&admin, &url, dir.path()).await;
    let after = add_integrator(&admin, "bi").await;
    assert_eq!(after.platform_key_gen, 2);
    assert_eq!(after.platform_key, public_key(&data_dir));
    assert_ne!(after.platform_key, before.platform_key);
    for profile in [&before, &after] {
        let (events, kept) = run_python_integrator(profile, &url, dir.path(), &[]).await;
        assert_eq!(events.len(), 5, "{}: {events:?}", profile.name);
        assert_eq!(kept, "5", "{}", profile.name);
    }
    let reached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("erp.state.key")).unwrap()).unwrap();
    assert_eq!(reached["current"][0], 2, "{reached}");
    assert_eq!(
        reached["current"][1].as_str(),
        Some(after.platform_key.to_hex().as_str())
    );
    admin.close().await;
    platform.stop().await;
}

/// One install (five events), then integrator `erp` added (its profile names key generation
/// 0), then two key rotations: erp's profile.
async fn erp_before_two_rotations(
    admin: &AdminClient,
    url: &BrokerUrl,
    dir: &Path,
) -> fleetcast_proto::admin::IntegratorProfile {
    one_install(admin, url, dir).await;
    let profile = add_integrator(admin, "erp").await;
    assert_eq!(profile.platform_key_gen, 0);
    admin.call(calls::KeyRotate {}).await.unwrap();
    admin.call(calls::KeyRotate {}).await.unwrap();
    profile
}

/// What scripts/integrator.py does with a key chain someone other than the platform made (on
/// a broker without ACLs anyone may publish one): a link whose signature or body was changed,
/// or that is no JSON, is refused whole and the trusted key stays; the honest chain of the
/// test vectors is followed; a message signed by a generation not reached yet is held, not
/// checked against the wrong key. Runs the script's own `Trust` on docs/test-vectors.
#[test]
fn the_python_integrator_refuses_a_forged_key_chain() {
    if !python_with_mqtt() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let check = r#"
import json, importlib.util, pathlib, sys, tempfile
spec = importlib.util.spec_from_file_location("integrator", "scripts/integrator.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
d = json.load(open("docs/test-vectors/signatures.json"))
link = json.loads([v for v in d["vectors"] if v["purpose"] == "key-rotation"][0]["envelope"])
event = json.loads([v for v in d["vectors"] if v["purpose"] == "event"][0]["envelope"])
dir = pathlib.Path(tempfile.mkdtemp())
def trust():
    (dir / "k").unlink(missing_ok=True)
    return m.Trust({"platform_key": d["public_key"], "platform_key_gen": 0}, dir / "k")
out = []
forged = dict(link, sig=("1" if link["sig"][0] == "0" else "0") + link["sig"][1:])
body = json.loads(link["body"]); body["key"] = d["public_key"]
changed = dict(link, body=json.dumps(body))
for name, chain in [("forged", {"links": [forged]}), ("changed", {"links": [changed]}), ("junk", None)]:
    t = trust()
    moved = t.follow(b"junk" if chain is None else json.dumps(chain))
    out.append(f"{name} {moved} {t.gen} {(dir / 'k').exists()}")
ahead = dict(event, gen=1)
out.append(f"ahead-held {t.verify('event', json.dumps(ahead)) is m.LATER}")
t = trust()
out.append(f"honest {t.follow(json.dumps({'links': [link]}))} {t.gen} {t.key_hex == d['next_public_key']}")
out.append(f"old-dropped {t.verify('event', json.dumps(event)) is None}")
print("\n".join(out))
"#;
    let run = std::process::Command::new("python3")
        .args(["-c", check])
        .current_dir(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}
{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "forged False 0 False",
            "changed False 0 False",
            "junk False 0 False",
            "ahead-held True",
            "honest True 1 True",
            "old-dropped True",
        ]
    );
}

/// A catch-up longer than the platform's burst of 20 requests (40 pages of one event): the
/// documented script keeps under the rate (5 a second) and asks again what goes unanswered,
/// instead of waiting 30 s for an answer to a request the platform dropped and giving up (as
/// it did once a 10,000-machine demo had more than 20 pages of events to fetch quickly).
#[tokio::test]
async fn the_python_integrator_catches_up_past_the_request_burst() {
    if !python_with_mqtt() {
        return;
    }
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    {
        let store = fleetcast_platform::store::SledStore::open(&data_dir.join("db")).unwrap();
        let mut events: Vec<FleetEvent> = (1..=40)
            .map(|i| FleetEvent {
                id: 0,
                recorded_at_ms: i,
                machine: MachineId::new("vm-001").unwrap(),
                release: None,
                kind: Kind::new("app").unwrap(),
                version: "1.0".into(),
                phase: Phase::Notified,
                at_ms: i,
                attempt: 1,
                progress: None,
                error: None,
                detail: None,
            })
            .collect();
        fleetcast_platform::store::Store::append_events(&store, &mut events).unwrap();
    }
    let platform = start_platform(&url, &data_dir);
    let admin = admin(&url, &data_dir).await;
    let (events, kept) = integrator_catch_up(&admin, &url, dir.path(), &["--page", "1"]).await;
    let ids: Vec<u64> = events.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert_eq!(ids, (1..=40).collect::<Vec<u64>>());
    assert_eq!(kept, "40");
    admin.close().await;
    platform.stop().await;
}

/// Whether mosquitto_sub, jq, xxd and openssl are here. `scripts/test.sh` installs them and sets
/// FLEETCAST_REQUIRE_SHELL_TOOLS=1, so there a missing one fails instead of skipping.
fn shell_tools() -> bool {
    let missing: Vec<&str> = ["mosquitto_sub", "jq", "xxd", "openssl"]
        .into_iter()
        .filter(|tool| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var("FLEETCAST_REQUIRE_SHELL_TOOLS").is_err(),
            "{missing:?} required (apt-get install mosquitto-clients jq xxd openssl)"
        );
        eprintln!("SKIPPED: {missing:?} not installed");
    }
    missing.is_empty()
}

/// The `sh` blocks of docs/integrators.md §6 as written, the first (which profile, which
/// release) replaced by `settings`.
fn mosquitto_sub_blocks(settings: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/integrators.md"),
    )
    .unwrap();
    let section = doc
        .split("\n## 6. With mosquitto_sub")
        .nth(1)
        .expect("integrators.md has §6")
        .split("\n## ")
        .next()
        .unwrap();
    let mut blocks: Vec<String> = section
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("\n```").next().unwrap().to_owned())
        .collect();
    assert_eq!(
        blocks.len(),
        5,
        "settings, credentials, verify, progress, live events"
    );
    assert!(
        blocks[0]
            .lines()
            .all(|l| l.starts_with("PROFILE=") || l.starts_with("RELEASE=")),
        "the first block only says which profile and release: {}",
        blocks[0]
    );
    blocks[0] = settings.to_owned();
    blocks
}

async fn bash(script: String) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .output(),
    )
    .await
    .expect("the script ends within 30 s")
    .unwrap()
}

#[tokio::test]
async fn the_documented_mosquitto_sub_commands_follow_a_rollout() {
    if !shell_tools() {
        return;
    }
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    upload(&admin, dir.path(), "a.bin", &data(3000, 9), "1.0")
        .await
        .unwrap();
    upload(&admin, dir.path(), "b.bin", &data(3000, 10), "2.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r1 = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    install(&admin, &mut vm, &r1.id, "1.0").await;
    let integrator = add_integrator(&admin, "erp").await;
    let profile = dir.path().join("erp.toml");
    std::fs::write(
        &profile,
        fleetcast_platform::cli::identity::integrator_toml(&integrator, &url.to_string()),
    )
    .unwrap();
    let blocks = mosquitto_sub_blocks(&format!(
        "PROFILE='{}'\nRELEASE={}",
        profile.display(),
        r1.id
    ));
    let prelude = blocks[..3].join("\n");

    // Where the rollout stands: its retained progress, verified.
    let progress = poll_until(
        WAIT,
        "the retained progress shows the finished rollout",
        || bash(format!("{prelude}\n{}", blocks[3])),
        |out| serde_json::from_slice::<RolloutProgress>(&out.stdout).is_ok_and(|p| p.finished == 1),
    )
    .await;
    let shown: RolloutProgress = serde_json::from_slice(&progress.stdout).unwrap();
    assert_eq!((shown.release.clone(), shown.total), (r1.id.clone(), 1));

    // A message the platform key did not sign is dropped, body and all.
    let forged = String::from_utf8(
        fleetcast_proto::auth::PlatformKey::from_seed([9; 32]).sign(Purpose::Progress, &shown),
    )
    .unwrap();
    let out = bash(format!(
        "{prelude}\nprintf '%s' '{forged}' | verify fleetcast/v1/progress"
    ))
    .await;
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("dropped"));

    // Live events of the next rollout, each verified, as they are stored.
    let mut live = tokio::process::Command::new("bash")
        .args(["-c", &format!("{prelude}\n{}", blocks[4])])
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let group = live.id().expect("running");
    // mosquitto_sub connects and subscribes in milliseconds; events published before that
    // would be missed (QoS 0, not retained).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r2 = release(&admin, "2.0", &["vm-001"], &[]).await.release;
    install(&admin, &mut vm, &r2.id, "2.0").await;
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(live.stdout.take().unwrap()));
    let mut phases = Vec::new();
    while phases.last() != Some(&Phase::Installed) {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no verified event within {WAIT:?}; saw {phases:?}"))
            .unwrap()
            .expect("mosquitto_sub still running");
        let event: FleetEvent = serde_json::from_str(&line).unwrap();
        if event.release.as_ref() == Some(&r2.id) {
            phases.push(event.phase);
        }
    }
    // Ends only what this test started: the script's own process group.
    let _ = std::process::Command::new("kill")
        .args(["--", &format!("-{group}")])
        .status();
    let _ = live.wait().await;
    assert_eq!(
        phases,
        [
            Phase::Notified,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Installing,
            Phase::Installed
        ]
    );
    admin.close().await;
    platform.stop().await;
}

/// The Mosquitto files of the platform's identities now, as `fleetcast broker mosquitto-config`
/// asks for them.
async fn generated_files(admin: &AdminClient) -> fleetcast_broker::mosquitto::MosquittoFiles {
    let calls::MosquittoFiles { passwd, acl, .. } =
        fleetcast_platform::cli::identity::mosquitto_files_all(admin, None)
            .await
            .unwrap();
    fleetcast_broker::mosquitto::MosquittoFiles { passwd, acl }
}

/// docs/operations.md, "Moving a machine to another group", on Mosquitto with the generated
/// files and the real agent: the platform cannot close a session there, so `machine groups`
/// sends the `groups` command at once; the operator regenerates the files and reloads, and the
/// agent, its config still naming shanghai, installs beijing's release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mosquitto_a_machine_moved_in_one_command_follows_its_new_group() {
    let open = start_on_free_port(|s| s).unwrap();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&open.url()).await;
    let p = provisioned(&admin, "vm-m", &["shanghai"]).await;
    let mosq =
        fleetcast_broker::testing::Mosquitto::start_with_files(&generated_files(&admin).await)
            .expect("mosquitto starts (scripts/test.sh installs it)");
    admin.close().await;
    platform.stop().await;
    let platform = start_platform(&mosq.url, &data_dir);
    let admin = super::admin(&mosq.url, &data_dir).await;
    let mut config = super::e2e::machine_config(&p, &mosq.machine_url, dir.path());
    config.initial_versions = BTreeMap::from([(app(), "1.0.0".to_owned())]);
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(config, agents.clone()));
    wait_online(&admin, 1).await;

    let said = move_to_beijing(&admin, "vm-m").await;
    assert!(
        said.contains("0 broker session") || said.contains("told its groups when it is next"),
        "{said}"
    );
    mosq.rewrite_files(&generated_files(&admin).await).unwrap();
    mosq.reload().unwrap();
    installed_by_group(&admin, dir.path(), ("2.0.0", 9), "beijing", 1).await;
    admin.close().await;
    agents.cancel();
    joined(agent, "agent vm-m moved on mosquitto").await;
    platform.stop().await;
}

#[tokio::test]
async fn on_mosquitto_with_the_generated_files_one_machine_cannot_touch_another() {
    // The files come from the platform's own identities.
    let open = start_on_free_port(|s| s).unwrap();
    let open_url = open.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&open_url).await;
    upload(&admin, dir.path(), "a.bin", &data(3000, 8), "1.0")
        .await
        .unwrap();
    let p1 = provisioned(&admin, "vm-1", &["g1"]).await;
    let p2 = provisioned(&admin, "vm-2", &["g2"]).await;
    // As `fleetcast broker mosquitto-config` asks for them: in pages, here of one machine.
    let calls::MosquittoFiles { passwd, acl, .. } =
        fleetcast_platform::cli::identity::mosquitto_files_all(&admin, Some(1))
            .await
            .unwrap();
    admin.close().await;
    platform.stop().await;
    let files = fleetcast_broker::mosquitto::MosquittoFiles { passwd, acl };
    let mosq = fleetcast_broker::testing::Mosquitto::start_with_files(&files)
        .expect("mosquitto starts (scripts/test.sh installs it)");
    let (url, machine_url) = (mosq.url.clone(), mosq.machine_url.clone());

    // The platform, its operator and its machines run on it with their own credentials, the
    // machines on their own listener.
    let platform = start_platform(&url, &data_dir);
    let admin = super::admin(&url, &data_dir).await;
    let mut vm1 = connected(&admin, &machine_url, p1).await;
    let mut vm2 = connected(&admin, &machine_url, p2).await;
    vm1.peer.subscribe("#").await;
    vm2.peer.subscribe("fleet/machines/vm-2/release/+").await;
    let r = release(&admin, "1.0", &["vm-2"], &[]).await.release;
    let mine = vm2
        .peer
        .next(|p| p.topic == "fleet/machines/vm-2/release/app")
        .await;
    assert!(!mine.payload.is_empty());
    // vm-1 says vm-2 went offline, then reports for itself on the same connection.
    vm1.peer
        .client
        .publish(
            "fleet/machines/vm-2/online",
            QoS::AtLeastOnce,
            true,
            "false",
        )
        .await
        .unwrap();
    let r1 = release(&admin, "1.0", &[], &["g1"]).await.release;
    install(&admin, &mut vm1, &r1.id, "1.0").await;
    let ms = machines(&admin).await;
    assert!(
        ms.iter().any(|x| x.id.as_str() == "vm-2" && x.online),
        "vm-1's publish on vm-2's topic never reached the platform"
    );
    let seen: Vec<String> = vm1
        .peer
        .drain(Duration::from_millis(300))
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert!(
        seen.iter().any(|t| t == "fleet/machines/vm-1/status/ack"),
        "vm-1 reads its own topics: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|t| t.contains("vm-2") || t.contains("/admin/")),
        "vm-1 read another machine's or the operators' topics: {seen:?}"
    );
    install(&admin, &mut vm2, &r.id, "1.0").await;
    admin.close().await;
    platform.stop().await;
}

/// `fleetcast machine provision --from-file LIST --out-dir OUT` as the bootstrap operator.
fn provision_from_file(
    url: &BrokerUrl,
    data_dir: &Path,
    list: &Path,
    out: &Path,
) -> impl std::future::Future<Output = std::io::Result<std::process::Output>> {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["machine", "provision", "--from-file"])
        .arg(list)
        .arg("--out-dir")
        .arg(out)
        .args(["--broker", &url.to_string(), "--admin-secret-file"])
        .arg(admin_secret_path(data_dir))
        .output()
}

#[tokio::test]
async fn machines_are_provisioned_in_bulk_from_a_list_with_one_private_config_each() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let list = dir.path().join("machines.csv");
    let mut text = String::from("# machine,groups\n");
    for i in 1..=1203 {
        let group = if i % 2 == 0 { "north" } else { "south;east" };
        text.push_str(&format!("vm-{i:04},{group}\n"));
    }
    std::fs::write(&list, text).unwrap();
    let out = dir.path().join("configs");
    let status = provision_from_file(&url, &data_dir, &list, &out)
        .await
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let cfg = out.join("vm-1203.toml");
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let parsed: fleetcast_device::config::MachineConfig =
        toml::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    assert_eq!(parsed.groups, vec![g("south"), g("east")]);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1203);
    let ms = machines(&admin).await;
    assert_eq!(ms.len(), 1203);
    assert!(ms
        .iter()
        .any(|m| m.id.as_str() == "vm-0002" && m.groups == vec![g("north")]));
    // The config's secret is the one the platform checks: that machine reports and is heard.
    let mut vm = Machine {
        peer: peer_with(&url, "vm-1203", Some(&parsed.secret.mqtt_password())).await,
        id: m("vm-1203"),
        secret: parsed.secret.clone(),
        ctr: 0,
    };
    vm.report_state(&["south", "east"], 0).await;
    poll_until(
        WAIT,
        "vm-1203 seen",
        || machines(&admin),
        |ms| {
            ms.iter()
                .any(|x| x.id.as_str() == "vm-1203" && x.agent_version.is_some())
        },
    )
    .await;
    admin.close().await;
    platform.stop().await;
}

/// A list longer than one batch is checked whole before the first batch is applied: one id
/// provisioned already, in the second batch, refuses the run with nothing provisioned and no
/// config written, and the error says so. A run that fails after its first batch was applied
/// (here a config that cannot be written) says how many were provisioned, how many configs are
/// in the directory, and where to go on from.
#[tokio::test]
async fn a_long_list_refused_in_a_later_batch_provisions_nothing_and_a_later_failure_says_how_far_it_got(
) {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    provisioned(&admin, "vm-1100", &[]).await;
    let list = dir.path().join("machines.csv");
    let out = dir.path().join("configs");
    let from_file = |except: &'static str| {
        let text: String = (1..=1203)
            .map(|i| format!("vm-{i:04}"))
            .filter(|id| id != except)
            .map(|id| format!("{id},north\n"))
            .collect();
        std::fs::write(&list, text).unwrap();
        provision_from_file(&url, &data_dir, &list, &out)
    };
    let run = from_file("").await.unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    for want in ["nothing was provisioned", "vm-1100 is provisioned already"] {
        assert!(stderr.contains(want), "{want} missing: {stderr}");
    }
    assert_eq!(machines(&admin).await.len(), 1, "nothing was provisioned");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "no config written"
    );

    // vm-0500's config cannot be written (a directory is in its place): the first batch is
    // provisioned, the second is not sent.
    std::fs::create_dir(out.join("vm-0500.toml")).unwrap();
    let run = from_file("vm-1100").await.unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    for want in [
        "provisioned 1000 of 1202 machine(s) before this error",
        &format!("the configs of 499 are in {}", out.display()),
        "501 machine(s) from vm-0500 on were provisioned but their configs not written",
        "--rotate",
        "the 202 from vm-1001 on were not provisioned",
    ] {
        assert!(stderr.contains(want), "{want} missing: {stderr}");
    }
    assert_eq!(machines(&admin).await.len(), 1001);
    admin.close().await;
    platform.stop().await;
}

#[tokio::test]
async fn a_machine_cannot_grow_the_event_log_past_its_cap_but_its_record_still_finishes_and_a_rotation_lifts_it(
) {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let limits = fleetcast_platform::limits::MachineLimits {
        events_per_release: 3,
        ..Default::default()
    };
    let platform = start_platform_with(&url, &data_dir, limits);
    let admin = super::admin(&url, &data_dir).await;
    upload(&admin, dir.path(), "a.bin", &data(3000, 10), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    for _ in 0..20 {
        vm.report(Some(&r.id), "1.0", Phase::Downloading).await;
    }
    install(&admin, &mut vm, &r.id, "1.0").await;
    let (events, _) = stored_events(&admin).await;
    assert_eq!(events.len(), 3, "{events:?}");
    let s = status(&admin, &r.id).await;
    assert_eq!(phase_of(&s, "vm-001"), Phase::Installed);

    // Had a thief used the cap up with a stolen config, the operator's `--rotate` gives the
    // machine its events back, as it gives its counters.
    let fresh = provisioned_with(&admin, "vm-001", &[], true).await;
    let mut vm = vm.reconnect(&url, fresh.secret).await;
    vm.report(Some(&r.id), "1.0", Phase::Installed).await;
    poll_until(
        WAIT,
        "the event after the rotation stored",
        || stored_events(&admin),
        |(events, _)| events.len() == 4,
    )
    .await;
    admin.close().await;
    platform.stop().await;
}

#[tokio::test]
async fn an_integrator_flooding_requests_gets_answers_only_up_to_its_budget() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir: _dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    let integrator = add_integrator(&admin, "erp").await;
    let client = integrator.username.clone();
    let mut int = peer_with(&url, &client, Some(&integrator.password)).await;
    let answers = format!("fleet/integrators/{client}/events");
    int.subscribe(&answers).await;
    let ask = serde_json::to_vec(&EventsRequest {
        since: 0,
        limit: None,
    })
    .unwrap();
    for _ in 0..100 {
        int.client
            .publish(
                format!("{answers}/get"),
                QoS::AtLeastOnce,
                false,
                ask.clone(),
            )
            .await
            .unwrap();
    }
    let got = int
        .drain(Duration::from_secs(2))
        .await
        .into_iter()
        .filter(|p| p.topic == answers)
        .count();
    // Burst 20 plus 5/s while the flood and the drain last (a few seconds at most).
    assert!((20..=40).contains(&got), "{got} answers to 100 requests");
    admin.close().await;
    platform.stop().await;
}

/// A stolen config raises the machine's counters as far as they go, on every channel: each
/// later report of the machine looked like a replay, for ever, and rotating its secret did not
/// help (the counters were kept). Rotation forgets them: the machine with its new secret is
/// heard again (status stored, state applied, chunk requests served), and the old secret stays
/// dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_a_stolen_config_raised_are_forgotten_when_its_secret_is_rotated() {
    let (_broker, url, env, info) = with_one_artifact(11).await;
    let Env {
        platform, admin, ..
    } = env;
    let mut thief = provision(&admin, &url, "vm-001", &[]).await;
    let r = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    thief.ctr = u64::MAX - 1;
    thief
        .report_recorded(&admin, &r.id, "1.0", Phase::Downloading)
        .await;
    thief.ctr = u64::MAX - 1;
    thief.report_state(&[], 0).await;
    thief.ctr = u64::MAX - 1;
    thief.request_chunks(info.id, true, vec![]).await;
    let stolen = thief.secret.clone();

    let fresh = provisioned_with(&admin, "vm-001", &[], true).await;
    let mut vm = thief.reconnect(&url, fresh.secret).await;
    vm.ctr = 100;
    vm.report_recorded(&admin, &r.id, "1.0", Phase::Downloaded)
        .await;
    let applied = fleetcast_proto::status::KindState {
        version: Some("0.9".into()),
        ..Default::default()
    };
    vm.publish_state(&[], applied).await;
    poll_until(
        WAIT,
        "the new secret's state applied",
        || machines(&admin),
        |ms| ms[0].kinds.get(&app()).and_then(|k| k.version.as_deref()) == Some("0.9"),
    )
    .await;
    let chunks = format!("fleet/artifacts/{}/chunks", info.id);
    vm.peer.subscribe(&chunks).await;
    vm.request_chunks(info.id, true, vec![(0, 1)]).await;
    vm.peer.next(|p| p.topic == chunks).await;

    // The old secret is dead: what it MACs changes nothing.
    let mut old = vm.status(Some(&r.id), "1.0", Phase::InstallFailed);
    old.ctr = 1_000;
    vm.send_raw("status", stolen.seal(Purpose::Status, &old))
        .await;
    vm.report_recorded(&admin, &r.id, "1.0", Phase::Installing)
        .await;
    let s = status(&admin, &r.id).await;
    assert_eq!(target(&s, "vm-001").error, None, "{s:?}");
    admin.close().await;
    platform.stop().await;
}

/// What one machine puts in its reports is bounded where the platform keeps it: a state with a
/// 70,000-character version (it crashed operators' tables) or with too many kinds is dropped,
/// a status event's huge `error` is stored cut to 4 KiB, and an event with a bad version is
/// refused; the machine's honest reports after them are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_malformed_fields_of_one_machine_are_refused_or_cut() {
    let (_broker, url, env, _) = with_one_artifact(12).await;
    let Env {
        platform, admin, ..
    } = env;
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    let long = fleetcast_proto::status::KindState {
        version: Some("9".repeat(70_000)),
        ..Default::default()
    };
    vm.publish_state(&[], long).await;
    let honest = fleetcast_proto::status::KindState {
        version: Some("0.9".into()),
        ..Default::default()
    };
    vm.publish_state(&[], honest).await;
    let shown = poll_until(
        WAIT,
        "the honest state applied",
        || machines(&admin),
        |ms| ms[0].kinds.get(&app()).and_then(|k| k.version.as_deref()) == Some("0.9"),
    )
    .await;
    assert!(
        !format!("{shown:?}").contains("99999"),
        "the long version never showed"
    );

    let mut bad = vm.status(Some(&r.id), "1.0\n0.0.1-COMPROMISED", Phase::Notified);
    vm.send_status(&bad).await;
    bad = vm.status(Some(&r.id), "1.0", Phase::DownloadFailed);
    bad.error = Some("x".repeat(250_000));
    vm.send_status(&bad).await;
    wait_status(&admin, &r.id, |s| {
        phase_of(s, "vm-001") == Phase::DownloadFailed
    })
    .await;
    let (events, _) = stored_events(&admin).await;
    assert_eq!(
        events.len(),
        1,
        "the bad version was not stored: {events:?}"
    );
    let error = events[0].error.as_deref().unwrap();
    assert!(error.len() < 4_200, "{}", error.len());
    assert!(
        error.ends_with(" [245904 bytes cut]"),
        "{}",
        &error[4_000..]
    );
    admin.close().await;
    platform.stop().await;
}

/// A genuinely MAC'd status event whose body is no status event (here a `kind` that is no id,
/// which an agent following §3.1 to the letter once sent for a junk notice on such a topic) is
/// refused, and its counter is spent: the machine's resend is acknowledged as a replay, so its
/// outbox moves on to what comes after. Before, it was never acknowledged and held every later
/// event of the machine for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_mac_holds_but_whose_body_does_not_parse_spends_its_counter() {
    let (_broker, url, env, _) = with_one_artifact(14).await;
    let Env {
        platform, admin, ..
    } = env;
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    vm.peer.subscribe("fleet/machines/vm-001/status/ack").await;
    let ev = vm.status(None, "", Phase::Rejected);
    let mut body = serde_json::to_value(&ev).unwrap();
    body["kind"] = "bad!kind".into();
    let junk = vm.secret.seal_text(Purpose::Status, body.to_string());
    let secret = vm.secret.clone();
    let acked = move |p: &Publish| {
        p.topic.ends_with("/status/ack")
            && secret
                .open::<fleetcast_proto::StatusAck>(Purpose::StatusAck, &p.payload)
                .is_ok_and(|a| a.ctr == ev.ctr)
    };
    vm.send_raw("status", junk.clone()).await;
    // Sent again, as an agent does when no ack comes.
    vm.send_raw("status", junk).await;
    // An ack for its counter comes (`next` fails the test after its wait otherwise).
    vm.peer.next(&acked).await;
    // What comes after it is taken.
    vm.report_recorded(&admin, &r.id, "1.0", Phase::Downloading)
        .await;
    let (events, _) = stored_events(&admin).await;
    assert_eq!(
        events.iter().map(|e| e.phase).collect::<Vec<_>>(),
        [Phase::Downloading],
        "the junk was not stored"
    );
    admin.close().await;
    platform.stop().await;
}

/// A machine provisioned into a group after the group's publish acts on the group's notice
/// before the platform has taken in its first state (which gives it its target record): it may
/// fetch the group's artifact already (it was refused it, and a refused subscription lost the
/// agent its first download). A machine of another group still may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_new_to_a_group_fetches_the_groups_artifact_before_its_first_state() {
    let (_broker, url, env, one) = with_one_artifact(13).await;
    let Env {
        platform, admin, ..
    } = env;
    let _first = provision(&admin, &url, "vm-001", &["g1"]).await;
    release(&admin, "1.0", &[], &["g1"]).await;
    for (id, group, allowed) in [("vm-002", "g1", true), ("vm-003", "g2", false)] {
        let mut vm = provision(&admin, &url, id, &[group]).await;
        let (own, artifact) = (
            format!("fleet/machines/{id}/chunks"),
            format!("fleet/artifacts/{}/chunks", one.id),
        );
        vm.peer.subscribe(&own).await;
        vm.peer.subscribe(&artifact).await;
        vm.request_chunks(one.id, false, vec![(0, 1)]).await;
        let p = vm
            .peer
            .next(|p| p.topic == own || p.topic == artifact)
            .await;
        let (h, _) = decode_frame(&p.payload).unwrap();
        let served = p.topic == artifact && h.frame_type == FrameType::Chunk;
        assert_eq!(served, allowed, "{id} in {group}: {:?}", h.frame_type);
    }
    admin.close().await;
    platform.stop().await;
}

/// A platform on a broker of its own with one artifact (3,000 bytes from `seed`, app 1.0): the
/// opening of the attacks below. Keep the broker and the env while the test runs.
async fn with_one_artifact(
    seed: u8,
) -> (
    fleetcast_broker::embedded::EmbeddedBroker,
    BrokerUrl,
    Env,
    ArtifactInfo,
) {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let env = env(&url).await;
    let info = upload(
        &env.admin,
        env.dir.path(),
        "a.bin",
        &data(3000, seed),
        "1.0",
    )
    .await
    .unwrap();
    (broker, url, env, info)
}

/// On a broker that lets anyone read the admin topics (no ACLs, no TLS), a captured change is
/// replayed after the platform restarts, within the five minutes its time stamp stays fresh:
/// the platform remembers the counter across the restart and refuses it.
#[tokio::test]
async fn a_change_replayed_across_a_platform_restart_does_not_run_again() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir: _dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let mut attacker = peer(&url, "vm-evil").await;
    attacker.subscribe("fleet/admin/+/request").await;
    let add = calls::OperatorAdd {
        name: "ops".into(),
        role: Role::Operator,
    };
    admin.call(add).await.unwrap();
    let captured = attacker.next(|p| p.topic.ends_with("/request")).await;
    let revoke = calls::OperatorRevoke { name: "ops".into() };
    admin.call(revoke).await.unwrap();
    let names = |ops: Vec<fleetcast_proto::admin::OperatorInfo>| -> Vec<String> {
        ops.into_iter().map(|o| o.name).collect()
    };
    let before = names(admin.call(calls::OperatorList {}).await.unwrap());
    assert_eq!(before, ["admin"]);
    admin.close().await;
    platform.stop().await;

    let platform = start_platform(&url, &data_dir);
    let admin = super::admin(&url, &data_dir).await;
    let response_topic = captured.topic.replace("/request", "/response");
    attacker.subscribe(&response_topic).await;
    attacker
        .client
        .publish(
            captured.topic.as_str(),
            QoS::AtLeastOnce,
            false,
            captured.payload.to_vec(),
        )
        .await
        .unwrap();
    // The platform answers the replay (sealed for the operator, so the attacker learns
    // nothing); once it has, the request has been handled one way or the other.
    let id = fleetcast_proto::auth::peek_body::<serde_json::Value>(&captured.payload).unwrap()
        ["id"]
        .as_u64()
        .unwrap();
    attacker
        .next(|p| {
            p.topic == response_topic
                && serde_json::from_slice::<ResponseEnvelope>(&p.payload)
                    .is_ok_and(|env| env.id == id && env.sealed.is_some())
        })
        .await;
    let after = names(admin.call(calls::OperatorList {}).await.unwrap());
    assert_eq!(after, ["admin"], "the replayed operator_add ran again");
    admin.close().await;
    platform.stop().await;
}

/// A request with an op or a field this platform does not know (a newer client's, say one
/// narrowing what the op reaches) is refused with the op or field named, and changes nothing; the same field
/// with an absent value (`0`) is harmless and the op runs. Sent as raw MAC'd JSON through the
/// broker, as a newer CLI would send it.
#[tokio::test]
async fn a_request_with_an_op_or_a_field_this_platform_does_not_know_is_refused_and_runs_nothing() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir: _dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let client = "fleetcast-op-admin.newer";
    let secret = admin_secret(&data_dir);
    let mut newer = peer(&url, client).await;
    let response_topic = format!("fleet/admin/{client}/response");
    newer.subscribe(&response_topic).await;
    let ctr0 = fleetcast_platform::now_ms() * 1000;
    let mut ask = async |ctr: u64, op: &str, expires: serde_json::Value| {
        let body = serde_json::json!({
            "client": client, "id": ctr, "ctr": ctr, "at_ms": fleetcast_platform::now_ms(),
            "op": op, "name": "ops", "role": "viewer", "expires_in_days": expires,
        });
        newer
            .publish_acked(
                &format!("fleet/admin/{client}/request"),
                false,
                secret.seal(Purpose::Admin, &body),
            )
            .await;
        let p = newer
            .next(|p| {
                p.topic == response_topic
                    && serde_json::from_slice::<ResponseEnvelope>(&p.payload)
                        .is_ok_and(|env| env.id == ctr)
            })
            .await;
        let env: ResponseEnvelope = serde_json::from_slice(&p.payload).unwrap();
        let sealed = env.sealed.expect("a sealed answer");
        secret
            .open_box::<fleetcast_proto::admin::AdminResponse>(
                Purpose::AdminResponse,
                client,
                &sealed,
            )
            .unwrap()
    };
    let names = async || -> Vec<String> {
        let ops = admin.call(calls::OperatorList {}).await.unwrap();
        ops.into_iter().map(|o| o.name).collect()
    };

    // An op this platform does not know: answered sealed (the CLI takes it at once), saying
    // so; nothing runs.
    let unknown = ask(ctr0 + 1, "operator_add_for_a_while", 30.into()).await;
    let said = unknown.error.unwrap_or_default();
    assert!(
        said.contains("cannot read it") && said.contains("operator_add_for_a_while"),
        "{said}"
    );
    assert_eq!(names().await, ["admin"], "nothing was done");

    let refused = ask(ctr0 + 2, "operator_add", 30.into()).await;
    assert_eq!(
        refused.error.as_deref(),
        Some(
            "unknown field \"expires_in_days\" in operator_add: this platform does not know it \
             (is it older than the CLI?); nothing was done"
        ),
        "{refused:?}"
    );
    assert_eq!(names().await, ["admin"], "nothing was done");
    let audited: Vec<AuditEntry> = audit(&admin).await;
    assert!(
        audited
            .iter()
            .any(|e| e.action == "operator_add" && e.result.starts_with("unknown field")),
        "{audited:?}"
    );

    let ran = ask(ctr0 + 3, "operator_add", 0.into()).await;
    assert!(ran.error.is_none(), "{ran:?}");
    assert_eq!(names().await, ["admin", "ops"]);

    admin.close().await;
    platform.stop().await;
}

/// The Rust integrator example (platform/examples/follow_events.rs, docs/integrators.md §5),
/// run as written with a profile issued before two key rotations: it follows the retained key
/// chain, catches up on what was stored (signed by the newest key) and then shows live events
/// signed after a third rotation, which it follows live. Before, it checked everything with the
/// profile's key alone and showed nothing after a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_example_integrator_follows_key_rotations_and_live_events() {
    use tokio::io::AsyncBufReadExt;

    let example = follow_events_example();
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    let profile = erp_before_two_rotations(&admin, &url, dir.path()).await;
    let cfg = dir.path().join("erp.toml");
    std::fs::write(
        &cfg,
        fleetcast_platform::cli::identity::integrator_toml(&profile, &url.to_string()),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(&example)
        .arg(&cfg)
        .arg("0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("example.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let err_file = dir.path().join("example.err");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            next_event(&mut lines, &err_file).await["id"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(ids, [1, 2, 3, 4, 5], "caught up, in order");

    // Live, after one more rotation: the new key's events.
    admin.call(calls::KeyRotate {}).await.unwrap();
    upload(&admin, dir.path(), "b.bin", &data(3000, 8), "1.1")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-002", &[]).await;
    let r = release(&admin, "1.1", &["vm-002"], &[]).await.release;
    install(&admin, &mut vm, &r.id, "1.1").await;
    let mut phases = Vec::new();
    for _ in 0..5 {
        let e = next_event(&mut lines, &err_file).await;
        assert_eq!(e["machine"], "vm-002", "{e}");
        phases.push(e["phase"].as_str().unwrap().to_owned());
    }
    assert_eq!(phases, INSTALL_PHASES);
    let err = std::fs::read_to_string(dir.path().join("example.err")).unwrap();
    assert!(err.contains("key chain followed to generation 3"), "{err}");
    assert!(!err.contains("does not verify"), "{err}");
    drop(child);
    admin.close().await;
    platform.stop().await;
}

/// The next line the example printed, as JSON (an event), within 30 s.
async fn next_event(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    err_file: &Path,
) -> serde_json::Value {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap_or_else(|_| {
            let err = std::fs::read_to_string(err_file);
            panic!("no event from the example within 30 s; its stderr: {err:?}")
        })
        .unwrap()
        .expect("the example runs on");
    serde_json::from_str(&line).unwrap()
}

/// The example binary `follow_events`, beside the test binaries (`cargo test` builds the
/// examples); built first when a narrower `cargo test` did not.
fn follow_events_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let example = profile_dir.join("examples").join("follow_events");
    if !example.exists() {
        let built = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "-q",
                "-p",
                "fleetcast-platform",
                "--example",
                "follow_events",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(built.success() && example.exists(), "{}", example.display());
    }
    example
}
