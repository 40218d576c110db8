//! Named operator API tokens: each is a separate identity the deploy log records, created and
//! revoked by the `admin` identity (`DATA/admin.token`, see `token.rs`).
//!
//! Trees in the coordinator's [`Db`] (values JSON):
//! - `tokens`:       name → [`TokenRecord`] (the hash of the current secret, who created it
//!   when, and whether and when it was revoked);
//! - `token_hashes`: hash (32 bytes) → name, so resolving a presented token is one lookup by
//!   its hash and one by name, never a scan.
//!
//! Invariants: a secret is never stored or logged, only its hash: BLAKE3 over a context string
//! and the secret. A secret is 256 random bits (`token::new_secret`), so a fast unsalted hash
//! cannot be reversed by guessing, and looking a hash up in sled leaks nothing usable about
//! the secret through timing. The names `admin` and `coordinator` are reserved for the built-in
//! identities and never stored. A `token_hashes` entry is never removed: the hash of a revoked
//! (or since re-created) token still leads to its name, so the caller can be told it was
//! revoked rather than unknown; it is valid only while it is the hash of its name's record and
//! that record is not revoked. Both trees change in one transaction. Like the rest of [`Db`],
//! writes are durable only after [`Db::flush`].

use protocol::{AppName, Digest, NameError, UnixSeconds};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

use crate::db::{Db, DbError};
use crate::token::{self, Identity};

/// Prefixed to the secret before hashing, so a token hash can never equal another BLAKE3
/// digest the coordinator keeps (chunks, manifests).
const HASH_CONTEXT: &[u8] = b"fleet coordinator operator API token v1\0";

/// Identities that exist without a stored token.
const RESERVED: [&str; 2] = ["admin", "coordinator"];

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenStoreError {
    #[error(transparent)]
    InvalidName(NameError),
    #[error("{0:?} is a built-in identity, not a token name: choose another name")]
    Reserved(String),
    #[error("a token named {0:?} already exists; revoke it first (`coordinator token revoke {0}`) to replace it")]
    Exists(String),
    #[error("there is no token named {0:?} (`coordinator token list` lists them)")]
    NoSuchToken(String),
    #[error(
        "the token {name:?} is already revoked (by {by}; `coordinator token list` shows when)"
    )]
    AlreadyRevoked {
        name: String,
        by: String,
        at: UnixSeconds,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// One named token as stored: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    /// Hex of the hash of the current secret.
    pub hash: String,
    pub created_at: UnixSeconds,
    /// The identity that created it (`admin`).
    pub created_by: String,
    pub revoked_at: Option<UnixSeconds>,
    pub revoked_by: Option<String>,
}

/// What a presented secret is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A valid token, with the identity it names.
    Active(Identity),
    /// The token of this name was revoked (or revoked and created again with a new secret).
    Revoked(String),
    /// No token ever had this secret.
    Unknown,
}

/// The named tokens, in the coordinator's database. Cheap to clone.
#[derive(Clone)]
pub struct TokenStore {
    by_name: sled::Tree,
    by_hash: sled::Tree,
}

/// Checks a token name: the rule of app and node names (1 to 64 of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-`), and none of the built-in identities.
pub fn check_name(name: &str) -> Result<(), TokenStoreError> {
    AppName::new(name).map_err(|error| {
        TokenStoreError::InvalidName(NameError {
            what: "token name",
            ..error
        })
    })?;
    if RESERVED.contains(&name) {
        return Err(TokenStoreError::Reserved(name.to_owned()));
    }
    Ok(())
}

