//! The platform's ed25519 signing key and the operator (admin) secret, kept in the data dir.
//! Created on first start; secret files are written 0600 via temp file + fsync + rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use fleetcast_proto::auth::{PlatformKey, PlatformPublicKey, Secret};
use rand::RngCore;

use crate::error::PlatformError;

pub struct Keys {
    pub platform: PlatformKey,
    pub public: PlatformPublicKey,
    pub admin: Secret,
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

/// Writes `text` to `path` atomically with the given Unix mode.
pub fn write_atomic(path: &Path, text: &[u8], mode: u32) -> Result<(), PlatformError> {
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

/// Loads the keys from `data_dir`, creating the directory and any missing key on first start.
pub fn load_or_create_keys(data_dir: &Path) -> Result<Keys, PlatformError> {
    std::fs::create_dir_all(data_dir).map_err(|e| PlatformError::io(data_dir, e))?;
    let key_path = platform_key_path(data_dir);
    let seed = match read_hex32(&key_path)? {
        Some(s) => s,
        None => {
            let s = random32();
            write_atomic(&key_path, format!("{}\n", hex::encode(s)).as_bytes(), 0o600)?;
            s
        }
    };
    let platform = PlatformKey::from_seed(seed);
    let public = platform.public();
    let pub_path = public_key_path(data_dir);
    if std::fs::read_to_string(&pub_path)
        .map(|t| t.trim().to_owned())
        .ok()
        != Some(public.to_hex())
    {
        write_atomic(&pub_path, format!("{public}\n").as_bytes(), 0o644)?;
    }
    let admin_path = admin_secret_path(data_dir);
    let admin = match read_hex32(&admin_path)? {
        Some(s) => Secret::from_bytes(s),
        None => {
            let s = Secret::from_bytes(random32());
            write_atomic(&admin_path, format!("{}\n", s.to_hex()).as_bytes(), 0o600)?;
            s
        }
    };
    Ok(Keys {
        platform,
        public,
        admin,
    })
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
}
