//! The bootstrap operator API token and caller identities: `DATA/admin.token` (identity
//! `admin`) is created once per data directory; the named tokens the admin creates live in
//! `tokens.rs`. Every `/api/*` call presents one of them.
//!
//! Invariants: `DATA/admin.token` is created with `create_new` and mode 0600 and never
//! rewritten; comparison with a presented token takes time independent of where they differ.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rand::RngCore as _;

pub const ADMIN_TOKEN_FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("cannot create the admin token {}: {error}", path.display())]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read the admin token {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the admin token {} is empty; delete it and restart to create a new one", .0.display())]
    Empty(PathBuf),
}

/// Who is calling the API: the name of the token presented. Handlers take it as
/// `Extension<Identity>` (the token middleware inserts it) and write it to the deploy log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity(pub String);

impl Identity {
    /// The identity of `DATA/admin.token`.
    pub fn admin() -> Identity {
        Identity("admin".to_owned())
    }

    /// The coordinator itself, for the steps a rollout takes on its own.
    pub fn coordinator() -> Identity {
        Identity("coordinator".to_owned())
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret bearer token. Deliberately not `Display`: it is never logged.
#[derive(Clone)]
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads `data/admin.token`, creating it (32 random bytes, hex) if absent. Returns whether
    /// it was created.
    pub fn load_or_create(data: &Path) -> Result<(AdminToken, PathBuf, bool), TokenError> {
        let path = data.join(ADMIN_TOKEN_FILE);
        let fresh = new_secret();
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match created {
            Ok(mut file) => {
                file.write_all(format!("{fresh}\n").as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|error| TokenError::Create {
                        path: path.clone(),
                        error,
                    })?;
                Ok((AdminToken(fresh), path, true))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(&path).map_err(|error| TokenError::Read {
                    path: path.clone(),
                    error,
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(TokenError::Empty(path));
                }
                Ok((AdminToken(token.to_owned()), path, false))
            }
            Err(error) => Err(TokenError::Create { path, error }),
        }
    }

    #[cfg(test)]
    pub fn from_string(token: &str) -> AdminToken {
        AdminToken(token.to_owned())
    }

    /// Whether an `Authorization` header value carries this token (`Bearer <token>`).
    pub fn authorizes(&self, header: Option<&str>) -> bool {
        let Some(presented) = bearer(header) else {
            return false;
        };
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

/// The token an `Authorization` header value carries (`Bearer <token>`), trimmed; `None`
/// without one.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    header
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A fresh bearer token secret: 32 bytes from the OS generator, hex. Its 256 bits of entropy
/// are what let `tokens.rs` store a plain (unsalted) BLAKE3 hash of it.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares without an early exit on the first differing byte. The length is not secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let token = AdminToken::from_string("s3cret");
        assert!(token.authorizes(Some("Bearer s3cret")));
        for bad in [
            "Bearer s3cres",
            "Bearer s3cret2",
            "Bearer ",
            "s3cret",
            "Basic s3cret",
            "",
        ] {
            assert!(!token.authorizes(Some(bad)), "{bad:?} accepted");
        }
        assert!(!token.authorizes(None));
    }

    #[test]
    fn the_token_file_is_created_once_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, path, created) = AdminToken::load_or_create(dir.path()).expect("create");
        assert!(created);
        let (second, _, created) = AdminToken::load_or_create(dir.path()).expect("read");
        assert!(!created);
        assert!(second.authorizes(Some(&format!("Bearer {}", first.0))));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
