//! docs/asyncapi.yaml and docs/protocol.md against the code: the AsyncAPI channels are exactly
//! the topics `Topics` builds, their QoS, retain flag and direction are the ones in the table of
//! protocol.md §2, every JSON body schema has exactly the fields the code writes and requires,
//! and every admin op and reply is in protocol.md §8.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use fleetcast_proto::admin::{
    AdminOp, AdminRequest, AdminResponse, FleetEvent, ResponseEnvelope, RolloutProgress,
};
use fleetcast_proto::auth::{MacEnvelope, SignedEnvelope};
use fleetcast_proto::chunk::ChunkRequest;
use fleetcast_proto::command::{Command, CommandAction};
use fleetcast_proto::events::{EventBatch, EventsRequest};
use fleetcast_proto::keychain::{KeyAnnouncement, KeyChain};
use fleetcast_proto::release::ArtifactRef;
use fleetcast_proto::status::{KindState, Progress};
use fleetcast_proto::{
    ArtifactId, GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseNotice, Route, StatusAck,
    StatusEvent, Target, Topics,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::vectors;

pub(crate) fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn yaml_to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(s) => Value::from(s.parse::<f64>().unwrap()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::from(s.clone()),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => panic!("unsupported YAML key {other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Null => Value::Null,
        other => panic!("unsupported YAML value {other:?}"),
    }
}

fn asyncapi() -> Value {
    let docs = yaml_rust2::YamlLoader::load_from_str(&repo_file("docs/asyncapi.yaml"))
        .expect("docs/asyncapi.yaml is YAML");
    assert_eq!(docs.len(), 1);
    yaml_to_json(&docs[0])
}

/// channel id -> address
fn channels(doc: &Value) -> BTreeMap<String, String> {
    doc["channels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, c)| (id.clone(), c["address"].as_str().unwrap().to_owned()))
        .collect()
}

// Sentinel ids, replaced by the parameter names the documents use.
const M: &str = "MACHINE";
const G: &str = "GROUP";
const K: &str = "KIND";
const R: &str = "RELEASE";
const C: &str = "CLIENT";

fn artifact() -> ArtifactId {
    ArtifactId::from_bytes([0xab; 32])
}

fn to_pattern(topic: &str) -> String {
    topic
        .replace(M, "{m}")
        .replace(G, "{g}")
        .replace(K, "{kind}")
        .replace(R, "{r}")
        .replace(C, "{client}")
        .replace(&artifact().to_hex(), "{a}")
}

/// What every public topic method of `Topics` returns, by method name, as patterns.
fn topic_methods() -> BTreeMap<&'static str, Vec<String>> {
    let t = Topics::default();
    let (m, g, k) = (
        MachineId::new(M).unwrap(),
        GroupId::new(G).unwrap(),
        Kind::new(K).unwrap(),
    );
    let a = artifact();
    let one = |s: String| vec![s];
    let methods: Vec<(&str, Vec<String>)> = vec![
        ("machine_release", one(t.machine_release(&m, &k))),
        ("group_release", one(t.group_release(&g, &k))),
        (
            "release",
            vec![
                t.release(&Target::Machine(m.clone()), &k),
                t.release(&Target::Group(g.clone()), &k),
            ],
        ),
        ("machine_release_filter", one(t.machine_release_filter(&m))),
        ("group_release_filter", one(t.group_release_filter(&g))),
        ("command", one(t.command(&m))),
        ("machine_chunks", one(t.machine_chunks(&m))),
        ("artifact_chunks", one(t.artifact_chunks(&a))),
        ("chunk_request", one(t.chunk_request(&m))),
        ("status", one(t.status(&m))),
        ("status_ack", one(t.status_ack(&m))),
        ("state", one(t.state(&m))),
        ("online", one(t.online(&m))),
        ("admin_request", one(t.admin_request(C))),
        ("admin_response", one(t.admin_response(C))),
        ("admin_upload", one(t.admin_upload(C))),
        ("rollout_progress", one(t.rollout_progress(R))),
        ("events", one(t.events())),
        ("integrator_events_get", one(t.integrator_events_get(C))),
        ("integrator_events", one(t.integrator_events(C))),
        (
            "platform_integrator_request_filter",
            one(t.platform_integrator_request_filter()),
        ),
        ("platform_keys", one(t.platform_keys())),
        ("platform_status_filter", one(t.platform_status_filter())),
        ("platform_state_filter", one(t.platform_state_filter())),
        ("platform_online_filter", one(t.platform_online_filter())),
        (
            "platform_chunk_request_filter",
            one(t.platform_chunk_request_filter()),
        ),
        ("chunk_filters", t.chunk_filters()),
        ("bulk_filters", t.bulk_filters()),
        ("platform_inbound_filters", t.platform_inbound_filters()),
        ("platform_burst_filters", t.platform_burst_filters()),
        (
            "platform_admin_request_filter",
            one(t.platform_admin_request_filter()),
        ),
        (
            "platform_admin_upload_filter",
            one(t.platform_admin_upload_filter()),
        ),
    ];
    methods
        .into_iter()
        .map(|(name, topics)| (name, topics.iter().map(|t| to_pattern(t)).collect()))
        .collect()
}

/// Whether subscription `filter` (a pattern that may hold `+`) covers channel `address`.
fn covers(filter: &str, address: &str) -> bool {
    let (f, a): (Vec<&str>, Vec<&str>) =
        (filter.split('/').collect(), address.split('/').collect());
    f.len() == a.len()
        && f.iter()
            .zip(&a)
            .all(|(f, a)| f == a || (*f == "+" && a.starts_with('{')))
}

#[test]
fn the_channels_are_exactly_the_topics_the_code_builds() {
    let doc = asyncapi();
    assert_eq!(doc["asyncapi"], "3.0.0");
    let addresses: BTreeSet<String> = channels(&doc).into_values().collect();
    let methods = topic_methods();

    // Every public method that builds a topic is listed above (a new one must be added here,
    // and its topic to the AsyncAPI document and protocol.md §2).
    let source = repo_file("proto/src/topics.rs");
    let public: BTreeSet<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub fn "))
        .map(|l| l.split('(').next().unwrap())
        .filter(|name| !matches!(*name, "new" | "prefix" | "parse" | "parse_release_filter"))
        .collect();
    let listed: BTreeSet<&str> = methods.keys().copied().collect();
    assert_eq!(
        public, listed,
        "Topics methods vs the ones this test covers"
    );

    let mut built = BTreeSet::new();
    for (name, patterns) in &methods {
        for p in patterns {
            if p.contains('+') {
                assert!(
                    addresses.iter().any(|a| covers(p, a)),
                    "{name}: filter {p} covers no channel"
                );
            } else {
                assert!(addresses.contains(p), "{name}: topic {p} is not a channel");
                built.insert(p.clone());
            }
        }
    }
    assert_eq!(
        addresses, built,
        "channels in docs/asyncapi.yaml vs topics the code builds"
    );

    // Every channel, with concrete ids, parses back to a route (the code receives it).
    let t = Topics::default();
    for address in &addresses {
        let concrete = address
            .replace("{m}", "vm-001")
            .replace("{g}", "shanghai")
            .replace("{kind}", "app")
            .replace("{r}", "r-000007")
            .replace("{client}", "fleetcast-int-erp")
            .replace("{a}", &artifact().to_hex());
        let route = t.parse(&concrete);
        assert!(route.is_some(), "{concrete} does not parse");
        if address.ends_with("/online") {
            assert!(matches!(route, Some(Route::Online(_))));
        }
    }
}

/// The rows of the topic table in protocol.md §2: topic -> (direction, QoS cell, retained cell).
fn protocol_topic_table() -> BTreeMap<String, (String, String, String)> {
    let text = repo_file("docs/protocol.md");
    let section = text
        .split("\n## 2. Topics")
        .nth(1)
        .expect("protocol.md has §2")
        .split("\n### ")
        .next()
        .unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let topic = cells[1].trim_matches('`').to_owned();
        rows.insert(
            topic,
            (
                cells[2].to_owned(),
                cells[3].to_owned(),
                cells[4].to_owned(),
            ),
        );
    }
    rows
}

