//! Who may talk to the platform: operators (with roles), integrators (read-only), machines
//! (revocation). Every identity has its own secret; the broker password derives from it, so
//! the broker never holds a secret, and revoking one identity touches no other.

use fleetcast_proto::acl::{integrator_username, validate_name, Principal, Role};
use fleetcast_proto::admin::{
    IntegratorProfile, MachineInfo, MachineSpec, OperatorInfo, OperatorProfile, ProvisionedMachine,
    MAX_GROUPS_BATCH, MAX_PROVISION_BATCH,
};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::command::CommandAction;
use fleetcast_proto::{GroupId, MachineId};
use rand::RngCore;

use crate::context::Ctx;
use crate::keys::Keys;
use crate::now_ms;
use crate::ops::{refused, OpError};
use crate::store::{IntegratorRecord, OperatorRecord, Reads, Store, StoreError};

/// Name of the operator every platform starts with; its secret is `<data>/admin.secret`.
pub const BOOTSTRAP_OPERATOR: &str = fleetcast_broker::admin::BOOTSTRAP_OPERATOR;

fn random_secret() -> Secret {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    Secret::from_bytes(b)
}

/// Creates the first admin operator from `admin.secret` on the platform's first start (once:
/// an operator revoked later is not brought back by a restart).
pub fn ensure_bootstrap_admin(store: &dyn Store, keys: &Keys) -> Result<(), StoreError> {
    let created = store.transaction(|tx| {
        if tx.bootstrapped()? {
            return Ok(false);
        }
        if tx.operator(BOOTSTRAP_OPERATOR)?.is_none() {
            tx.put_operator(&OperatorRecord {
                info: OperatorInfo {
                    name: BOOTSTRAP_OPERATOR.into(),
                    role: Role::Admin,
                    created_at_ms: now_ms(),
                    created_by: "platform".into(),
                },
                secret: keys.admin.clone(),
            })?;
        }
        tx.set_bootstrapped()?;
        Ok(true)
    })?;
    if created {
        store.flush()?;
    }
    Ok(())
}

pub async fn operator_add(
    ctx: &Ctx,
    by: &str,
    name: String,
    role: Role,
) -> Result<OperatorProfile, OpError> {
    validate_name(&name).map_err(OpError::Refused)?;
    let rec = ctx.store.transaction(|tx| {
        if tx.operator(&name)?.is_some() {
            return refused(format!("operator {name} exists already"));
        }
        let rec = OperatorRecord {
            info: OperatorInfo {
                name: name.clone(),
                role,
                created_at_ms: now_ms(),
                created_by: by.to_owned(),
            },
            secret: random_secret(),
        };
        tx.put_operator(&rec)?;
        Ok(rec)
    })?;
    ctx.store.flush_async().await?;
    Ok(OperatorProfile {
        operator: name,
        role,
        secret: rec.secret,
        platform_key: ctx.keys().public,
        topic_prefix: ctx.topics.prefix().to_owned(),
    })
}

pub async fn operator_revoke(ctx: &Ctx, name: &str) -> Result<String, OpError> {
    ctx.store.transaction(|tx| {
        let Some(rec) = tx.operator(name)? else {
            return refused(format!("unknown operator {name}"));
        };
        let admins = tx
            .operators()?
            .into_iter()
            .filter(|o| o.role() == Role::Admin)
            .count();
        if rec.role() == Role::Admin && admins <= 1 {
            return refused(format!(
                "operator {name} is the last admin; add another admin first"
            ));
        }
        tx.remove_operator(name)?;
        Ok(())
    })?;
    ctx.store.flush_async().await?;
    let closed = ctx.sessions.close_sessions(
        &Principal::Operator {
            name: name.to_owned(),
            role: Role::Viewer,
        }
        .username(),
    );
    Ok(format!(
        "operator {name} revoked ({closed} broker session(s) closed)"
    ))
}

