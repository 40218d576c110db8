//! The coordinator's durable state, in one sled database at `DATA/db`.
//!
//! Trees (keys are UTF-8 unless noted, values JSON unless noted):
//! - `releases`:     `app@version` → the sealed manifest envelope bytes (exactly as sent to agents)
//! - `release_info`: `app@version` → [`ReleaseInfo`] (summary, so listing never parses manifests)
//! - `nodes`:        node id → [`NodeRecord`] (inventory: last state, presence, last event)
//! - `desired`:      node id → the sealed command envelope bytes the node should act on
//! - `rollouts`, `rollout_nodes`: each rollout's head and per-node progress (layout in
//!   `rollout/store.rs`; records from before staged rollouts still read)
//! - `log`:          entry id (u64 big-endian) → [`LogEntry`] (the deploy log, append-only)
//! - `meta`:         `seq`, `rollout`, `log` → u64 big-endian counters
//! - `tokens`, `token_hashes`: operator API tokens, hashes only (layout in `tokens.rs`)
//! - `metric_samples`, `metric_seqs`: health samples by time, each node's highest sample seq
//!   (layout in `metrics/store.rs`)
//!
//! Invariants: a release is inserted once (`insert_release` is atomic over both release trees)
//! and its envelope is never changed. The one thing that may change later is the summary's
//! mirror list ([`Db::set_release_mirrors`]): mirrors are where to fetch chunks from, not part
//! of the signed release. Counters only grow and are changed by compare-and-swap, so no value is
//! handed out twice. Methods here write to sled's page cache only; the caller decides when a
//! write must be durable and calls [`Db::flush`] before acting on it (see `api.rs`).

use std::ops::RangeInclusive;
use std::path::Path;

use protocol::messages::{Event, NodeState};
use protocol::{Digest, NodeId, ReleaseId, ReleaseKind, RunSpec, UnixSeconds};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

use crate::canary::CanaryConfig;
use crate::rollout::plan::PlanOptions;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The message includes sled's, so the error is not also chained as a source.
    #[error("database error: {0}")]
    Sled(sled::Error),
    #[error("stored {what} {key:?} is corrupt: {reason}")]
    Corrupt {
        what: &'static str,
        key: String,
        reason: String,
    },
}

/// Summary of a published release. (Not `Eq`: the canary configuration holds floats.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub release: ReleaseId,
    pub kind: ReleaseKind,
    /// Number of regular files.
    pub files: u64,
    /// Total uncompressed size of the files.
    pub bytes: u64,
    /// Number of distinct chunks.
    pub chunks: u64,
    /// The manifest's identity, as agents report it (`Envelope::payload_digest`).
    pub manifest_digest: Digest,
    pub created_at: UnixSeconds,
    pub published_at: UnixSeconds,
    /// Base URLs of static mirrors serving `{base}/chunks/{digest}`, in the order agents try
    /// them (checked by `release::mirror_list`). Replaced when the same content is published
    /// again with another list. Absent in records written before mirrors existed.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// The signed manifest's run section (how the release runs on a node); `None` for files
    /// only, and in records written before run sections existed (all files only).
    #[serde(default)]
    pub run: Option<RunSpec>,
    /// The plan defaults of its rollouts (`release.toml` `[rollout]`); not signed.
    #[serde(default)]
    pub rollout: Option<PlanOptions>,
    /// How its canaries are judged (`release.toml` `[canary]`, validated at publish); not
    /// signed. `None`: the defaults, also for records written before canary judgment.
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
}

/// What the coordinator knows about one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub state: Option<NodeState>,
    pub online: Option<bool>,
    /// When the coordinator last heard from the node itself (not a retained replay).
    pub last_seen: Option<UnixSeconds>,
    pub last_event: Option<Event>,
}

/// The result of inserting a release.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The release already existed; its stored envelope bytes, unchanged.
    Existing(Vec<u8>),
}

const SEQ_KEY: &[u8] = b"seq";
const ROLLOUT_KEY: &[u8] = b"rollout";
const LOG_KEY: &[u8] = b"log";
/// The page cache of the coordinator's database. Its reads are mostly recent records (the
/// canary window's samples, node states). At a 1,000-node rollout the measured rollout
/// started at 122 MiB resident with 64 MiB, at 105 MiB with 16 MiB (README, "Fleet scale").
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// One deploy-log entry: who did what, to which nodes, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the log (1, 2, …); entries are never changed or removed.
    pub id: u64,
    pub at: UnixSeconds,
    /// The identity of the API token that asked, or `coordinator` (with the rollout it acts
    /// for in `target`) for steps a rollout takes by itself.
    pub who: String,
    /// What was done, e.g. `release publish`, `rollout start`, `wave switch`, `node rollback`.
    pub action: String,
    /// What it was done to, e.g. `web@2`, `rollout 7`.
    pub target: String,
    #[serde(default)]
    pub nodes: Vec<NodeId>,
    /// How it ended, in one line: `ok`, `refused: …`, `failed: …`.
    pub outcome: String,
}

