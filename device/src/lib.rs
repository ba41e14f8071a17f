//! fleetcast-device: the agent that runs on each vending machine, and a fleet simulator.
//!
//! Layout:
//! - [`config`]: `machine.toml` (identity, keys, broker, data dir, installers).
//! - [`machine`]: the update logic as a pure state machine (`Updater::handle`), no I/O.
//! - [`agent`]: the async loop around it: MQTT, verification, outbox, download/install tasks.
//! - [`download`]: fetching an artifact in verified chunks, resumable across restarts: the
//!   transfer's decisions a pure state machine (`download::fetch`), the files and MQTT around it.
//! - [`install`]: installers (A/B slots with health check and switch-back; external command).
//! - [`sale_lock`]: the `flock` that keeps sales and installs apart (the vending application's
//!   side is in docs/device.md).
//! - [`resend`]: when to send an unacknowledged status event again (adapts to the ack's round trip).
//! - [`store`]: the persisted agent state, message counter, followed platform key and status
//!   outbox.
//! - [`trust`]: which platform key is trusted: the configured one, advanced along the key chain.
//! - [`status`]: `fleetcast-device status`, the technician's view from the data dir alone.
//! - [`simulate`]: many agents in one process, provisioned through the platform.
//! - [`durable`]: the group-commit writer: durable file writes off the runtime's threads.
//! - [`fsutil`]: atomic file writes (blocking).

pub mod agent;
pub mod config;
pub mod download;
pub mod durable;
pub mod fsutil;
pub mod install;
pub mod machine;
pub mod resend;
pub mod sale_lock;
pub mod simulate;
pub mod status;
pub mod store;
pub mod trust;

pub use agent::{run, run_with, AgentError, AgentOptions, StateRepeats};
pub use config::{ConfigError, InstallerConfig, MachineConfig};
pub use simulate::{SimulateError, SimulateOptions};