/// Creates an integrator; one that exists is refused unless `rotate`, as for machines: adding
/// a name twice by mistake must not cut a working integrator off. With `rotate`, it gets a new
/// secret and the old password stops working at once: the broker refuses it at its next
/// connect, its live sessions on the embedded broker are closed now, and the platform answers
/// no event request of the old session (the request topic is checked against the store).
pub async fn integrator_add(
    ctx: &Ctx,
    by: &str,
    name: String,
    rotate: bool,
) -> Result<IntegratorProfile, OpError> {
    validate_name(&name).map_err(OpError::Refused)?;
    let (rec, rotated) = ctx.store.transaction(|tx| {
        let existed = tx.integrator(&name)?.is_some();
        if existed && !rotate {
            return refused(format!(
                "integrator {name} exists already; to give it a new password (the old one stops working at once): fleetcast integrator add {name} --rotate"
            ));
        }
        let rec = IntegratorRecord {
            name: name.clone(),
            secret: random_secret(),
            created_at_ms: now_ms(),
            created_by: by.to_owned(),
        };
        tx.put_integrator(&rec)?;
        Ok((rec, existed))
    })?;
    ctx.store.flush_async().await?;
    if rotated {
        let closed = ctx.sessions.close_sessions(&integrator_username(&name));
        tracing::info!(integrator = %name, closed, "integrator secret rotated; the old password no longer connects");
    }
    let keys = ctx.keys();
    Ok(IntegratorProfile {
        username: integrator_username(&name),
        password: rec.secret.mqtt_password(),
        name,
        platform_key: keys.public,
        platform_key_gen: keys.generation(),
        topic_prefix: ctx.topics.prefix().to_owned(),
    })
}

/// Removes an integrator: its password stops working (the broker refuses it at its next
/// connect, and the platform answers no request of its), its live broker sessions are closed
/// now, as `operator_revoke` does, and its name may be added again.
pub async fn integrator_revoke(ctx: &Ctx, name: &str) -> Result<String, OpError> {
    ctx.store.transaction(|tx| {
        if !tx.remove_integrator(name)? {
            return refused(format!("unknown integrator {name}"));
        }
        Ok(())
    })?;
    ctx.store.flush_async().await?;
    let closed = ctx.sessions.close_sessions(&integrator_username(name));
    Ok(format!(
        "integrator {name} revoked: its password no longer connects ({closed} broker session(s) closed)"
    ))
}

/// Why `machine_provision_batch` with `specs` would be refused, if it would: too many, a
/// reserved id, or (without `rotate`) machines that exist already.
fn provision_refusal<S: Reads + ?Sized>(
    store: &S,
    specs: &[MachineSpec],
    rotate: bool,
) -> Result<(), OpError> {
    if specs.len() > MAX_PROVISION_BATCH {
        return refused(format!(
            "{} machines in one request; at most {MAX_PROVISION_BATCH}",
            specs.len()
        ));
    }
    if let Some(s) = specs
        .iter()
        .find(|s| s.machine.as_str().starts_with("fleetcast-"))
    {
        return refused(format!(
            "machine id {} is reserved: ids starting with fleetcast- are operator and platform clients; nothing in this batch was changed",
            s.machine
        ));
    }
    if !rotate {
        let mut existing = Vec::new();
        for s in specs {
            if store.machine(&s.machine)?.is_some() {
                existing.push(s.machine.to_string());
            }
        }
        if !existing.is_empty() {
            return refused(exists_already(&existing));
        }
    }
    Ok(())
}

/// Whether provisioning `specs` would be accepted now; changes nothing.
pub fn provision_check(ctx: &Ctx, specs: &[MachineSpec], rotate: bool) -> Result<String, OpError> {
    provision_refusal(&*ctx.store, specs, rotate)?;
    Ok(format!("{} machine(s) may be provisioned", specs.len()))
}

/// Registers machines under one lock and one flush. A machine that exists already (revoked or
/// not) is refused, and with it the whole request, unless `rotate`: provisioning an id again by
/// mistake must not hand out a live machine's secret. With `rotate`, every machine named gets a
/// new secret (a revoked one is no longer revoked), the groups are added to its own, and the
/// old secret stops working at once: nothing it MACs verifies, the broker refuses it at its
/// next connect, and a live session on the embedded broker is closed now, as `machine_revoke`
/// does.
pub async fn provision(
    ctx: &Ctx,
    mut specs: Vec<MachineSpec>,
    rotate: bool,
) -> Result<Vec<ProvisionedMachine>, OpError> {
    let keys = ctx.keys();
    let mut out = Vec::with_capacity(specs.len());
    let mut rotated = Vec::new();
    let secrets = ctx.secrets.write().unwrap_or_else(|p| p.into_inner());
    ctx.store.transaction(|tx| -> Result<(), OpError> {
        provision_refusal(tx, &specs, rotate)?;
        for MachineSpec { machine, groups } in specs.drain(..) {
            let secret = random_secret();
            tx.put_secret(&machine, &secret)?;
            let mut info = match tx.machine(&machine)? {
                Some(info) => {
                    rotated.push(machine.clone());
                    info
                }
                None => MachineInfo::new(machine.clone(), now_ms()),
            };
            info.revoked_at_ms = None;
            for g in groups {
                if !info.groups.contains(&g) {
                    info.groups.push(g);
                }
            }
            tx.put_machine(&info)?;
            out.push(ProvisionedMachine {
                machine,
                groups: info.groups,
                secret,
                platform_key: keys.public,
                platform_key_gen: keys.generation(),
                topic_prefix: ctx.topics.prefix().to_owned(),
            });
        }
        Ok(())
    })?;
    // Counters the old secret raised (a stolen config can raise them to u64::MAX) would refuse
    // everything the machine sends with its new secret as a replay.
    for machine in &rotated {
        ctx.store.reset_counters(machine)?;
    }
    drop(secrets);
    ctx.store.flush_async().await?;
    for machine in &rotated {
        let closed = ctx.sessions.close_sessions(machine.as_str());
        tracing::info!(%machine, closed, "machine secret rotated; the old one no longer verifies");
    }
    Ok(out)
}

