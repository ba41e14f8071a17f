//! Every target. To add one: a file `src/targets/<name>.rs` with `pub fn run(&[u8]) -> Verdict`
//! and `pub fn seeds() -> Vec<Vec<u8>>`, and its name in the list below; then
//! `cargo run -p fleetcast-fuzz --bin seed-corpus` writes its seed corpus.

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(pub mod $name;)*

        /// Every target, in the order `scripts/fuzz.sh` runs them.
        pub const ALL: &[crate::Target] = &[$(crate::Target {
            name: stringify!($name),
            run: $name::run,
            seeds: $name::seeds,
        }),*];
    };
}

targets! {
    envelope,
    release_notice,
    command,
    status_ack,
    status_event,
    machine_state,
    chunk_request,
    admin_request,
    admin_response,
    admin_sealed,
    upload_frame,
    key_chain,
    integrator,
    chunk_frame,
    chunk_verifier,
    topics,
    release_policy,
    acl,
    machine_config,
    agent_store,
}
