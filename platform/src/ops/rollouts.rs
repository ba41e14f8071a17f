//! `rollout_status`, `rollout_pause`, `rollout_resume`, `rollout_cancel`: following and steering
//! a staged rollout (see [`crate::staged`]). Each answers the rollout with its `order` cut to
//! the first machines ([`RolloutReport`]): a 50,000-machine order is ~0.6-3.4 MB of JSON.

use fleetcast_proto::calls;
use fleetcast_proto::rollout::RolloutReport;

use crate::context::Ctx;
use crate::ops::OpError;
use crate::staged::{self, Control};

/// The rollout, with the tally of its notified machines (why a running wave waits).
pub fn status(ctx: &Ctx, c: calls::RolloutStatus) -> Result<RolloutReport, OpError> {
    let r = staged::status(ctx, &c.release)?;
    let tally = staged::wave_tally(ctx, &r)?;
    Ok(RolloutReport::new(r).with_tally(tally))
}

/// `by`: the operator, recorded with the transition.
pub async fn pause(ctx: &Ctx, by: &str, c: calls::RolloutPause) -> Result<RolloutReport, OpError> {
    staged::control(ctx, &c.release, Control::Pause, by)
        .await
        .map(RolloutReport::new)
}

pub async fn resume(
    ctx: &Ctx,
    by: &str,
    c: calls::RolloutResume,
) -> Result<RolloutReport, OpError> {
    let control = Control::Resume { advance: c.advance };
    staged::control(ctx, &c.release, control, by)
        .await
        .map(RolloutReport::new)
}

pub async fn cancel(
    ctx: &Ctx,
    by: &str,
    c: calls::RolloutCancel,
) -> Result<RolloutReport, OpError> {
    staged::control(ctx, &c.release, Control::Cancel, by)
        .await
        .map(RolloutReport::new)
}
