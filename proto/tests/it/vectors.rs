//! The test vectors in docs/test-vectors/: every value is computed here from fixed inputs with
//! the real code and compared with the file, and every file's vectors are also checked the way
//! a receiver checks them (signatures verify, MACs open, frames decode, manifests merge to the
//! artifact id). `FLEETCAST_REGEN_VECTORS=1 cargo test -p fleetcast-proto --test it vectors`
//! rewrites the files instead of comparing (then review the diff: a changed vector is a
//! protocol change).

use std::path::{Path, PathBuf};

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use fleetcast_proto::admin::{
    AdminOp, AdminReply, AdminRequest, AdminResponse, FleetEvent, RolloutProgress,
};
use fleetcast_proto::auth::{PlatformKey, PlatformPublicKey, Purpose, Secret};
use fleetcast_proto::chunk::{
    chunk_cv, decode_frame, encode_frame, encode_upload_frame, open_upload_frame, root_from_cvs,
    ChunkRequest, ChunkVerifier, FrameHeader, FrameType, Layout, ManifestBuilder,
};
use fleetcast_proto::command::{Command, CommandAction};
use fleetcast_proto::events::EventBatch;
use fleetcast_proto::keychain::KeyAnnouncement;
use fleetcast_proto::release::{compare_versions, validate_version, ArtifactRef};
use fleetcast_proto::status::{KindState, Progress};
use fleetcast_proto::{
    ArtifactId, GroupId, InstallPolicy, Kind, MachineId, MachineState, Phase, ReleaseId,
    ReleaseNotice, StatusAck, StatusEvent, Target,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::asyncapi::repo_file;

const REGENERATE: &str =
    "FLEETCAST_REGEN_VECTORS=1 cargo test -p fleetcast-proto --test it vectors";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/test-vectors")
}

fn regenerating() -> bool {
    std::env::var("FLEETCAST_REGEN_VECTORS").is_ok_and(|v| v == "1")
}

/// Where two JSON values first differ, as a JSON pointer.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => {
                        if let Some(d) = first_difference(v, w, format!("{at}/{k}")) {
                            return Some(d);
                        }
                    }
                    _ => return Some(format!("{at}/{k}")),
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}/{i}"))),
        _ => (a != b).then_some(at),
    }
}

/// Compares `built` with the file (or writes it when regenerating); returns the file's content.
fn check_file(name: &str, built: Value) -> Value {
    let path = dir().join(name);
    if regenerating() {
        std::fs::create_dir_all(dir()).unwrap();
        let mut text = serde_json::to_string_pretty(&built).unwrap();
        text.push('\n');
        std::fs::write(&path, text).unwrap();
        return built;
    }
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (generate it: {REGENERATE})", path.display()));
    let on_disk: Value = serde_json::from_slice(&bytes).unwrap();
    if let Some(at) = first_difference(&on_disk, &built, String::new()) {
        panic!(
            "{name} differs from what the code computes at {at}:\n file: {}\n code: {}\nIf the protocol changed on purpose, regenerate ({REGENERATE}) and review the diff.",
            pointer(&on_disk, &at),
            pointer(&built, &at)
        );
    }
    on_disk
}

fn pointer(v: &Value, at: &str) -> String {
    v.pointer(at)
        .map(|v| v.to_string())
        .unwrap_or_else(|| "(absent)".into())
}

fn header(about: &str, section: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("about".into(), json!(about));
    m.insert(
        "protocol".into(),
        json!(format!("docs/protocol.md {section}")),
    );
    m.insert(
        "regenerate".into(),
        json!(format!(
            "{REGENERATE} (proto/tests/it/vectors.rs; the same test fails if the code and this file disagree)"
        )),
    );
    m
}

fn file(mut head: serde_json::Map<String, Value>, body: Value) -> Value {
    if let Value::Object(b) = body {
        head.extend(b);
    }
    Value::Object(head)
}

