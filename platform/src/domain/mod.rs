//! The platform's domain core: pure state machines, tested without a broker or a disk. The
//! callers (admin, ingest, staged) load records, ask these what follows, store the result and
//! carry out the effects.
//! - [`release`]: a release's life: what a publish records on it, its progress over its
//!   targets, which machines a retry or an activate reaches, where a rollback goes.
//! - [`target`]: what a machine's status event does to its record for one release.
//! - [`rollout`]: a staged rollout: wave order, advancing, pausing by itself, operator commands.
//! - [`removal`]: whether a release may be removed, or what still needs it.

pub mod release;
pub mod removal;
pub mod rollout;
pub mod target;
