//! End-to-end authentication, so the system is safe on a broker without topic ACLs.
//!
//! - Platform -> machine (release notices, commands): ed25519 signatures. The machine pins the
//!   platform's public key.
//! - Machine -> platform (status, state, chunk requests) and operator -> platform (admin
//!   requests): a blake3 keyed hash (MAC) with the sender's 32-byte secret. Bodies carry a
//!   monotonic counter (`ctr`) that the platform checks against replays.
//!
//! Both envelopes carry the signed body as a JSON *string* so the exact signed bytes survive any
//! JSON re-encoding on the way; integrators read it with one extra parse. Every signature and
//! MAC covers a domain tag naming the message family, so a body signed for one purpose can never
//! be replayed as another.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, Verifier};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest JSON message (notice, command, status, state, request) either side accepts.
/// Anything bigger is refused before parsing.
pub const MAX_JSON_MESSAGE: usize = 256 * 1024;

/// Largest sealed box (admin responses: listings of a whole fleet) either side accepts.
pub const MAX_SEALED: usize = 16 * 1024 * 1024;

/// What a signature or MAC is for. Part of the signed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Release,
    Command,
    StatusAck,
    Status,
    State,
    ChunkRequest,
    Admin,
    /// An admin response, sealed (encrypted and authenticated) for the requesting operator.
    AdminResponse,
    /// An artifact upload part, MAC'd by the uploading operator.
    UploadPart,
    /// A persisted status event on `fleet/events`.
    Event,
    /// Rollout progress on `fleet/rollouts/{r}/progress`.
    Progress,
    /// A batch of stored events answering an integrator.
    EventBatch,
    /// A new platform key, announced under the previous key.
    KeyRotation,
    /// A chunk error frame to one machine, MAC'd with that machine's secret.
    ChunkError,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Release => b"fleetcast/v1/release\0",
            Purpose::Command => b"fleetcast/v1/command\0",
            Purpose::StatusAck => b"fleetcast/v1/status-ack\0",
            Purpose::Status => b"fleetcast/v1/status\0",
            Purpose::State => b"fleetcast/v1/state\0",
            Purpose::ChunkRequest => b"fleetcast/v1/chunks-get\0",
            Purpose::Admin => b"fleetcast/v1/admin\0",
            Purpose::AdminResponse => b"fleetcast/v1/admin-response\0",
            Purpose::UploadPart => b"fleetcast/v1/upload-part\0",
            Purpose::Event => b"fleetcast/v1/event\0",
            Purpose::Progress => b"fleetcast/v1/progress\0",
            Purpose::EventBatch => b"fleetcast/v1/event-batch\0",
            Purpose::KeyRotation => b"fleetcast/v1/key-rotation\0",
            Purpose::ChunkError => b"fleetcast/v1/chunk-error\0",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("message of {len} bytes is over the {MAX_JSON_MESSAGE}-byte limit")]
    TooLarge { len: usize },
    #[error("malformed envelope: {0}")]
    Envelope(serde_json::Error),
    #[error("signature is not 64 hex-encoded bytes")]
    SignatureFormat,
    #[error("bad signature")]
    BadSignature,
    #[error("MAC is not 32 hex-encoded bytes")]
    MacFormat,
    #[error("bad MAC")]
    BadMac,
    #[error("authenticated body is malformed: {0}")]
    Body(serde_json::Error),
    #[error("a batch of {len} envelopes: 1 to {max} are allowed")]
    BatchSize { len: usize, max: usize },
    #[error("sealed box is not base64 of a 24-byte nonce and a ciphertext")]
    BoxFormat,
    #[error("sealed box does not open with this key (wrong secret, or forged)")]
    BadBox,
}

/// `{"body": "<json>", "sig": "<hex ed25519>", "gen": n}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    pub body: String,
    pub sig: String,
    /// Generation of the platform key that signed it (0 = the first key; see
    /// [`crate::keychain`]). Unauthenticated: a hint that tells a machine to follow the key
    /// chain before judging the signature. Absent means 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gen: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `{"body": "<json>", "mac": "<hex blake3 keyed hash>"}`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MacEnvelope {
    pub body: String,
    pub mac: String,
}

/// The platform's signing key (ed25519 seed) and its generation in the key chain.
pub struct PlatformKey(ed25519_dalek::SigningKey, u32);

