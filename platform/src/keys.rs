//! The platform's ed25519 signing key, its rotation chain, and the bootstrap operator secret,
//! kept in the data dir. Created on first start; secret files are written 0600 via temp file +
//! fsync + rename.
//!
//! Files: `platform.key` (current seed, hex), `platform.pub` (current public key),
//! `key-chain.json` (every rotation: each new key announced under the previous one; the current
//! generation is its length), `admin.secret` (the first operator's secret). A rotation writes
//! the new seed to `platform.key.next`, then the chain, then renames the seed into place; a
//! crash in between is finished (or undone) at the next start.

use std::io::Write;
use std::path::{Path, PathBuf};

use fleetcast_proto::auth::{PlatformKey, PlatformPublicKey, Purpose, Secret};
use fleetcast_proto::keychain::{KeyAnnouncement, KeyChain};
use rand::RngCore;

use crate::error::PlatformError;

pub struct Keys {
    pub platform: PlatformKey,
    pub public: PlatformPublicKey,
    pub admin: Secret,
    /// Every rotation so far; its length is the current key's generation.
    pub chain: KeyChain,
}

impl Keys {
    pub fn generation(&self) -> u32 {
        self.platform.generation()
    }

    /// The broker password of the platform's own clients on an external broker (derived from
    /// the first admin secret, which stays in the data dir, so it survives key rotation).
    pub fn platform_mqtt_password(&self) -> String {
        Secret::from_bytes(blake3::derive_key(
            "fleetcast v1 platform broker secret",
            self.admin.as_bytes(),
        ))
        .mqtt_password()
    }
}

pub fn chain_path(data_dir: &Path) -> PathBuf {
    data_dir.join("key-chain.json")
}

fn next_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("platform.key.next")
}

pub fn platform_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("platform.key")
}
pub fn public_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("platform.pub")
}
pub fn admin_secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.secret")
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn read_hex32(path: &Path) -> Result<Option<[u8; 32]>, PlatformError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PlatformError::io(path, e)),
    };
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|_| PlatformError::BadFile {
        path: path.to_owned(),
        reason: "expected 64 hex digits".into(),
    })?;
    Ok(Some(out))
}

/// Writes a 32-byte secret (a key seed, the admin's secret) to `path` as the keys' files hold
/// it: 64 hex digits and a newline, readable by the owner alone.
fn write_secret(path: &Path, bytes: &[u8; 32]) -> Result<(), PlatformError> {
    write_atomic(path, format!("{}\n", hex::encode(bytes)).as_bytes(), 0o600)
}

/// Writes the public key file `platform.pub`.
fn write_public(path: &Path, public: &PlatformPublicKey) -> Result<(), PlatformError> {
    write_atomic(path, format!("{public}\n").as_bytes(), 0o644)
}

/// Writes `text` to `path` atomically with the given Unix mode.
pub fn write_atomic(path: &Path, text: &[u8], mode: u32) -> Result<(), PlatformError> {
    write_atomic_owned(path, text, mode, None)
}

/// [`write_atomic`], the file given to `owner` (uid, gid) before it takes `path`'s place.
pub fn write_atomic_owned(
    path: &Path,
    text: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), PlatformError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let io = |e| PlatformError::io(path, e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io)?;
    }
    f.write_all(text).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Creates `data_dir` readable by its owner alone (0700), or takes group and other access
/// away from one that allows it: the database in it holds every identity's secret, the
/// admin's included, and sled creates its files readable by all (0644 under the usual umask).
/// Returns the mode it had when it was changed; one it cannot change (another user owns it) is
/// left as it is, with a warning.
pub fn private_data_dir(data_dir: &Path) -> Result<Option<u32>, PlatformError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |e| PlatformError::io(data_dir, e);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(io)?;
    let mode = std::fs::metadata(data_dir)
        .map_err(io)?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    if let Err(e) =
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(mode & 0o700))
    {
        tracing::warn!(
            "data dir {} is open to other users (mode {mode:04o}) and cannot be made 0700 ({e}): its database holds every identity's secret",
            data_dir.display()
        );
        return Ok(None);
    }
    Ok(Some(mode))
}