#[derive(Clone)]
pub struct Db {
    db: sled::Db,
    releases: sled::Tree,
    release_info: sled::Tree,
    nodes: sled::Tree,
    desired: sled::Tree,
    log: sled::Tree,
    meta: sled::Tree,
}

impl From<sled::Error> for DbError {
    fn from(error: sled::Error) -> Self {
        DbError::Sled(error)
    }
}

fn release_key(id: &ReleaseId) -> Vec<u8> {
    id.to_string().into_bytes()
}

fn decode_u64(what: &'static str, key: &[u8], bytes: &[u8]) -> Result<u64, DbError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| DbError::Corrupt {
        what,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("{} bytes, want 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

fn decode_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|e| DbError::Corrupt {
        what,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("coordinator records always serialize")
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let db = sled::Config::new()
            .path(path)
            // sled's default page cache is 1 GiB, which a busy metric store fills; the
            // coordinator reads recent records mostly, so a smaller one costs little.
            .cache_capacity(CACHE_BYTES)
            .open()?;
        Ok(Db {
            releases: db.open_tree("releases")?,
            release_info: db.open_tree("release_info")?,
            nodes: db.open_tree("nodes")?,
            desired: db.open_tree("desired")?,
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// A tree a module of its own keeps in this database (named in the list above), so that
    /// its writes become durable with everything else at [`Db::flush`].
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, DbError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Makes every write so far durable. Call before acting on or acknowledging a write.
    pub async fn flush(&self) -> Result<(), DbError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Reserves `count` (≥ 1) consecutive command sequence numbers, above every number reserved
    /// before. Not durable until [`Db::flush`]: flush before any of them leaves the process.
    pub fn reserve_seqs(&self, count: u64) -> Result<RangeInclusive<u64>, DbError> {
        let end = self.bump(SEQ_KEY, count.max(1))?;
        Ok(end + 1 - count.max(1)..=end)
    }

    /// The next rollout id (1, 2, …). Not durable until [`Db::flush`].
    pub fn next_rollout_id(&self) -> Result<u64, DbError> {
        self.bump(ROLLOUT_KEY, 1)
    }

    /// Adds `by` to the counter at `key` by compare-and-swap; returns the new value.
    fn bump(&self, key: &[u8], by: u64) -> Result<u64, DbError> {
        loop {
            let old = self.meta.get(key)?;
            let current = match &old {
                Some(bytes) => decode_u64("counter", key, bytes)?,
                None => 0,
            };
            let next = current.checked_add(by).ok_or_else(|| DbError::Corrupt {
                what: "counter",
                key: String::from_utf8_lossy(key).into_owned(),
                reason: "would overflow".to_owned(),
            })?;
            let swapped = self
                .meta
                .compare_and_swap(key, old, Some(&next.to_be_bytes()[..]))?;
            if swapped.is_ok() {
                return Ok(next);
            }
        }
    }

    /// Inserts a release unless one with the same id exists, atomically over both release trees.
    pub fn insert_release(&self, info: &ReleaseInfo, envelope: &[u8]) -> Result<Inserted, DbError> {
        let key = release_key(&info.release);
        let info_bytes = encode_json(info);
        let result = (&self.releases, &self.release_info).transaction(|(releases, infos)| {
            if let Some(existing) = releases.get(&key)? {
                return Ok(Inserted::Existing(existing.to_vec()));
            }
            releases.insert(key.as_slice(), envelope)?;
            infos.insert(key.as_slice(), info_bytes.as_slice())?;
            Ok::<_, ConflictableTransactionError<DbError>>(Inserted::New)
        });
        match result {
            Ok(inserted) => Ok(inserted),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Replaces the mirror list of a published release, by compare-and-swap so a concurrent
    /// change is not lost. Returns the summary as stored afterwards, or `None` if there is no
    /// such release. Not durable until [`Db::flush`].
    pub fn set_release_mirrors(
        &self,
        id: &ReleaseId,
        mirrors: &[String],
    ) -> Result<Option<ReleaseInfo>, DbError> {
        let key = release_key(id);
        loop {
            let Some(old) = self.release_info.get(&key)? else {
                return Ok(None);
            };
            let mut info: ReleaseInfo = decode_json("release", &key, &old)?;
            if info.mirrors == mirrors {
                return Ok(Some(info));
            }
            info.mirrors = mirrors.to_vec();
            let new = encode_json(&info);
            if self
                .release_info
                .compare_and_swap(&key, Some(old), Some(new))?
                .is_ok()
            {
                return Ok(Some(info));
            }
        }
    }

    /// The sealed manifest envelope bytes of a release.
    pub fn release_envelope(&self, id: &ReleaseId) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self.releases.get(release_key(id))?.map(|v| v.to_vec()))
    }

    pub fn release_info(&self, id: &ReleaseId) -> Result<Option<ReleaseInfo>, DbError> {
        let key = release_key(id);
        self.release_info
            .get(&key)?
            .map(|v| decode_json("release", &key, &v))
            .transpose()
    }

    /// Every release, ordered by `app@version`.
    pub fn releases(&self) -> Result<Vec<ReleaseInfo>, DbError> {
        self.release_info
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode_json("release", &k, &v)
            })
            .collect()
    }

    pub fn node(&self, node: &NodeId) -> Result<Option<NodeRecord>, DbError> {
        let key = node.as_str().as_bytes();
        self.nodes
            .get(key)?
            .map(|v| decode_json("node", key, &v))
            .transpose()
    }

    pub fn put_node(&self, node: &NodeId, record: &NodeRecord) -> Result<(), DbError> {
        self.nodes.insert(node.as_str(), encode_json(record))?;
        Ok(())
    }

    /// Every node record, ordered by node id. A record that no longer parses is an error
    /// naming the node.
    pub fn nodes(&self) -> Result<Vec<(NodeId, NodeRecord)>, DbError> {
        self.nodes
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let node = node_key(&k)?;
                Ok((node, decode_json("node", &k, &v)?))
            })
            .collect()
    }

    pub fn set_desired(&self, node: &NodeId, envelope: &[u8]) -> Result<(), DbError> {
        self.desired.insert(node.as_str(), envelope)?;
        Ok(())
    }

    pub fn desired(&self, node: &NodeId) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self.desired.get(node.as_str())?.map(|v| v.to_vec()))
    }

    /// Every node that has a desired command.
    pub fn desired_nodes(&self) -> Result<Vec<NodeId>, DbError> {
        self.desired.iter().keys().map(|k| node_key(&k?)).collect()
    }

    /// Appends an entry to the deploy log (its `id` is assigned here) and returns it. Not
    /// durable until [`Db::flush`].
    pub fn append_log(&self, mut entry: LogEntry) -> Result<LogEntry, DbError> {
        entry.id = self.bump(LOG_KEY, 1)?;
        self.log
            .insert(entry.id.to_be_bytes(), encode_json(&entry))?;
        Ok(entry)
    }

    /// Deploy-log entries at or after `since`, oldest first.
    pub fn log_since(&self, since: UnixSeconds) -> Result<Vec<LogEntry>, DbError> {
        let mut entries = Vec::new();
        for kv in self.log.iter() {
            let (k, v) = kv?;
            let entry: LogEntry = decode_json("log entry", &k, &v)?;
            if entry.at >= since {
                entries.push(entry);
            }
        }
        Ok(entries)
    }
}

