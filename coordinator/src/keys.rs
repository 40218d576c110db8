//! The release signing key: creating it (`keygen`) and loading it (`serve`).
//!
//! Invariants: `signing.key` is written once, with `create_new` and mode 0600, and never
//! overwritten; `trust.json` next to it always names exactly that key. The secret never
//! leaves this process except into that file.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use protocol::{KeyId, TrustedKeys};

pub const SIGNING_KEY_FILE: &str = "signing.key";
pub const TRUST_FILE: &str = "trust.json";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("{} already exists; refusing to overwrite keys (agents trust the old key): choose another --out or remove the directory's keys deliberately", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read the signing key {}: {error}; create one with `coordinator keygen --out {}`", path.display(), path.parent().unwrap_or(Path::new(".")).display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is not a signing key (want 64 hex digits as written by `coordinator keygen`)", .0.display())]
    Malformed(PathBuf),
}

/// What `keygen` created.
#[derive(Debug)]
pub struct Generated {
    pub key_id: KeyId,
    pub signing_key: PathBuf,
    pub trust_file: PathBuf,
}

/// Creates `dir/signing.key` and `dir/trust.json`. Fails without writing anything if either
/// exists.
pub fn keygen(dir: &Path) -> Result<Generated, KeyError> {
    let key_path = dir.join(SIGNING_KEY_FILE);
    let trust_path = dir.join(TRUST_FILE);
    for path in [&key_path, &trust_path] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists(path.clone()));
        }
    }
    fs::create_dir_all(dir).map_err(|error| KeyError::Write {
        path: dir.to_owned(),
        error,
    })?;

    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let verifying = key.verifying_key();
    write_new(
        &key_path,
        format!("{}\n", hex::encode(key.to_bytes())).as_bytes(),
        0o600,
    )?;
    write_new(&trust_path, &TrustedKeys::new([verifying]).to_json(), 0o644)?;
    Ok(Generated {
        key_id: KeyId::of(&verifying),
        signing_key: key_path,
        trust_file: trust_path,
    })
}

/// Writes a file that must not exist yet, and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists(path.to_owned()),
            _ => KeyError::Write {
                path: path.to_owned(),
                error,
            },
        })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| KeyError::Write {
            path: path.to_owned(),
            error,
        })
}

/// Loads `dir/signing.key`. Warns (does not fail) when other users can read it.
pub fn load_signing_key(dir: &Path) -> Result<SigningKey, KeyError> {
    let path = dir.join(SIGNING_KEY_FILE);
    let read_err = |error| KeyError::Read {
        path: path.clone(),
        error,
    };
    let text = fs::read_to_string(&path).map_err(read_err)?;
    let mut secret = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut secret)
        .map_err(|_| KeyError::Malformed(path.clone()))?;
    if let Ok(meta) = fs::metadata(&path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "signing key is readable by other users; chmod 600 it");
        }
    }
    Ok(SigningKey::from_bytes(&secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_loadable_key_and_a_matching_trust_file_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let generated = keygen(dir.path()).expect("keygen");
        let key = load_signing_key(dir.path()).expect("load");
        assert_eq!(KeyId::of(&key.verifying_key()), generated.key_id);
        let trust = TrustedKeys::from_json(&fs::read(&generated.trust_file).expect("read trust"))
            .expect("trust parses");
        assert!(trust.get(&generated.key_id).is_some());
        let mode = fs::metadata(&generated.signing_key)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(keygen(dir.path()), Err(KeyError::Exists(_))));
    }
}