#[test]
fn qos_retain_and_direction_match_the_table_in_protocol_md() {
    let doc = asyncapi();
    let table = protocol_topic_table();
    let channels = channels(&doc);
    assert_eq!(
        table.keys().cloned().collect::<BTreeSet<_>>(),
        channels.values().cloned().collect::<BTreeSet<_>>(),
        "topics in protocol.md §2 vs channels in docs/asyncapi.yaml"
    );
    let operations = doc["operations"].as_object().unwrap();
    for (id, address) in &channels {
        let reference = format!("#/channels/{id}");
        let ops: Vec<&Value> = operations
            .values()
            .filter(|o| o["channel"]["$ref"] == reference.as_str())
            .collect();
        assert_eq!(ops.len(), 1, "{address}: one operation");
        let mqtt = &ops[0]["bindings"]["mqtt"];
        let (direction, qos, retained) = &table[address];
        let table_qos: i64 = qos[..1].parse().unwrap();
        assert_eq!(mqtt["qos"], table_qos, "{address}: QoS");
        assert_eq!(mqtt["retain"], retained == "yes", "{address}: retained");
        assert_eq!(
            doc["channels"][id]["x-direction"],
            direction.as_str(),
            "{address}: direction"
        );
        let sends = direction.starts_with("platform →");
        assert_eq!(
            ops[0]["action"],
            if sends { "send" } else { "receive" },
            "{address}: action"
        );
    }
}

