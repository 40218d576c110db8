//! How a rollout lies in sled, in the coordinator's one database (so its writes become
//! durable with the desired commands and deploy-log entries of the same step, at one flush).
//!
//! Trees:
//! - `rollouts`: rollout id (u64 big-endian) → the [`Head`] as JSON. Records written before
//!   staged rollouts (`{id, release, nodes: [[node, seq]], started_at}`) are read as
//!   [`Status::Legacy`] rollouts; they are never rewritten.
//! - `rollout_nodes`: rollout id (u64 big-endian) ++ node id → that node's [`NodeProgress`]
//!   as JSON, so a step that moves three nodes of a thousand writes three records.
//!
//! Writes here are not durable until `Db::flush`; the driver flushes each step's writes
//! before anything they decided leaves the process.

use protocol::{NodeId, ReleaseId, UnixSeconds};
use serde::Deserialize;

use super::engine::{Head, NodePhase, NodeProgress, Rollout, Status, WavePhase};
use super::plan::{Plan, PlanOptions};
use crate::db::{Db, DbError};

#[derive(Clone)]
pub struct RolloutStore {
    heads: sled::Tree,
    nodes: sled::Tree,
}

/// A rollout record as written before staged rollouts.
#[derive(Deserialize)]
struct LegacyRecord {
    id: u64,
    release: ReleaseId,
    nodes: Vec<(NodeId, u64)>,
    started_at: UnixSeconds,
}

fn node_key(id: u64, node: &NodeId) -> Vec<u8> {
    let mut key = id.to_be_bytes().to_vec();
    key.extend_from_slice(node.as_str().as_bytes());
    key
}

fn corrupt(what: &'static str, key: &[u8], reason: impl ToString) -> DbError {
    DbError::Corrupt {
        what,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("rollout records always serialize")
}

impl RolloutStore {
    pub fn open(db: &Db) -> Result<RolloutStore, DbError> {
        Ok(RolloutStore {
            heads: db.open_tree("rollouts")?,
            nodes: db.open_tree("rollout_nodes")?,
        })
    }

    pub fn put_head(&self, head: &Head) -> Result<(), DbError> {
        self.heads.insert(head.id.to_be_bytes(), encode(head))?;
        Ok(())
    }

    pub fn put_node(&self, id: u64, node: &NodeProgress) -> Result<(), DbError> {
        self.nodes.insert(node_key(id, &node.node), encode(node))?;
        Ok(())
    }

    /// Every rollout's head, newest first; legacy records converted (with their nodes, which
    /// they hold inline).
    pub fn heads(&self) -> Result<Vec<Head>, DbError> {
        let mut heads = Vec::new();
        for kv in self.heads.iter().rev() {
            let (key, value) = kv?;
            heads.push(decode_head(&key, &value)?.0);
        }
        Ok(heads)
    }

    pub fn head(&self, id: u64) -> Result<Option<Head>, DbError> {
        let key = id.to_be_bytes();
        self.heads
            .get(key)?
            .map(|value| decode_head(&key, &value).map(|(head, _)| head))
            .transpose()
    }

    /// A whole rollout: its head and every node's progress.
    pub fn load(&self, id: u64) -> Result<Option<Rollout>, DbError> {
        let key = id.to_be_bytes();
        let Some(value) = self.heads.get(key)? else {
            return Ok(None);
        };
        let (head, legacy_nodes) = decode_head(&key, &value)?;
        let nodes = match legacy_nodes {
            Some(nodes) => nodes,
            None => self.nodes_of(id)?,
        };
        Ok(Some(Rollout::from_parts(head, nodes)))
    }

    fn nodes_of(&self, id: u64) -> Result<Vec<NodeProgress>, DbError> {
        self.nodes
            .scan_prefix(id.to_be_bytes())
            .map(|kv| {
                let (key, value) = kv?;
                serde_json::from_slice(&value).map_err(|e| corrupt("rollout node", &key, e))
            })
            .collect()
    }
}

/// A head, or a legacy record turned into one (with its nodes).
fn decode_head(key: &[u8], value: &[u8]) -> Result<(Head, Option<Vec<NodeProgress>>), DbError> {
    match serde_json::from_slice::<Head>(value) {
        Ok(head) => Ok((head, None)),
        Err(current) => match serde_json::from_slice::<LegacyRecord>(value) {
            Ok(legacy) => Ok(from_legacy(legacy)),
            Err(_) => Err(corrupt("rollout", key, current)),
        },
    }
}

/// An old all-at-once rollout as a finished one-wave rollout whose nodes were each sent a
/// deploy (their outcome is in the inventory, not here).
fn from_legacy(legacy: LegacyRecord) -> (Head, Option<Vec<NodeProgress>>) {
    let plan = Plan::merge(&PlanOptions::default(), None).expect("the default plan is valid");
    let nodes: Vec<NodeProgress> = legacy
        .nodes
        .into_iter()
        .map(|(node, seq)| {
            let mut progress = NodeProgress::new(node, Some(0), legacy.started_at);
            progress.phase = NodePhase::Switching;
            progress.deploy_seq = Some(seq);
            progress
        })
        .collect();
    let wave: Vec<NodeId> = nodes.iter().map(|n| n.node.clone()).collect();
    let mut head = Head {
        status: Status::Legacy,
        reason: Some(
            "started before staged rollouts: a deploy was sent to every node at once; `coordinator nodes` shows where each stands".to_owned(),
        ),
        finished_at: Some(legacy.started_at),
        ..Head::new(
            legacy.id,
            legacy.release,
            plan,
            &[wave],
            "unknown".to_owned(),
            legacy.started_at,
        )
    };
    for wave in &mut head.waves {
        wave.phase = WavePhase::Stopped;
        wave.started_at = Some(legacy.started_at);
    }
    (head, Some(nodes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{AppName, Version};

    #[test]
    fn a_rollout_record_written_before_staged_rollouts_reads_as_a_legacy_rollout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("db")).expect("open");
        let store = RolloutStore::open(&db).expect("trees");
        let old = serde_json::json!({
            "id": 3,
            "release": {"app": "web", "version": "2"},
            "nodes": [["n1", 11], ["n2", 12]],
            "started_at": 1000,
        });
        db.open_tree("rollouts")
            .expect("tree")
            .insert(3u64.to_be_bytes(), old.to_string().as_bytes())
            .expect("insert");
        let rollout = store.load(3).expect("reads").expect("exists");
        assert_eq!(rollout.status(), Status::Legacy);
        assert!(!rollout.status().is_active());
        assert_eq!(
            rollout.head().release,
            ReleaseId::new(
                AppName::new("web").expect("app"),
                Version::new("2").expect("version")
            )
        );
        let seqs: Vec<(String, Option<u64>)> = rollout
            .nodes()
            .iter()
            .map(|n| (n.node.to_string(), n.deploy_seq))
            .collect();
        assert_eq!(
            seqs,
            [("n1".to_owned(), Some(11)), ("n2".to_owned(), Some(12))]
        );
        assert_eq!(store.heads().expect("heads").len(), 1);
        db.open_tree("rollouts")
            .expect("tree")
            .insert(4u64.to_be_bytes(), &b"{\"id\": 4}"[..])
            .expect("insert");
        let error = store.heads().expect_err("corrupt").to_string();
        assert!(error.contains("stored rollout"), "{error}");
    }
}
