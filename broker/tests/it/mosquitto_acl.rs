//! fleetcast's generated Mosquitto files on a real Mosquitto: one machine cannot touch another's
//! topics, integrators and operators stay in their lanes, and a reload revokes at once.
//!
//! Every check that something does NOT arrive publishes a marker the receiver IS allowed to see
//! after the forbidden messages, and compares everything received up to the marker with the
//! exact list expected: one publisher's QoS 1 messages arrive in order, so a forbidden message
//! that got through would be in the list, and a broken setup never delivers the marker.

use std::time::Duration;

use fleetcast_broker::client;
use fleetcast_broker::mosquitto::{mosquitto_files, BrokerIdentity, MosquittoFiles};
use fleetcast_broker::testing::{mosquitto_binary, Mosquitto};
use fleetcast_broker::MqttEvent;
use fleetcast_proto::acl::{Claim, Principal, Role};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::{ArtifactId, GroupId, MachineId, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{assert_refused, connected_with, next_connected, subscribe};

const END: &[u8] = b"end";

struct Fleet {
    mosq: Mosquitto,
    t: Topics,
    identities: Vec<BrokerIdentity>,
    shutdown: CancellationToken,
}

type Conn = (AsyncClient, mpsc::Receiver<MqttEvent>);

fn machine(id: &str, group: &str) -> Principal {
    Principal::Machine {
        id: MachineId::new(id).unwrap(),
        groups: vec![GroupId::new(group).unwrap()],
    }
}

/// Platform, vm-1 (group g1), vm-2 (group g2), operator alice, integrator erp; random secrets.
fn identities(vm1_group: &str) -> Vec<BrokerIdentity> {
    [
        Principal::Platform,
        machine("vm-1", vm1_group),
        machine("vm-2", "g2"),
        Principal::Operator {
            name: "alice".into(),
            role: Role::Operator,
        },
        Principal::Integrator { name: "erp".into() },
    ]
    .into_iter()
    .map(|principal| BrokerIdentity {
        principal,
        password: Secret::from_bytes(rand::random()).mqtt_password(),
    })
    .collect()
}

impl Fleet {
    /// Mosquitto with the generated files; `None` (after a loud notice) only when mosquitto is
    /// not installed outside CI.
    fn start() -> Option<Fleet> {
        if mosquitto_binary().is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "mosquitto is not installed, and CI must run the Mosquitto ACL tests \
                 (scripts/test.sh installs it)"
            );
            eprintln!(
                "\n!!!!!!!! SKIPPED: mosquitto is not installed, so fleetcast's Mosquitto ACL \
                 files were NOT tested. Run scripts/test.sh or apt-get install mosquitto. !!!!!!!!\n"
            );
            return None;
        }
        let t = Topics::default();
        let identities = identities("g1");
        let mosq = Mosquitto::start_with_files(&files(&t, &identities))
            .expect("mosquitto starts with the generated files");
        Some(Fleet {
            mosq,
            t,
            identities,
            shutdown: CancellationToken::new(),
        })
    }

    fn password(&self, user: &str) -> String {
        password(&self.identities, user)
    }

    /// Connects as `user` with `client_id` until `until` is cancelled: a machine to the
    /// machines' listener (where Mosquitto makes the client id the username), anyone else to the
    /// service listener (where client ids are free).
    async fn connect_as(&self, user: &str, client_id: &str, until: &CancellationToken) -> Conn {
        self.connect_with(user, client_id, until, |_| {}).await
    }

    /// [`Self::connect_as`], with `adjust` applied to the client's options.
    async fn connect_with(
        &self,
        user: &str,
        client_id: &str,
        until: &CancellationToken,
        adjust: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Conn {
        let mut o = client::options(self.url_of(user), client_id, None);
        o.set_credentials(user, self.password(user));
        adjust(&mut o);
        let (c, mut rx) = connected_with(o, until);
        if let Err(e) = next_connected(&mut rx).await {
            panic!(
                "{user} as {client_id} did not connect: {e}\nmosquitto log:\n{}",
                self.mosq.log()
            );
        }
        (c, rx)
    }

    /// The listener `user` connects to.
    fn url_of(&self, user: &str) -> &client::BrokerUrl {
        match Claim::parse(user) {
            Some(Claim::Machine(_)) => &self.mosq.machine_url,
            _ => &self.mosq.url,
        }
    }

    /// The platform as a publisher only.
    async fn platform(&self) -> AsyncClient {
        drained(
            self.connect_as("fleetcast-platform", "fleetcast-platform", &self.shutdown)
                .await,
        )
    }

    /// A second platform connection subscribed to `#`, cancelled with `until`.
    async fn platform_listener(&self, until: &CancellationToken) -> Conn {
        let (c, mut rx) = self
            .connect_as("fleetcast-platform", "fleetcast-platform.listen", until)
            .await;
        subscribe(&c, &mut rx, "#").await;
        (c, rx)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A client whose events nobody reads: they are discarded, so its driver never waits on a full
/// channel (every QoS 1 publish reports Sent and PubAck).
fn drained((c, mut rx): Conn) -> AsyncClient {
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    c
}

fn files(t: &Topics, identities: &[BrokerIdentity]) -> MosquittoFiles {
    mosquitto_files(t, identities).expect("files generate")
}

fn password(identities: &[BrokerIdentity], user: &str) -> String {
    identities
        .iter()
        .find(|i| i.principal.username() == user)
        .map(|i| i.password.clone())
        .unwrap_or_else(|| panic!("no identity {user}"))
}

/// Publishes each topic (QoS 1, payload "x"), then `marker` with payload [`END`].
async fn publish_then_marker(c: &AsyncClient, topics: &[String], marker: &str) {
    for topic in topics {
        c.publish(topic, QoS::AtLeastOnce, false, b"x".to_vec())
            .await
            .unwrap();
    }
    c.publish(marker, QoS::AtLeastOnce, false, END)
        .await
        .unwrap();
}

/// The topics of everything received up to and including the marker (payload [`END`]).
/// Fails on a disconnect or if the marker does not come within 5 s.
async fn received_until_marker(rx: &mut mpsc::Receiver<MqttEvent>, who: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => panic!("{who}: no marker within 5 s; received {got:?}"),
            Ok(None) => panic!("{who}: event loop ended; received {got:?}"),
            Ok(Some(MqttEvent::Disconnected(e))) => {
                panic!("{who}: disconnected ({e}); received {got:?}")
            }
            Ok(Some(MqttEvent::Publish(p))) => {
                got.push(p.topic.clone());
                if p.payload.as_ref() == END {
                    return got;
                }
            }
            Ok(Some(_)) => {}
        }
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn mosquitto_refuses_wrong_passwords_unknown_users_and_anonymous_clients() {
    let Some(f) = Fleet::start() else { return };
    let (services, machines) = (&f.mosq.url, &f.mosq.machine_url);
    // Control: the right password connects.
    f.connect_as("vm-1", "vm-1", &f.shutdown).await;

    let refused = |url, user: &str, client_id: &str, password: Option<String>, what: &str| {
        let mut o = client::options(url, client_id, None);
        if let Some(p) = password {
            o.set_credentials(user, p);
        }
        let (c, mut rx) = connected_with(o, &f.shutdown);
        let what = what.to_owned();
        async move {
            // Kept until refused: a dropped client would end its loop, which reads as refused.
            let _c = c;
            assert_refused(&mut rx, &what).await
        }
    };
    refused(
        machines,
        "vm-1",
        "vm-1",
        Some(f.password("vm-2")),
        "vm-1 with vm-2's password",
    )
    .await;
    refused(
        machines,
        "vm-1",
        "vm-1",
        Some("0123456789abcdef0123456789abcdef".into()),
        "vm-1 with a wrong password",
    )
    .await;
    refused(
        services,
        "fleetcast-platform",
        "fleetcast-platform",
        Some(f.password("vm-1")),
        "the platform's username with a machine's password",
    )
    .await;
    refused(
        machines,
        "vm-3",
        "vm-3",
        Some(f.password("vm-1")),
        "a user not in the password file",
    )
    .await;
    refused(
        machines,
        "",
        "anon",
        None,
        "a client without credentials on the machines' listener",
    )
    .await;
    refused(
        services,
        "",
        "anon",
        None,
        "a client without credentials on the service listener",
    )
    .await;
    // Each listener knows only its own users: a machine's right password on the service
    // listener, where it could pick any client id, and the platform's on the machines'.
    refused(
        services,
        "vm-1",
        "vm-2",
        Some(f.password("vm-1")),
        "a machine on the service listener",
    )
    .await;
    refused(
        machines,
        "fleetcast-platform",
        "fleetcast-platform",
        Some(f.password("fleetcast-platform")),
        "the platform on the machines' listener",
    )
    .await;
}

/// One machine's credentials, connecting again and again with another machine's client id,
/// used to end that machine's session each time (Mosquitto ends the older session of a client
/// id): the whole fleet could be kept offline from one stolen config. On the machines' listener
/// the client id is the username, so vm-1 only ever replaces its own session.
#[tokio::test]
async fn one_machines_credentials_cannot_take_over_another_machines_session() {
    let Some(f) = Fleet::start() else { return };
    let t = &f.t;
    let vm2 = MachineId::new("vm-2").unwrap();
    let (vm2_c, mut vm2_rx) = f.connect_as("vm-2", "vm-2", &f.shutdown).await;
    subscribe(&vm2_c, &mut vm2_rx, &t.command(&vm2)).await;

    for _ in 0..5 {
        let attempt = CancellationToken::new();
        f.connect_as("vm-1", "vm-2", &attempt).await;
        attempt.cancel();
    }

    // vm-2 was never disconnected (that fails here) and is still served.
    let platform = f.platform().await;
    publish_then_marker(&platform, &[], &t.command(&vm2)).await;
    assert_eq!(
        received_until_marker(&mut vm2_rx, "vm-2").await,
        vec![t.command(&vm2)],
        "mosquitto log:\n{}",
        f.mosq.log()
    );
}

#[tokio::test]
async fn a_machine_receives_its_own_and_its_groups_topics_and_nothing_of_another_machine() {
    let Some(f) = Fleet::start() else { return };
    let t = &f.t;
    let (vm1, vm2) = (
        MachineId::new("vm-1").unwrap(),
        MachineId::new("vm-2").unwrap(),
    );
    let (g1, g2) = (GroupId::new("g1").unwrap(), GroupId::new("g2").unwrap());
    let app = fleetcast_proto::Kind::new("app").unwrap();
    let artifact = ArtifactId::of(b"some artifact");
    let platform = f.platform().await;

    let allowed = vec![
        t.machine_release(&vm1, &app),
        t.command(&vm1),
        t.machine_chunks(&vm1),
        t.status_ack(&vm1),
        t.group_release(&g1, &app),
        t.artifact_chunks(&artifact),
        t.platform_keys(),
    ];
    let marker = t.command(&vm1);
    let mut expected = allowed.clone();
    expected.push(marker.clone());

    // As vm-1 with its own client id: `#`, then every topic exactly. Then vm-1's credentials
    // with vm-2's client id (Mosquitto does not tie the two): grants follow the username.
    for (client_id, wildcard) in [("vm-1", true), ("vm-1", false), ("vm-2", true)] {
        let forbidden = vec![
            t.machine_release(&vm2, &app),
            t.command(&vm2),
            t.machine_chunks(&vm2),
            t.status_ack(&vm2),
            t.group_release(&g2, &app),
            // Its own reports are write-only.
            t.status(&vm1),
            t.chunk_request(&vm1),
            t.events(),
            t.rollout_progress("r-1"),
            // The client-id patterns match here; the machine's deny lines must win.
            t.admin_response(client_id),
            t.integrator_events(client_id),
            "elsewhere/topic".to_owned(),
        ];
        let round = f.shutdown.child_token();
        let (c, mut rx) = f.connect_as("vm-1", client_id, &round).await;
        if wildcard {
            subscribe(&c, &mut rx, "#").await;
        } else {
            for filter in forbidden.iter().chain(&allowed) {
                subscribe(&c, &mut rx, filter).await;
            }
        }
        let mut all = forbidden.clone();
        all.extend(allowed.iter().cloned());
        publish_then_marker(&platform, &all, &marker).await;
        let who = format!("vm-1 as {client_id}, wildcard {wildcard}");
        assert_eq!(
            received_until_marker(&mut rx, &who).await,
            expected,
            "{who}"
        );
        round.cancel();
    }
}

#[tokio::test]
async fn a_machines_publishes_outside_its_own_reports_never_reach_the_platform() {
    let Some(f) = Fleet::start() else { return };
    let t = &f.t;
    let (vm1, vm2) = (
        MachineId::new("vm-1").unwrap(),
        MachineId::new("vm-2").unwrap(),
    );
    let app = fleetcast_proto::Kind::new("app").unwrap();
    let (_listener, mut listener_rx) = f.platform_listener(&f.shutdown).await;
    let c = drained(f.connect_as("vm-1", "vm-1", &f.shutdown).await);

    let forbidden = vec![
        t.status(&vm2),
        t.online(&vm2),
        t.state(&vm2),
        t.chunk_request(&vm2),
        t.group_release(&GroupId::new("g1").unwrap(), &app),
        t.group_release(&GroupId::new("g2").unwrap(), &app),
        t.machine_release(&vm1, &app),
        t.command(&vm1),
        t.status_ack(&vm1),
        t.machine_chunks(&vm1),
        t.artifact_chunks(&ArtifactId::of(b"x")),
        t.events(),
        t.platform_keys(),
        t.admin_request("vm-1"),
        t.integrator_events_get("vm-1"),
        "elsewhere/topic".to_owned(),
    ];
    let own = vec![
        t.status(&vm1),
        t.state(&vm1),
        t.online(&vm1),
        t.chunk_request(&vm1),
    ];
    let mut all = forbidden;
    all.extend(own.iter().cloned());
    publish_then_marker(&c, &all, &t.status(&vm1)).await;
    let mut expected = own;
    expected.push(t.status(&vm1));
    assert_eq!(
        received_until_marker(&mut listener_rx, "platform listener").await,
        expected
    );
}

/// A stolen machine config leaves a retained message larger than the platform's clients read
/// (`client::MAX_PACKET`) on the machine's own `state` topic. Mosquitto's default limit is 256 MiB:
/// the platform's connections read it at every (re)subscribe and closed, again and again.
/// The generated snippet's `max_packet_size` makes Mosquitto disconnect the sender and keep
/// nothing, so the platform's next subscription gets what it can read, and only that.
#[tokio::test]
async fn a_machine_cannot_leave_a_message_too_large_for_the_platform() {
    let Some(f) = Fleet::start() else { return };
    let t = &f.t;
    let vm1 = MachineId::new("vm-1").unwrap();
    let attack = CancellationToken::new();
    let (c, mut rx) = f
        .connect_with("vm-1", "vm-1", &attack, |o| {
            o.set_max_packet_size(8 << 20, 8 << 20);
        })
        .await;
    c.publish(
        t.state(&vm1),
        QoS::AtLeastOnce,
        true,
        vec![b'x'; client::MAX_PACKET + (1 << 20)],
    )
    .await
    .unwrap();
    let dropped = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match rx.recv().await {
                Some(MqttEvent::Disconnected(_)) | None => return,
                Some(MqttEvent::PubAck(_)) => panic!("mosquitto took the oversized publish"),
                Some(_) => {}
            }
        }
    })
    .await;
    attack.cancel();
    assert!(
        dropped.is_ok(),
        "the sender of an oversized packet stays connected\nmosquitto log:\n{}",
        f.mosq.log()
    );
    // The platform subscribes as it does at every start, and reads the machine's next state.
    let (_listener, mut listener_rx) = f.platform_listener(&f.shutdown).await;
    let c = drained(f.connect_as("vm-1", "vm-1", &f.shutdown).await);
    publish_then_marker(&c, &[], &t.state(&vm1)).await;
    assert_eq!(
        received_until_marker(&mut listener_rx, "platform listener").await,
        [t.state(&vm1)],
        "nothing retained before the machine's next state"
    );
}

