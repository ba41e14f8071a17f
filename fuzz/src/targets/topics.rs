//! `Topics::parse` on any topic string, under the default and a two-level prefix. A parsed
//! topic holds no wildcard, and building the route again gives the same topic back: one topic,
//! one meaning.

use fleetcast_proto::{ArtifactId, Kind, Route, Topics};

use crate::samples::{group, kind, machine, release};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    let Ok(topic) = std::str::from_utf8(data) else {
        return Verdict::Rejected;
    };
    let mut verdict = Verdict::Rejected;
    for topics in [Topics::default(), Topics::new("acme/prod")] {
        if let Some(route) = topics.parse(topic) {
            assert!(!topic.contains(['+', '#']), "{topic:?} parsed as {route:?}");
            assert_eq!(build(&topics, &route), topic, "{route:?}");
            verdict = Verdict::Accepted;
        }
    }
    verdict
}

/// The topic the builders make for `route`.
fn build(t: &Topics, route: &Route) -> String {
    match route {
        Route::MachineRelease(m, k) => t.machine_release(m, k),
        Route::GroupRelease(g, k) => t.group_release(g, k),
        Route::Command(m) => t.command(m),
        Route::MachineChunks(m) => t.machine_chunks(m),
        Route::ArtifactChunks(a) => t.artifact_chunks(a),
        Route::ChunkRequest(m) => t.chunk_request(m),
        Route::Status(m) => t.status(m),
        Route::StatusAck(m) => t.status_ack(m),
        Route::State(m) => t.state(m),
        Route::Online(m) => t.online(m),
        Route::AdminRequest(c) => t.admin_request(c),
        Route::AdminResponse(c) => t.admin_response(c),
        Route::AdminUpload(c) => t.admin_upload(c),
        Route::RolloutProgress(r) => t.rollout_progress(r),
        Route::Events => t.events(),
        Route::IntegratorEventsGet(c) => t.integrator_events_get(c),
        Route::IntegratorEvents(c) => t.integrator_events(c),
        Route::PlatformKeys => t.platform_keys(),
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let t = Topics::default();
    let (m, g, k) = (machine(), group(), kind());
    let a = ArtifactId::of(b"x");
    let client = "fleetcast-op-alice.1a2b";
    let mut out = vec![
        t.machine_release(&m, &k),
        t.group_release(&g, &Kind::new("firmware").expect("valid id")),
        t.command(&m),
        t.machine_chunks(&m),
        t.artifact_chunks(&a),
        t.chunk_request(&m),
        t.status(&m),
        t.status_ack(&m),
        t.state(&m),
        t.online(&m),
        t.admin_request(client),
        t.admin_response(client),
        t.admin_upload(client),
        t.rollout_progress(release().as_str()),
        t.events(),
        t.integrator_events_get("fleetcast-int-erp"),
        t.integrator_events("fleetcast-int-erp"),
        t.platform_keys(),
    ];
    out.push(Topics::new("acme/prod").status(&m));
    out.into_iter().map(String::into_bytes).collect()
}