/// Why provisioning existing machines without `rotate` is refused, naming a few of them.
fn exists_already(ids: &[String]) -> String {
    let names = some_of(ids, 5);
    format!(
        "{names} {} provisioned already; nothing in this batch was changed. To give {} a new secret (the old one stops working at once), provision again with --rotate (fleetcast machine provision ID --rotate, or the same --from-file list with --rotate)",
        if ids.len() == 1 { "is" } else { "are" },
        if ids.len() == 1 { "it" } else { "them" },
    )
}

/// Changes the groups `machine` is in, keeping its secret: `add` first, then `remove`; a group
/// to remove that it is not in is refused (a typo would otherwise change nothing, silently).
/// Group membership is read from the record when the machine connects (it is what the broker
/// lets it subscribe to) and whenever the platform resolves a group or serves chunks, so the
/// new groups count at once for publishing, `artifact remove` and the chunk server. A removal
/// also closes its live broker sessions: the subscriptions its old groups granted end there, and
/// when it reconnects it may subscribe to its new groups only.
pub async fn machine_groups(
    ctx: &Ctx,
    machine: &MachineId,
    add: Vec<GroupId>,
    remove: Vec<GroupId>,
) -> Result<String, OpError> {
    let moved = change_groups(ctx, std::slice::from_ref(machine), &add, &remove).await?;
    let Regrouped { groups, closed, .. } = &moved[0];
    let now = if groups.is_empty() {
        "no group".to_owned()
    } else {
        format!("group(s) {}", join(groups))
    };
    let mut message = format!("machine {machine} is in {now}");
    if !remove.is_empty() {
        message.push_str(&format!("; removed from {}", join(&remove)));
    }
    message.push_str(&if *closed > 0 {
        format!(
            "; {closed} broker session(s) closed: its agent is told its groups as it reconnects"
        )
    } else {
        "; its agent is told its groups when it is next connected".to_owned()
    });
    Ok(message)
}

/// [`machine_groups`] for up to [`MAX_GROUPS_BATCH`] machines in one transaction, one atomic
/// write and one flush, all or nothing: one unknown machine, or one not in a group to remove, refuses the
/// whole request and nothing changes. The answer counts what was done.
pub async fn machine_groups_batch(
    ctx: &Ctx,
    machines: &[MachineId],
    add: Vec<GroupId>,
    remove: Vec<GroupId>,
) -> Result<String, OpError> {
    let moved = change_groups(ctx, machines, &add, &remove).await?;
    Ok(batch_summary(&moved, &add, &remove))
}

/// One machine whose groups changed.
struct Regrouped {
    machine: MachineId,
    /// Its groups now.
    groups: Vec<GroupId>,
    /// Its broker sessions closed by the change (none: it was told its groups at once).
    closed: usize,
}

