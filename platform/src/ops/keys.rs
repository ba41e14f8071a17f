//! `key_rotate`, `mosquitto_config`: the platform key and the broker's credentials.
//!
//! Mosquitto's files hold ~0.7-2.5 KB per machine (a password hash and an ACL block), so a
//! 10,000-machine fleet's are several MB: more than one packet. Asked for pages, the platform
//! answers them by machine id, each about [`PAGE_BYTES`] of text at most, and the pages appended
//! in order are exactly the files generated whole.

use fleetcast_broker::mosquitto::{mosquitto_files, BrokerIdentity};
use fleetcast_proto::acl::Principal;
use fleetcast_proto::admin::MAX_MOSQUITTO_PAGE;
use fleetcast_proto::calls::{self, MosquittoFiles};
use fleetcast_proto::{MachineId, Topics};

use crate::context::Ctx;
use crate::inventory::{off_thread, PAGE_BYTES};
use crate::keys::Keys;
use crate::ops::OpError;
use crate::publish;
use crate::store::Store;

pub async fn rotate(ctx: &Ctx, _: calls::KeyRotate) -> Result<String, OpError> {
    let generation = publish::rotate_key(ctx).await?;
    Ok(format!(
        "platform key rotated to generation {generation}; machines follow the announced chain"
    ))
}

/// The whole files (no `after` or `limit`: what a CLI from before paging asks), or one page.
/// Hashing a password takes a while, so this runs off the async threads.
pub async fn mosquitto_config(
    ctx: &Ctx,
    c: calls::MosquittoConfig,
) -> Result<MosquittoFiles, OpError> {
    let page = match (&c.after, c.limit) {
        (None, None) => None,
        (_, limit) => Some((
            limit
                .unwrap_or(MAX_MOSQUITTO_PAGE)
                .clamp(1, MAX_MOSQUITTO_PAGE) as usize,
            PAGE_BYTES,
        )),
    };
    let topics = ctx.topics.clone();
    let keys = ctx.keys();
    off_thread(&ctx.store, move |store| {
        mosquitto_page(store, &topics, &keys, c.after.as_ref(), page)
    })
    .await
}

/// The users before the machines: the platform, operators, integrators.
fn service_identities(store: &dyn Store, keys: &Keys) -> Result<Vec<BrokerIdentity>, OpError> {
    let mut out = vec![BrokerIdentity {
        principal: Principal::Platform,
        password: keys.platform_mqtt_password(),
    }];
    for op in store.operators()? {
        out.push(BrokerIdentity {
            principal: Principal::Operator {
                name: op.info.name.clone(),
                role: op.role(),
            },
            password: op.secret.mqtt_password(),
        });
    }
    for int in store.integrators()? {
        out.push(BrokerIdentity {
            principal: Principal::Integrator { name: int.name },
            password: int.secret.mqtt_password(),
        });
    }
    Ok(out)
}

/// Bytes of `text` inside a JSON string: each newline is written `\n`.
fn json_text_len(text: &str) -> usize {
    text.len() + text.bytes().filter(|b| *b == b'\n').count()
}

/// The files for machines after `after` (the service's own users and the ACL header first when
/// `after` is None), at most `page = (machines, bytes of text)` (at least one machine), or
/// everything without `page`. Revoked machines, and machines without a secret, have no user.
pub fn mosquitto_page(
    store: &dyn Store,
    topics: &Topics,
    keys: &Keys,
    after: Option<&MachineId>,
    page: Option<(usize, usize)>,
) -> Result<MosquittoFiles, OpError> {
    let refused =
        |e: fleetcast_broker::mosquitto::MosquittoFilesError| OpError::Refused(e.to_string());
    let (limit, budget) = page.unwrap_or((usize::MAX, usize::MAX));
    // Generated per machine, each machine's ACL file is this header and its block.
    let header = mosquitto_files(topics, &[]).map_err(refused)?.acl;
    let (mut passwd, mut acl) = match after {
        Some(_) => (String::new(), String::new()),
        None => {
            let service =
                mosquitto_files(topics, &service_identities(store, keys)?).map_err(refused)?;
            (service.passwd, service.acl)
        }
    };
    let mut used = json_text_len(&passwd) + json_text_len(&acl);
    let (mut machines, mut next, mut more) = (0, after.cloned(), false);
    for m in store.machines_after(after) {
        let m = m?;
        if m.revoked_at_ms.is_some() {
            continue;
        }
        let Some(secret) = store.secret(&m.id)? else {
            continue;
        };
        if machines >= limit {
            more = true;
            break;
        }
        let user = BrokerIdentity {
            principal: Principal::Machine {
                id: m.id.clone(),
                groups: m.groups,
            },
            password: secret.mqtt_password(),
        };
        let one = mosquitto_files(topics, &[user]).map_err(refused)?;
        let block = one
            .acl
            .strip_prefix(header.as_str())
            .expect("an ACL file starts with its header");
        let size = json_text_len(&one.passwd) + json_text_len(block);
        if machines > 0 && used + size > budget {
            more = true;
            break;
        }
        passwd.push_str(&one.passwd);
        acl.push_str(block);
        used += size;
        machines += 1;
        next = Some(m.id);
    }
    Ok(MosquittoFiles {
        passwd,
        acl,
        next: page.and(next),
        more,
    })
}

