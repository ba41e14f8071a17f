//! `operator_add`, `operator_list`, `operator_revoke`, `integrator_add`, `integrator_list`,
//! `integrator_revoke`.

use fleetcast_proto::acl::integrator_username;
use fleetcast_proto::admin::{IntegratorInfo, IntegratorProfile, OperatorInfo, OperatorProfile};
use fleetcast_proto::calls;

use crate::context::Ctx;
use crate::identities;
use crate::ops::OpError;

/// `by`: the operator creating it (recorded as its creator).
pub async fn operator_add(
    ctx: &Ctx,
    by: &str,
    c: calls::OperatorAdd,
) -> Result<OperatorProfile, OpError> {
    identities::operator_add(ctx, by, c.name, c.role).await
}

pub fn operator_list(ctx: &Ctx, _: calls::OperatorList) -> Result<Vec<OperatorInfo>, OpError> {
    Ok(ctx.store.operators()?.into_iter().map(|o| o.info).collect())
}

pub async fn operator_revoke(ctx: &Ctx, c: calls::OperatorRevoke) -> Result<String, OpError> {
    identities::operator_revoke(ctx, &c.name).await
}

pub async fn integrator_add(
    ctx: &Ctx,
    by: &str,
    c: calls::IntegratorAdd,
) -> Result<IntegratorProfile, OpError> {
    identities::integrator_add(ctx, by, c.name, c.rotate).await
}

pub fn integrator_list(
    ctx: &Ctx,
    _: calls::IntegratorList,
) -> Result<Vec<IntegratorInfo>, OpError> {
    Ok(ctx
        .store
        .integrators()?
        .into_iter()
        .map(|i| IntegratorInfo {
            username: integrator_username(&i.name),
            name: i.name,
            created_at_ms: i.created_at_ms,
            created_by: i.created_by,
        })
        .collect())
}

pub async fn integrator_revoke(ctx: &Ctx, c: calls::IntegratorRevoke) -> Result<String, OpError> {
    identities::integrator_revoke(ctx, &c.name).await
}
