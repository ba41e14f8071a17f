//! `machine_groups_batch` and `fleetcast machine groups` with several machines, against a real
//! platform: many machines change groups in one request, each is cut off (embedded broker) or
//! told its groups at once (external broker), and a request that cannot be done whole changes
//! nothing.

use fleetcast_proto::acl::Role;
use fleetcast_proto::command::{Command, CommandAction};

use super::cli::Fleetcast;
use super::gateway::{closed, embedded, Embedded};
use super::*;

/// `machine_groups_batch` of `machines`, by `admin`.
async fn regroup(
    admin: &AdminClient,
    machines: &[&str],
    add: &[&str],
    remove: &[&str],
) -> Result<String, AdminError> {
    let call = calls::MachineGroupsBatch {
        machines: machines.iter().map(|x| m(x)).collect(),
        add: add.iter().map(|x| g(x)).collect(),
        remove: remove.iter().map(|x| g(x)).collect(),
    };
    admin.call(call).await
}

/// Each machine's groups, by id.
async fn groups_of(admin: &AdminClient) -> BTreeMap<String, Vec<GroupId>> {
    machines(admin)
        .await
        .into_iter()
        .map(|x| (x.id.to_string(), x.groups))
        .collect()
}

/// vm-1, vm-2 and vm-3 in shanghai, vm-9 in beijing; their groups.
async fn shanghai_and_one_in_beijing(admin: &AdminClient) -> BTreeMap<String, Vec<GroupId>> {
    for id in ["vm-1", "vm-2", "vm-3"] {
        provisioned(admin, id, &["shanghai"]).await;
    }
    provisioned(admin, "vm-9", &["beijing"]).await;
    groups_of(admin).await
}

/// On the embedded broker: three machines moved in one request, the two connected ones are
/// cut off (their agents are told their groups as they reconnect) and the offline one is sent
/// its groups now; the change is in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_machines_move_in_one_request_and_the_connected_ones_are_cut_off() {
    let Embedded {
        data_dir,
        platform,
        plain,
        dir: _dir,
        ..
    } = embedded().await;
    let admin = super::admin(&plain, &data_dir).await;
    let mut peers = Vec::new();
    for id in ["vm-1", "vm-2", "vm-3"] {
        let p = provisioned(&admin, id, &["shanghai", "north"]).await;
        if id != "vm-3" {
            let mut peer = peer_with(&plain, id, Some(&p.secret.mqtt_password())).await;
            peer.subscribe("fleet/groups/shanghai/release/+").await;
            peers.push(peer);
        }
    }
    provisioned(&admin, "vm-4", &["shanghai"]).await;
    let said = regroup(
        &admin,
        &["vm-1", "vm-2", "vm-3"],
        &["east-china"],
        &["shanghai"],
    )
    .await
    .unwrap();
    assert!(
        said.starts_with(
            "3 machine(s) added to east-china and removed from shanghai; 2 broker session(s) of 2 machine(s) closed"
        ) && said.contains("1 machine(s) without a session closed were sent their groups now"),
        "{said}"
    );
    for peer in &mut peers {
        closed(peer, "the moved machine's session closed").await;
    }
    let groups = groups_of(&admin).await;
    for id in ["vm-1", "vm-2", "vm-3"] {
        assert_eq!(groups[id], vec![g("north"), g("east-china")], "{id}");
    }
    assert_eq!(groups["vm-4"], vec![g("shanghai")], "not named, not moved");
    let entry = audit(&admin)
        .await
        .into_iter()
        .find(|e| e.action == "machine_groups_batch")
        .expect("the batch is audited");
    assert_eq!(entry.result, "ok");
    assert_eq!(entry.request["machines"].as_array().unwrap().len(), 3);
    admin.close().await;
    platform.stop().await;
}

/// Two real agents moved in one request: both are cut off, told their groups as they
/// reconnect, and install what is released to their new group (whose notice reaches them only
/// if they follow it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_moved_in_one_request_both_install_their_new_groups_release() {
    let Embedded {
        dir,
        data_dir,
        platform,
        plain,
        ..
    } = embedded().await;
    let admin = super::admin(&plain, &data_dir).await;
    let agents = CancellationToken::new();
    let mut running = Vec::new();
    for id in ["vm-a", "vm-b"] {
        let p = provisioned(&admin, id, &["shanghai"]).await;
        let mut config = super::e2e::machine_config(&p, &plain, dir.path());
        config.initial_versions = BTreeMap::from([(app(), "1.0.0".to_owned())]);
        running.push(tokio::spawn(fleetcast_device::agent::run(
            config,
            agents.clone(),
        )));
    }
    wait_online(&admin, 2).await;
    let said = regroup(&admin, &["vm-a", "vm-b"], &["east-china"], &["shanghai"])
        .await
        .unwrap();
    assert!(
        said.contains("2 broker session(s) of 2 machine(s) closed"),
        "{said}"
    );
    installed_by_group(&admin, dir.path(), ("2.0.0", 9), "east-china", 2).await;
    agents.cancel();
    for agent in running {
        joined(agent, "an agent moved to east-china").await;
    }
    admin.close().await;
    platform.stop().await;
}

