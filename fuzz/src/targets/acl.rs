//! `acl::Claim::parse` and `Principal::{accepts_client_id, may_publish, may_subscribe}`: the
//! broker's decisions on usernames, client ids, topics and filters a client sends.
//!
//! Input: a selector byte, then lines: username, client id, topic (or filter), groups.
//! Properties: nothing panics; a claimed username names its principal back; nobody publishes
//! on a wildcard; no one but the platform subscribes to a filter with `#`; a `+` stands only
//! where every topic it matches is readable; whatever concrete topic a machine may publish or
//! subscribe to is one of its own.

use fleetcast_proto::acl::{Claim, Principal, Role};
use fleetcast_proto::{GroupId, Route, Topics};

use crate::samples::{group, machine};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    let Some((selector, rest)) = data.split_first() else {
        return Verdict::Rejected;
    };
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let username = lines.next().unwrap_or("");
    let client_id = lines.next().unwrap_or("");
    let topic = lines.next().unwrap_or("");
    let groups: Vec<GroupId> = lines.filter_map(|g| GroupId::new(g).ok()).collect();
    let role = [Role::Viewer, Role::Operator, Role::Admin][usize::from(selector >> 2) % 3];

    let claim = Claim::parse(username);
    let principal = match claim.clone() {
        Some(c) => {
            let p = principal(c, role, groups);
            assert_eq!(p.username(), username, "{p:?} does not name itself back");
            p
        }
        // Unclaimed names still exercise the policy, as a fixed principal of each kind.
        None => match selector % 4 {
            0 => Principal::Platform,
            1 => principal(Claim::Operator("alice".into()), role, groups),
            2 => principal(Claim::Integrator("erp".into()), role, groups),
            _ => principal(Claim::Machine(machine()), role, vec![group()]),
        },
    };

    let topics = Topics::default();
    if principal.accepts_client_id(client_id) {
        if let Principal::Machine { id, .. } = &principal {
            assert_eq!(id.as_str(), client_id);
        }
    }
    let publish = principal.may_publish(&topics, client_id, topic);
    if publish {
        assert!(!topic.contains(['+', '#']), "publish on {topic:?}");
        if let Principal::Machine { id, .. } = &principal {
            assert!(
                matches!(
                    topics.parse(topic),
                    Some(Route::Status(m) | Route::State(m) | Route::Online(m) | Route::ChunkRequest(m))
                        if &m == id
                ),
                "{id} may publish on {topic:?}"
            );
        }
    }
    let subscribe = principal.may_subscribe(&topics, client_id, topic);
    if subscribe {
        assert!(
            principal == Principal::Platform || !topic.contains('#'),
            "{principal:?} may subscribe to {topic:?}"
        );
        // A '+' only where every topic it stands for is readable: try a few of them. (A
        // machine's release filters are the exception the other way: the `+` filter is the
        // only way to read them, a concrete kind is refused so that it never becomes a filter
        // of its own on rumqttd; what the filter reads is the machine's or its groups' own.)
        let release_filter = matches!(principal, Principal::Machine { .. })
            && topics.parse_release_filter(topic).is_some();
        if topic.contains('+') && principal.accepts_client_id(client_id) && !release_filter {
            for level in ["x", "vm-002", client_id] {
                let concrete = topic
                    .split('/')
                    .map(|l| if l == "+" { level } else { l })
                    .collect::<Vec<_>>()
                    .join("/");
                assert!(
                    principal.may_subscribe(&topics, client_id, &concrete),
                    "{principal:?} may subscribe to {topic:?} but not to {concrete:?}"
                );
            }
        }
        if let Principal::Machine { id, groups } = &principal {
            if !topic.contains('+') {
                let ok = match topics.parse(topic) {
                    Some(
                        Route::MachineRelease(m, _)
                        | Route::Command(m)
                        | Route::MachineChunks(m)
                        | Route::StatusAck(m),
                    ) => &m == id,
                    Some(Route::GroupRelease(g, _)) => groups.contains(&g),
                    Some(Route::ArtifactChunks(_) | Route::PlatformKeys) => true,
                    _ => false,
                };
                assert!(ok, "{id} in {groups:?} may subscribe to {topic:?}");
            }
        }
    }
    Verdict::from_ok(claim.is_some() || publish || subscribe)
}

fn principal(claim: Claim, role: Role, groups: Vec<GroupId>) -> Principal {
    match claim {
        Claim::Platform => Principal::Platform,
        Claim::Operator(name) => Principal::Operator { name, role },
        Claim::Integrator(name) => Principal::Integrator { name },
        Claim::Machine(id) => Principal::Machine { id, groups },
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let t = Topics::default();
    let m = machine();
    let g = group();
    let op = "fleetcast-op-alice.1a2b";
    let int = "fleetcast-int-erp";
    let seed = |selector: u8, lines: &[&str]| {
        let mut v = vec![selector];
        v.extend_from_slice(lines.join("\n").as_bytes());
        v
    };
    vec![
        seed(3, &[m.as_str(), m.as_str(), &t.status(&m)]),
        seed(3, &[m.as_str(), m.as_str(), &t.chunk_request(&m)]),
        seed(
            3,
            &[m.as_str(), m.as_str(), &t.group_release_filter(&g), g.as_str()],
        ),
        seed(3, &[m.as_str(), m.as_str(), &t.machine_release_filter(&m)]),
        seed(
            3,
            &[m.as_str(), m.as_str(), &t.artifact_chunks(&crate::samples::artifact())],
        ),
        seed(1, &["fleetcast-op-alice", op, &t.admin_request(op)]),
        seed(9, &["fleetcast-op-alice", op, &t.admin_response(op)]),
        seed(2, &[int, int, &t.integrator_events_get(int)]),
        seed(2, &[int, int, "fleet/rollouts/+/progress"]),
        seed(0, &["fleetcast-platform", "fleetcast-platform.x", "fleet/#"]),
    ]
}