fn str_of(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .to_owned()
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

// --- fixed inputs ---

/// Byte `i` of every test artifact is `i mod 251` (BLAKE3's own test-vector input).
fn artifact_bytes(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// The machine (and operator) secret of every MAC vector: bytes 0x00, 0x01, ... 0x1f.
fn secret() -> Secret {
    Secret::from_bytes(std::array::from_fn(|i| i as u8))
}

/// The platform signing key (ed25519 seed) of every signature vector: bytes 0x80 ... 0x9f.
fn platform_key() -> PlatformKey {
    PlatformKey::from_seed(std::array::from_fn(|i| 0x80 + i as u8))
}

/// The generation-1 key the key-rotation vector announces: seed bytes 0xa0 ... 0xbf.
fn next_platform_key() -> PlatformKey {
    PlatformKey::with_generation(std::array::from_fn(|i| 0xa0 + i as u8), 1)
}

pub(crate) fn vm() -> MachineId {
    MachineId::new("vm-001").unwrap()
}
fn app() -> Kind {
    Kind::new("app").unwrap()
}
pub(crate) fn r7() -> ReleaseId {
    ReleaseId::new("r-000007").unwrap()
}
/// The artifact of the worked example in §7.1: 2,500 bytes at 1,024-byte chunks.
fn example_artifact() -> (Vec<u8>, Layout) {
    let bytes = artifact_bytes(2500);
    let layout = Layout::new(2500, 1024).unwrap();
    (bytes, layout)
}

fn tag_text(purpose: &str) -> String {
    format!("fleetcast/v1/{purpose}\0")
}

// --- chunks ---

fn largest_power_of_two_below(n: usize) -> usize {
    let mut p = 1;
    while p * 2 < n {
        p *= 2;
    }
    p
}

/// Merges CVs the way BLAKE3's tree does, recording every parent node (left to right, bottom up).
fn merge_recording(cvs: &[[u8; 32]], root: bool, nodes: &mut Vec<Value>) -> [u8; 32] {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let k = largest_power_of_two_below(cvs.len());
    let left = merge_recording(&cvs[..k], false, nodes);
    let right = merge_recording(&cvs[k..], false, nodes);
    let cv = if root {
        *merge_subtrees_root(&left, &right, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(&left, &right, Mode::Hash)
    };
    nodes.push(json!({
        "left": hex::encode(left),
        "right": hex::encode(right),
        "root": root,
        "cv": hex::encode(cv),
    }));
    cv
}

fn chunk_vector(name: &str, size: usize, chunk_size: u32, with_parents: bool) -> Value {
    let bytes = artifact_bytes(size);
    let layout = Layout::new(size as u64, chunk_size).unwrap();
    let id = ArtifactId::of(&bytes);
    let mut builder = ManifestBuilder::new(layout);
    let mut chunks = Vec::new();
    let mut cvs = Vec::new();
    let per_chunk = (chunk_size / 1024) as u64;
    for i in 0..layout.chunks {
        let start = layout.offset(i) as usize;
        let data = &bytes[start..start + layout.chunk_len(i)];
        builder.push_chunk(data);
        let cv = chunk_cv(&layout, i, data);
        cvs.push(cv);
        let first_counter = i as u64 * per_chunk;
        let leaves = data.len().div_ceil(1024) as u64;
        let mut entry = json!({
            "index": i,
            "offset": start,
            "len": data.len(),
            "blake3_chunk_counters": [first_counter, first_counter + leaves - 1],
            "cv": hex::encode(cv),
        });
        if leaves > 1 {
            // The chunk's own subtree: one leaf per 1,024 bytes, numbered by counter.
            let leaf_cvs: Vec<Value> = data
                .chunks(1024)
                .enumerate()
                .map(|(j, leaf)| {
                    let counter = first_counter + j as u64;
                    let cv = blake3::Hasher::new()
                        .set_input_offset(counter * 1024)
                        .update(leaf)
                        .finalize_non_root();
                    json!({"counter": counter, "cv": hex::encode(cv)})
                })
                .collect();
            entry["leaves"] = json!(leaf_cvs);
        }
        chunks.push(entry);
    }
    let manifest = builder.finish();
    let mut v = json!({
        "name": name,
        "size": size,
        "chunk_size": chunk_size,
        "chunk_count": layout.chunks,
        "artifact": id.to_hex(),
        "chunks": chunks,
        "manifest": hex::encode(&manifest),
        "manifest_parts": (0..layout.manifest_parts())
            .map(|p| hex::encode(&manifest[layout.manifest_part_range(p)]))
            .collect::<Vec<_>>(),
    });
    if layout.chunks >= 2 {
        let mut nodes = Vec::new();
        let root = merge_recording(&cvs, true, &mut nodes);
        assert_eq!(ArtifactId::from_bytes(root), id, "{name}: recorded merge");
        assert_eq!(
            ArtifactId::from(root_from_cvs(&cvs)),
            id,
            "{name}: root_from_cvs"
        );
        if with_parents {
            v["parents"] = json!(nodes);
        }
    } else {
        // What the platform answers a manifest request for a one-chunk artifact with: its one
        // non-root CV, which is not the artifact id.
        assert_ne!(cvs[0], *id.as_bytes());
    }
    v
}

fn chunk_file() -> Value {
    let vectors = vec![
        chunk_vector("one chunk of one BLAKE3 chunk", 1000, 1024, true),
        chunk_vector("one chunk of three BLAKE3 chunks", 3000, 4096, true),
        chunk_vector("two chunks", 2048, 1024, true),
        chunk_vector(
            "worked example: three chunks, the last one short",
            2500,
            1024,
            true,
        ),
        chunk_vector("chunks of two BLAKE3 chunks each", 5000, 2048, true),
        chunk_vector(
            "six chunks: the left subtree holds four",
            5 * 1024 + 17,
            1024,
            true,
        ),
        chunk_vector("a manifest in two parts", 33 * 1024 + 1, 1024, false),
    ];
    file(
        header(
            "Artifact chunk chaining values, manifests and roots. The artifact of `size` bytes has byte i = i mod 251. `chunks[k].cv` is chunk k's chaining value (non-root); `leaves` (for chunks longer than 1,024 bytes) are its BLAKE3 chunks' CVs; `parents` are the parent nodes merging the chunk CVs up to the root, bottom-up, left to right, the last one with the ROOT flag: its output is `artifact` (the plain BLAKE3 hash of the bytes). `manifest` is the chunk CVs concatenated, `manifest_parts` how it is cut into manifest frames. A one-chunk artifact's id is its plain hash; its `manifest` is what the platform sends when asked anyway. scripts/chunk_tree.py --check recomputes this file from the BLAKE3 compression function alone.",
            "§7.1",
        ),
        json!({ "vectors": vectors }),
    )
}

#[test]
fn chunk_vectors_match_the_code_and_verify() {
    let on_disk = check_file("chunks.json", chunk_file());
    for v in on_disk["vectors"].as_array().unwrap() {
        let size = v["size"].as_u64().unwrap();
        let layout = Layout::new(size, v["chunk_size"].as_u64().unwrap() as u32).unwrap();
        let artifact: ArtifactId = str_of(v, "artifact").parse().unwrap();
        let bytes = artifact_bytes(size as usize);
        let verifier = if layout.chunks == 1 {
            ChunkVerifier::single(artifact, layout)
        } else {
            ChunkVerifier::from_manifest(artifact, layout, &unhex(&str_of(v, "manifest"))).unwrap()
        };
        for i in 0..layout.chunks {
            let s = layout.offset(i) as usize;
            verifier
                .verify(i, &bytes[s..s + layout.chunk_len(i)])
                .unwrap();
        }
    }
}

/// Runs scripts/chunk_tree.py with `args`: its output, or `None` (skipped) without python3.
fn chunk_tree_py(args: &[&std::ffi::OsStr]) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/chunk_tree.py");
    let out = match std::process::Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            assert!(
                std::env::var("FLEETCAST_REQUIRE_PYTHON").is_err(),
                "python3 is required: {e}"
            );
            eprintln!("SKIPPED: no python3 ({e})");
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}

/// The language-neutral definition (scripts/chunk_tree.py: the BLAKE3 compression function and
/// nothing else) computes the same vectors.
#[test]
fn chunk_vectors_are_reproduced_from_the_compression_function_alone() {
    // Written (when regenerating) before the script reads it.
    check_file("chunks.json", chunk_file());
    let path = dir().join("chunks.json");
    if let Some(stdout) = chunk_tree_py(&["--check".as_ref(), path.as_os_str()]) {
        assert!(stdout.contains("7 chunk vectors, 0 failed"), "{stdout}");
    }
}

/// The same script's keyed_hash and derive_key (BLAKE3's other two modes, from the compression
/// function alone) compute the MAC and MQTT password vectors: an agent author without a BLAKE3
/// library has all three modes to port.
#[test]
fn mac_and_password_vectors_are_reproduced_from_the_compression_function_alone() {
    let dir = dir();
    if let Some(stdout) = chunk_tree_py(&["--check-keyed".as_ref(), dir.as_os_str()]) {
        assert!(stdout.contains("8 keyed vectors, 0 failed"), "{stdout}");
    }
}

/// protocol.md §7.1 prints the compression function for agent authors: it must be
/// scripts/chunk_tree.py's, which the test above runs against the vectors, line for line.
#[test]
fn protocol_md_prints_the_tested_compression_function() {
    let page = repo_file("docs/protocol.md");
    let script = repo_file("scripts/chunk_tree.py");
    let start = page
        .find("```python\n")
        .expect("protocol.md has a python block")
        + 10;
    let block = &page[start..start + page[start..].find("```").expect("the block ends")];
    for needle in [
        "IV = [0x6A09E667",
        "PERMUTATION = [",
        "def _g(",
        "def compress(",
    ] {
        assert!(block.contains(needle), "the block lacks {needle:?}");
    }
    assert!(
        script.contains(block),
        "protocol.md's python block is not scripts/chunk_tree.py's text:\n{block}"
    );
}

/// The status MAC example in protocol.md §3 prints the first vector's body and MAC.
#[test]
fn protocol_md_prints_the_first_status_vectors_body_and_mac() {
    let page = repo_file("docs/protocol.md");
    let macs: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("macs.json")).unwrap()).unwrap();
    let first = macs["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["purpose"] == "status")
        .expect("a status vector");
    let body = first["body"].as_str().unwrap();
    let mac = first["mac"].as_str().unwrap();
    assert!(
        page.contains(&format!("`{body}`")),
        "protocol.md lacks the body {body}"
    );
    assert!(page.contains(mac), "protocol.md lacks the MAC {mac}");
}

// --- MACs ---

pub(crate) fn status_event() -> StatusEvent {
    StatusEvent {
        machine: vm(),
        ctr: 1042,
        at_ms: 1795600001000,
        release: Some(r7()),
        kind: app(),
        version: "2.4.1".into(),
        phase: Phase::Downloading,
        progress: Some(Progress {
            bytes: 1048576,
            total: 52428800,
        }),
        attempt: 1,
        error: None,
        detail: None,
    }
}

/// The platform's acknowledgement of `status_event()`, MAC'd with the machine's secret.
fn status_ack() -> StatusAck {
    StatusAck {
        machine: vm(),
        ctr: status_event().ctr,
    }
}

pub(crate) fn machine_state() -> MachineState {
    MachineState {
        machine: vm(),
        ctr: 1043,
        at_ms: 1795600001000,
        agent_version: "0.1.0".into(),
        groups: vec![GroupId::new("shanghai").unwrap()],
        busy: false,
        kinds: [(
            app(),
            KindState {
                version: Some("2.4.0".into()),
                artifact: Some(ArtifactId::of(b"app 2.4.0")),
                release: Some(r7()),
                phase: Some(Phase::Downloading),
                seq: 42,
            },
        )]
        .into(),
        key_gen: 0,
    }
}

pub(crate) fn chunk_request() -> ChunkRequest {
    let (bytes, _) = example_artifact();
    ChunkRequest {
        machine: vm(),
        ctr: 1044,
        artifact: ArtifactId::of(&bytes),
        manifest: true,
        manifest_parts: None,
        chunks: vec![(0, 2), (2, 3)],
    }
}

pub(crate) fn admin_request() -> AdminRequest {
    AdminRequest {
        client: "fleetcast-op-alice.1a2b3c4d".into(),
        id: 1,
        ctr: 1795600000000123,
        at_ms: 1795600000000,
        op: AdminOp::ReleaseStatus {
            release: r7(),
            after: None,
            limit: None,
        },
    }
}

fn mac_vector<T>(secret: &Secret, purpose: Purpose, name: &str, body: &T) -> Value
where
    T: serde::Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let envelope = secret.seal(purpose, body);
    let env: Value = serde_json::from_slice(&envelope).unwrap();
    let opened: T = secret.open(purpose, &envelope).unwrap();
    assert_eq!(&opened, body);
    json!({
        "purpose": name,
        "tag": tag_text(name),
        "body": env["body"],
        "mac": env["mac"],
        "envelope": String::from_utf8(envelope).unwrap(),
    })
}