/// The platform's public key, pinned by every machine. Hex in configs.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PlatformPublicKey(ed25519_dalek::VerifyingKey);

/// A 32-byte secret shared by one machine (or operator) and the platform. Hex in configs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Secret([u8; 32]);

impl PlatformKey {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed), 0)
    }

    /// A key of a later generation (after rotations).
    pub fn with_generation(seed: [u8; 32], generation: u32) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed), generation)
    }

    pub fn generation(&self) -> u32 {
        self.1
    }

    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> PlatformPublicKey {
        PlatformPublicKey(self.0.verifying_key())
    }

    /// Serializes `body` and signs it for `purpose`; returns the envelope's bytes.
    pub fn sign<T: Serialize>(&self, purpose: Purpose, body: &T) -> Vec<u8> {
        serde_json::to_vec(&self.sign_envelope(purpose, body)).expect("envelope serializes")
    }

    /// Signs `body` exactly as given (JSON text, not re-encoded) for `purpose`; returns the
    /// envelope's bytes. For bodies that no message type would serialize to: tests and fuzzing.
    pub fn sign_text(&self, purpose: Purpose, body: String) -> Vec<u8> {
        serde_json::to_vec(&self.sign_text_envelope(purpose, body)).expect("envelope serializes")
    }

    /// Serializes `body` and signs it for `purpose`; returns the envelope.
    pub fn sign_envelope<T: Serialize>(&self, purpose: Purpose, body: &T) -> SignedEnvelope {
        self.sign_text_envelope(
            purpose,
            serde_json::to_string(body).expect("message types serialize"),
        )
    }

    fn sign_text_envelope(&self, purpose: Purpose, body: String) -> SignedEnvelope {
        let sig = self.0.sign(&tagged(purpose, body.as_bytes()));
        SignedEnvelope {
            body,
            sig: hex::encode(sig.to_bytes()),
            gen: self.1,
        }
    }
}

impl PlatformPublicKey {
    /// Checks an envelope's signature for `purpose` and parses its body.
    pub fn verify<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        bytes: &[u8],
    ) -> Result<T, AuthError> {
        let env: SignedEnvelope = parse_envelope(bytes)?;
        self.verify_envelope(purpose, &env)
    }

    /// Checks an already parsed envelope's signature for `purpose` and parses its body.
    pub fn verify_envelope<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        env: &SignedEnvelope,
    ) -> Result<T, AuthError> {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&env.sig, &mut sig).map_err(|_| AuthError::SignatureFormat)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        self.0
            .verify(&tagged(purpose, env.body.as_bytes()), &sig)
            .map_err(|_| AuthError::BadSignature)?;
        serde_json::from_str(&env.body).map_err(AuthError::Body)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }
}

impl FromStr for PlatformPublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut b)
            .map_err(|_| "platform public key must be 64 hex digits".to_owned())?;
        ed25519_dalek::VerifyingKey::from_bytes(&b)
            .map(Self)
            .map_err(|_| "platform public key is not a valid ed25519 point".to_owned())
    }
}

impl TryFrom<String> for PlatformPublicKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PlatformPublicKey> for String {
    fn from(k: PlatformPublicKey) -> String {
        k.to_hex()
    }
}

impl fmt::Debug for PlatformPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlatformPublicKey({})", self.to_hex())
    }
}