/// Adds `add` to and removes `remove` from the groups of every machine of `machines` (see
/// [`machine_groups`]), all or nothing; then closes each one's broker sessions, and tells
/// those that had none closed their groups now.
async fn change_groups(
    ctx: &Ctx,
    machines: &[MachineId],
    add: &[GroupId],
    remove: &[GroupId],
) -> Result<Vec<Regrouped>, OpError> {
    if let Some(why) = groups_change_refusal(machines, add, remove) {
        return refused(why);
    }
    let changed = ctx.store.transaction(|tx| {
        // Everything is read and checked before the first write: a refusal stores nothing.
        let (mut changed, mut unknown, mut not_in) = (Vec::new(), Vec::new(), Vec::new());
        for machine in machines {
            let Some(mut info) = tx.machine(machine)? else {
                unknown.push(machine.to_string());
                continue;
            };
            match regrouped(&info.groups, add, remove) {
                Ok(groups) => {
                    info.groups = groups;
                    changed.push(info);
                }
                Err(missing) => not_in.push(format!("{machine} (not in {})", join(&missing))),
            }
        }
        if !unknown.is_empty() {
            return refused(format!(
                "unknown machine {}; nothing was changed",
                some_of(&unknown, NAMED_IN_REFUSAL)
            ));
        }
        if !not_in.is_empty() {
            return refused(format!(
                "not in a group to remove: {}; nothing was changed",
                some_of(&not_in, NAMED_IN_REFUSAL)
            ));
        }
        tx.put_machines(&changed)?;
        Ok(changed)
    })?;
    ctx.store.flush_async().await?;
    // The embedded broker reads a machine's groups at connect, so its session is closed after
    // any change: its agent reconnects at once, and its first state, still naming the groups
    // it followed, makes the ingest tell it its new ones (a `groups` command, protocol.md §5).
    // Where no session was closed (an external broker, or the machine is offline) the command
    // goes now; one that finds no session is lost, and the next state brings it again.
    let moved: Vec<Regrouped> = changed
        .into_iter()
        .map(|info| Regrouped {
            closed: ctx.sessions.close_sessions(info.id.as_str()),
            machine: info.id,
            groups: info.groups,
        })
        .collect();
    let tell_now: Vec<_> = moved
        .iter()
        .filter(|m| m.closed == 0)
        .map(|m| {
            let action = CommandAction::Groups {
                groups: m.groups.clone(),
            };
            (&m.machine, action)
        })
        .collect();
    if !tell_now.is_empty() {
        crate::publish::send_commands(ctx, tell_now).await?;
    }
    Ok(moved)
}

/// How many machines a refusal names; the rest are counted.
const NAMED_IN_REFUSAL: usize = 10;

/// Why changing the groups of `machines` is refused whatever their records say, if it is.
fn groups_change_refusal(
    machines: &[MachineId],
    add: &[GroupId],
    remove: &[GroupId],
) -> Option<String> {
    if machines.is_empty() {
        return Some("name at least one machine".into());
    }
    if machines.len() > MAX_GROUPS_BATCH {
        return Some(format!(
            "{} machines in one request; at most {MAX_GROUPS_BATCH}",
            machines.len()
        ));
    }
    if add.is_empty() && remove.is_empty() {
        return Some("name groups to add or to remove".into());
    }
    if let Some(g) = add.iter().find(|g| remove.contains(g)) {
        return Some(format!("group {g} is both added and removed"));
    }
    let mut seen = std::collections::HashSet::new();
    let twice: Vec<String> = machines
        .iter()
        .filter(|m| !seen.insert(*m))
        .map(|m| m.to_string())
        .collect();
    if !twice.is_empty() {
        return Some(format!(
            "listed more than once: {}; nothing was changed",
            some_of(&twice, NAMED_IN_REFUSAL)
        ));
    }
    None
}

/// `groups` with `add` added (each once), then `remove` removed; or the groups of `remove`
/// that `groups` does not hold, if any.
fn regrouped(
    groups: &[GroupId],
    add: &[GroupId],
    remove: &[GroupId],
) -> Result<Vec<GroupId>, Vec<GroupId>> {
    let missing: Vec<GroupId> = remove
        .iter()
        .filter(|g| !groups.contains(g))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(missing);
    }
    let mut out = groups.to_vec();
    for g in add {
        if !out.contains(g) {
            out.push(g.clone());
        }
    }
    out.retain(|g| !remove.contains(g));
    Ok(out)
}

/// The answer to `machine_groups_batch`: how many machines, the groups changed, and how each
/// agent hears of its new groups.
fn batch_summary(moved: &[Regrouped], add: &[GroupId], remove: &[GroupId]) -> String {
    let mut text = format!("{} machine(s)", moved.len());
    if !add.is_empty() {
        text.push_str(&format!(" added to {}", join(add)));
    }
    if !remove.is_empty() {
        let and = if add.is_empty() { "" } else { " and" };
        text.push_str(&format!("{and} removed from {}", join(remove)));
    }
    let reconnecting = moved.iter().filter(|m| m.closed > 0).count();
    let sessions: usize = moved.iter().map(|m| m.closed).sum();
    text.push_str(&format!(
        "; {sessions} broker session(s) of {reconnecting} machine(s) closed: their agents are told their groups as they reconnect; {} machine(s) without a session closed were sent their groups now (an offline agent is told when it is next connected)",
        moved.len() - reconnecting
    ));
    text
}

/// The first `at_most` of `ids`, and how many more there are: `vm-1, vm-2 and 8 more`.
fn some_of(ids: &[String], at_most: usize) -> String {
    let mut text = ids[..ids.len().min(at_most)].join(", ");
    if ids.len() > at_most {
        text.push_str(&format!(" and {} more", ids.len() - at_most));
    }
    text
}