/// An admin response sealed with a fixed nonce (the platform draws a random one).
fn sealed_response(secret: &Secret, client: &str, nonce: [u8; 24], plain: &[u8]) -> String {
    use base64::Engine;
    use chacha20poly1305::aead::{Aead, Payload};
    use chacha20poly1305::KeyInit;
    let key = blake3::derive_key("fleetcast v1 sealed box key", secret.as_bytes());
    let mut aad = tag_text("admin-response").into_bytes();
    aad.extend_from_slice(client.as_bytes());
    let ct = chacha20poly1305::XChaCha20Poly1305::new(&key.into())
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: plain,
                aad: &aad,
            },
        )
        .unwrap();
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    base64::engine::general_purpose::STANDARD.encode(out)
}

fn mac_file() -> Value {
    let secret = secret();
    let (bytes, layout) = example_artifact();
    let upload = encode_upload_frame(
        &secret,
        &FrameHeader {
            frame_type: FrameType::UploadPart,
            artifact: ArtifactId::of(&bytes),
            index: 2,
            total: layout.chunks,
        },
        &bytes[2048..],
    );
    let (frame, mac) = upload.split_at(upload.len() - 32);
    let error = fleetcast_proto::chunk::encode_error_frame(
        &secret,
        &FrameHeader {
            frame_type: FrameType::Error,
            artifact: ArtifactId::of(&bytes),
            index: 0,
            total: 0,
        },
        b"unknown artifact",
    );
    let (error_frame, error_mac) = error.split_at(error.len() - 32);
    let client = admin_request().client;
    let response = AdminResponse::ok(
        1,
        admin_request().ctr,
        AdminReply::Done {
            message: "ok".into(),
        },
    );
    let plain = serde_json::to_vec(&response).unwrap();
    let nonce: [u8; 24] = std::array::from_fn(|i| 0x40 + i as u8);
    let sealed = sealed_response(&secret, &client, nonce, &plain);
    let opened: AdminResponse = secret
        .open_box(Purpose::AdminResponse, &client, &sealed)
        .expect("the real code opens the vector's box");
    assert_eq!(opened, response);
    let mut aad = tag_text("admin-response").into_bytes();
    aad.extend_from_slice(client.as_bytes());
    file(
        header(
            "MACs (machine and operator -> platform, and status acks platform -> machine with the machine's secret). mac = hex(BLAKE3 keyed_hash(key = the 32-byte secret, message = tag || body)), tag = the ASCII text then one zero byte, body = the exact UTF-8 of the envelope's body string. `envelope` is the exact message the reference implementation publishes. `upload_part` MACs a binary frame instead of a body, and so does `error_frame` (a chunk error frame to the machine, on its own chunks topic); `sealed_box` is an admin response sealed for the operator with a fixed nonce (the platform draws a random one).",
            "§3, §6, §7.3, §8",
        ),
        json!({
            "secret": secret.to_hex(),
            "vectors": [
                mac_vector(&secret, Purpose::Status, "status", &status_event()),
                mac_vector(&secret, Purpose::StatusAck, "status-ack", &status_ack()),
                mac_vector(&secret, Purpose::State, "state", &machine_state()),
                mac_vector(&secret, Purpose::ChunkRequest, "chunks-get", &chunk_request()),
                mac_vector(&secret, Purpose::Admin, "admin", &admin_request()),
            ],
            "upload_part": {
                "purpose": "upload-part",
                "tag": tag_text("upload-part"),
                "frame": hex::encode(frame),
                "mac": hex::encode(mac),
                "published": hex::encode(&upload),
            },
            "error_frame": {
                "purpose": "chunk-error",
                "tag": tag_text("chunk-error"),
                "frame": hex::encode(error_frame),
                "mac": hex::encode(error_mac),
                "published": hex::encode(&error),
            },
            "sealed_box": {
                "purpose": "admin-response",
                "key": hex::encode(blake3::derive_key("fleetcast v1 sealed box key", secret.as_bytes())),
                "client": client,
                "aad": hex::encode(&aad),
                "nonce": hex::encode(nonce),
                "plaintext": String::from_utf8(plain).unwrap(),
                "sealed": sealed,
                "envelope": serde_json::to_string(&json!({"id": 1, "sealed": sealed})).unwrap(),
            },
        }),
    )
}