#[tokio::test]
async fn an_integrator_reads_events_and_progress_but_publishes_only_its_event_requests() {
    let Some(f) = Fleet::start() else { return };
    let t = &f.t;
    let vm1 = MachineId::new("vm-1").unwrap();
    let app = fleetcast_proto::Kind::new("app").unwrap();
    let me = "fleetcast-int-erp";
    let (int, mut int_rx) = f.connect_as(me, me, &f.shutdown).await;

    // What it publishes: only its own event requests reach the platform.
    let listening = f.shutdown.child_token();
    let (_listener, mut listener_rx) = f.platform_listener(&listening).await;
    let forbidden = vec![
        t.events(),
        t.rollout_progress("r-1"),
        t.platform_keys(),
        t.status(&vm1),
        t.machine_release(&vm1, &app),
        t.integrator_events_get("fleetcast-int-other"),
        t.integrator_events(me),
        t.admin_request(me),
    ];
    let mut all = vec![t.integrator_events_get(me)];
    all.extend(forbidden);
    publish_then_marker(&int, &all, &t.integrator_events_get(me)).await;
    assert_eq!(
        received_until_marker(&mut listener_rx, "platform listener").await,
        vec![t.integrator_events_get(me), t.integrator_events_get(me)]
    );
    listening.cancel();

    // What it reads: events, progress, keys and its own answers; no machine topics.
    subscribe(&int, &mut int_rx, "#").await;
    let platform = f.platform().await;
    let forbidden = vec![
        t.status(&vm1),
        t.state(&vm1),
        t.online(&vm1),
        t.machine_release(&vm1, &app),
        t.command(&vm1),
        t.machine_chunks(&vm1),
        t.group_release(&GroupId::new("g1").unwrap(), &app),
        t.artifact_chunks(&ArtifactId::of(b"x")),
        t.admin_response(me),
        t.integrator_events("fleetcast-int-other"),
    ];
    let allowed = vec![
        t.events(),
        t.rollout_progress("r-1"),
        t.platform_keys(),
        t.integrator_events(me),
    ];
    let mut all = forbidden;
    all.extend(allowed.iter().cloned());
    publish_then_marker(&platform, &all, &t.events()).await;
    let mut expected = allowed;
    expected.push(t.events());
    assert_eq!(received_until_marker(&mut int_rx, me).await, expected);
}