fn hash(secret: &str) -> Digest {
    let mut input = HASH_CONTEXT.to_vec();
    input.extend_from_slice(secret.as_bytes());
    Digest::of(&input)
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<TokenRecord, DbError> {
    serde_json::from_slice(bytes).map_err(|e| DbError::Corrupt {
        what: "token",
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn encode(record: &TokenRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("token records always serialize")
}

/// Unwraps a transaction's result: an abort carries our error, storage errors are sled's.
fn settle<T>(result: Result<T, TransactionError<TokenStoreError>>) -> Result<T, TokenStoreError> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(error)) => Err(error),
        Err(TransactionError::Storage(error)) => Err(DbError::from(error).into()),
    }
}

impl TokenStore {
    pub fn open(db: &Db) -> Result<TokenStore, DbError> {
        Ok(TokenStore {
            by_name: db.open_tree("tokens")?,
            by_hash: db.open_tree("token_hashes")?,
        })
    }

    /// Creates the token `name` for `by` and returns its record and its secret, which is
    /// shown to the caller once and kept nowhere. A revoked name may be created again (a new
    /// secret; the old one stays refused). Not durable until [`Db::flush`].
    pub fn create(
        &self,
        name: &str,
        by: &Identity,
        now: UnixSeconds,
    ) -> Result<(TokenRecord, String), TokenStoreError> {
        check_name(name)?;
        let secret = token::new_secret();
        let digest = hash(&secret);
        let record = TokenRecord {
            name: name.to_owned(),
            hash: digest.to_hex(),
            created_at: now,
            created_by: by.0.clone(),
            revoked_at: None,
            revoked_by: None,
        };
        let bytes = encode(&record);
        settle(
            (&self.by_name, &self.by_hash).transaction(|(by_name, by_hash)| {
                if let Some(old) = by_name.get(name)? {
                    let old = decode(name.as_bytes(), &old)
                        .map_err(|e| ConflictableTransactionError::Abort(e.into()))?;
                    if old.revoked_at.is_none() {
                        return Err(ConflictableTransactionError::Abort(
                            TokenStoreError::Exists(name.to_owned()),
                        ));
                    }
                }
                by_name.insert(name, bytes.as_slice())?;
                by_hash.insert(&digest.as_bytes()[..], name)?;
                Ok(())
            }),
        )?;
        Ok((record, secret))
    }

    /// Revokes the token `name`: from now on its secret gets 401. Returns the record as
    /// revoked. Not durable until [`Db::flush`].
    pub fn revoke(
        &self,
        name: &str,
        by: &Identity,
        now: UnixSeconds,
    ) -> Result<TokenRecord, TokenStoreError> {
        check_name(name)?;
        loop {
            let Some(old) = self.by_name.get(name).map_err(DbError::from)? else {
                return Err(TokenStoreError::NoSuchToken(name.to_owned()));
            };
            let mut record = decode(name.as_bytes(), &old)?;
            if let Some(at) = record.revoked_at {
                return Err(TokenStoreError::AlreadyRevoked {
                    name: name.to_owned(),
                    by: record.revoked_by.unwrap_or_default(),
                    at,
                });
            }
            record.revoked_at = Some(now);
            record.revoked_by = Some(by.0.clone());
            // Compare-and-swap: a concurrent revoke or re-create is not overwritten.
            let swapped = self
                .by_name
                .compare_and_swap(name, Some(old), Some(encode(&record)))
                .map_err(DbError::from)?;
            if swapped.is_ok() {
                return Ok(record);
            }
        }
    }

    /// Every token, revoked ones included, ordered by name.
    pub fn list(&self) -> Result<Vec<TokenRecord>, DbError> {
        self.by_name
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// What a presented secret is: two point lookups, no scan.
    pub fn resolve(&self, secret: &str) -> Result<Resolved, DbError> {
        let digest = hash(secret);
        let Some(name) = self.by_hash.get(digest.as_bytes())? else {
            return Ok(Resolved::Unknown);
        };
        let name = String::from_utf8_lossy(&name).into_owned();
        let Some(bytes) = self.by_name.get(name.as_bytes())? else {
            return Err(DbError::Corrupt {
                what: "token hash index",
                key: name,
                reason: "names a token that has no record".to_owned(),
            });
        };
        let record = decode(name.as_bytes(), &bytes)?;
        if record.hash == digest.to_hex() && record.revoked_at.is_none() {
            Ok(Resolved::Active(Identity(name)))
        } else {
            Ok(Resolved::Revoked(name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Db, TokenStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("db")).expect("open");
        let tokens = TokenStore::open(&db).expect("tokens");
        (dir, db, tokens)
    }

    #[test]
    fn a_created_token_resolves_to_its_name_and_nothing_else_does() {
        let (_dir, _db, tokens) = store();
        let (record, secret) = tokens
            .create("alice", &Identity::admin(), 100)
            .expect("create");
        assert_eq!(
            (
                record.name.as_str(),
                record.created_by.as_str(),
                record.created_at
            ),
            ("alice", "admin", 100)
        );
        assert_eq!(secret.len(), 64);
        assert_eq!(
            tokens.resolve(&secret).expect("resolve"),
            Resolved::Active(Identity("alice".into()))
        );
        let (_, bob) = tokens.create("bob", &Identity::admin(), 101).expect("bob");
        assert_ne!(bob, secret);
        assert_eq!(
            tokens.resolve(&bob).expect("resolve"),
            Resolved::Active(Identity("bob".into()))
        );
        let mut wrong = secret.clone();
        wrong.replace_range(0..1, if secret.starts_with('0') { "1" } else { "0" });
        assert_eq!(tokens.resolve(&wrong).expect("resolve"), Resolved::Unknown);
        assert_eq!(tokens.resolve("").expect("resolve"), Resolved::Unknown);
    }

    #[test]
    fn a_revoked_token_is_refused_as_revoked_and_its_name_can_be_given_a_new_secret() {
        let (_dir, _db, tokens) = store();
        let (_, old) = tokens.create("ci", &Identity::admin(), 1).expect("create");
        assert!(matches!(
            tokens.create("ci", &Identity::admin(), 2),
            Err(TokenStoreError::Exists(name)) if name == "ci"
        ));
        let revoked = tokens.revoke("ci", &Identity::admin(), 3).expect("revoke");
        assert_eq!(
            (revoked.revoked_at, revoked.revoked_by.as_deref()),
            (Some(3), Some("admin"))
        );
        assert_eq!(
            tokens.resolve(&old).expect("resolve"),
            Resolved::Revoked("ci".into())
        );
        assert!(matches!(
            tokens.revoke("ci", &Identity::admin(), 4),
            Err(TokenStoreError::AlreadyRevoked { at: 3, .. })
        ));

        let (again, new) = tokens.create("ci", &Identity::admin(), 5).expect("again");
        assert_eq!(again.revoked_at, None);
        assert_eq!(
            tokens.resolve(&new).expect("resolve"),
            Resolved::Active(Identity("ci".into()))
        );
        assert_eq!(
            tokens.resolve(&old).expect("resolve"),
            Resolved::Revoked("ci".into()),
            "the first secret came back to life"
        );
        assert!(matches!(
            tokens.revoke("nobody", &Identity::admin(), 6),
            Err(TokenStoreError::NoSuchToken(_))
        ));
    }

    #[test]
    fn only_a_hash_of_the_secret_is_stored() {
        let (_dir, _db, tokens) = store();
        let (_, secret) = tokens
            .create("alice", &Identity::admin(), 1)
            .expect("create");
        tokens
            .revoke("alice", &Identity::admin(), 2)
            .expect("revoke");
        let (_, secret2) = tokens
            .create("alice", &Identity::admin(), 3)
            .expect("create again");
        for secret in [&secret, &secret2] {
            let raw = secret.as_bytes();
            let decoded = hex::decode(secret).expect("hex secret");
            for tree in [&tokens.by_name, &tokens.by_hash] {
                for kv in tree.iter() {
                    let (k, v) = kv.expect("read");
                    for stored in [&k[..], &v[..]] {
                        for needle in [raw, decoded.as_slice()] {
                            assert!(
                                !stored.windows(needle.len()).any(|w| w == needle),
                                "a secret is stored in {:?}",
                                String::from_utf8_lossy(stored)
                            );
                        }
                    }
                }
            }
        }
        let listed = tokens.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].hash, hash(&secret2).to_hex());
        assert_eq!(
            tokens.by_hash.len(),
            2,
            "both hashes are kept, to refuse the old one as revoked"
        );
    }

    #[test]
    fn token_names_follow_the_name_rule_and_built_in_identities_are_reserved() {
        let (_dir, _db, tokens) = store();
        for bad in ["", "a b", "../x", "-x", &"x".repeat(65)] {
            let error = tokens
                .create(bad, &Identity::admin(), 1)
                .expect_err("accepted");
            assert!(error.to_string().contains("invalid token name"), "{error}");
        }
        for reserved in ["admin", "coordinator"] {
            assert!(matches!(
                tokens.create(reserved, &Identity::admin(), 1),
                Err(TokenStoreError::Reserved(_))
            ));
        }
        assert!(tokens.list().expect("list").is_empty());
    }
}
