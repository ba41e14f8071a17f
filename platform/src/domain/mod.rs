//! The platform's domain core: pure state machines, tested without a broker or a disk.
//! - [`rollout`]: a staged rollout: wave order, advancing, pausing by itself, operator commands.

pub mod rollout;