#[tokio::test]
async fn an_operator_uses_only_the_admin_topics_of_its_own_client_id() {
    let Some(f) = Fleet::start() else { return };
    let t = &f.t;
    let vm1 = MachineId::new("vm-1").unwrap();
    let app = fleetcast_proto::Kind::new("app").unwrap();
    let me = "fleetcast-op-alice.s1";
    let (op, mut op_rx) = f.connect_as("fleetcast-op-alice", me, &f.shutdown).await;

    let listening = f.shutdown.child_token();
    let (_listener, mut listener_rx) = f.platform_listener(&listening).await;
    let forbidden = vec![
        t.admin_request("fleetcast-op-bob"),
        // Its bare username is another client id than the one it connected with.
        t.admin_request("fleetcast-op-alice"),
        t.admin_response(me),
        t.machine_release(&vm1, &app),
        t.command(&vm1),
        t.events(),
        t.integrator_events_get(me),
    ];
    let mut all = vec![t.admin_upload(me)];
    all.extend(forbidden);
    publish_then_marker(&op, &all, &t.admin_request(me)).await;
    assert_eq!(
        received_until_marker(&mut listener_rx, "platform listener").await,
        strings(&[
            "fleet/admin/fleetcast-op-alice.s1/upload",
            "fleet/admin/fleetcast-op-alice.s1/request"
        ])
    );
    listening.cancel();

    subscribe(&op, &mut op_rx, "#").await;
    let platform = f.platform().await;
    let forbidden = vec![
        t.admin_response("fleetcast-op-alice"),
        t.admin_response("fleetcast-op-bob"),
        t.admin_request(me),
        t.integrator_events(me),
        t.command(&vm1),
        t.status(&vm1),
    ];
    let allowed = vec![
        t.admin_response(me),
        t.events(),
        t.rollout_progress("r-1"),
        t.platform_keys(),
    ];
    let mut all = forbidden;
    all.extend(allowed.iter().cloned());
    publish_then_marker(&platform, &all, &t.events()).await;
    let mut expected = allowed;
    expected.push(t.events());
    assert_eq!(received_until_marker(&mut op_rx, me).await, expected);
}

