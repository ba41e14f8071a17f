//! fleetcast's MQTT layer.
//!
//! Layout:
//! - [`admin`]: the operator side of the admin protocol (CLI, simulator): requests, uploads.
//! - [`client`]: broker addresses, rumqttc options with fleetcast's limits (TCP_NODELAY, 2 MiB
//!   packets), and `drive`, the one task that owns an event loop and reconnects with backoff.
//! - [`embedded`] (feature `embedded`): rumqttd configured in code with every field set, auth
//!   by `client_id == username` plus a password check, sized segment logs for bulk topics.
//! - [`fdlimit`]: raise the open-file limit (one descriptor per machine on the platform).
//! - [`memory`]: hand freed heap memory back to the system (the platform, the simulator).
//! - [`mosquitto`]: the broker policy (`proto::acl`) as Mosquitto password and ACL files.
//! - [`sigpipe`]: commands that print end quietly when their output pipe closes.
//! - [`gateway`] (feature `embedded`): the authorizing gateway in front of rumqttd: per-packet
//!   topic ACLs from `proto::acl`, TLS, TCP_NODELAY, rate limits, kick; rumqttd on loopback only.
//! - `testing` (feature `testing`): a real Mosquitto on a free loopback port, for tests.

pub mod admin;
pub mod client;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod fdlimit;
#[cfg(feature = "embedded")]
pub mod gateway;
pub mod memory;
pub mod mosquitto;
pub mod sigpipe;
#[cfg(feature = "testing")]
pub mod testing;

pub use client::{BrokerUrl, MqttEvent, TlsTrust};
#[cfg(feature = "embedded")]
pub use embedded::{BrokerSettings, EmbeddedBroker};
#[cfg(feature = "embedded")]
pub use gateway::{
    start_secured, AdminSink, Authenticator, ChunkRequestSink, GatewayHandle, ReportSink,
    SecureBrokerSettings, SecuredBroker,
};
