//! The platform with its embedded broker as a fleet would run it: rumqttd behind fleetcast's
//! authorizing gateway, clients over TLS with a pinned CA. One machine's credentials open
//! nothing else, integrators read with their own read-only credentials, a revoked machine is
//! cut off at once, and a rollout completes around the attacks.

use super::*;
use fleetcast_broker::gateway::TlsListen;
use fleetcast_broker::testing::test_pki;

/// The platform with its embedded broker: a plain listener and a TLS one.
pub(super) struct Embedded {
    pub(super) dir: tempfile::TempDir,
    pub(super) data_dir: PathBuf,
    pub(super) platform: Platform,
    /// mqtts:// with the test CA pinned.
    pub(super) tls: BrokerUrl,
    /// mqtt:// on loopback.
    pub(super) plain: BrokerUrl,
}

pub(super) async fn embedded() -> Embedded {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let plain = client::free_loopback_port().unwrap();
    let tls_port = client::free_loopback_port().unwrap();
    let shutdown = CancellationToken::new();
    let opts = ServeOptions {
        data_dir: data_dir.clone(),
        broker: BrokerUrl::mqtt("127.0.0.1", plain),
        embedded_listen: Some(([127, 0, 0, 1], plain).into()),
        tls: Some(TlsListen {
            addr: ([127, 0, 0, 1], tls_port).into(),
            cert_chain_pem: pki.cert_pem.into_bytes(),
            key_pem: pki.key_pem.into_bytes(),
        }),
        topic_prefix: "fleet".into(),
        limits: Default::default(),
        compaction: Default::default(),
    };
    let task = tokio::spawn(serve(opts, shutdown.clone()));
    let tls = BrokerUrl::mqtts("127.0.0.1", tls_port)
        .with_ca(pki.ca_pem.into_bytes())
        .unwrap();
    Embedded {
        dir,
        data_dir,
        platform: Platform { shutdown, task },
        tls,
        plain: BrokerUrl::mqtt("127.0.0.1", plain),
    }
}

/// The documented Python integrator through the embedded broker as `serve` runs it. It once
/// named its answer topic in one SUBSCRIBE with `fleet/events` and the progress topics, which
/// the gateway hands to rumqttd whole, and answering in process only to the gateway's own
/// subscriptions left it waiting 30 s for an answer that never came (and the demo with it):
/// such a client gets its answers through rumqttd now (broker test
/// `gateway::answers_reach_the_operator_in_process`), and the script subscribes to its answer
/// topic alone.
#[tokio::test]
async fn the_documented_python_integrator_catches_up_through_the_gateway() {
    if !super::security::python_with_mqtt() {
        return;
    }
    let Embedded {
        dir,
        data_dir,
        platform,
        plain,
        ..
    } = embedded().await;
    let admin = super::admin(&plain, &data_dir).await;
    super::security::python_integrator_sees_one_install(&admin, &plain, dir.path()).await;
    admin.close().await;
    platform.stop().await;
}

