//! The reconciler: a machine whose reported state is behind its desired notice gets that notice
//! again (once the topic's re-publish interval has passed: not right after the publish, which
//! every state in flight then is behind on), the notice with the later seq (machine or group)
//! is the one desired, and a machine first seen in a group becomes a target of the group's
//! release.

use super::*;

/// The re-publish interval of these tests (30 s in a fleet).
const EVERY: Duration = Duration::from_millis(300);

/// Reports `seq` as the machine's state: the first report behind a notice starts its topic's
/// clock and sends nothing; reported again once `EVERY` has passed, the notice goes out again
/// (reported once more each `EVERY` until it does, in case the first report was taken in late).
async fn behind(
    vm: &mut Machine,
    observer: &mut Peer,
    data: &Path,
    topic: &str,
    seq: u64,
) -> ReleaseNotice {
    vm.report_state(&["g"], seq).await;
    assert!(
        tokio::time::timeout(EVERY / 2, observer.next(|p| p.topic == topic))
            .await
            .is_err(),
        "re-published at once"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(EVERY).await;
        vm.report_state(&["g"], seq).await;
        if let Ok(notice) = tokio::time::timeout(EVERY, next_notice(observer, data, topic)).await {
            return notice;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{topic} never re-published"
        );
    }
}

/// The next release notice on `observer` for `topic`, verified.
async fn next_notice(observer: &mut Peer, data: &Path, topic: &str) -> ReleaseNotice {
    let p = observer.next(|p| p.topic == topic).await;
    public_key(data)
        .verify(Purpose::Release, &p.payload)
        .expect("notice signed by the platform key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_behind_gets_the_latest_desired_notice_machine_rollback_or_group_release() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let limits = fleetcast_platform::limits::MachineLimits {
        republish_every: EVERY,
        ..Default::default()
    };
    let platform = start_platform_with(&url, &data_dir, limits);
    let admin = admin(&url, &data_dir).await;
    for (i, v) in ["1.0", "2.0", "3.0"].into_iter().enumerate() {
        upload(
            &admin,
            dir.path(),
            &format!("a{i}.bin"),
            &data(1500, i as u8),
            v,
        )
        .await
        .unwrap();
    }
    let mut vm = provision(&admin, &url, "vm-001", &["g"]).await;
    let mut observer = peer(&url, "observer").await;
    observer.subscribe("fleet/+/+/release/app").await;
    let (group_topic, own_topic) = (
        "fleet/groups/g/release/app",
        "fleet/machines/vm-001/release/app",
    );

    let r2 = release(&admin, "2.0", &[], &["g"]).await.release;
    let sent = next_notice(&mut observer, &data_dir, group_topic).await;
    assert_eq!(sent.release, r2.id);
    // A machine that never got it (seq 0) gets the group notice again.
    let again = behind(&mut vm, &mut observer, &data_dir, group_topic, 0).await;
    assert_eq!((again.release, again.seq), (r2.id.clone(), sent.seq));

    // A per-machine rollback has the later seq: it is what the machine must follow now.
    let plan = rollback(&admin, Target::Machine(m("vm-001")), &app(), Some("1.0")).await;
    let rollback = next_notice(&mut observer, &data_dir, own_topic).await;
    assert_eq!(rollback.release, plan.release.id);
    // Behind on the rollback (it still reports the group release's seq): the rollback is
    // re-sent, even though the group's notice was re-published just before.
    let again = behind(&mut vm, &mut observer, &data_dir, own_topic, sent.seq).await;
    assert_eq!(
        (again.release, again.seq),
        (plan.release.id.clone(), rollback.seq)
    );

    // A newer group release wins over the rollback again.
    let r3 = release(&admin, "3.0", &[], &["g"]).await.release;
    let newer = next_notice(&mut observer, &data_dir, group_topic).await;
    assert!(newer.seq > rollback.seq);
    let again = behind(&mut vm, &mut observer, &data_dir, group_topic, rollback.seq).await;
    assert_eq!((again.release, again.seq), (r3.id.clone(), newer.seq));

    let s = status(&admin, &plan.release.id).await;
    assert_eq!(phase_of(&s, "vm-001"), Phase::Superseded);
    let s = status(&admin, &r3.id).await;
    assert_eq!(phase_of(&s, "vm-001"), Phase::Pending);
    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_first_seen_in_a_group_becomes_a_target_of_its_release() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    upload(&admin, dir.path(), "a.bin", &data(1500, 1), "1.0")
        .await
        .unwrap();
    let _member = provision(&admin, &url, "vm-001", &["g"]).await;
    let late = provision(&admin, &url, "vm-002", &[]).await;
    let mut observer = peer(&url, "observer").await;
    observer.subscribe("fleet/groups/g/release/app").await;
    let plan = release(&admin, "1.0", &[], &["g"]).await;
    let r1 = &plan.release;
    assert_eq!(plan.targets.len(), 1);
    let sent = next_notice(&mut observer, &data_dir, "fleet/groups/g/release/app").await;

    // A machine cannot join a group by claiming it: membership is the operator's.
    let mut claimer = provision(&admin, &url, "vm-003", &[]).await;
    claimer.report_state(&["g"], 0).await;
    // The operator adds vm-002 to the group (provisioning it again, with rotate: it gets a new
    // secret and config); its next state report makes it a target.
    let rotated = provisioned_with(&admin, "vm-002", &["g"], true).await;
    assert!(rotated.secret != late.secret, "a new secret");
    let mut late = late.reconnect(&url, rotated.secret).await;
    late.report_state(&["g"], 0).await;
    let s = wait_status(&admin, &r1.id, |s| s.targets.len() == 2).await;
    let rec = target(&s, "vm-002");
    assert_eq!(
        (rec.phase, rec.via.as_ref().map(|g| g.as_str())),
        (Phase::Pending, Some("g"))
    );
    assert_eq!(s.progress.total, 2);
    // The group's notice reaches it as it subscribes, as it reaches any machine (retained); the
    // platform does not send it to the whole group again for one machine behind it.
    late.peer.subscribe("fleet/groups/g/release/app").await;
    let got = next_notice(&mut late.peer, &data_dir, "fleet/groups/g/release/app").await;
    assert_eq!((got.release, got.seq), (r1.id.clone(), sent.seq));
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            observer.next(|p| p.topic == "fleet/groups/g/release/app")
        )
        .await
        .is_err(),
        "re-published to the whole group"
    );
    // Its reports now count.
    late.report_recorded(&admin, &r1.id, "1.0", Phase::Installed)
        .await;
    let machines = machines(&admin).await;
    let info = machines.iter().find(|m| m.id.as_str() == "vm-002").unwrap();
    assert_eq!(info.groups, vec![g("g")]);
    let claimer = machines.iter().find(|m| m.id.as_str() == "vm-003").unwrap();
    assert!(claimer.groups.is_empty(), "a claimed group is ignored");
    let s = status(&admin, &r1.id).await;
    assert!(
        s.targets.iter().all(|t| t.machine.as_str() != "vm-003"),
        "a machine claiming a group is not a target of its release"
    );
    admin.close().await;
    platform.stop().await;
}

