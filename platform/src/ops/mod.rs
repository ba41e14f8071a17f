//! One function per admin operation, grouped by family: each takes its typed call
//! ([`fleetcast_proto::calls`]) and returns its typed reply. Authentication, role checks, the
//! audit log, retries and response sealing happen once, in [`crate::admin`], which dispatches
//! here. Uploads are in [`crate::uploads`]: their staging state lives with the admin task.
//!
//! [`OpError`] is what every operation returns when it fails: its text goes back to the CLI.

pub mod artifacts;
pub mod events;
pub mod identities;
pub mod inventory;
pub mod keys;
pub mod machines;
pub mod releases;
pub mod removal;
pub mod rollouts;

use fleetcast_proto::admin::ReleaseInfo;
use fleetcast_proto::ReleaseId;

use crate::artifacts::ArtifactError;
use crate::store::{Reads, StoreError};

/// Why an operator request failed; the text goes back to the CLI.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("cannot publish: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
}

impl From<crate::domain::release::Refused> for OpError {
    fn from(e: crate::domain::release::Refused) -> Self {
        OpError::Refused(e.to_string())
    }
}

pub fn refused<T>(text: impl Into<String>) -> Result<T, OpError> {
    Err(OpError::Refused(text.into()))
}

/// The release `id`, or the operator's "unknown release" error.
pub fn known_release<S: Reads + ?Sized>(store: &S, id: &ReleaseId) -> Result<ReleaseInfo, OpError> {
    store
        .release(id)?
        .ok_or_else(|| OpError::Refused(format!("unknown release {id}")))
}