/// Waits until the broker ends `peer`'s connection.
pub(super) async fn closed(peer: &mut Peer, what: &str) {
    peer.wait_event(what, |e| {
        matches!(e, MqttEvent::Disconnected(_)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn over_tls_one_machines_credentials_open_nothing_else_and_the_rollout_completes() {
    let Embedded {
        dir,
        data_dir,
        platform,
        tls,
        ..
    } = embedded().await;
    let admin = super::admin(&tls, &data_dir).await;
    let info = upload(&admin, dir.path(), "a.bin", &data(3000, 9), "1.0")
        .await
        .unwrap();
    let mut vm1 = provision(&admin, &tls, "vm-1", &["g1"]).await;
    let mut vm2 = provision(&admin, &tls, "vm-2", &["g2"]).await;
    let evil = provisioned(&admin, "vm-evil", &["g1"]).await;
    let evil_password = evil.secret.mqtt_password();
    let integrator = super::security::add_integrator(&admin, "erp").await;
    let mut erp = peer_with(&tls, &integrator.username, Some(&integrator.password)).await;
    erp.subscribe("fleet/events").await;
    vm2.peer.subscribe("fleet/groups/g2/release/+").await;

    // Each attack with vm-evil's credentials ends its connection.
    for filter in [
        "#",
        "fleet/#",
        "fleet/machines/vm-2/command",
        "fleet/admin/+/response",
        "fleet/events",
    ] {
        let mut attacker = peer_with(&tls, "vm-evil", Some(&evil_password)).await;
        attacker
            .client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        closed(&mut attacker, &format!("close after subscribing {filter}")).await;
    }
    let forged_notice = {
        let fake = fleetcast_proto::auth::PlatformKey::from_seed([3; 32]);
        let n = ReleaseNotice {
            release: ReleaseId::new("r-000001").unwrap(),
            seq: 1_000_000,
            target: Target::Group(g("g2")),
            kind: app(),
            version: "6.6.6".into(),
            artifact: fleetcast_proto::release::ArtifactRef {
                id: ArtifactId::of(b"evil"),
                size: 4,
                chunk_size: 65536,
                name: "evil.bin".into(),
            },
            policy: InstallPolicy::Immediate,
            rollback: false,
            issued_at_ms: 0,
        };
        fake.sign(Purpose::Release, &n)
    };
    for (topic, payload, retain) in [
        ("fleet/machines/vm-2/online", b"false".to_vec(), true),
        ("fleet/groups/g2/release/app", forged_notice, true),
        ("fleet/machines/vm-2/status", b"{}".to_vec(), false),
    ] {
        let mut attacker = peer_with(&tls, "vm-evil", Some(&evil_password)).await;
        attacker
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
        closed(&mut attacker, &format!("close after publishing on {topic}")).await;
    }
    // Its credentials cannot take over another machine's session either.
    let stop = CancellationToken::new();
    let (_c, el) = client::connect(
        client::options_as(&tls, "vm-2", "vm-evil", Some(&evil_password)),
        8,
    );
    let (tx, mut rx) = mpsc::channel(8);
    tokio::spawn(client::drive(el, tx, stop.clone()));
    let refused =
        client::wait_for(&mut rx, WAIT, |e| matches!(e, MqttEvent::Connected { .. })).await;
    stop.cancel();
    assert!(refused.is_err(), "vm-evil connected as vm-2");

    // The rollout completes; nothing forged reached anyone.
    let r = release(&admin, "1.0", &[], &["g2"]).await.release;
    let notice = vm2
        .peer
        .next(|p| p.topic == "fleet/groups/g2/release/app")
        .await;
    let n: ReleaseNotice = public_key(&data_dir)
        .verify(Purpose::Release, &notice.payload)
        .expect("the first notice vm-2 sees is the platform's");
    assert_eq!((n.release, n.artifact.id), (r.id.clone(), info.id));
    for phase in [
        Phase::Notified,
        Phase::Downloading,
        Phase::Downloaded,
        Phase::Installing,
    ] {
        vm2.report(Some(&r.id), "1.0", phase).await;
    }
    vm2.report_recorded(&admin, &r.id, "1.0", Phase::Installed)
        .await;
    let ms = machines(&admin).await;
    assert!(
        ms.iter().any(|x| x.id.as_str() == "vm-2" && x.online),
        "vm-2 still online"
    );
    // The integrator read every event, signed.
    let mut phases = Vec::new();
    while phases.len() < 5 {
        let p = erp.next(|p| p.topic == "fleet/events").await;
        let e: FleetEvent = public_key(&data_dir)
            .verify(Purpose::Event, &p.payload)
            .unwrap();
        phases.push(e.phase);
    }
    assert_eq!(phases.last(), Some(&Phase::Installed));
    // An integrator cannot publish.
    erp.client
        .publish("fleet/events", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    closed(&mut erp, "integrator closed after publishing").await;

    // Revoking vm-1 closes its live session now, and it cannot come back.
    revoke(&admin, "vm-1").await;
    closed(&mut vm1.peer, "revoked machine's session closed").await;
    let stop = CancellationToken::new();
    let (_c, el) = client::connect(
        client::options(&tls, "vm-1", Some(&vm1.secret.mqtt_password())),
        8,
    );
    let (tx, mut rx) = mpsc::channel(8);
    tokio::spawn(client::drive(el, tx, stop.clone()));
    let back = client::wait_for(&mut rx, WAIT, |e| matches!(e, MqttEvent::Connected { .. })).await;
    stop.cancel();
    assert!(back.is_err(), "a revoked machine reconnected");
    admin.close().await;
    platform.stop().await;
}

/// Whether `id` can connect with `secret`'s password now.
async fn connects(broker: &BrokerUrl, id: &str, secret: &Secret) -> bool {
    connects_as(broker, id, &secret.mqtt_password()).await
}

/// Provisioning an id that exists hands out nothing unless asked: `rotate` issues a new
/// secret, and the old one stops working at once, its live session closed as a revoke does.
#[tokio::test]
async fn an_existing_machine_is_provisioned_again_only_with_rotate_which_cuts_the_old_secret_off() {
    let Embedded {
        data_dir,
        platform,
        plain,
        ..
    } = embedded().await;
    let admin = super::admin(&plain, &data_dir).await;
    let mut vm = provision(&admin, &plain, "vm-1", &["g1"]).await;
    let old = vm.secret.clone();
    let spec = |id: &str| fleetcast_proto::admin::MachineSpec {
        machine: m(id),
        groups: vec![],
    };
    let single = calls::MachineProvision {
        machine: m("vm-1"),
        groups: vec![],
        rotate: false,
    };
    let batch = calls::MachineProvisionBatch {
        machines: vec![spec("vm-2"), spec("vm-1")],
        rotate: false,
    };
    for err in [
        admin.call(single).await.unwrap_err(),
        admin.call(batch).await.unwrap_err(),
    ] {
        assert!(
            matches!(&err, AdminError::Refused(r) if r.contains("vm-1 is provisioned already")),
            "{err}"
        );
    }
    assert!(
        machines(&admin)
            .await
            .iter()
            .all(|x| x.id.as_str() != "vm-2"),
        "nothing of a refused batch is stored"
    );
    // The machine did not notice.
    vm.send_raw("online", b"true".to_vec()).await;

    let rotated = provisioned_with(&admin, "vm-1", &["g2"], true).await;
    assert!(rotated.secret != old, "a new secret");
    assert_eq!(rotated.groups, vec![g("g1"), g("g2")]);
    closed(&mut vm.peer, "the old secret's session closed").await;
    assert!(
        !connects(&plain, "vm-1", &old).await,
        "the old secret still connects"
    );
    assert!(
        connects(&plain, "vm-1", &rotated.secret).await,
        "the new secret connects"
    );

    // A revoked machine exists too; rotate brings it back with a new secret.
    revoke(&admin, "vm-1").await;
    let err = admin
        .call(calls::MachineProvision {
            machine: m("vm-1"),
            groups: vec![],
            rotate: false,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, AdminError::Refused(_)), "{err}");
    let back = provisioned_with(&admin, "vm-1", &[], true).await;
    assert!(connects(&plain, "vm-1", &back.secret).await);
    admin.close().await;
    platform.stop().await;
}

/// Machines that subscribe to an artifact's topic just after a broadcast on it get what they
/// missed when they subscribe (`fanout::CAUGHT_UP_FOR`), once: their requests for it, right
/// after, find it on its way and bring no second copy, and nothing goes to the machines that
/// did not ask. (Before, each such request was owed and the frame sent again 500 ms later to
/// the machines that asked: two to four sends of every frame in a 1,000-machine rollout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_subscribers_get_the_broadcast_they_missed_once_and_no_one_else_gets_more() {
    let Embedded {
        dir,
        data_dir,
        platform,
        plain: url,
        ..
    } = embedded().await;
    let port = url.to_string().rsplit(':').next().unwrap().to_owned();
    poll_until(
        WAIT,
        "the embedded broker listens",
        || async {
            tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
                .await
                .is_ok()
        },
        |&up| up,
    )
    .await;
    let admin = super::admin(&url, &data_dir).await;
    let info = upload(&admin, dir.path(), "a.bin", &data(4096, 7), "1.0")
        .await
        .unwrap();
    let names: Vec<String> = (0..8).map(|i| format!("vm-o{i}")).collect();
    let mut vms = Vec::new();
    for n in &names {
        vms.push(provision(&admin, &url, n, &[]).await);
    }
    let targets: Vec<&str> = names.iter().map(String::as_str).collect();
    release(&admin, "1.0", &targets, &[]).await;
    let topic = format!("fleet/artifacts/{}/chunks", info.id);
    // vm-o1, vm-o2 and vm-o3 subscribe only after the broadcast.
    let late = [1, 2, 3];
    for (i, vm) in vms.iter_mut().enumerate() {
        if !late.contains(&i) {
            vm.peer.subscribe(&topic).await;
        }
    }
    let chunk_index = |p: &Publish| {
        let (h, _) = decode_frame(&p.payload).unwrap();
        assert_eq!((h.frame_type, h.artifact), (FrameType::Chunk, info.id));
        h.index
    };
    // The first request: chunks 0 and 1 go out once, to all five subscribed.
    vms[0].request_chunks(info.id, false, vec![(0, 2)]).await;
    for (_, vm) in vms
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| !late.contains(i))
    {
        let mut got = vec![
            chunk_index(&vm.peer.next(|p| p.topic == topic).await),
            chunk_index(&vm.peer.next(|p| p.topic == topic).await),
        ];
        got.sort_unstable();
        assert_eq!(got, [0, 1], "{}", vm.id);
    }
    // Right after, the late ones subscribe: one asks for chunk 0, two ask for chunk 1.
    for i in late {
        vms[i].peer.subscribe(&topic).await;
    }
    vms[1].request_chunks(info.id, false, vec![(0, 1)]).await;
    vms[2].request_chunks(info.id, false, vec![(1, 2)]).await;
    vms[3].request_chunks(info.id, false, vec![(1, 2)]).await;
    let wait = Duration::from_millis(1500);
    let indices = |ps: Vec<Publish>| {
        let mut v: Vec<u32> = ps
            .iter()
            .filter(|p| p.topic == topic)
            .map(chunk_index)
            .collect();
        v.sort_unstable();
        v
    };
    for i in late {
        assert_eq!(
            indices(vms[i].peer.drain(wait).await),
            [0, 1],
            "vm-o{i}: what was broadcast, once"
        );
    }
    for i in [0, 4, 7] {
        assert_eq!(
            indices(vms[i].peer.drain(Duration::from_millis(100)).await),
            [0u32; 0],
            "vm-o{i} asked for nothing more"
        );
    }
    admin.close().await;
    platform.stop().await;
}

/// A manifest of many more parts than a session's queue at the gateway holds (64 frames): a
/// 6.5 MB artifact in 1 KiB chunks has 200. Asked for all at once, the parts past the queue
/// were dropped at each request and the download failed (found by an agent written from the
/// docs; so did the reference agent, `download_failed` here); the agent now asks 32 parts at a
/// time (`manifest_parts`, protocol.md §7.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_of_more_parts_than_a_session_queue_holds_downloads_and_installs() {
    let Embedded {
        dir,
        data_dir,
        platform,
        plain,
        ..
    } = embedded().await;
    let admin = super::admin(&plain, &data_dir).await;
    let bytes = data(200 * 32 * 1024 - 500, 3);
    let info = upload(&admin, dir.path(), "big.bin", &bytes, "2.0")
        .await
        .unwrap();
    let layout = Layout::new(info.size, info.chunk_size).unwrap();
    assert_eq!(layout.manifest_parts(), 200);
    let p = provisioned(&admin, "vm-1", &["g1"]).await;
    let installed = dir.path().join("installed.bin");
    let mut config = fleetcast_device::config::MachineConfig::from_provisioned(
        &p,
        &plain.to_string(),
        dir.path().join("vm-1"),
    );
    config.installers.insert(
        app(),
        fleetcast_device::config::InstallerConfig::Command {
            cmd: format!("cp {{file}} {}", installed.display()),
        },
    );
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(config, agents.clone()));
    let r = release(&admin, "2.0", &[], &["g1"]).await.release;
    let s = until_finished(&admin, &r.id, 1).await;
    assert_eq!(phase_of(&s, "vm-1"), Phase::Installed, "{s:?}");
    assert_eq!(std::fs::read(&installed).unwrap(), bytes);
    admin.close().await;
    agents.cancel();
    joined(agent, "agent vm-1").await;
    platform.stop().await;
}

/// The gateway's count of violations (each closes a session).
async fn violations(admin: &AdminClient) -> u64 {
    let stats = admin.call(calls::Stats {}).await.unwrap();
    stats
        .gateway
        .expect("the embedded gateway counts")
        .violations
}

/// Filters the gateway refused in a SUBACK since the platform started.
async fn refused_subscriptions(admin: &AdminClient) -> u64 {
    let stats = admin.call(calls::Stats {}).await.unwrap();
    stats
        .gateway
        .expect("the embedded gateway counts")
        .subscriptions_refused
}

/// Whether a client can connect as `username` with `password` now.
async fn connects_as(broker: &BrokerUrl, username: &str, password: &str) -> bool {
    let stop = CancellationToken::new();
    let (_c, el) = client::connect(client::options(broker, username, Some(password)), 8);
    let (tx, mut rx) = mpsc::channel(8);
    tokio::spawn(client::drive(el, tx, stop.clone()));
    let back = client::wait_for(&mut rx, Duration::from_secs(3), |e| {
        matches!(e, MqttEvent::Connected { .. })
    })
    .await;
    stop.cancel();
    back.is_ok()
}

/// A leaked integrator config is cut off like an operator's: a new password (`rotate`) or a
/// revoke stops the old one at once and closes its live session, the list shows who is left,
/// and a revoked name may be added again.
#[tokio::test]
async fn an_integrators_password_is_rotated_or_revoked_and_its_live_session_closed() {
    let Embedded {
        data_dir,
        platform,
        plain,
        ..
    } = embedded().await;
    let admin = super::admin(&plain, &data_dir).await;
    let first = super::security::add_integrator(&admin, "erp").await;
    let mut erp = peer_with(&plain, &first.username, Some(&first.password)).await;
    erp.subscribe("fleet/events").await;
    let listed = admin.call(calls::IntegratorList {}).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|i| (i.name.as_str(), i.username.as_str()))
            .collect::<Vec<_>>(),
        [("erp", "fleetcast-int-erp")]
    );
    // Adding it again by mistake hands out nothing and cuts nothing off.
    let err = admin
        .call(calls::IntegratorAdd {
            name: "erp".into(),
            rotate: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdminError::Refused(r) if r.contains("exists already") && r.contains("--rotate")),
        "{err}"
    );
    erp.subscribe("fleet/rollouts/+/progress").await;

    let second = admin
        .call(calls::IntegratorAdd {
            name: "erp".into(),
            rotate: true,
        })
        .await
        .unwrap();
    assert_ne!(second.password, first.password);
    closed(&mut erp, "the old password's session closed").await;
    drop(erp);
    assert!(
        !connects_as(&plain, &first.username, &first.password).await,
        "the old password still connects"
    );
    let mut erp = peer_with(&plain, &second.username, Some(&second.password)).await;
    erp.subscribe("fleet/events").await;

    let said = admin
        .call(calls::IntegratorRevoke { name: "erp".into() })
        .await
        .unwrap();
    assert!(said.contains("1 broker session(s) closed"), "{said}");
    closed(&mut erp, "the revoked integrator's session closed").await;
    drop(erp);
    assert!(
        !connects_as(&plain, &second.username, &second.password).await,
        "a revoked integrator connects"
    );
    assert!(admin
        .call(calls::IntegratorList {})
        .await
        .unwrap()
        .is_empty());
    let err = admin
        .call(calls::IntegratorRevoke { name: "erp".into() })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdminError::Refused(r) if r.contains("unknown integrator erp")),
        "{err}"
    );
    // The name is free again.
    let third = super::security::add_integrator(&admin, "erp").await;
    assert!(connects_as(&plain, &third.username, &third.password).await);
    admin.close().await;
    platform.stop().await;
}