#[test]
fn mac_vectors_match_the_code_and_open() {
    let on_disk = check_file("macs.json", mac_file());
    let secret: Secret = str_of(&on_disk, "secret").parse().unwrap();
    let vectors = on_disk["vectors"].as_array().unwrap();
    for v in vectors {
        let envelope = str_of(v, "envelope");
        let purpose = match v["purpose"].as_str().unwrap() {
            "status" => Purpose::Status,
            "status-ack" => Purpose::StatusAck,
            "state" => Purpose::State,
            "chunks-get" => Purpose::ChunkRequest,
            "admin" => Purpose::Admin,
            other => panic!("unknown purpose {other}"),
        };
        let body: Value = secret.open(purpose, envelope.as_bytes()).unwrap();
        assert_eq!(
            body,
            serde_json::from_str::<Value>(&str_of(v, "body")).unwrap()
        );
        // The TAG tells the families apart: an ack is not a status event, nor the other way.
        for other in [
            Purpose::Status,
            Purpose::StatusAck,
            Purpose::State,
            Purpose::ChunkRequest,
            Purpose::Admin,
        ] {
            if other != purpose {
                assert!(secret.open::<Value>(other, envelope.as_bytes()).is_err());
            }
        }
        let mut tagged = str_of(v, "tag").into_bytes();
        tagged.extend_from_slice(str_of(v, "body").as_bytes());
        assert_eq!(
            blake3::keyed_hash(secret.as_bytes(), &tagged)
                .to_hex()
                .as_str(),
            str_of(v, "mac")
        );
    }
    // Each MAC'd purpose with a JSON body appears once.
    assert_eq!(vectors.len(), 5);
    let up = &on_disk["upload_part"];
    let published = unhex(&str_of(up, "published"));
    let (header, payload) = open_upload_frame(&secret, &published).unwrap();
    assert_eq!((header.index, payload.len()), (2, 452));
    let ef = &on_disk["error_frame"];
    let published = unhex(&str_of(ef, "published"));
    let frame = fleetcast_proto::chunk::open_error_frame(&secret, &published)
        .expect("the error frame vector opens with the machine's secret");
    let (header, reason) = decode_frame(frame).unwrap();
    assert_eq!(
        (header.frame_type, reason),
        (FrameType::Error, &b"unknown artifact"[..])
    );
    assert_eq!(hex::encode(frame), str_of(ef, "frame"));
    let mut tagged = tag_text("chunk-error").into_bytes();
    tagged.extend_from_slice(frame);
    assert_eq!(
        blake3::keyed_hash(secret.as_bytes(), &tagged)
            .to_hex()
            .as_str(),
        str_of(ef, "mac")
    );
    let sealed = &on_disk["sealed_box"];
    let opened: Value = secret
        .open_box(
            Purpose::AdminResponse,
            &str_of(sealed, "client"),
            &str_of(sealed, "sealed"),
        )
        .unwrap();
    assert_eq!(
        opened,
        serde_json::from_str::<Value>(&str_of(sealed, "plaintext")).unwrap()
    );
}