/// The JSON keys `value` serializes to.
fn keys<T: Serialize>(value: &T) -> BTreeSet<String> {
    serde_json::to_value(value)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// The keys of `minimal` without which it no longer parses as `T`.
fn required<T: Serialize + DeserializeOwned>(minimal: &T) -> BTreeSet<String> {
    let json = serde_json::to_value(minimal).unwrap();
    let obj = json.as_object().unwrap();
    obj.keys()
        .filter(|k| {
            let mut without = obj.clone();
            without.remove(*k);
            serde_json::from_value::<T>(Value::Object(without)).is_err()
        })
        .cloned()
        .collect()
}

/// `full` sets every optional field, `minimal` none.
fn check_schema<T: Serialize + DeserializeOwned>(doc: &Value, name: &str, full: &T, minimal: &T) {
    let schema = &doc["components"]["schemas"][name];
    let properties: BTreeSet<String> = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has properties"))
        .keys()
        .cloned()
        .collect();
    let listed_required: BTreeSet<String> = schema["required"]
        .as_array()
        .map(|r| r.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    assert_eq!(properties, keys(full), "schema {name}: properties");
    assert_eq!(
        listed_required,
        required(minimal),
        "schema {name}: required"
    );
}

#[test]
fn body_schemas_have_the_fields_the_code_writes_and_requires() {
    let doc = asyncapi();
    let notice = ReleaseNotice {
        rollback: true,
        ..vectors::release_notice()
    };
    check_schema(&doc, "ReleaseNotice", &notice, &notice);
    let artifact = notice.artifact.clone();
    check_schema::<ArtifactRef>(&doc, "ArtifactRef", &artifact, &artifact);
    check_schema(
        &doc,
        "InstallPolicy",
        &"window:02:00-04:00@+08:00"
            .parse::<InstallPolicy>()
            .unwrap(),
        &InstallPolicy::Immediate,
    );
    let command = |action| Command {
        machine: vectors::vm(),
        seq: 43,
        issued_at_ms: 1,
        action,
    };
    // A command's fields depend on its action: the schema lists every action's, and requires
    // what every command has.
    let activate = command(CommandAction::Activate {
        release: vectors::r7(),
    });
    let groups = command(CommandAction::Groups {
        groups: vec![GroupId::new("shanghai").unwrap()],
    });
    let schema = &doc["components"]["schemas"]["Command"];
    let listed: BTreeSet<String> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut written = keys(&activate);
    written.extend(keys(&groups));
    assert_eq!(listed, written, "schema Command: properties");
    let listed_required: BTreeSet<String> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed_required,
        required(&command(CommandAction::Report)),
        "schema Command: required"
    );
    let actions: BTreeSet<&str> = schema["properties"]["action"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        BTreeSet::from(["activate", "cancel", "report", "groups"]),
        "schema Command: actions"
    );
    let full_event = StatusEvent {
        error: Some("e".into()),
        detail: Some("d".into()),
        ..vectors::status_event()
    };
    let minimal_event = StatusEvent {
        release: None,
        progress: None,
        ..vectors::status_event()
    };
    check_schema(&doc, "StatusEvent", &full_event, &minimal_event);
    let progress = Progress { bytes: 1, total: 2 };
    check_schema(&doc, "Progress", &progress, &progress);
    let ack = StatusAck {
        machine: vectors::vm(),
        ctr: 1,
    };
    check_schema(&doc, "StatusAck", &ack, &ack);
    let kind_state = vectors::machine_state().kinds[&Kind::new("app").unwrap()].clone();
    check_schema(&doc, "KindState", &kind_state, &KindState::default());
    let state = vectors::machine_state();
    check_schema(&doc, "MachineState", &state, &state);
    let request = vectors::chunk_request();
    let windowed = ChunkRequest {
        manifest: true,
        manifest_parts: Some((0, 1)),
        ..request.clone()
    };
    check_schema::<ChunkRequest>(&doc, "ChunkRequest", &windowed, &request);
    let response = ResponseEnvelope {
        id: 1,
        sealed: Some("x".into()),
        unverified_error: Some("y".into()),
    };
    let bare = ResponseEnvelope {
        id: 1,
        sealed: None,
        unverified_error: None,
    };
    check_schema(&doc, "ResponseEnvelope", &response, &bare);
    let both = AdminResponse {
        error: Some("e".into()),
        ..AdminResponse::ok(
            1,
            2,
            fleetcast_proto::admin::AdminReply::Done {
                message: "m".into(),
            },
        )
    };
    check_schema(
        &doc,
        "AdminResponse",
        &both,
        &AdminResponse::error(1, 2, "e"),
    );
    let rollout = RolloutProgress {
        release: vectors::r7(),
        kind: Kind::new("app").unwrap(),
        version: "1".into(),
        total: 1,
        phases: [(Phase::Installed, 1)].into(),
        finished: 1,
        succeeded: 1,
        failed: 0,
        updated_at_ms: 1,
    };
    check_schema(&doc, "RolloutProgress", &rollout, &rollout);
    let event = FleetEvent {
        progress: Some(progress),
        error: Some("e".into()),
        detail: Some("d".into()),
        ..vectors::fleet_event()
    };
    let bare_event = FleetEvent {
        release: None,
        ..vectors::fleet_event()
    };
    check_schema(&doc, "FleetEvent", &event, &bare_event);
    check_schema(
        &doc,
        "EventsRequest",
        &EventsRequest {
            since: 1,
            limit: Some(5),
        },
        &EventsRequest {
            since: 1,
            limit: None,
        },
    );
    let batch = EventBatch {
        client: "c".into(),
        since: 0,
        events: vec![],
        next: 0,
        more: false,
    };
    check_schema(&doc, "EventBatch", &batch, &batch);
    let signed = SignedEnvelope {
        body: "{}".into(),
        sig: "00".repeat(64),
        gen: 1,
    };
    let gen0 = SignedEnvelope {
        gen: 0,
        ..signed.clone()
    };
    check_schema(&doc, "SignedEnvelope", &signed, &gen0);
    let mac = MacEnvelope {
        body: "{}".into(),
        mac: "00".repeat(32),
    };
    check_schema(&doc, "MacEnvelope", &mac, &mac);
    let chain = KeyChain {
        links: vec![signed],
    };
    check_schema(&doc, "KeyChain", &chain, &chain);
    let announcement = KeyAnnouncement {
        generation: 1,
        key: fleetcast_proto::auth::PlatformKey::from_seed([1; 32]).public(),
        issued_at_ms: 1,
    };
    check_schema(&doc, "KeyAnnouncement", &announcement, &announcement);
    // Admin requests carry their op's fields beside the common ones.
    let admin = AdminRequest {
        op: AdminOp::Machines,
        ..vectors::admin_request()
    };
    check_schema(&doc, "AdminRequest", &admin, &admin);
    // The phases the schema lists are the phases there are.
    let phases: Vec<String> = Phase::ALL.iter().map(|p| p.to_string()).collect();
    let listed: Vec<String> = doc["components"]["schemas"]["Phase"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, phases);
}

/// CamelCase variant names of an enum in `source`, as snake_case.
fn variants(source: &str, enum_decl: &str) -> Vec<String> {
    let body = source
        .split(enum_decl)
        .nth(1)
        .unwrap_or_else(|| panic!("{enum_decl} not found"));
    let body = &body[..body.find("\n}\n").unwrap()];
    body.lines()
        .filter(|l| l.starts_with("    ") && !l.starts_with("     "))
        .map(str::trim)
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        .map(|l| {
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            let mut snake = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            }
            snake
        })
        .collect()
}

#[test]
fn every_admin_op_and_reply_is_in_protocol_md() {
    let source = repo_file("proto/src/admin.rs");
    let text = repo_file("docs/protocol.md");
    let section = text.split("\n## 8. ").nth(1).unwrap();
    let section = section.split("\n## 9. ").next().unwrap();
    let ops = variants(&source, "pub enum AdminOp {");
    let replies = variants(&source, "pub enum AdminReply {");
    assert!(
        ops.len() >= 20 && replies.len() >= 15,
        "{ops:?} {replies:?}"
    );
    for op in &ops {
        assert!(
            section.contains(&format!("| `{op}` |")),
            "op {op} has no row in protocol.md §8"
        );
    }
    for reply in &replies {
        assert!(
            section.contains(&format!("`{reply}")),
            "reply {reply} is not named in protocol.md §8"
        );
    }
}