/// Moving a machine to another group keeps its secret. Removing a group closes its live
/// session (whose subscription the old group granted), its group's topic is closed to it from
/// then on (its retained notices no longer reach it), and the group's releases leave it out.
#[tokio::test]
async fn a_machine_removed_from_a_group_can_no_longer_subscribe_to_it_nor_be_its_target() {
    let Embedded {
        dir,
        data_dir,
        platform,
        plain,
        ..
    } = embedded().await;
    let admin = super::admin(&plain, &data_dir).await;
    upload(&admin, dir.path(), "a.bin", &data(3000, 9), "1.0")
        .await
        .unwrap();
    let vm1 = provisioned(&admin, "vm-1", &["shanghai"]).await;
    provisioned(&admin, "vm-2", &["shanghai"]).await;
    let password = vm1.secret.mqtt_password();
    let mut peer = peer_with(&plain, "vm-1", Some(&password)).await;
    peer.subscribe("fleet/groups/shanghai/release/+").await;
    let change = |add: &[&str], remove: &[&str]| calls::MachineGroups {
        machine: m("vm-1"),
        add: add.iter().map(|x| g(x)).collect(),
        remove: remove.iter().map(|x| g(x)).collect(),
    };
    // A group it is not in, and a change that names none, are refused.
    for call in [change(&[], &["beijing"]), change(&[], &[])] {
        let err = admin.call(call).await.unwrap_err();
        assert!(matches!(err, AdminError::Refused(_)), "{err}");
    }
    let said = admin
        .call(change(&["beijing"], &["shanghai"]))
        .await
        .unwrap();
    assert!(
        said.contains("is in group(s) beijing") && said.contains("1 broker session(s) closed"),
        "{said}"
    );
    closed(&mut peer, "the session subscribed to shanghai closed").await;
    drop(peer);
    let ms = machines(&admin).await;
    let vm = ms.iter().find(|x| x.id.as_str() == "vm-1").unwrap();
    assert_eq!(vm.groups, vec![g("beijing")]);

    // The same secret connects and reads beijing. Shanghai, whose notice is retained, is
    // refused in the SUBACK: nothing of it arrives and the connection stays.
    let plan = release(&admin, "1.0", &[], &["shanghai"]).await;
    let targets: Vec<&str> = plan.targets.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(targets, ["vm-2"], "shanghai's release leaves vm-1 out");
    let before = violations(&admin).await;
    let refused = refused_subscriptions(&admin).await;
    let mut peer = peer_with(&plain, "vm-1", Some(&password)).await;
    peer.subscribe("fleet/groups/shanghai/release/+").await;
    peer.subscribe("fleet/groups/beijing/release/+").await;
    release(&admin, "1.0", &[], &["beijing"]).await;
    let first = peer.next(|p| p.topic.starts_with("fleet/groups/")).await;
    assert_eq!(first.topic, "fleet/groups/beijing/release/app");
    assert_eq!(
        violations(&admin).await,
        before,
        "no violation, no closed session"
    );
    assert_eq!(
        refused_subscriptions(&admin).await,
        refused + 1,
        "shanghai refused in the SUBACK, and counted"
    );
    admin.close().await;
    platform.stop().await;
}