// --- MQTT passwords ---

fn password_file() -> Value {
    let secrets = [[0u8; 32], std::array::from_fn(|i| i as u8), [0xffu8; 32]];
    let vectors: Vec<Value> = secrets
        .iter()
        .map(|s| {
            let secret = Secret::from_bytes(*s);
            json!({
                "secret": secret.to_hex(),
                "derived_key": hex::encode(blake3::derive_key("fleetcast v1 mqtt password", s)),
                "password": secret.mqtt_password(),
            })
        })
        .collect();
    file(
        header(
            "MQTT passwords. password = lowercase hex of the first 16 bytes of BLAKE3 derive_key(context = \"fleetcast v1 mqtt password\", key material = the 32 raw bytes of the secret, i.e. its 64 hex digits decoded): 32 hex digits. `derived_key` is the whole 32-byte derived key.",
            "§2 (Connecting)",
        ),
        json!({ "vectors": vectors }),
    )
}

#[test]
fn mqtt_password_vectors_match_the_code() {
    let on_disk = check_file("mqtt-passwords.json", password_file());
    for v in on_disk["vectors"].as_array().unwrap() {
        let secret: Secret = str_of(v, "secret").parse().unwrap();
        assert_eq!(secret.mqtt_password(), str_of(v, "password"));
        assert_eq!(&str_of(v, "derived_key")[..32], str_of(v, "password"));
    }
}

