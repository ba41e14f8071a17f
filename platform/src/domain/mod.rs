//! The platform's domain core: pure state machines, tested without a broker or a disk. The
//! callers (admin, ingest, staged) load records, ask these what follows, store the result and
//! carry out the effects.
//! - [`target`]: what a machine's status event does to its record for one release, and the
//!   aggregate rollout progress.
//! - [`rollout`]: a staged rollout: wave order, advancing, pausing by itself, operator commands.

pub mod rollout;
pub mod target;