/// Loads the keys from `data_dir`, creating the directory (owner only, [`private_data_dir`])
/// and any missing key on first start.
pub fn load_or_create_keys(data_dir: &Path) -> Result<Keys, PlatformError> {
    if let Some(was) = private_data_dir(data_dir)? {
        tracing::warn!(
            "data dir {} was open to other users (mode {was:04o}); made it 0700: its database holds every identity's secret",
            data_dir.display()
        );
    }
    let key_path = platform_key_path(data_dir);
    let seed = match read_hex32(&key_path)? {
        Some(s) => s,
        None => {
            let s = random32();
            write_secret(&key_path, &s)?;
            s
        }
    };
    let chain_file = chain_path(data_dir);
    let chain = match std::fs::read(&chain_file) {
        Ok(bytes) => KeyChain::parse(&bytes).map_err(|e| PlatformError::BadFile {
            path: chain_file.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => KeyChain::default(),
        Err(e) => return Err(PlatformError::io(&chain_file, e)),
    };
    let generation = chain.links.len() as u32;
    let newest = chain
        .links
        .last()
        .and_then(|l| serde_json::from_str::<KeyAnnouncement>(&l.body).ok())
        .map(|a| a.key);
    // A rotation interrupted after the chain was written: finish it.
    let mut seed = seed;
    let next = next_key_path(data_dir);
    if let Some(next_seed) = read_hex32(&next)? {
        if Some(PlatformKey::from_seed(next_seed).public()) == newest {
            std::fs::rename(&next, &key_path).map_err(|e| PlatformError::io(&next, e))?;
            seed = next_seed;
        } else {
            std::fs::remove_file(&next).map_err(|e| PlatformError::io(&next, e))?;
        }
    }
    let platform = PlatformKey::with_generation(seed, generation);
    let public = platform.public();
    if newest.is_some_and(|k| k != public) {
        return Err(PlatformError::BadFile {
            path: key_path,
            reason: format!(
                "this key is not generation {generation} of {} (the newest key it announces)",
                chain_file.display()
            ),
        });
    }
    let pub_path = public_key_path(data_dir);
    if std::fs::read_to_string(&pub_path)
        .map(|t| t.trim().to_owned())
        .ok()
        != Some(public.to_hex())
    {
        write_public(&pub_path, &public)?;
    }
    let admin_path = admin_secret_path(data_dir);
    let admin = match read_hex32(&admin_path)? {
        Some(s) => Secret::from_bytes(s),
        None => {
            let s = Secret::from_bytes(random32());
            write_secret(&admin_path, s.as_bytes())?;
            s
        }
    };
    Ok(Keys {
        platform,
        public,
        admin,
        chain,
    })
}

/// Rotates the platform key: a new key, announced under the current one. Returns the new keys;
/// the caller re-signs what it keeps signed (desired notices) and publishes the chain.
pub fn rotate(data_dir: &Path, keys: &Keys, now_ms: u64) -> Result<Keys, PlatformError> {
    let seed = random32();
    let generation = keys.generation() + 1;
    let platform = PlatformKey::with_generation(seed, generation);
    let link = keys.platform.sign_envelope(
        Purpose::KeyRotation,
        &KeyAnnouncement {
            generation,
            key: platform.public(),
            issued_at_ms: now_ms,
        },
    );
    let mut chain = keys.chain.clone();
    chain.links.push(link);
    let next = next_key_path(data_dir);
    write_secret(&next, &seed)?;
    write_atomic(&chain_path(data_dir), &chain.to_bytes(), 0o644)?;
    let key_path = platform_key_path(data_dir);
    std::fs::rename(&next, &key_path).map_err(|e| PlatformError::io(&next, e))?;
    let public = platform.public();
    write_public(&public_key_path(data_dir), &public)?;
    Ok(Keys {
        platform,
        public,
        admin: keys.admin.clone(),
        chain,
    })
}

/// Writes `keys` into `dir` as the files [`load_or_create_keys`] reads (a backup's keys): the
/// seed and the first admin's secret owner-only, the public key, and the chain when there was a
/// rotation.
pub fn write_all(dir: &Path, keys: &Keys) -> Result<(), PlatformError> {
    write_secret(&platform_key_path(dir), &keys.platform.seed())?;
    if !keys.chain.links.is_empty() {
        write_atomic(&chain_path(dir), &keys.chain.to_bytes(), 0o644)?;
    }
    write_public(&public_key_path(dir), &keys.public)?;
    write_secret(&admin_secret_path(dir), keys.admin.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_and_reloaded_identically() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_keys(dir.path()).unwrap();
        let b = load_or_create_keys(dir.path()).unwrap();
        assert_eq!(a.public, b.public);
        assert_eq!(a.admin, b.admin);
        let mode = std::fs::metadata(admin_secret_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(public_key_path(dir.path())).unwrap();
        assert_eq!(text.trim(), a.public.to_hex());
    }

    /// Red-team pass of 2026-11-28: `serve` made its data dir 0755 and sled its database
    /// 0644, so any local user could read every secret in it, the admin's included.
    #[test]
    fn the_data_dir_is_made_and_kept_readable_by_its_owner_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let parent = tempfile::tempdir().unwrap();
        let fresh = parent.path().join("a/data");
        load_or_create_keys(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let open = parent.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_data_dir(&open).unwrap(), Some(0o755));
        assert_eq!(mode(&open), 0o700);
        assert_eq!(private_data_dir(&open).unwrap(), None, "left as it is now");
        load_or_create_keys(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
    }

    #[test]
    fn a_rotated_key_is_announced_under_the_old_one_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_keys(dir.path()).unwrap();
        let second = rotate(dir.path(), &first, 1).unwrap();
        let third = rotate(dir.path(), &second, 2).unwrap();
        assert_eq!(third.generation(), 2);
        let reloaded = load_or_create_keys(dir.path()).unwrap();
        assert_eq!(reloaded.public, third.public);
        assert_eq!(reloaded.generation(), 2);
        assert_eq!(
            reloaded.chain.follow(0, first.public).unwrap(),
            (2, third.public)
        );
        assert_eq!(reloaded.admin, first.admin);
    }

    #[test]
    fn a_rotation_interrupted_after_the_chain_was_written_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_keys(dir.path()).unwrap();
        let second = rotate(dir.path(), &first, 1).unwrap();
        // Put the old seed back as if the rename had not happened.
        write_atomic(
            &next_key_path(dir.path()),
            format!("{}\n", hex::encode(second.platform.seed())).as_bytes(),
            0o600,
        )
        .unwrap();
        write_atomic(
            &platform_key_path(dir.path()),
            format!("{}\n", hex::encode(first.platform.seed())).as_bytes(),
            0o600,
        )
        .unwrap();
        let reloaded = load_or_create_keys(dir.path()).unwrap();
        assert_eq!(reloaded.public, second.public);
        assert!(!next_key_path(dir.path()).exists());
    }
}