// --- signatures ---

pub(crate) fn release_notice() -> ReleaseNotice {
    let (bytes, _) = example_artifact();
    ReleaseNotice {
        release: r7(),
        seq: 42,
        target: Target::Group(GroupId::new("shanghai").unwrap()),
        kind: app(),
        version: "2.4.1".into(),
        artifact: ArtifactRef {
            id: ArtifactId::of(&bytes),
            size: 2500,
            chunk_size: 1024,
            name: "app-2.4.1.bin".into(),
        },
        policy: "window:02:00-04:00".parse::<InstallPolicy>().unwrap(),
        rollback: false,
        issued_at_ms: 1795600000000,
    }
}

pub(crate) fn fleet_event() -> FleetEvent {
    let mut e = FleetEvent::recorded(
        &StatusEvent {
            phase: Phase::Installed,
            progress: None,
            ..status_event()
        },
        1795600001010,
    );
    e.id = 118;
    e
}

fn signature_vector<T>(key: &PlatformKey, purpose: Purpose, name: &str, body: &T) -> Value
where
    T: serde::Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let envelope = key.sign(purpose, body);
    let verified: T = key.public().verify(purpose, &envelope).unwrap();
    assert_eq!(&verified, body);
    let env: Value = serde_json::from_slice(&envelope).unwrap();
    json!({
        "purpose": name,
        "tag": tag_text(name),
        "gen": key.generation(),
        "body": env["body"],
        "sig": env["sig"],
        "envelope": String::from_utf8(envelope).unwrap(),
    })
}