impl fmt::Display for PlatformPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Secret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn mac_of(&self, purpose: Purpose, body: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.0, &tagged(purpose, body))
    }

    /// Serializes `body` and MACs it for `purpose`; returns the envelope's bytes.
    pub fn seal<T: Serialize>(&self, purpose: Purpose, body: &T) -> Vec<u8> {
        self.seal_text(
            purpose,
            serde_json::to_string(body).expect("message types serialize"),
        )
    }

    /// MACs `body` exactly as given (JSON text, not re-encoded) for `purpose`; returns the
    /// envelope's bytes. For bodies that no message type would serialize to: tests and fuzzing.
    pub fn seal_text(&self, purpose: Purpose, body: String) -> Vec<u8> {
        let mac = self.mac_of(purpose, body.as_bytes()).to_hex().to_string();
        serde_json::to_vec(&MacEnvelope { body, mac }).expect("envelope serializes")
    }

    /// Checks an envelope's MAC for `purpose` (in constant time) and parses its body.
    pub fn open<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        bytes: &[u8],
    ) -> Result<T, AuthError> {
        self.open_envelope(purpose, &parse_envelope(bytes)?)
    }

    /// [`Secret::open`] for an envelope already parsed (one of a batch).
    pub fn open_envelope<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        env: &MacEnvelope,
    ) -> Result<T, AuthError> {
        let mac = blake3::Hash::from_hex(&env.mac).map_err(|_| AuthError::MacFormat)?;
        // blake3::Hash's PartialEq is constant-time.
        if self.mac_of(purpose, env.body.as_bytes()) != mac {
            return Err(AuthError::BadMac);
        }
        serde_json::from_str(&env.body).map_err(AuthError::Body)
    }

    /// The raw MAC of `bytes` for `purpose` (binary messages such as upload parts).
    pub fn mac_bytes(&self, purpose: Purpose, bytes: &[u8]) -> [u8; 32] {
        *self.mac_of(purpose, bytes).as_bytes()
    }

    /// Checks a raw MAC from [`Secret::mac_bytes`] in constant time.
    pub fn verify_mac_bytes(&self, purpose: Purpose, bytes: &[u8], mac: &[u8; 32]) -> bool {
        self.mac_of(purpose, bytes) == blake3::Hash::from_bytes(*mac)
    }

    fn box_cipher(&self) -> chacha20poly1305::XChaCha20Poly1305 {
        use chacha20poly1305::KeyInit;
        let key = blake3::derive_key("fleetcast v1 sealed box key", &self.0);
        chacha20poly1305::XChaCha20Poly1305::new(&key.into())
    }

    /// Encrypts and authenticates `body` for the one holder of this secret: the result is
    /// base64 of a random 24-byte nonce followed by the XChaCha20-Poly1305 ciphertext, with
    /// `TAG || context` as associated data (context: e.g. the receiving client id), so a box
    /// made for one purpose or client never opens as another.
    pub fn seal_box<T: Serialize>(&self, purpose: Purpose, context: &str, body: &T) -> String {
        use base64::Engine;
        use chacha20poly1305::aead::{Aead, Payload};
        use rand::RngCore;
        let plain = serde_json::to_vec(body).expect("message types serialize");
        let mut nonce = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = tagged(purpose, context.as_bytes());
        let ct = self
            .box_cipher()
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory messages");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Opens a box from [`Secret::seal_box`] made for `purpose` and `context`, and parses it.
    pub fn open_box<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        context: &str,
        sealed: &str,
    ) -> Result<T, AuthError> {
        use base64::Engine;
        use chacha20poly1305::aead::{Aead, Payload};
        if sealed.len() > 4 * MAX_SEALED / 3 + 4 {
            return Err(AuthError::TooLarge { len: sealed.len() });
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| AuthError::BoxFormat)?;
        if bytes.len() < 24 + 16 {
            return Err(AuthError::BoxFormat);
        }
        let (nonce, ct) = bytes.split_at(24);
        let aad = tagged(purpose, context.as_bytes());
        let plain = self
            .box_cipher()
            .decrypt(nonce.into(), Payload { msg: ct, aad: &aad })
            .map_err(|_| AuthError::BadBox)?;
        serde_json::from_slice(&plain).map_err(AuthError::Body)
    }

    /// The MQTT password derived from this secret, so the broker never needs the secret itself.
    pub fn mqtt_password(&self) -> String {
        hex::encode(&blake3::derive_key("fleetcast v1 mqtt password", &self.0)[..16])
    }

    /// Whether `password` is [`Secret::mqtt_password`], compared in constant time.
    pub fn accepts_mqtt_password(&self, password: &str) -> bool {
        constant_time_eq(self.mqtt_password().as_bytes(), password.as_bytes())
    }
}

/// Whether `a == b`, in time that depends on their lengths only, not on where they differ
/// (a password or token compared with `==` stops at the first wrong byte, which tells a
/// guesser how far it got). Lengths are not secret here: every password is 32 hex digits.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut b)
            .map_err(|_| "secret must be 64 hex digits".to_owned())?;
        Ok(Self(b))
    }
}

