//! Who may talk to the platform: operators (with roles), integrators (read-only), machines
//! (revocation). Every identity has its own secret; the broker password derives from it, so
//! the broker never holds a secret, and revoking one identity touches no other.

use fleetcast_proto::acl::{integrator_username, validate_name, Principal, Role};
use fleetcast_proto::admin::{
    IntegratorProfile, MachineInfo, MachineSpec, OperatorInfo, OperatorProfile, ProvisionedMachine,
    MAX_PROVISION_BATCH,
};
use fleetcast_proto::auth::Secret;
use fleetcast_proto::MachineId;
use rand::RngCore;

use crate::context::Ctx;
use crate::keys::Keys;
use crate::now_ms;
use crate::ops::{refused, OpError};
use crate::store::{IntegratorRecord, OperatorRecord, Store, StoreError};

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

pub async fn integrator_add(
    ctx: &Ctx,
    by: &str,
    name: String,
) -> Result<IntegratorProfile, OpError> {
    validate_name(&name).map_err(OpError::Refused)?;
    let rec = ctx.store.transaction(|tx| {
        if tx.integrator(&name)?.is_some() {
            return refused(format!("integrator {name} exists already"));
        }
        let rec = IntegratorRecord {
            name: name.clone(),
            secret: random_secret(),
            created_at_ms: now_ms(),
            created_by: by.to_owned(),
        };
        tx.put_integrator(&rec)?;
        Ok(rec)
    })?;
    ctx.store.flush_async().await?;
    Ok(IntegratorProfile {
        username: integrator_username(&name),
        password: rec.secret.mqtt_password(),
        name,
        platform_key: ctx.keys().public,
        topic_prefix: ctx.topics.prefix().to_owned(),
    })
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
            "machine id {} is reserved: ids starting with fleetcast- are operator and platform clients",
            s.machine
        ));
    }
    let keys = ctx.keys();
    let mut out = Vec::with_capacity(specs.len());
    let mut rotated = Vec::new();
    let secrets = ctx.secrets.write().unwrap_or_else(|p| p.into_inner());
    ctx.store.transaction(|tx| -> Result<(), OpError> {
        if !rotate {
            let mut existing = Vec::new();
            for s in &specs {
                if tx.machine(&s.machine)?.is_some() {
                    existing.push(s.machine.to_string());
                }
            }
            if !existing.is_empty() {
                return refused(exists_already(&existing));
            }
        }
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
    const NAMED: usize = 5;
    let mut names = ids[..ids.len().min(NAMED)].join(", ");
    if ids.len() > NAMED {
        names.push_str(&format!(" and {} more", ids.len() - NAMED));
    }
    format!(
        "{names} {} provisioned already; nothing was changed. To give {} a new secret (the old one stops working at once), provision again with rotate (fleetcast machine provision ID --rotate)",
        if ids.len() == 1 { "is" } else { "are" },
        if ids.len() == 1 { "it" } else { "them" },
    )
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