/// The move of docs/operations.md ("Moving a machine to another group") with the real agent:
/// one command on the platform, nothing on the machine. Its session is closed, and as it
/// reconnects, still following shanghai (its config), the platform tells it its groups: it
/// installs beijing's release. Restarted with the same config, it follows beijing still (its
/// data dir keeps what the platform said, which `fleetcast-device status` shows) and never
/// asks for shanghai again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moved_to_another_group_follows_it_without_a_config_edit() {
    let Embedded {
        dir,
        data_dir,
        platform,
        plain,
        ..
    } = embedded().await;
    let admin = super::admin(&plain, &data_dir).await;
    let p = provisioned(&admin, "vm-m", &["shanghai"]).await;
    let mut config = super::e2e::machine_config(&p, &plain, dir.path());
    config.initial_versions = BTreeMap::from([(app(), "1.0.0".to_owned())]);
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(config.clone(), agents.clone()));
    wait_online(&admin, 1).await;
    let before = violations(&admin).await;
    let said = move_to_beijing(&admin, "vm-m").await;
    assert!(
        said.contains("1 broker session(s) closed: its agent is told its groups"),
        "{said}"
    );
    installed_by_group(&admin, dir.path(), ("2.0.0", 9), "beijing", 1).await;
    agents.cancel();
    joined(agent, "agent vm-m moved to beijing").await;
    let status = fleetcast_device::status::collect(&config, &dir.path().join("vm-m.toml"), &[])
        .expect("the machine's status");
    assert_eq!(
        (status.groups, status.groups_from),
        (vec![g("beijing")], "platform")
    );

    // Restarted with the config that still names shanghai.
    let refused_before = refused_subscriptions(&admin).await;
    let agents = CancellationToken::new();
    let agent = tokio::spawn(fleetcast_device::agent::run(config, agents.clone()));
    installed_by_group(&admin, dir.path(), ("3.0.0", 10), "beijing", 1).await;
    assert_eq!(
        violations(&admin).await,
        before,
        "the moved agent is never disconnected for what it subscribes to"
    );
    assert_eq!(
        refused_subscriptions(&admin).await,
        refused_before,
        "the restarted agent subscribed to shanghai again"
    );
    admin.close().await;
    agents.cancel();
    joined(agent, "agent vm-m in beijing").await;
    platform.stop().await;
}
