//! Signed (platform -> machines) and MAC'd (machine or operator -> platform; status acks
//! platform -> machine, with its secret) message families.
//!
//! A fuzzer practically never forges a signature or MAC, so raw envelopes (the `envelope`
//! target) stop at the check. These helpers reach the code behind it: the input is the *body*;
//! it is parsed directly, and also signed or sealed with the fixed test key and sent through
//! the real `verify`/`open`. Both must agree, and a parsed message must survive a JSON round
//! trip (the platform stores and re-reads what it parsed).

use std::fmt::Debug;
use std::sync::OnceLock;

use fleetcast_proto::auth::{AuthError, PlatformKey, PlatformPublicKey, Purpose, Secret};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Verdict;

/// The platform's signing key in every target and seed. Never a real key.
pub fn platform_key() -> &'static PlatformKey {
    static KEY: OnceLock<PlatformKey> = OnceLock::new();
    KEY.get_or_init(|| PlatformKey::from_seed([0x5e; 32]))
}

pub fn platform_public() -> PlatformPublicKey {
    static PUBLIC: OnceLock<PlatformPublicKey> = OnceLock::new();
    *PUBLIC.get_or_init(|| platform_key().public())
}

/// The machine's (and operator's) MAC secret in every target and seed. Never a real secret.
pub fn secret() -> &'static Secret {
    static SECRET: OnceLock<Secret> = OnceLock::new();
    SECRET.get_or_init(|| Secret::from_bytes([0x5a; 32]))
}

/// Body of a platform-signed message: parsed directly and through `sign` + `verify`.
pub fn signed<T>(purpose: Purpose, data: &[u8], check: impl Fn(&T)) -> Verdict
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    body(data, check, Cost::Signature, |body| {
        let envelope = platform_key().sign_text(purpose, body);
        platform_public().verify::<T>(purpose, &envelope)
    })
}

/// Body of a MAC'd message: parsed directly and through `seal` + `open`.
pub fn sealed<T>(purpose: Purpose, data: &[u8], check: impl Fn(&T)) -> Verdict
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    body(data, check, Cost::Mac, |body| {
        let envelope = secret().seal_text(purpose, body);
        secret().open::<T>(purpose, &envelope)
    })
}

/// What sending a body through the authenticated path costs.
enum Cost {
    /// blake3: cheap, every input goes through it.
    Mac,
    /// ed25519 sign + verify: ~10 times the parse. Every body that parses goes through it, and
    /// one in eight of the rest (picked by content, so a run stays reproducible).
    Signature,
}

fn body<T>(
    data: &[u8],
    check: impl Fn(&T),
    cost: Cost,
    authenticated: impl Fn(String) -> Result<T, AuthError>,
) -> Verdict
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let direct = serde_json::from_slice::<T>(data);
    if let Ok(msg) = &direct {
        round_trip(msg);
        check(msg);
    }
    let send = match cost {
        Cost::Mac => true,
        Cost::Signature => {
            direct.is_ok() || data.iter().fold(0u8, |a, b| a.wrapping_add(*b)) % 8 == 0
        }
    };
    // Envelope bodies are JSON strings, so only UTF-8 bodies can be sent at all.
    if let (true, Ok(text)) = (send, std::str::from_utf8(data)) {
        match (&direct, authenticated(text.to_owned())) {
            (Ok(d), Ok(a)) => assert_eq!(d, &a, "verified body differs from the direct parse"),
            (Err(_), Err(AuthError::Body(_))) => {}
            // Escaping can push a body just under the limit over it.
            (_, Err(AuthError::TooLarge { .. })) => {}
            (d, a) => panic!("direct parse {d:?} but authenticated parse {a:?}"),
        }
    }
    Verdict::from_ok(direct.is_ok())
}

/// What the platform or machine serializes from a parsed message parses back to the same.
pub fn round_trip<T>(msg: &T)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let text = serde_json::to_string(msg).expect("a parsed message serializes");
    let back: T =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text} does not parse back: {e}"));
    assert_eq!(&back, msg, "round trip through {text}");
}
