//! fleetcast's management service and operator CLI.
//!
//! Layout:
//! - [`serve`](fn@serve): `serve(opts, shutdown)`, the service: opens the data dir, optionally starts the
//!   embedded broker, runs the connections and tasks below until shutdown.
//! - [`context`]: `Ctx`, what every task shares (store, files, keys, MQTT client, session
//!   control, limits, counters).
//! - [`broker_auth`]: which principal holds a broker client's credentials (the store's view).
//! - [`limits`]: per-machine limits (chunk requests and bytes per second, stored events).
//! - [`keys`]: the platform's signing key and the admin secret in the data dir.
//! - [`store`]: the database behind the `Store` trait (reads, transactions for records, flush);
//!   sled is the embedded implementation (layout documented in `store::sled`), an in-memory
//!   one serves unit tests.
//! - [`artifacts`]: artifact files: staged uploads, atomic commit, manifests, chunk reads.
//! - [`domain`]: the domain's pure state machines: a release (publishing, progress, retry,
//!   activate, rollback's version), a target (one machine's record for one release) and a
//!   staged rollout with its waves.
//! - [`staged`]: staged rollouts, the I/O side: waves' notices, pause/resume/cancel.
//! - [`ingest`]: the persistent connection for status, state and online.
//! - [`integrators`]: integrators' requests for stored events (signed batches).
//! - [`chunks`]: the chunk server (per machine or broadcast).
//! - [`identities`]: operators with roles, integrators, machine revocation.
//! - [`admin`]: the operator request loop: authentication, roles, audit, retried requests,
//!   sealed responses; uploads go to [`uploads`], every other operation to [`ops`].
//! - [`uploads`]: artifact uploads in progress (staging, parts, commit, abandoned uploads).
//! - [`unknown_fields`]: a request's fields this platform does not know (refused by [`admin`]).
//! - [`ops`]: one function per admin operation (typed call in, typed reply out), one module
//!   per family: artifacts, releases, rollouts, machines, identities, inventory, events, keys;
//!   and `OpError`, why an operation failed.
//! - [`inventory`]: machines by filter, installed versions and compliance, a machine's release
//!   history (read-only, paged, aggregated on the platform).
//! - [`retention`]: deletes the oldest stored events beyond what the platform keeps.
//! - [`publish`]: signing and bookkeeping of notices and commands, shared by admin and ingest.
//! - [`stats`]: counters of the running platform (`fleetcast stats`).
//! - [`cli`]: the `fleetcast` command line (one module per command family).
//! - [`logs`]: the binary's log output (no colour off a terminal, the default filter).

pub mod admin;
pub mod artifacts;
pub mod backup;
pub mod broker_auth;
pub mod chunks;
pub mod cli;
pub mod context;
pub mod disk;
pub mod domain;
pub mod error;
pub mod identities;
pub mod ingest;
pub mod integrators;
pub mod inventory;
pub mod keys;
pub mod limits;
pub mod logs;
pub mod ops;
pub mod publish;
pub mod retention;
pub mod serve;
pub mod staged;
pub mod stats;
pub mod store;
pub mod unknown_fields;
pub mod uploads;

pub use error::PlatformError;
pub use keys::{admin_secret_path, load_or_create_keys, public_key_path, Keys};
pub use serve::{serve, AutoCompaction, ServeOptions};

/// Milliseconds since the Unix epoch, platform clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Test fixtures shared by the unit tests of several modules.
#[cfg(test)]
pub(crate) mod fixtures {
    use fleetcast_proto::admin::ReleaseInfo;
    use fleetcast_proto::release::ArtifactRef;
    use fleetcast_proto::{ArtifactId, GroupId, InstallPolicy, Kind, MachineId, ReleaseId};

    pub fn m(id: &str) -> MachineId {
        MachineId::new(id).unwrap()
    }

    pub fn g(id: &str) -> GroupId {
        GroupId::new(id).unwrap()
    }

    /// Stores `bytes` as `app` `version` in chunks of 1 KiB: the files, committed as an upload
    /// is, and the record.
    pub fn stored_artifact(
        ctx: &crate::context::Ctx,
        bytes: &[u8],
        version: &str,
    ) -> fleetcast_proto::admin::ArtifactInfo {
        let id = ArtifactId::of(bytes);
        let mut up = ctx
            .files
            .begin_upload(id, bytes.len() as u64, 1024)
            .unwrap();
        for i in 0..up.layout.chunks {
            let (s, l) = (up.layout.offset(i) as usize, up.layout.chunk_len(i));
            up.write_part(i, &bytes[s..s + l]).unwrap();
        }
        ctx.files.commit(up).unwrap();
        let info = fleetcast_proto::admin::ArtifactInfo {
            id,
            kind: Kind::new("app").unwrap(),
            version: version.into(),
            name: "a".into(),
            size: bytes.len() as u64,
            chunk_size: 1024,
            notes: None,
            uploaded_at_ms: 0,
            removed_at_ms: None,
        };
        ctx.store.put_artifact(&info).unwrap();
        info
    }

    /// An unpublished `app` release of `version` (artifact: the version's bytes, one byte long).
    pub fn release(id: &str, version: &str) -> ReleaseInfo {
        ReleaseInfo {
            id: ReleaseId::new(id).unwrap(),
            kind: Kind::new("app").unwrap(),
            version: version.into(),
            artifact: ArtifactRef {
                id: ArtifactId::of(version.as_bytes()),
                size: 1,
                chunk_size: 65536,
                name: "x".into(),
            },
            policy: InstallPolicy::Immediate,
            rollback: false,
            notes: None,
            created_at_ms: 0,
            published_at_ms: None,
            seq: 0,
            machines: vec![],
            groups: vec![],
        }
    }
}
