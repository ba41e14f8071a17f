//! Every admin and integrator reply stays within one packet however large the fleet: each test
//! builds the case where the reply from before would have been over the 2 MiB limit (shown by
//! asking the old way, or by adding up what the old reply held) and shows that the operation
//! works: counts with bounded lists, or pages the CLI joins.

use fleetcast_broker::mosquitto::{mosquitto_files, BrokerIdentity};
use fleetcast_platform::cli::identity::mosquitto_files_all;
use fleetcast_platform::cli::release::plan_all;
use fleetcast_proto::acl::{Principal, Role};
use fleetcast_proto::admin::{FleetEvent, MachineSpec, MAX_PLAN_PAGE, RELEASE_MACHINES_SHOWN};
use fleetcast_proto::auth::MAX_JSON_MESSAGE;
use fleetcast_proto::events::{EventBatch, EventsRequest};
use fleetcast_proto::rollout::{WavePlan, ROLLOUT_ORDER_SHOWN};

use super::cli::Fleetcast;
use super::security::add_integrator;
use super::*;

/// A 64-character machine id, the longest there is: the fleet below is the worst case per
/// machine, so a few thousand machines make replies of what 50,000 short ids would.
fn long_id(i: usize) -> MachineId {
    m(&format!("vm-{i:061}"))
}

/// The `n`th 64-character group id.
fn long_group(n: usize) -> GroupId {
    g(&format!("group-{n:02}-{}", "x".repeat(55)))
}

/// Provisions `ids` in `groups`: up to 1,000 a call (the most one `machine_provision_batch`
/// takes), fewer with many groups (a request is at most 256 KiB).
pub(super) async fn provision_all(admin: &AdminClient, ids: &[MachineId], groups: &[GroupId]) {
    let per_call = (150_000 / (100 + 70 * groups.len())).min(1000);
    for batch in ids.chunks(per_call) {
        let specs = batch
            .iter()
            .map(|id| MachineSpec {
                machine: id.clone(),
                groups: groups.to_vec(),
            })
            .collect();
        admin
            .call(calls::MachineProvisionBatch {
                machines: specs,
                rotate: false,
            })
            .await
            .unwrap();
    }
}

/// Bytes of `value` sealed for an operator in its response envelope (base64 of a 24-byte
/// nonce, the response JSON and a 16-byte tag, and the envelope): what would be published.
fn sealed_len<T: serde::Serialize>(value: &T) -> usize {
    let json = serde_json::to_vec(value).unwrap().len() + 40;
    json.div_ceil(3) * 4 + 64
}

/// The most a sealed response may be: a 2 MiB packet, less its header and topic.
const PACKET: usize = 2 * 1024 * 1024;

