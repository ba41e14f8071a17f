//! fleetcast wire protocol. Plain data: no sockets, no tasks, no files.
//!
//! Layout:
//! - [`ids`]: validated id newtypes (`MachineId`, `GroupId`, `ReleaseId`, `Kind`, `ArtifactId`).
//! - [`topics`]: every MQTT topic, built and parsed.
//! - [`release`]: signed release notices, install policies, version ordering.
//! - [`rollout`]: staged rollouts: wave plans, rollout state and its recorded transitions.
//! - [`command`]: signed commands (activate, cancel, report).
//! - [`status`]: phases, status events and the retained machine state.
//! - [`chunk`]: the binary chunk frame, chunk requests, per-chunk blake3 verification.
//! - [`auth`]: ed25519 signatures (platform -> machine) and blake3 MACs (machine -> platform).
//! - [`events`]: what integrators read: signed events, progress, event batches on request.
//! - [`keychain`]: platform key rotation (each new key announced under the previous one).
//! - [`admin`]: operator CLI <-> platform requests, and the records the platform keeps.
//! - [`calls`]: the same requests typed: one struct per operation, naming the reply it gets
//!   (the wire format stays that of [`admin`]).
//! - [`acl`]: principals (platform, operators with roles, integrators, machines) and where
//!   each may publish and subscribe.
//! - [`text`]: outside text made safe to show in a terminal or a log line, and a per-client
//!   gate on log lines.

pub mod acl;
pub mod admin;
pub mod auth;
pub mod calls;
pub mod chunk;
pub mod command;
pub mod events;
pub mod ids;
pub mod keychain;
pub mod release;
pub mod rollout;
pub mod status;
pub mod text;
pub mod topics;

pub use ids::{ArtifactId, GroupId, IdError, Kind, MachineId, ReleaseId};
pub use release::{InstallPolicy, ReleaseNotice, Target};
pub use status::{MachineState, Phase, StatusAck, StatusEvent};
pub use topics::{ReleaseFilter, Route, Topics};

/// The agent and platform version, reported in machine state.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
