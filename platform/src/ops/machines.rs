//! `machines`, `machine_provision`, `machine_provision_batch`, `machine_provision_check`,
//! `machine_groups`, `machine_groups_batch`, `machine_revoke`.

use fleetcast_proto::admin::{MachineInfo, MachineSpec, ProvisionedMachine};
use fleetcast_proto::calls;

use crate::context::Ctx;
use crate::identities;
use crate::ops::OpError;

pub fn list(ctx: &Ctx, _: calls::Machines) -> Result<Vec<MachineInfo>, OpError> {
    Ok(ctx.store.machines()?)
}

pub async fn provision(
    ctx: &Ctx,
    c: calls::MachineProvision,
) -> Result<ProvisionedMachine, OpError> {
    let spec = MachineSpec {
        machine: c.machine,
        groups: c.groups,
    };
    let mut done = identities::provision(ctx, vec![spec], c.rotate).await?;
    Ok(done.pop().expect("one machine provisioned"))
}

pub async fn provision_batch(
    ctx: &Ctx,
    c: calls::MachineProvisionBatch,
) -> Result<Vec<ProvisionedMachine>, OpError> {
    identities::provision(ctx, c.machines, c.rotate).await
}

pub fn provision_check(ctx: &Ctx, c: calls::MachineProvisionCheck) -> Result<String, OpError> {
    identities::provision_check(ctx, &c.machines, c.rotate)
}

pub async fn groups(ctx: &Ctx, c: calls::MachineGroups) -> Result<String, OpError> {
    identities::machine_groups(ctx, &c.machine, c.add, c.remove).await
}

pub async fn groups_batch(ctx: &Ctx, c: calls::MachineGroupsBatch) -> Result<String, OpError> {
    identities::machine_groups_batch(ctx, &c.machines, c.add, c.remove).await
}

pub async fn revoke(ctx: &Ctx, c: calls::MachineRevoke) -> Result<String, OpError> {
    identities::machine_revoke(ctx, &c.machine).await
}