/// On an external broker (no session to close) every machine of a batch is sent its signed
/// groups. A batch one of whose machines is not in the group to remove, or that names an
/// unknown machine, is refused whole, naming it, and changes nothing; a viewer or operator
/// may not move machines at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_all_or_nothing_admins_only_and_each_machine_is_told_its_groups() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir: _dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let before = shanghai_and_one_in_beijing(&admin).await;

    let err = regroup(
        &admin,
        &["vm-1", "vm-9", "vm-2"],
        &["east-china"],
        &["shanghai"],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, AdminError::Refused(why)
            if why == "not in a group to remove: vm-9 (not in shanghai); nothing was changed"),
        "{err}"
    );
    let err = regroup(&admin, &["vm-1", "vm-404", "vm-2"], &["east-china"], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdminError::Refused(why)
            if why == "unknown machine vm-404; nothing was changed"),
        "{err}"
    );
    for (name, role) in [("val", Role::Viewer), ("oscar", Role::Operator)] {
        let profile = add_operator(&admin, name, role).await;
        let op = AdminClient::connect_as(&url, Topics::default(), name, profile.secret, WAIT)
            .await
            .unwrap();
        let err = regroup(&op, &["vm-1"], &["east-china"], &[])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("needs admin"), "{name}: {err}");
        op.close().await;
    }
    assert_eq!(groups_of(&admin).await, before, "nothing was changed");

    let mut watcher = peer(&url, "watcher").await;
    watcher.subscribe("fleet/machines/+/command").await;
    let said = regroup(
        &admin,
        &["vm-1", "vm-2", "vm-3"],
        &["east-china"],
        &["shanghai"],
    )
    .await
    .unwrap();
    assert!(
        said.contains("3 machine(s) without a session closed were sent their groups now"),
        "{said}"
    );
    let key = public_key(&data_dir);
    let mut told = BTreeMap::new();
    while told.len() < 3 {
        let p = watcher.next(|p| p.topic.ends_with("/command")).await;
        let cmd: Command = key.verify(Purpose::Command, &p.payload).expect("signed");
        told.insert(cmd.machine.to_string(), cmd.action);
    }
    for id in ["vm-1", "vm-2", "vm-3"] {
        assert_eq!(
            told[id],
            CommandAction::Groups {
                groups: vec![g("east-china")]
            },
            "{id}"
        );
    }
    let groups = groups_of(&admin).await;
    assert_eq!(groups["vm-1"], vec![g("east-china")]);
    assert_eq!(groups["vm-9"], vec![g("beijing")]);
    admin.close().await;
    platform.stop().await;
}

/// `fleetcast machine groups --members-of shanghai --add east-china --remove shanghai`: the
/// whole group moves after a confirmation (refused without a terminal or --yes), and a list
/// file moves the machines it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_moves_a_whole_group_once_confirmed_and_the_machines_of_a_file() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let before = shanghai_and_one_in_beijing(&admin).await;
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    let move_shanghai = [
        "machine",
        "groups",
        "--members-of",
        "shanghai",
        "--add",
        "east-china",
        "--remove",
        "shanghai",
    ];
    let unconfirmed = fc.run(&move_shanghai).await;
    assert_ne!(unconfirmed.code, 0, "{unconfirmed:#?}");
    assert!(
        unconfirmed
            .stdout
            .contains("3 machine(s) (vm-1, vm-2, vm-3)")
            && unconfirmed.stderr.contains("pass --yes"),
        "{unconfirmed:#?}"
    );
    assert_eq!(groups_of(&admin).await, before, "nothing moved unconfirmed");

    let out = fc
        .run(&[&move_shanghai[..], &["--yes"]].concat())
        .await
        .ok();
    assert!(
        out.contains("3 machine(s) added to east-china and removed from shanghai"),
        "{out}"
    );
    let groups = groups_of(&admin).await;
    for id in ["vm-1", "vm-2", "vm-3"] {
        assert_eq!(groups[id], vec![g("east-china")], "{id}");
    }
    assert_eq!(groups["vm-9"], vec![g("beijing")]);

    let list = dir.path().join("cwd/shops.txt");
    std::fs::write(&list, "# closing shops\nvm-1\n\nvm-9  # airport\n").unwrap();
    let out = fc
        .run(&[
            "machine",
            "groups",
            "--from-file",
            "shops.txt",
            "--add",
            "closing",
            "--yes",
        ])
        .await
        .ok();
    assert!(out.contains("2 machine(s) added to closing"), "{out}");
    let groups = groups_of(&admin).await;
    assert_eq!(groups["vm-9"], vec![g("beijing"), g("closing")]);
    assert_eq!(groups["vm-2"], vec![g("east-china")]);
    admin.close().await;
    platform.stop().await;
}