fn signature_file() -> Value {
    let key = platform_key();
    let next = next_platform_key();
    let batch = EventBatch {
        client: "fleetcast-int-erp".into(),
        since: 117,
        events: vec![fleet_event()],
        next: 118,
        more: false,
    };
    let progress = RolloutProgress {
        release: r7(),
        kind: app(),
        version: "2.4.1".into(),
        total: 12,
        phases: [(Phase::Downloading, 3), (Phase::Installed, 9)].into(),
        finished: 9,
        succeeded: 9,
        failed: 0,
        updated_at_ms: 1795600001010,
    };
    let command = Command {
        machine: vm(),
        seq: 43,
        issued_at_ms: 1795600000000,
        action: CommandAction::Activate { release: r7() },
    };
    let vectors = vec![
        signature_vector(&key, Purpose::Release, "release", &release_notice()),
        signature_vector(&key, Purpose::Command, "command", &command),
        signature_vector(&key, Purpose::Event, "event", &fleet_event()),
        signature_vector(&key, Purpose::Progress, "progress", &progress),
        signature_vector(&key, Purpose::EventBatch, "event-batch", &batch),
        signature_vector(
            &key,
            Purpose::KeyRotation,
            "key-rotation",
            &KeyAnnouncement {
                generation: 1,
                key: next.public(),
                issued_at_ms: 1795700000000,
            },
        ),
        // After the rotation: the generation-1 key signs, and the envelope says so.
        signature_vector(&next, Purpose::Command, "command", &command),
    ];
    file(
        header(
            "Ed25519 signatures (platform -> everyone). sig = hex(Ed25519 signature by the platform key over tag || body), tag = the ASCII text then one zero byte, body = the exact UTF-8 of the envelope's body string (verify those bytes; never re-encode the JSON). `seed` is the ed25519 secret seed, `public_key` the 32-byte public key machines pin. The key-rotation vector announces `next_public_key` as generation 1; the last vector is signed by that key and carries \"gen\": 1.",
            "§3, §3.1",
        ),
        json!({
            "seed": hex::encode(key.seed()),
            "public_key": key.public().to_hex(),
            "next_seed": hex::encode(next.seed()),
            "next_public_key": next.public().to_hex(),
            "vectors": vectors,
        }),
    )
}

#[test]
fn signature_vectors_match_the_code_and_verify() {
    let on_disk = check_file("signatures.json", signature_file());
    let keys: Vec<PlatformPublicKey> = ["public_key", "next_public_key"]
        .iter()
        .map(|k| str_of(&on_disk, k).parse().unwrap())
        .collect();
    let vectors = on_disk["vectors"].as_array().unwrap();
    for v in vectors {
        let purpose = match v["purpose"].as_str().unwrap() {
            "release" => Purpose::Release,
            "command" => Purpose::Command,
            "event" => Purpose::Event,
            "progress" => Purpose::Progress,
            "event-batch" => Purpose::EventBatch,
            "key-rotation" => Purpose::KeyRotation,
            other => panic!("unknown purpose {other}"),
        };
        let gen = v["gen"].as_u64().unwrap() as usize;
        let body: Value = keys[gen]
            .verify(purpose, str_of(v, "envelope").as_bytes())
            .unwrap();
        assert_eq!(
            body,
            serde_json::from_str::<Value>(&str_of(v, "body")).unwrap()
        );
        // The other key does not verify it: the vectors tell the keys apart.
        assert!(keys[1 - gen]
            .verify::<Value>(purpose, str_of(v, "envelope").as_bytes())
            .is_err());
    }
    // Each signed purpose appears (the generation-1 command repeats one).
    assert_eq!(vectors.len(), 7);
}

// --- frames ---

fn frame_vector(name: &str, header: FrameHeader, payload: &[u8]) -> Value {
    let frame = encode_frame(&header, payload);
    let (back, body) = decode_frame(&frame).unwrap();
    assert_eq!((back, body), (header, payload));
    json!({
        "name": name,
        "type": header.frame_type as u8,
        "artifact": header.artifact.to_hex(),
        "index": header.index,
        "total": header.total,
        "header": hex::encode(&frame[..48]),
        "payload": hex::encode(payload),
        "frame": hex::encode(&frame),
    })
}

fn frame_file() -> Value {
    let (bytes, layout) = example_artifact();
    let artifact = ArtifactId::of(&bytes);
    let mut manifest = ManifestBuilder::new(layout);
    for i in 0..layout.chunks {
        let s = layout.offset(i) as usize;
        manifest.push_chunk(&bytes[s..s + layout.chunk_len(i)]);
    }
    let manifest = manifest.finish();
    let h = |frame_type, index, total| FrameHeader {
        frame_type,
        artifact,
        index,
        total,
    };
    let secret = secret();
    let upload = encode_upload_frame(
        &secret,
        &h(FrameType::UploadPart, 2, layout.chunks),
        &bytes[2048..],
    );
    let good = encode_frame(&h(FrameType::Chunk, 2, 3), &bytes[2048..]);
    let invalid = |name: &str, change: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = good.clone();
        change(&mut frame);
        let error = decode_frame(&frame).unwrap_err().to_string();
        json!({"name": name, "frame_header": hex::encode(&frame[..frame.len().min(48)]), "error": error})
    };
    file(
        header(
            "Binary chunk frames: a 48-byte header (magic FCK, version 1, type, 3 zero bytes, raw artifact id, index and total as big-endian u32), then the payload. The artifact is the 2,500-byte example of chunks.json (byte i = i mod 251, chunk size 1024). An upload part is published with a 32-byte MAC after the frame (macs.json); `invalid` lists headers a receiver must refuse (the payload is chunk 2's bytes).",
            "§7.2, §8.2",
        ),
        json!({
            "vectors": [
                frame_vector("chunk 2 of 3", h(FrameType::Chunk, 2, layout.chunks), &bytes[2048..]),
                frame_vector("manifest part 0 of 1", h(FrameType::Manifest, 0, 1), &manifest),
                frame_vector("error", h(FrameType::Error, 0, 0), b"unknown artifact"),
            ],
            "upload_part": {
                "name": "upload part 2 of 3, with its MAC",
                "secret": secret.to_hex(),
                "published": hex::encode(&upload),
            },
            "invalid": [
                invalid("too short", &|f| f.truncate(47)),
                invalid("bad magic", &|f| f[0] = b'X'),
                invalid("format version 2", &|f| f[3] = 2),
                invalid("unknown type 4", &|f| f[4] = 4),
                invalid("index not below total", &|f| f[43] = 3),
            ],
        }),
    )
}