impl TryFrom<String> for Secret {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Secret> for String {
    fn from(k: Secret) -> String {
        k.to_hex()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

fn tagged(purpose: Purpose, body: &[u8]) -> Vec<u8> {
    let tag = purpose.tag();
    let mut out = Vec::with_capacity(tag.len() + body.len());
    out.extend_from_slice(tag);
    out.extend_from_slice(body);
    out
}

pub(crate) fn parse_envelope<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AuthError> {
    if bytes.len() > MAX_JSON_MESSAGE {
        return Err(AuthError::TooLarge { len: bytes.len() });
    }
    serde_json::from_slice(bytes).map_err(AuthError::Envelope)
}

/// Reads only the body of a MAC envelope without checking it: for routing (which machine?)
/// before the secret is looked up. Never act on the result.
pub fn peek_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AuthError> {
    let env: MacEnvelope = parse_envelope(bytes)?;
    serde_json::from_str(&env.body).map_err(AuthError::Body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn seed() -> [u8; 32] {
        let mut s = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut s);
        s
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Msg {
        a: u32,
    }

    #[test]
    fn a_signed_message_verifies_with_the_public_key() {
        let key = PlatformKey::from_seed(seed());
        let bytes = key.sign(Purpose::Release, &Msg { a: 7 });
        let msg: Msg = key.public().verify(Purpose::Release, &bytes).unwrap();
        assert_eq!(msg, Msg { a: 7 });
    }

    #[test]
    fn signatures_fail_for_another_key_purpose_or_a_changed_body() {
        let key = PlatformKey::from_seed(seed());
        let bytes = key.sign(Purpose::Release, &Msg { a: 7 });
        let other = PlatformKey::from_seed(seed()).public();
        assert!(matches!(
            other.verify::<Msg>(Purpose::Release, &bytes),
            Err(AuthError::BadSignature)
        ));
        assert!(matches!(
            key.public().verify::<Msg>(Purpose::Command, &bytes),
            Err(AuthError::BadSignature)
        ));
        let tampered = String::from_utf8(bytes)
            .unwrap()
            .replace("{\\\"a\\\":7}", "{\\\"a\\\":8}");
        assert!(matches!(
            key.public()
                .verify::<Msg>(Purpose::Release, tampered.as_bytes()),
            Err(AuthError::BadSignature)
        ));
        assert!(matches!(
            key.public()
                .verify::<Msg>(Purpose::Release, br#"{"body":"{}","sig":"zz"}"#),
            Err(AuthError::SignatureFormat)
        ));
        assert!(matches!(
            key.public().verify::<Msg>(Purpose::Release, b"not json"),
            Err(AuthError::Envelope(_))
        ));
    }

    #[test]
    fn macs_fail_for_another_secret_purpose_or_a_changed_body() {
        let secret = Secret::from_bytes(seed());
        let bytes = secret.seal(Purpose::Status, &Msg { a: 1 });
        assert_eq!(
            secret.open::<Msg>(Purpose::Status, &bytes).unwrap(),
            Msg { a: 1 }
        );
        assert!(matches!(
            Secret::from_bytes(seed()).open::<Msg>(Purpose::Status, &bytes),
            Err(AuthError::BadMac)
        ));
        assert!(matches!(
            secret.open::<Msg>(Purpose::State, &bytes),
            Err(AuthError::BadMac)
        ));
        let tampered = String::from_utf8(bytes)
            .unwrap()
            .replace("\\\"a\\\":1", "\\\"a\\\":2");
        assert!(matches!(
            secret.open::<Msg>(Purpose::Status, tampered.as_bytes()),
            Err(AuthError::BadMac)
        ));
        assert!(matches!(
            secret.open::<Msg>(Purpose::Status, br#"{"body":"{}","mac":"00"}"#),
            Err(AuthError::MacFormat)
        ));
    }

    #[test]
    fn a_sealed_box_opens_only_with_its_secret_purpose_and_context() {
        let secret = Secret::from_bytes(seed());
        let sealed = secret.seal_box(Purpose::AdminResponse, "cli-1", &Msg { a: 9 });
        assert!(!sealed.contains("\"a\""), "the body is encrypted");
        let back: Msg = secret
            .open_box(Purpose::AdminResponse, "cli-1", &sealed)
            .unwrap();
        assert_eq!(back, Msg { a: 9 });
        assert!(matches!(
            Secret::from_bytes(seed()).open_box::<Msg>(Purpose::AdminResponse, "cli-1", &sealed),
            Err(AuthError::BadBox)
        ));
        assert!(matches!(
            secret.open_box::<Msg>(Purpose::AdminResponse, "cli-2", &sealed),
            Err(AuthError::BadBox)
        ));
        assert!(matches!(
            secret.open_box::<Msg>(Purpose::Admin, "cli-1", &sealed),
            Err(AuthError::BadBox)
        ));
        let mut flipped = sealed.into_bytes();
        let last = flipped.len() - 3;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(secret
            .open_box::<Msg>(Purpose::AdminResponse, "cli-1", &flipped)
            .is_err());
        assert!(matches!(
            secret.open_box::<Msg>(Purpose::AdminResponse, "cli-1", "!!"),
            Err(AuthError::BoxFormat)
        ));
    }

    #[test]
    fn a_body_signed_or_sealed_as_text_fails_only_at_parsing_when_it_is_malformed() {
        let key = PlatformKey::from_seed(seed());
        let bytes = key.sign_text(Purpose::Command, r#"{"a":"x"}"#.to_owned());
        assert!(matches!(
            key.public().verify::<Msg>(Purpose::Command, &bytes),
            Err(AuthError::Body(_))
        ));
        let bytes = key.sign_text(Purpose::Command, r#"{"a":3}"#.to_owned());
        assert_eq!(
            key.public()
                .verify::<Msg>(Purpose::Command, &bytes)
                .unwrap(),
            Msg { a: 3 }
        );
        let secret = Secret::from_bytes(seed());
        let bytes = secret.seal_text(Purpose::State, "[".to_owned());
        assert!(matches!(
            secret.open::<Msg>(Purpose::State, &bytes),
            Err(AuthError::Body(_))
        ));
    }

    #[test]
    fn raw_macs_verify_only_for_the_same_bytes_and_purpose() {
        let secret = Secret::from_bytes(seed());
        let mac = secret.mac_bytes(Purpose::UploadPart, b"part");
        assert!(secret.verify_mac_bytes(Purpose::UploadPart, b"part", &mac));
        assert!(!secret.verify_mac_bytes(Purpose::UploadPart, b"parT", &mac));
        assert!(!secret.verify_mac_bytes(Purpose::Status, b"part", &mac));
    }

    #[test]
    fn oversized_messages_are_refused_before_parsing() {
        let secret = Secret::from_bytes(seed());
        let huge = vec![b' '; MAX_JSON_MESSAGE + 1];
        assert!(matches!(
            secret.open::<Msg>(Purpose::Status, &huge),
            Err(AuthError::TooLarge { .. })
        ));
    }

    #[test]
    fn keys_round_trip_through_hex() {
        let key = PlatformKey::from_seed(seed());
        let public = key.public();
        assert_eq!(
            public.to_hex().parse::<PlatformPublicKey>().unwrap(),
            public
        );
        assert!("00".parse::<PlatformPublicKey>().is_err());
        let s = Secret::from_bytes(seed());
        assert_eq!(s.to_hex().parse::<Secret>().unwrap(), s);
        assert_eq!(s.mqtt_password().len(), 32);
        assert_ne!(
            s.mqtt_password(),
            Secret::from_bytes(seed()).mqtt_password()
        );
        assert_eq!(PlatformKey::from_seed(key.seed()).public(), public);
    }

    #[test]
    fn constant_time_eq_says_equal_only_for_the_same_bytes() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"0123abcd", b"0123abcd"));
        assert!(!constant_time_eq(b"0123abcd", b"0123abce"), "last byte");
        assert!(!constant_time_eq(b"0123abcd", b"1123abcd"), "first byte");
        assert!(!constant_time_eq(b"0123abcd", b"0123abc"), "shorter");
        assert!(!constant_time_eq(b"0123abc", b"0123abcd"), "longer");
        assert!(!constant_time_eq(b"", b"0"));
    }

    #[test]
    fn a_secret_accepts_its_own_mqtt_password_only() {
        let s = Secret::from_bytes(seed());
        let password = s.mqtt_password();
        assert!(s.accepts_mqtt_password(&password));
        assert!(!s.accepts_mqtt_password(&password[..31]));
        assert!(!s.accepts_mqtt_password(&format!("{password}0")));
        assert!(!s.accepts_mqtt_password(&password.to_uppercase()));
        assert!(!s.accepts_mqtt_password(""));
        assert!(!Secret::from_bytes(seed()).accepts_mqtt_password(&password));
    }
}
