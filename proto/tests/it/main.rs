//! Decoders never panic on hostile input: random and mutated bytes through every parser the
//! network reaches. (A cheap stand-in for cargo-fuzz that runs in every test run.)

use fleetcast_proto::admin::AdminRequest;
use fleetcast_proto::auth::{PlatformKey, Purpose, Secret};
use fleetcast_proto::chunk::{decode_frame, encode_frame, ChunkRequest, FrameHeader, FrameType};
use fleetcast_proto::{ArtifactId, ReleaseNotice, StatusEvent, Topics};
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
    let sealed = secret.seal(Purpose::Status, &status);
    let signed = key.sign(Purpose::Release, &serde_json::json!({"x": 1}));
    for _ in 0..5_000 {
        let m = mutate(&mut rng, &sealed);
        if let Ok(opened) = secret.open::<StatusEvent>(Purpose::Status, &m) {
            assert_eq!(
                opened, status,
                "a mutation that still opens must carry the same body"
            );
        }
        let m = mutate(&mut rng, &signed);
        let _ = key.public().verify::<ReleaseNotice>(Purpose::Release, &m);
        let _ = serde_json::from_slice::<ChunkRequest>(&m);
        let _ = serde_json::from_slice::<AdminRequest>(&m);
    }
}

#[test]
fn topic_parser_survives_random_topics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let t = Topics::default();
    let alphabet = b"fleet/machinesgroupartifactschunksgetstatus+#-._ 0123456789";
    for _ in 0..20_000 {
        let len = rng.gen_range(0..60);
        let s: String = (0..len)
            .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
            .collect();
        if let Some(route) = t.parse(&s) {
            assert!(!s.contains(['+', '#']), "{s:?} parsed as {route:?}");
        }
    }
}
