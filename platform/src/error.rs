//! The service's errors. Admin requests turn these into the error text the CLI prints.

use std::path::PathBuf;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// Not a `source`: its message is in this one's (a chain would print it twice).
    #[error("embedded broker: {0}")]
    Broker(fleetcast_broker::embedded::BrokerError),
    #[error("MQTT client: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
    #[error("task {task} failed: {reason}")]
    Task { task: &'static str, reason: String },
}

impl From<fleetcast_broker::embedded::BrokerError> for PlatformError {
    fn from(e: fleetcast_broker::embedded::BrokerError) -> Self {
        PlatformError::Broker(e)
    }
}

impl PlatformError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PlatformError::Io {
            path: path.into(),
            source,
        }
    }
}