/// A machine added to a group after the publish that reports its events before its first
/// state (an agent not in the documented order): its first event for the group's release gives
/// it its record, as its state would, so its events count and are kept, and it does not stay
/// `pending`.
#[tokio::test]
async fn a_late_member_whose_events_come_before_its_state_is_recorded_by_them() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        platform,
        admin,
        ..
    } = env(&url).await;
    upload(&admin, dir.path(), "a.bin", &data(1500, 2), "1.0")
        .await
        .unwrap();
    let _member = provision(&admin, &url, "vm-001", &["g"]).await;
    let plan = release(&admin, "1.0", &[], &["g"]).await;
    let r1 = &plan.release;
    assert_eq!(plan.targets.len(), 1);
    let mut late = provision(&admin, &url, "vm-002", &["g"]).await;
    late.peer
        .subscribe("fleet/machines/vm-002/status/ack")
        .await;
    for phase in [Phase::Notified, Phase::Downloading, Phase::Downloaded] {
        late.report(Some(&r1.id), "1.0", phase).await;
    }
    let installed = late.report(Some(&r1.id), "1.0", Phase::Installed).await;
    late.acked_up_to(installed.ctr).await;
    let s = status(&admin, &r1.id).await;
    let rec = target(&s, "vm-002");
    assert_eq!(
        (rec.phase, rec.via.as_ref().map(|g| g.as_str())),
        (Phase::Installed, Some("g"))
    );
    assert_eq!(s.progress.total, 2);
    let (events, _) = super::security::stored_events(&admin).await;
    let late_events = events
        .iter()
        .filter(|e| e.machine.as_str() == "vm-002")
        .count();
    assert_eq!(late_events, 4, "its events are kept");
    admin.close().await;
    platform.stop().await;
}

/// A machine's state names the groups it follows. One following a group it is not in (its
/// config was not edited after a move, or a stolen config claims one) is sent a signed `groups`
/// command naming its own groups only, and at most once per interval however often, and
/// whatever, it claims: a stolen config cannot make the platform sign a command per state. A
/// machine following its own groups is sent nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_following_a_group_it_is_not_in_is_told_its_own_once_per_interval() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir: _dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let commands = |id: &str| format!("fleet/machines/{id}/command");
    let mut vm = provision(&admin, &url, "vm-001", &["g"]).await;
    vm.peer.subscribe(&commands("vm-001")).await;
    vm.report_state(&["g", "h"], 0).await;
    let p = vm.peer.next(|p| p.topic == commands("vm-001")).await;
    let cmd: fleetcast_proto::command::Command = public_key(&data_dir)
        .verify(Purpose::Command, &p.payload)
        .expect("signed by the platform key");
    assert_eq!(
        (cmd.machine, cmd.action),
        (
            m("vm-001"),
            fleetcast_proto::command::CommandAction::Groups {
                groups: vec![g("g")]
            }
        )
    );
    for claimed in [&["g", "h"][..], &["x", "y"], &[]] {
        vm.report_state(claimed, 0).await;
    }
    assert!(
        nothing_within_a_second(&mut vm.peer, &commands("vm-001")).await,
        "told its groups again within the interval"
    );
    let mut member = provision(&admin, &url, "vm-002", &["g"]).await;
    member.peer.subscribe(&commands("vm-002")).await;
    member.report_state(&["g"], 0).await;
    assert!(
        nothing_within_a_second(&mut member.peer, &commands("vm-002")).await,
        "a machine following its own groups is told them"
    );
    admin.close().await;
    platform.stop().await;
}

/// Whether nothing arrives on `topic` for a second.
async fn nothing_within_a_second(peer: &mut Peer, topic: &str) -> bool {
    tokio::time::timeout(Duration::from_secs(1), peer.next(|p| p.topic == topic))
        .await
        .is_err()
}