fn join(groups: &[GroupId]) -> String {
    groups
        .iter()
        .map(|g| g.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Revokes a machine: its secret is forgotten (nothing it sends verifies, the broker refuses
/// it at its next connect) and its live broker session is closed now.
pub async fn machine_revoke(ctx: &Ctx, machine: &MachineId) -> Result<String, OpError> {
    ctx.store.transaction(|tx| {
        let Some(mut info) = tx.machine(machine)? else {
            return refused(format!("unknown machine {machine}"));
        };
        tx.remove_secret(machine)?;
        info.revoked_at_ms.get_or_insert(now_ms());
        info.online = false;
        tx.put_machine(&info)?;
        Ok(())
    })?;
    ctx.store.flush_async().await?;
    let closed = ctx.sessions.close_sessions(machine.as_str());
    Ok(format!(
        "machine {machine} revoked: its secret no longer verifies ({closed} broker session(s) closed)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MachineId {
        MachineId::new(s).unwrap()
    }
    fn g(s: &str) -> GroupId {
        GroupId::new(s).unwrap()
    }

    #[test]
    fn groups_are_added_first_then_removed_and_a_group_to_remove_must_be_held() {
        let held = [g("shanghai"), g("north")];
        assert_eq!(
            regrouped(&held, &[g("east-china"), g("north")], &[g("shanghai")]),
            Ok(vec![g("north"), g("east-china")])
        );
        assert_eq!(
            regrouped(&held, &[], &[g("beijing"), g("north"), g("south")]),
            Err(vec![g("beijing"), g("south")])
        );
    }

    #[test]
    fn a_change_of_no_machine_too_many_a_repeated_one_or_no_group_is_refused_up_front() {
        let add = [g("east-china")];
        let ok = [m("vm-1"), m("vm-2")];
        assert_eq!(groups_change_refusal(&ok, &add, &[]), None);
        assert_eq!(
            groups_change_refusal(&[], &add, &[]).as_deref(),
            Some("name at least one machine")
        );
        let many: Vec<MachineId> = (0..=MAX_GROUPS_BATCH)
            .map(|i| m(&format!("vm-{i}")))
            .collect();
        assert_eq!(
            groups_change_refusal(&many, &add, &[]).as_deref(),
            Some("1001 machines in one request; at most 1000")
        );
        assert_eq!(
            groups_change_refusal(&many[..MAX_GROUPS_BATCH], &add, &[]),
            None
        );
        assert_eq!(
            groups_change_refusal(&ok, &[], &[]).as_deref(),
            Some("name groups to add or to remove")
        );
        assert_eq!(
            groups_change_refusal(&ok, &add, &add).as_deref(),
            Some("group east-china is both added and removed")
        );
        let twice = [m("vm-1"), m("vm-2"), m("vm-1")];
        assert_eq!(
            groups_change_refusal(&twice, &add, &[]).as_deref(),
            Some("listed more than once: vm-1; nothing was changed")
        );
    }

    #[test]
    fn a_refusal_names_ten_machines_and_counts_the_rest() {
        let ids: Vec<String> = (1..=25).map(|i| format!("vm-{i}")).collect();
        assert_eq!(
            some_of(&ids, NAMED_IN_REFUSAL),
            "vm-1, vm-2, vm-3, vm-4, vm-5, vm-6, vm-7, vm-8, vm-9, vm-10 and 15 more"
        );
        assert_eq!(some_of(&ids[..2], NAMED_IN_REFUSAL), "vm-1, vm-2");
    }

    #[test]
    fn a_batch_answer_counts_the_machines_and_how_each_hears_of_its_groups() {
        let moved = |machine: &str, closed| Regrouped {
            machine: m(machine),
            groups: vec![g("east-china")],
            closed,
        };
        let text = batch_summary(
            &[moved("vm-1", 1), moved("vm-2", 2), moved("vm-3", 0)],
            &[g("east-china")],
            &[g("shanghai")],
        );
        assert_eq!(
            text,
            "3 machine(s) added to east-china and removed from shanghai; 3 broker session(s) of 2 machine(s) closed: their agents are told their groups as they reconnect; 1 machine(s) without a session closed were sent their groups now (an offline agent is told when it is next connected)"
        );
        let text = batch_summary(&[moved("vm-1", 0)], &[], &[g("shanghai")]);
        assert!(
            text.starts_with("1 machine(s) removed from shanghai; 0 broker session(s)"),
            "{text}"
        );
    }
}