/// The size the platform names in its error for a reply over the limit: `reply of N bytes to
/// <op> is over the 2 MiB packet limit; ask for pages …`.
fn refused_bytes(err: &AdminError, op: &str) -> usize {
    let AdminError::Refused(text) = err else {
        panic!("expected the platform's error, got {err}")
    };
    assert!(
        text.starts_with("reply of ")
            && text.contains(&format!(
                "bytes to {op} is over the 2 MiB packet limit; ask for pages"
            )),
        "{text}"
    );
    text["reply of ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Machines in the Mosquitto test: at ~2.2 KB of password and ACL text each (a 64-character id
/// in ten 64-character groups), the files are ~1.75 MB of JSON, 2.3 MB sealed: as one reply,
/// over the limit. (Each generation hashes every password: more machines are slow to test.)
const MOSQUITTO_MACHINES: usize = 800;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_files_for_a_large_fleet_come_in_pages_that_append_to_the_whole_files() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let groups: Vec<GroupId> = (0..10).map(long_group).collect();
    let ids: Vec<MachineId> = (0..MOSQUITTO_MACHINES).map(long_id).collect();
    provision_all(&admin, &ids, &groups).await;
    revoke(&admin, long_id(7).as_str()).await;

    // Asked the old way (no page), the files do not fit a reply: the platform says so.
    let err = admin
        .request_with_timeout(
            AdminOp::MosquittoConfig {
                after: None,
                limit: None,
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    let whole = refused_bytes(&err, "mosquitto_config");
    assert!(whole > PACKET, "{whole} bytes");
    eprintln!("mosquitto_config, {MOSQUITTO_MACHINES} machines unpaged: {whole} bytes sealed");

    // In pages (so more than one), appended: exactly the files generated whole. Passwords
    // hash with fresh salts, so the ACL is compared whole and the password file by user.
    let files = mosquitto_files_all(&admin, None).await.unwrap();
    let mut everyone = vec![
        BrokerIdentity {
            principal: Principal::Platform,
            password: "-".into(),
        },
        BrokerIdentity {
            principal: Principal::Operator {
                name: "admin".into(),
                role: Role::Admin,
            },
            password: "-".into(),
        },
    ];
    everyone.extend(
        ids.iter()
            .filter(|id| **id != long_id(7))
            .map(|id| BrokerIdentity {
                principal: Principal::Machine {
                    id: id.clone(),
                    groups: groups.clone(),
                },
                password: "-".into(),
            }),
    );
    let expected = mosquitto_files(&Topics::default(), &everyone).unwrap();
    assert!(files.acl == expected.acl, "the paged ACL differs");
    let users = |passwd: &str| -> Vec<String> {
        passwd
            .lines()
            .map(|l| l.split(':').next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(users(&files.passwd), users(&expected.passwd));
    assert_eq!(users(&files.passwd).len(), 2 + MOSQUITTO_MACHINES - 1);
    assert!(files
        .passwd
        .lines()
        .all(|l| l.split(':').nth(1).unwrap().starts_with("$7$101$")));

    // `fleetcast broker mosquitto-config` writes the files from the pages.
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    let out = dir.path().join("mosquitto");
    let run = fc
        .run(&["broker", "mosquitto-config", "--out", out.to_str().unwrap()])
        .await
        .ok();
    assert!(run.starts_with("wrote "), "{run}");
    let acl = std::fs::read_to_string(out.join("fleetcast.acl")).unwrap();
    assert!(acl == expected.acl, "the ACL file the CLI wrote differs");
    // The password file in two: the machines' listener loads one, the service listener the
    // other (both in fleetcast.conf, with the machines' client ids tied to their usernames).
    let services = std::fs::read_to_string(out.join("fleetcast.passwd")).unwrap();
    let machines = std::fs::read_to_string(out.join("fleetcast-machines.passwd")).unwrap();
    assert!(users(&services).iter().all(|u| u.starts_with("fleetcast-")));
    assert!(!users(&machines).is_empty());
    assert!(users(&machines)
        .iter()
        .all(|u| !u.starts_with("fleetcast-")));
    assert_eq!(
        [users(&services), users(&machines)].concat(),
        users(&expected.passwd)
    );
    let conf = std::fs::read_to_string(out.join("fleetcast.conf")).unwrap();
    let machines_block = conf.split("listener 8883\n").nth(1).unwrap();
    let machines_block = machines_block.split("listener ").next().unwrap();
    assert!(
        machines_block.contains("fleetcast-machines.passwd")
            && machines_block.contains("use_username_as_clientid true"),
        "{conf}"
    );
    assert!(conf.contains("listener 1883 127.0.0.1\n"), "{conf}");
    // The audit log has each export once (its first page), and the refused one.
    let exports = audit(&admin)
        .await
        .into_iter()
        .filter(|e| e.action == "mosquitto_config")
        .count();
    assert_eq!(exports, 3);

    admin.close().await;
    platform.stop().await;
}

/// Machines in the plan test: as the old reply, a staged plan listing all of them by
/// 64-character id and group, and its rollout's order, was ~1.7 MB of JSON, 2.3 MB sealed.
const PLAN_MACHINES: usize = 8000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_release_to_a_large_fleet_answers_counts_and_bounded_lists() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let group = long_group(0);
    let ids: Vec<MachineId> = (0..PLAN_MACHINES).map(long_id).collect();
    provision_all(&admin, &ids, std::slice::from_ref(&group)).await;
    upload(&admin, dir.path(), "a.bin", &data(100, 3), "1.0")
        .await
        .unwrap();
    let created = create_release(&admin, &app(), "1.0", InstallPolicy::Immediate).await;
    let ask = calls::ReleasePlan {
        release: created.id.clone(),
        machines: vec![],
        groups: vec![group.clone()],
        allow_empty: false,
        after: None,
        limit: Some(MAX_PLAN_PAGE),
    };

    // The plan: every count, the first page of targets; a page asked for after a machine.
    let first = admin.call(ask.clone()).await.unwrap();
    assert_eq!(first.target_count(), PLAN_MACHINES);
    assert_eq!(first.topic_count(), 1);
    assert_eq!(
        first.via.as_deref().unwrap(),
        [fleetcast_proto::admin::GroupCount {
            group: Some(group.clone()),
            machines: PLAN_MACHINES as u32
        }]
    );
    let page: Vec<&MachineId> = first.plan.targets.iter().map(|(m, _)| m).collect();
    assert_eq!(
        page,
        ids[..MAX_PLAN_PAGE as usize].iter().collect::<Vec<_>>()
    );
    assert_eq!((first.next.as_ref(), first.more), (Some(&ids[999]), true));
    let last = admin
        .call(calls::ReleasePlan {
            after: Some(ids[PLAN_MACHINES - 3].clone()),
            ..ask.clone()
        })
        .await
        .unwrap();
    let page: Vec<&MachineId> = last.plan.targets.iter().map(|(m, _)| m).collect();
    assert_eq!(page, ids[PLAN_MACHINES - 2..].iter().collect::<Vec<_>>());
    assert!(!last.more);

    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    // The plan `release publish` shows before asking (unconfirmed, it publishes nothing;
    // before the rollout below, which refuses a publish without waves):
    // the counts and the first machines.
    let run = fc
        .run(&[
            "release",
            "publish",
            created.id.as_str(),
            "--groups",
            group.as_str(),
        ])
        .await;
    assert!(run.stderr.contains("pass --yes"), "{run:#?}");
    assert!(
        run.stdout.contains(&format!(
            "target machines: {PLAN_MACHINES}\n  {PLAN_MACHINES}  via group {group}\n"
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("  and 7990 more (--list shows all)\n"),
        "{}",
        run.stdout
    );

    // Published in waves: the reply counts the first wave's notices and every target, and
    // lists a bounded part of each.
    let waves = WavePlan::new(vec![100], 9500, 500, 0).unwrap();
    let published = admin
        .call(calls::ReleasePublish {
            release: created.id.clone(),
            machines: vec![],
            groups: vec![group.clone()],
            allow_empty: false,
            waves: Some(waves),
        })
        .await
        .unwrap();
    assert_eq!(published.target_count(), PLAN_MACHINES);
    assert_eq!(published.topic_count(), PLAN_MACHINES / 100);
    let rollout = published.plan.rollout.as_ref().unwrap();
    assert_eq!(rollout.order.len(), ROLLOUT_ORDER_SHOWN);
    assert_eq!(published.plan.targets.len(), MAX_PLAN_PAGE as usize);
    // What the reply held before: every target and the whole order.
    let old = fleetcast_proto::admin::PublishPlan {
        targets: ids
            .iter()
            .map(|m| (m.clone(), Some(group.clone())))
            .collect(),
        rollout: Some(fleetcast_proto::rollout::RolloutInfo {
            order: ids.clone(),
            ..rollout.clone()
        }),
        ..published.plan.clone()
    };
    let (was, now) = (sealed_len(&old), sealed_len(&published));
    eprintln!(
        "release_publish --waves to {PLAN_MACHINES} machines: {was} bytes sealed before, {now} now"
    );
    assert!(was > PACKET && now < PACKET / 4, "{was} -> {now}");

    // The rollout: its order cut, its size counted, whichever call answers it.
    let followed = admin
        .call(calls::RolloutStatus {
            release: created.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(followed.targets(), PLAN_MACHINES);
    assert_eq!(followed.rollout.order, rollout.order);
    let paused = admin
        .call(calls::RolloutPause {
            release: created.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        (paused.targets(), paused.rollout.order.len()),
        (PLAN_MACHINES, ROLLOUT_ORDER_SHOWN)
    );
    let text = fc
        .run(&["rollout", "status", created.id.as_str()])
        .await
        .ok();
    assert!(
        text.contains(&format!(
            "wave 1 of 2: 80 of {PLAN_MACHINES} machines notified"
        )),
        "{text}"
    );

    admin.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_release_pages_join_whole_and_many_named_machines_are_counted() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let Env {
        dir,
        data_dir,
        platform,
        admin,
    } = env(&url).await;
    let ids: Vec<MachineId> = (0..150).map(|i| m(&format!("vm-{i:03}"))).collect();
    provision_all(&admin, &ids[..100], &[g("a")]).await;
    provision_all(&admin, &ids[100..], &[g("b")]).await;
    upload(&admin, dir.path(), "a.bin", &data(100, 5), "1.0")
        .await
        .unwrap();
    let created = create_release(&admin, &app(), "1.0", InstallPolicy::DownloadOnly).await;

    // A plan in pages of 7, joined: every target once, in id order, each with its group.
    let ask = calls::ReleasePlan {
        release: created.id.clone(),
        machines: ids[140..].to_vec(),
        groups: vec![g("a"), g("b")],
        allow_empty: false,
        after: None,
        limit: Some(7),
    };
    let whole = plan_all(&admin, ask.clone(), None).await.unwrap();
    assert_eq!((whole.next.as_ref(), whole.more), (None, false));
    let expected: Vec<(MachineId, Option<GroupId>)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let via = match i {
                0..=99 => Some(g("a")),
                100..=139 => Some(g("b")),
                _ => None,
            };
            (id.clone(), via)
        })
        .collect();
    assert_eq!(whole.plan.targets, expected);
    assert_eq!((whole.target_count(), whole.topic_count()), (150, 12));
    let text = fleetcast_platform::cli::release::plan_text(&whole, &[g("a"), g("b")], true);
    assert!(
        text.contains(
            "target machines: 150\n  100  via group a\n   40  via group b\n   10  named directly\n"
        ),
        "{text}"
    );
    assert_eq!(text.lines().filter(|l| l.starts_with("  vm-")).count(), 150);
    // Asked as before paging (no `after`, no `limit`): the whole plan at once.
    let unpaged = admin
        .call(calls::ReleasePlan { limit: None, ..ask })
        .await
        .unwrap();
    assert_eq!(unpaged.plan.targets, expected);
    assert!(!unpaged.more);

    // A release named to 150 machines names its first 100 in every reply.
    let named: Vec<&str> = ids.iter().map(|m| m.as_str()).collect();
    let published = publish(&admin, &created.id, &named, &[]).await;
    assert_eq!(published.release.machines.len(), RELEASE_MACHINES_SHOWN);
    assert_eq!(published.topics.len(), 150);
    let status = status(&admin, &created.id).await;
    assert_eq!(status.release.machines, published.release.machines);
    assert_eq!(status.targets.len(), 150);
    // `activate` names the first 20 and counts the others.
    let activated = admin
        .call(calls::Activate {
            release: created.id.clone(),
            machines: vec![],
            groups: vec![],
        })
        .await
        .unwrap();
    let start = format!(
        "activate {} sent to 150 machine(s): vm-000, vm-001,",
        created.id
    );
    assert!(activated.starts_with(&start), "{activated}");
    assert!(activated.ends_with(", vm-019 and 130 more"), "{activated}");

    // Releases in pages, joined by the CLI.
    let second = release(&admin, "1.0", &["vm-000"], &[]).await.release;
    let page = admin
        .call(calls::ReleaseQuery {
            after: None,
            limit: Some(1),
        })
        .await
        .unwrap();
    let listed: Vec<&ReleaseId> = page.items.iter().map(|r| &r.id).collect();
    assert_eq!(listed, [&created.id]);
    assert_eq!((page.next.as_ref(), page.more), (Some(&created.id), true));
    let page = admin
        .call(calls::ReleaseQuery {
            after: page.next,
            limit: Some(1),
        })
        .await
        .unwrap();
    let listed: Vec<&ReleaseId> = page.items.iter().map(|r| &r.id).collect();
    assert_eq!((listed, page.more), (vec![&second.id], false));
    // `release_list`, as before paging: every release at once, each naming few machines.
    let all = admin.call(calls::ReleaseList {}).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].machines.len(), RELEASE_MACHINES_SHOWN);
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    let list = fc.run(&["release", "list", "--json"]).await.json();
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [created.id.as_str(), second.id.as_str()]);
    let text = fc.run(&["release", "list"]).await.ok();
    assert!(text.contains(" 100+ machines\n"), "{text}");
    assert!(text.contains(" vm-000\n"), "{text}");

    admin.close().await;
    platform.stop().await;
}

/// Large events: each one's error and detail are 90,000 characters as sent (a machine's
/// message may be 256 KiB), kept as 4 KiB each by ingest; 300 of them are 2.5 MB of JSON, 3.3
/// MB sealed as one page.
const BIG_EVENTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_and_audit_entries_come_in_pages_and_integrator_batches_that_fit() {
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
    upload(&admin, dir.path(), "a.bin", &data(3000, 4), "1.0")
        .await
        .unwrap();
    let mut vm = provision(&admin, &url, "vm-001", &[]).await;
    let r = release(&admin, "1.0", &["vm-001"], &[]).await.release;
    let error = "x".repeat(90_000);
    for _ in 0..BIG_EVENTS {
        let mut ev = vm.status(Some(&r.id), "1.0", Phase::Downloading);
        ev.error = Some(error.clone());
        ev.detail = Some(error.clone());
        vm.send_status(&ev).await;
    }
    let kept = format!("{} [{} bytes cut]", &error[..4096], 90_000 - 4096);
    // `fleetcast events` reads them in pages.
    let all_events = || async {
        let mut all: Vec<FleetEvent> = Vec::new();
        let mut since = 0;
        loop {
            let page = admin
                .call(calls::EventsSince { since, limit: None })
                .await
                .unwrap();
            assert!(!page.items.is_empty() || !page.more);
            assert!(sealed_len(&page.items) < PACKET);
            all.extend(page.items);
            since = page.next;
            if !page.more {
                break all;
            }
        }
    };
    let stored = poll_until(WAIT, "every large event stored", all_events, |all| {
        all.len() >= BIG_EVENTS
    })
    .await;
    assert_eq!(stored.len(), BIG_EVENTS);
    assert!(stored
        .iter()
        .all(|e| e.error.as_deref() == Some(&kept) && e.detail.as_deref() == Some(&kept)));
    let ids: Vec<u64> = stored.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let was = sealed_len(&stored);
    eprintln!("events_since, {BIG_EVENTS} events of 8 KB: {was} bytes sealed in one page before");
    assert!(was > PACKET);
    let page = admin
        .call(calls::EventsSince {
            since: 0,
            limit: Some(500),
        })
        .await
        .unwrap();
    assert!(
        page.more && page.items.len() < BIG_EVENTS,
        "{}",
        page.items.len()
    );

    // An integrator catching up: signed batches of at most 256 KiB, what `verify` accepts (as
    // one batch of up to 500 events, these were 2.5 MB: refused by every integrator).
    let client = integrator.username.clone();
    let mut int = peer_with(&url, &client, Some(&integrator.password)).await;
    let answers = format!("fleet/integrators/{client}/events");
    int.subscribe(&answers).await;
    let (mut caught_up, mut since, mut batches) = (Vec::new(), 0, 0);
    loop {
        let ask = serde_json::to_vec(&EventsRequest { since, limit: None }).unwrap();
        int.client
            .publish(format!("{answers}/get"), QoS::AtLeastOnce, false, ask)
            .await
            .unwrap();
        let p = int.next(|p| p.topic == answers).await;
        assert!(
            p.payload.len() <= MAX_JSON_MESSAGE,
            "{} bytes",
            p.payload.len()
        );
        let batch: EventBatch = key.verify(Purpose::EventBatch, &p.payload).unwrap();
        assert_eq!(batch.since, since);
        batches += 1;
        caught_up.extend(batch.events);
        since = batch.next;
        if !batch.more {
            break;
        }
    }
    assert_eq!(caught_up, stored);
    let json = serde_json::to_vec(&stored).unwrap().len();
    assert!(
        batches >= json / MAX_JSON_MESSAGE,
        "{batches} batches of {json} bytes"
    );

    // Audit entries hold the request: eight refused publishes naming 12,000 machines each
    // (and the error naming them back) are ~300 KB an entry.
    let unknown: Vec<MachineId> = (0..12_000).map(|i| m(&format!("nm-{i:05}"))).collect();
    for _ in 0..8 {
        let refused = admin
            .call(calls::ReleasePublish {
                release: r.id.clone(),
                machines: unknown.clone(),
                groups: vec![],
                allow_empty: false,
                waves: None,
            })
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("unknown machine"), "{refused}");
    }
    let fc = Fleetcast::new(dir.path())
        .with("FLEETCAST_DATA", &data_dir)
        .with("FLEETCAST_BROKER", url.to_string());
    let audit = fc.run(&["audit", "--json"]).await.json();
    let entries = audit.as_array().unwrap();
    let refusals = entries
        .iter()
        .filter(|e| {
            e["action"] == "release_publish"
                && e["result"].as_str().unwrap().starts_with("unknown machine")
        })
        .count();
    assert_eq!(refusals, 8);
    let was = sealed_len(entries);
    eprintln!("audit with 8 large entries: {was} bytes sealed in one page before");
    assert!(was > PACKET);
    let page = admin
        .call(calls::Audit {
            since: 0,
            limit: None,
        })
        .await
        .unwrap();
    assert!(page.more && page.items.len() < entries.len());

    admin.close().await;
    platform.stop().await;
}