#[test]
fn frame_vectors_match_the_code_and_decode() {
    let on_disk = check_file("frames.json", frame_file());
    for v in on_disk["vectors"].as_array().unwrap() {
        let frame = unhex(&str_of(v, "frame"));
        let (h, payload) = decode_frame(&frame).unwrap();
        assert_eq!(h.frame_type as u64, v["type"].as_u64().unwrap());
        assert_eq!(h.artifact.to_hex(), str_of(v, "artifact"));
        assert_eq!(
            (h.index as u64, h.total as u64),
            (v["index"].as_u64().unwrap(), v["total"].as_u64().unwrap())
        );
        assert_eq!(hex::encode(payload), str_of(v, "payload"));
        assert_eq!(hex::encode(&frame[..48]), str_of(v, "header"));
    }
    let up = &on_disk["upload_part"];
    let secret: Secret = str_of(up, "secret").parse().unwrap();
    let (h, _) = open_upload_frame(&secret, &unhex(&str_of(up, "published"))).unwrap();
    assert_eq!(h.frame_type, FrameType::UploadPart);
    let invalid = on_disk["invalid"].as_array().unwrap();
    assert_eq!(invalid.len(), 5);
}

// --- versions ---

fn version_file() -> Value {
    let pairs = [
        ("2.10.0", "2.9.1"),
        ("2.4.1", "2.4.1"),
        ("2.4", "2.4.1"),
        ("1.2.1", "1.2"),
        ("1.0.0-rc1", "1.0.0-rc2"),
        ("1.0.0", "1.0.0-rc1"),
        ("1.0.0-1", "1.0.0-alpha"),
        ("1.2.0", "1.2.x"),
        ("10", "9"),
        ("a", "B"),
        ("1.0+build5", "1.0+build10"),
        ("01.2", "1.2"),
        ("1.2", "1..2"),
        ("1.0", "1."),
        ("9", "18446744073709551616"),
        ("2024.01.15", "2024.1.15"),
    ];
    let ordered: Vec<Value> = pairs
        .iter()
        .map(|(a, b)| {
            let ord = match compare_versions(a, b) {
                std::cmp::Ordering::Less => "<",
                std::cmp::Ordering::Equal => "=",
                std::cmp::Ordering::Greater => ">",
            };
            json!({"a": a, "b": b, "order": ord})
        })
        .collect();
    let long = "1".repeat(65);
    let validity: Vec<Value> = [
        "2.4.1",
        "v1_beta+exp.sha.5114f85",
        "",
        "1.0 beta",
        long.as_str(),
        "1.0\u{e9}",
        "~!@#$%",
    ]
    .iter()
    .map(|v| json!({"version": v, "valid": validate_version(v).is_ok()}))
    .collect();
    file(
        header(
            "Version ordering (which notice is a downgrade) and validity. Split both versions on '.', '-' and '+'; compare part by part: two parts that parse as unsigned 64-bit integers numerically, an integer part above a non-integer part, two non-integer parts bytewise; the first difference decides; if every compared part is equal, the version with more parts is higher. `order` is a ? b. Valid versions are 1 to 64 printable ASCII characters (0x21-0x7e).",
            "§1",
        ),
        json!({"ordered": ordered, "validity": validity}),
    )
}

#[test]
fn version_vectors_match_the_code() {
    let on_disk = check_file("versions.json", version_file());
    for v in on_disk["ordered"].as_array().unwrap() {
        let (a, b) = (str_of(v, "a"), str_of(v, "b"));
        let want = match v["order"].as_str().unwrap() {
            "<" => std::cmp::Ordering::Less,
            "=" => std::cmp::Ordering::Equal,
            _ => std::cmp::Ordering::Greater,
        };
        assert_eq!(compare_versions(&a, &b), want, "{a} ? {b}");
        assert_eq!(compare_versions(&b, &a), want.reverse(), "{b} ? {a}");
    }
}
