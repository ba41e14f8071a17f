//! `events_since`, `audit`, `stats`: what the platform recorded and counted.

use fleetcast_proto::admin::{AuditEntry, FleetEvent, PlatformStats};
use fleetcast_proto::calls::{self, Page};
use fleetcast_proto::events::MAX_BATCH_EVENTS;

use crate::context::Ctx;
use crate::ops::OpError;

pub fn since(ctx: &Ctx, c: calls::EventsSince) -> Result<Page<FleetEvent, u64>, OpError> {
    let limit = c
        .limit
        .unwrap_or(MAX_BATCH_EVENTS)
        .clamp(1, MAX_BATCH_EVENTS);
    let (events, more) = ctx.store.events_since(c.since, limit as usize)?;
    let next = events.last().map_or(c.since, |e| e.id);
    Ok(Page {
        items: events,
        next,
        more,
    })
}

pub fn audit(ctx: &Ctx, c: calls::Audit) -> Result<Page<AuditEntry, u64>, OpError> {
    let limit = c
        .limit
        .unwrap_or(MAX_BATCH_EVENTS)
        .clamp(1, MAX_BATCH_EVENTS);
    let (entries, more) = ctx.store.audit_since(c.since, limit as usize)?;
    let next = entries.last().map_or(c.since, |e| e.id);
    Ok(Page {
        items: entries,
        next,
        more,
    })
}

pub fn stats(ctx: &Ctx, _: calls::Stats) -> Result<PlatformStats, OpError> {
    Ok(ctx.stats.snapshot())
}
