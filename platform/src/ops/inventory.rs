//! `machine_query`, `versions`, `history`: reads of the whole fleet, run off the async threads
//! (see [`crate::inventory`]).

use fleetcast_proto::admin::{MachineInfo, VersionReport};
use fleetcast_proto::calls::{self, HistoryPage, Page};
use fleetcast_proto::MachineId;

use crate::context::Ctx;
use crate::inventory::{self, off_thread};
use crate::ops::OpError;

pub async fn machine_query(
    ctx: &Ctx,
    c: calls::MachineQuery,
) -> Result<Page<MachineInfo, Option<MachineId>>, OpError> {
    off_thread(&ctx.store, move |s| {
        inventory::query(s, &c.filter, c.after.as_ref(), c.limit)
    })
    .await
}

pub async fn versions(ctx: &Ctx, c: calls::Versions) -> Result<VersionReport, OpError> {
    off_thread(&ctx.store, move |s| {
        inventory::versions(s, &c.kind, c.release.as_ref())
    })
    .await
}

pub async fn history(ctx: &Ctx, c: calls::History) -> Result<HistoryPage, OpError> {
    off_thread(&ctx.store, move |s| {
        inventory::history(s, &c.machine, c.kind.as_ref(), c.before.as_ref(), c.limit)
    })
    .await
}
