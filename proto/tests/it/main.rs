//! Decoders never panic on hostile input: random and mutated bytes through every parser the
//! network reaches. (A cheap stand-in for cargo-fuzz that runs in every test run.)

mod asyncapi;
mod vectors;

use fleetcast_proto::admin::AdminRequest;
use fleetcast_proto::auth::{PlatformKey, Purpose, Secret};
use fleetcast_proto::chunk::{decode_frame, encode_frame, ChunkRequest, FrameHeader, FrameType};
use fleetcast_proto::release::ArtifactRef;
use fleetcast_proto::{
    ArtifactId, InstallPolicy, Kind, MachineId, ReleaseId, ReleaseNotice, StatusEvent, Target,
    Topics,
};
use rand::{Rng, RngCore, SeedableRng};

fn mutate(rng: &mut rand::rngs::StdRng, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    match rng.gen_range(0..4) {
        0 if !b.is_empty() => {
            let i = rng.gen_range(0..b.len());
            b[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if !b.is_empty() => b.truncate(rng.gen_range(0..b.len())),
        2 => {
            let i = rng.gen_range(0..=b.len());
            b.insert(i, rng.gen());
        }
        _ => {
            let mut extra = vec![0u8; rng.gen_range(0..64)];
            rng.fill_bytes(&mut extra);
            b.extend(extra);
        }
    }
    b
}

#[test]
fn frame_decoder_survives_random_and_mutated_input() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let good = encode_frame(
        &FrameHeader {
            frame_type: FrameType::Chunk,
            artifact: ArtifactId::of(b"x"),
            index: 1,
            total: 4,
        },
        &[9u8; 100],
    );
    let mut accepted = 0;
    for _ in 0..20_000 {
        let input = if rng.gen_bool(0.5) {
            mutate(&mut rng, &good)
        } else {
            let mut r = vec![0u8; rng.gen_range(0..120)];
            rng.fill_bytes(&mut r);
            r
        };
        if let Ok((h, payload)) = decode_frame(&input) {
            accepted += 1;
            assert!(h.frame_type == FrameType::Error || h.index < h.total);
            assert_eq!(payload.len() + 48, input.len());
        }
    }
    assert!(accepted > 0, "some mutations keep a valid frame");
}

#[test]
fn envelope_openers_survive_mutations_and_accept_only_the_original() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let secret = Secret::from_bytes([3u8; 32]);
    let key = PlatformKey::from_seed([4u8; 32]);
    let status = br#"{"machine":"vm-1","ctr":5,"at_ms":1,"kind":"app","phase":"installed"}"#;
    let status: StatusEvent = serde_json::from_slice(status).unwrap();
    let notice = ReleaseNotice {
        release: ReleaseId::new("r-1").unwrap(),
        seq: 3,
        target: Target::Machine(MachineId::new("vm-1").unwrap()),
        kind: Kind::new("app").unwrap(),
        version: "1.2.3".into(),
        artifact: ArtifactRef {
            id: ArtifactId::of(b"x"),
            size: 1,
            chunk_size: 1024,
            name: "app.bin".into(),
        },
        policy: InstallPolicy::Immediate,
        rollback: false,
        issued_at_ms: 1,
    };
    let sealed = secret.seal(Purpose::Status, &status);
    let signed = key.sign(Purpose::Release, &notice);
    // The originals open: the checks below compare against something real.
    assert_eq!(
        secret
            .open::<StatusEvent>(Purpose::Status, &sealed)
            .unwrap(),
        status
    );
    assert_eq!(
        key.public()
            .verify::<ReleaseNotice>(Purpose::Release, &signed)
            .unwrap(),
        notice
    );
    for _ in 0..5_000 {
        let m = mutate(&mut rng, &sealed);
        if let Ok(opened) = secret.open::<StatusEvent>(Purpose::Status, &m) {
            assert_eq!(
                opened, status,
                "a mutation that still opens must carry the same body"
            );
        }
        let m = mutate(&mut rng, &signed);
        if let Ok(verified) = key.public().verify::<ReleaseNotice>(Purpose::Release, &m) {
            assert_eq!(
                verified, notice,
                "a mutation that still verifies must carry the same body"
            );
        }
        // Only that they return, whatever they return.
        let _ = serde_json::from_slice::<ChunkRequest>(&m);
        let _ = serde_json::from_slice::<AdminRequest>(&m);
    }
}

#[test]
fn topic_parser_survives_random_topics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let t = Topics::default();
    let alphabet = b"fleet/machinesgroupartifactschunksgetstatus+#-._ 0123456789";
    let vm = MachineId::new("vm-1").unwrap();
    // Random strings almost never parse; mutations of real topics often do.
    let valid = [
        t.status(&vm),
        t.command(&vm),
        t.machine_chunks(&vm),
        t.machine_release(&vm, &Kind::new("app").unwrap()),
        t.artifact_chunks(&ArtifactId::of(b"x")),
        "fleet/events".to_owned(),
    ];
    let mut parsed = 0;
    for _ in 0..20_000 {
        let s: String = if rng.gen_bool(0.5) {
            let mut b = valid[rng.gen_range(0..valid.len())].clone().into_bytes();
            let i = rng.gen_range(0..b.len());
            b[i] = alphabet[rng.gen_range(0..alphabet.len())];
            String::from_utf8(b).unwrap()
        } else {
            let len = rng.gen_range(0..60);
            (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
                .collect()
        };
        if let Some(route) = t.parse(&s) {
            parsed += 1;
            assert!(!s.contains(['+', '#']), "{s:?} parsed as {route:?}");
        }
    }
    assert!(parsed > 0, "some mutated topics still parse");
}