#[tokio::test]
async fn a_machine_removed_from_the_files_is_disconnected_on_reload_and_refused_after() {
    let Some(f) = Fleet::start() else { return };
    let t = &f.t;
    let vm2 = MachineId::new("vm-2").unwrap();
    let (_vm1, mut vm1_rx) = f.connect_as("vm-1", "vm-1", &f.shutdown).await;
    let (vm2_c, mut vm2_rx) = f.connect_as("vm-2", "vm-2", &f.shutdown).await;
    subscribe(&vm2_c, &mut vm2_rx, &t.command(&vm2)).await;

    let kept: Vec<BrokerIdentity> = f
        .identities
        .iter()
        .filter(|i| i.principal.username() != "vm-1")
        .cloned()
        .collect();
    f.mosq.rewrite_files(&files(t, &kept)).unwrap();
    f.mosq.reload().unwrap();

    let dropped = client::wait_for(&mut vm1_rx, Duration::from_secs(5), |_| false).await;
    assert!(
        matches!(&dropped, Err(e) if !e.starts_with("nothing within")),
        "the revoked vm-1 stays connected after the reload: {dropped:?}\nmosquitto log:\n{}",
        f.mosq.log()
    );
    let mut o = client::options(&f.mosq.machine_url, "vm-1", None);
    o.set_credentials("vm-1", f.password("vm-1"));
    let (_c, mut rx) = connected_with(o, &f.shutdown);
    assert_refused(&mut rx, "vm-1 reconnecting after its removal").await;

    // Control: vm-2 (rehashed with a new salt, same password) stayed connected and served.
    let platform = f.platform().await;
    publish_then_marker(&platform, &[], &t.command(&vm2)).await;
    assert_eq!(
        received_until_marker(&mut vm2_rx, "vm-2").await,
        vec![t.command(&vm2)]
    );
}

