//! One function per admin operation, grouped by family: each takes its typed call
//! ([`fleetcast_proto::calls`]) and returns its typed reply. Authentication, role checks, the
//! audit log, retries and response sealing happen once, in [`crate::admin`], which dispatches
//! here. Uploads stay in `admin`: their staging state lives with the admin task.

pub mod artifacts;
pub mod events;
pub mod identities;
pub mod inventory;
pub mod keys;
pub mod machines;
pub mod releases;
pub mod rollouts;