#[cfg(test)]
mod tests {
    use fleetcast_proto::admin::MachineInfo;
    use fleetcast_proto::auth::Secret;
    use fleetcast_proto::GroupId;

    use super::*;

    fn m(s: &str) -> MachineId {
        MachineId::new(s).unwrap()
    }

    /// Machines `vm-000`..`vm-{n-1}` in group `g`, each with a secret; `vm-001` revoked.
    fn fleet(ctx: &Ctx, n: usize) {
        ctx.store.transaction(|rec| {
            for i in 0..n {
                let id = m(&format!("vm-{i:03}"));
                let mut info = MachineInfo::new(id.clone(), 1);
                info.groups = vec![GroupId::new("g").unwrap()];
                if i == 1 {
                    info.revoked_at_ms = Some(2);
                }
                rec.put_machine(&info).unwrap();
                rec.put_secret(&id, &Secret::from_bytes([i as u8; 32]))
                    .unwrap();
            }
        });
    }

    /// The users of a password file, in order.
    fn users(passwd: &str) -> Vec<&str> {
        passwd
            .lines()
            .map(|l| l.split(':').next().unwrap())
            .collect()
    }

    #[test]
    fn pages_appended_in_order_are_the_files_generated_whole() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        fleet(&ctx, 7);
        let keys = ctx.keys();
        let whole = mosquitto_page(&*ctx.store, &ctx.topics, &keys, None, None).unwrap();
        assert_eq!((whole.next.as_ref(), whole.more), (None, false));
        let (mut passwd, mut acl, mut after, mut pages) = (String::new(), String::new(), None, 0);
        loop {
            let page = mosquitto_page(
                &*ctx.store,
                &ctx.topics,
                &keys,
                after.as_ref(),
                Some((2, 1 << 20)),
            )
            .unwrap();
            passwd.push_str(&page.passwd);
            acl.push_str(&page.acl);
            pages += 1;
            if !page.more {
                break;
            }
            after = Some(page.next.expect("a page to continue has a cursor"));
        }
        // vm-001 is revoked: six machines, two a page.
        assert_eq!(pages, 3);
        assert_eq!(acl, whole.acl);
        assert_eq!(users(&passwd), users(&whole.passwd));
        assert_eq!(
            users(&passwd),
            [
                "fleetcast-platform",
                "fleetcast-op-admin",
                "vm-000",
                "vm-002",
                "vm-003",
                "vm-004",
                "vm-005",
                "vm-006"
            ]
        );
        // The first page carries the header and the service's users; later ones only machines.
        let first =
            mosquitto_page(&*ctx.store, &ctx.topics, &keys, None, Some((2, 1 << 20))).unwrap();
        assert!(first.acl.starts_with("# Generated by fleetcast"));
        assert_eq!(first.next, Some(m("vm-002")));
        let second = mosquitto_page(
            &*ctx.store,
            &ctx.topics,
            &keys,
            Some(&m("vm-002")),
            Some((2, 1 << 20)),
        )
        .unwrap();
        assert!(second.acl.starts_with("\nuser vm-003\n"), "{}", second.acl);
        assert_eq!(users(&second.passwd), ["vm-003", "vm-004"]);
    }

    #[test]
    fn a_page_ends_at_its_byte_budget_but_holds_at_least_one_machine() {
        let (_dir, _eventloop, ctx) = Ctx::for_tests_in_temp_dir();
        fleet(&ctx, 5);
        let keys = ctx.keys();
        let tiny = mosquitto_page(&*ctx.store, &ctx.topics, &keys, None, Some((1000, 1))).unwrap();
        assert_eq!(
            users(&tiny.passwd).len(),
            3,
            "two service users, one machine"
        );
        assert!(tiny.more);
        let one_machine = mosquitto_page(
            &*ctx.store,
            &ctx.topics,
            &keys,
            Some(&m("vm-000")),
            Some((1000, 1)),
        )
        .unwrap();
        assert_eq!(users(&one_machine.passwd), ["vm-002"]);
        let bytes = json_text_len(&one_machine.passwd) + json_text_len(&one_machine.acl);
        let two = mosquitto_page(
            &*ctx.store,
            &ctx.topics,
            &keys,
            Some(&m("vm-000")),
            Some((1000, 2 * bytes)),
        )
        .unwrap();
        assert_eq!(users(&two.passwd), ["vm-002", "vm-003"]);
        // Past the last machine: an empty last page that stays where it was asked to start.
        let past = mosquitto_page(
            &*ctx.store,
            &ctx.topics,
            &keys,
            Some(&m("vm-9")),
            Some((10, 1)),
        )
        .unwrap();
        assert_eq!((past.passwd.as_str(), past.acl.as_str()), ("", ""));
        assert_eq!((past.next, past.more), (Some(m("vm-9")), false));
    }
}
