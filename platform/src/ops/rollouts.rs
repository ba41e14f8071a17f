//! `rollout_status`, `rollout_pause`, `rollout_resume`, `rollout_cancel`: following and steering
//! a staged rollout (see [`crate::staged`]).

use fleetcast_proto::calls;
use fleetcast_proto::rollout::RolloutInfo;

use crate::context::Ctx;
use crate::ops::OpError;
use crate::staged::{self, Control};

pub fn status(ctx: &Ctx, c: calls::RolloutStatus) -> Result<RolloutInfo, OpError> {
    staged::status(ctx, &c.release)
}

/// `by`: the operator, recorded with the transition.
pub async fn pause(ctx: &Ctx, by: &str, c: calls::RolloutPause) -> Result<RolloutInfo, OpError> {
    staged::control(ctx, &c.release, Control::Pause, by).await
}

pub async fn resume(ctx: &Ctx, by: &str, c: calls::RolloutResume) -> Result<RolloutInfo, OpError> {
    let control = Control::Resume { advance: c.advance };
    staged::control(ctx, &c.release, control, by).await
}

pub async fn cancel(ctx: &Ctx, by: &str, c: calls::RolloutCancel) -> Result<RolloutInfo, OpError> {
    staged::control(ctx, &c.release, Control::Cancel, by).await
}
