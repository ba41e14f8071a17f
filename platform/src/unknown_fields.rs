//! Fields of a request that this platform does not know. An admin request is an
//! `AdminRequest` with its op flattened into it, and `#[serde(deny_unknown_fields)]` does not
//! work with `flatten`: serde reads what it knows and drops the rest. So a newer CLI's field
//! (`groups` narrowing an `activate`) sent to an older platform was ignored, and the command
//! did more than asked (every target instead of a group's). The check compares what the client
//! sent with what the platform read from it, serialized again: a key the reading dropped, with
//! a value other than an absent one, is a field this platform does not know.

use serde_json::Value;

/// The first key of `sent` (the request as its client wrote it) that `read` (what this platform
/// parsed from it, serialized again) does not carry and whose value is not an absent one
/// (`null`, `false`, `0`, `""`, `[]`, `{}`: what a client leaves out as often as it sends, and
/// what an unknown field's default would be anyway). Objects are compared key by key, arrays of
/// the same length item by item; the path names where (`waves.pause_offline`,
/// `machines[2].site`).
///
/// Serialized again, a known field is left out only when its value is its default (`None`,
/// `false`, an empty list), which an absent value is too; so a known field is never taken for
/// an unknown one, whatever the fields' `skip_serializing_if`.
pub fn unknown_field(sent: &Value, read: &Value) -> Option<String> {
    match (sent, read) {
        (Value::Object(sent), Value::Object(read)) => {
            sent.iter().find_map(|(key, value)| match read.get(key) {
                None if absent(value) => None,
                None => Some(key.clone()),
                Some(read) => unknown_field(value, read).map(|inner| join(key, &inner)),
            })
        }
        (Value::Array(sent), Value::Array(read)) if sent.len() == read.len() => {
            sent.iter().zip(read).enumerate().find_map(|(i, (s, r))| {
                unknown_field(s, r).map(|inner| format!("[{i}]{}", dotted(&inner)))
            })
        }
        _ => None,
    }
}

/// `key.inner`, or `key[i]...` for an index.
fn join(key: &str, inner: &str) -> String {
    format!("{key}{}", dotted(inner))
}

fn dotted(inner: &str) -> String {
    if inner.starts_with('[') {
        inner.to_owned()
    } else {
        format!(".{inner}")
    }
}

/// What a client may send for a field it means to leave unset.
fn absent(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::admin::{AdminOp, AdminRequest};
    use serde_json::json;

    /// What the platform does with a request body: parse it, then look for what it dropped.
    fn check(sent: Value) -> Option<String> {
        let read: AdminRequest = serde_json::from_value(sent.clone()).expect("the body parses");
        unknown_field(&sent, &serde_json::to_value(&read).unwrap())
    }

    fn request(op: Value) -> Value {
        let mut body = json!({"client": "fleetcast-op-admin.1", "id": 1, "ctr": 2, "at_ms": 3});
        body.as_object_mut()
            .unwrap()
            .extend(op.as_object().unwrap().clone());
        body
    }

    #[test]
    fn a_field_this_platform_does_not_know_is_named_unless_its_value_is_absent() {
        let activate = |extra: Value| {
            let mut op = json!({"op": "activate", "release": "r-000001", "machines": []});
            op.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            check(request(op))
        };
        // Known, with every kind of value, set or left at its default.
        assert_eq!(activate(json!({})), None);
        assert_eq!(activate(json!({"groups": ["north"]})), None);
        assert_eq!(activate(json!({"groups": []})), None);
        // Unknown: refused unless it says nothing.
        assert_eq!(activate(json!({"sites": ["north"]})), Some("sites".into()));
        assert_eq!(activate(json!({"dry_run": true})), Some("dry_run".into()));
        assert_eq!(activate(json!({"batch": 5})), Some("batch".into()));
        assert_eq!(activate(json!({"note": "x"})), Some("note".into()));
        assert_eq!(activate(json!({"opts": {"a": 0}})), Some("opts".into()));
        for absent in [
            json!(null),
            json!(false),
            json!(0),
            json!(0.0),
            json!(""),
            json!([]),
            json!({}),
        ] {
            assert_eq!(activate(json!({ "later": absent })), None, "{absent}");
        }
    }

    #[test]
    fn optional_and_defaulted_fields_are_known_and_nested_unknown_fields_are_named_by_path() {
        // Fields the platform leaves out when it serializes them at their default.
        let publish = json!({
            "op": "release_publish", "release": "r-000001", "machines": ["vm-1"], "groups": [],
            "allow_empty": false,
            "waves": {"waves_bp": [1000, 10000], "success_bp": 9500, "failure_bp": 500, "wave_timeout_ms": 0}
        });
        assert_eq!(check(request(publish.clone())), None);
        let mut with_true = publish.clone();
        with_true["allow_empty"] = json!(true);
        assert_eq!(check(request(with_true)), None);
        let mut nested = publish;
        nested["waves"]["pause_offline"] = json!(true);
        assert_eq!(check(request(nested)), Some("waves.pause_offline".into()));
        let batch = json!({"op": "machine_provision_batch", "machines": [
            {"machine": "vm-1"}, {"machine": "vm-2", "groups": ["north"], "site": "berlin"}
        ]});
        assert_eq!(check(request(batch)), Some("machines[1].site".into()));
        // Flattened filters, limits of 0, unit ops.
        let query = json!({"op": "machine_query", "group": "north", "online": false, "limit": 0});
        assert_eq!(check(request(query)), None);
        assert_eq!(check(request(json!({"op": "stats"}))), None);
        assert_eq!(
            check(request(json!({"op": "stats", "detail": "all"}))),
            Some("detail".into())
        );
        // The envelope's own fields are known; one it does not know is named too.
        let read = AdminRequest {
            client: "c".into(),
            id: 1,
            ctr: 1,
            at_ms: 1,
            op: AdminOp::Stats,
        };
        let mut sent = serde_json::to_value(&read).unwrap();
        assert_eq!(
            unknown_field(&sent, &serde_json::to_value(&read).unwrap()),
            None
        );
        sent["signed_by"] = json!("alice");
        assert_eq!(
            unknown_field(&sent, &serde_json::to_value(&read).unwrap()),
            Some("signed_by".into())
        );
    }
}