fn node_key(key: &[u8]) -> Result<NodeId, DbError> {
    let corrupt = |reason: String| DbError::Corrupt {
        what: "node id",
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let text = std::str::from_utf8(key).map_err(|e| corrupt(e.to_string()))?;
    NodeId::new(text).map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{AppName, Version};

    fn rel(app: &str, version: &str) -> ReleaseId {
        ReleaseId::new(
            AppName::new(app).expect("app"),
            Version::new(version).expect("version"),
        )
    }

    fn info(release: ReleaseId) -> ReleaseInfo {
        ReleaseInfo {
            release,
            kind: ReleaseKind::App,
            files: 1,
            bytes: 2,
            chunks: 1,
            manifest_digest: Digest::of(b"m"),
            created_at: 1,
            published_at: 2,
            mirrors: Vec::new(),
            run: None,
            rollout: None,
            canary: None,
        }
    }

    #[tokio::test]
    async fn seqs_keep_growing_across_a_reopen_of_the_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let last = {
            let db = Db::open(&path).expect("open");
            let a = db.reserve_seqs(1).expect("seq");
            let b = db.reserve_seqs(3).expect("seq");
            assert_eq!(*a.start(), 1);
            assert_eq!(b, 2..=4);
            db.flush().await.expect("flush");
            *b.end()
        };
        let db = Db::open(&path).expect("reopen");
        let next = db.reserve_seqs(1).expect("seq");
        assert!(*next.start() > last, "{next:?} reused a seq ≤ {last}");
        assert_eq!(db.next_rollout_id().expect("id"), 1);
        assert_eq!(db.next_rollout_id().expect("id"), 2);
    }

    #[test]
    fn a_release_is_inserted_once_and_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("db")).expect("open");
        let id = rel("web", "1");
        assert_eq!(
            db.insert_release(&info(id.clone()), b"first")
                .expect("insert"),
            Inserted::New
        );
        assert_eq!(
            db.insert_release(&info(id.clone()), b"second")
                .expect("insert"),
            Inserted::Existing(b"first".to_vec())
        );
        assert_eq!(
            db.release_envelope(&id).expect("get"),
            Some(b"first".to_vec())
        );
        assert_eq!(db.releases().expect("list"), vec![info(id)]);
    }

    #[test]
    fn only_the_mirror_list_of_a_release_changes_after_it_is_inserted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("db")).expect("open");
        let id = rel("web", "1");
        assert_eq!(db.set_release_mirrors(&id, &[]).expect("set"), None);
        db.insert_release(&info(id.clone()), b"sealed")
            .expect("insert");
        let mirrors = vec!["https://cdn".to_owned(), "http://m".to_owned()];
        let updated = db
            .set_release_mirrors(&id, &mirrors)
            .expect("set")
            .expect("exists");
        assert_eq!(updated.mirrors, mirrors);
        assert_eq!(
            db.release_info(&id).expect("get"),
            Some(ReleaseInfo {
                mirrors,
                ..info(id.clone())
            })
        );
        assert_eq!(
            db.release_envelope(&id).expect("get"),
            Some(b"sealed".to_vec())
        );
    }

    #[test]
    fn a_release_summary_stored_before_mirrors_and_run_sections_existed_reads_with_none() {
        let mut old = serde_json::to_value(info(rel("web", "1"))).expect("json");
        let object = old.as_object_mut().expect("object");
        object.remove("mirrors");
        object.remove("run");
        object.remove("canary");
        let info: ReleaseInfo =
            decode_json("release", b"web@1", old.to_string().as_bytes()).expect("reads");
        assert!(info.mirrors.is_empty());
        assert_eq!(info.run, None);
        assert_eq!(info.canary, None);
    }

    #[test]
    fn node_records_and_desired_commands_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("db")).expect("open");
        let node = NodeId::new("n1").expect("node");
        let record = NodeRecord {
            online: Some(true),
            last_seen: Some(5),
            ..NodeRecord::default()
        };
        db.put_node(&node, &record).expect("put");
        assert_eq!(db.node(&node).expect("get"), Some(record.clone()));
        assert_eq!(db.nodes().expect("list"), vec![(node.clone(), record)]);
        db.set_desired(&node, b"cmd").expect("set");
        assert_eq!(db.desired_nodes().expect("list"), vec![node.clone()]);
        assert_eq!(db.desired(&node).expect("get"), Some(b"cmd".to_vec()));
    }

    #[tokio::test]
    async fn the_deploy_log_appends_in_order_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let entry = |at: u64, action: &str| LogEntry {
            id: 0,
            at,
            who: "alice".to_owned(),
            action: action.to_owned(),
            target: "web@2".to_owned(),
            nodes: vec![NodeId::new("n1").expect("node")],
            outcome: "ok".to_owned(),
        };
        {
            let db = Db::open(&path).expect("open");
            assert_eq!(
                db.append_log(entry(10, "release publish"))
                    .expect("append")
                    .id,
                1
            );
            assert_eq!(
                db.append_log(entry(20, "rollout start"))
                    .expect("append")
                    .id,
                2
            );
            db.flush().await.expect("flush");
        }
        let db = Db::open(&path).expect("reopen");
        assert_eq!(
            db.append_log(entry(30, "node rollback"))
                .expect("append")
                .id,
            3
        );
        let actions: Vec<String> = db
            .log_since(20)
            .expect("read")
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(actions, ["rollout start", "node rollback"]);
        assert_eq!(db.log_since(0).expect("read").len(), 3);
    }
}