#[tokio::test]
async fn a_changed_acl_applies_to_existing_subscriptions_on_reload() {
    let Some(f) = Fleet::start() else { return };
    let t = &f.t;
    let vm1 = MachineId::new("vm-1").unwrap();
    let app = fleetcast_proto::Kind::new("app").unwrap();
    let (g1, g2) = (
        t.group_release(&GroupId::new("g1").unwrap(), &app),
        t.group_release(&GroupId::new("g2").unwrap(), &app),
    );
    let (vm1_c, mut vm1_rx) = f.connect_as("vm-1", "vm-1", &f.shutdown).await;
    subscribe(&vm1_c, &mut vm1_rx, "#").await;
    let platform = f.platform().await;
    let both = [g1.clone(), g2.clone()];

    publish_then_marker(&platform, &both, &t.command(&vm1)).await;
    assert_eq!(
        received_until_marker(&mut vm1_rx, "vm-1 in g1").await,
        vec![g1.clone(), t.command(&vm1)]
    );

    // vm-1 moves from g1 to g2; same password.
    let mut moved = identities("g2");
    for i in &mut moved {
        i.password = f.password(&i.principal.username());
    }
    f.mosq.rewrite_files(&files(t, &moved)).unwrap();
    f.mosq.reload().unwrap();

    publish_then_marker(&platform, &both, &t.command(&vm1)).await;
    assert_eq!(
        received_until_marker(&mut vm1_rx, "vm-1 moved to g2, same connection").await,
        vec![g2, t.command(&vm1)]
    );
}
