//! The metric store: samples in the coordinator's sled database, and the in-memory counters
//! of what was refused ([`DropCounters`], shared by every clone).
//!
//! Trees (see `db.rs`):
//! - `metric_samples`: `at` (u64 big-endian) ++ node id ++ `0x00` ++ `seq` (u64 big-endian) →
//!   JSON `{version, labels, values}`. Byte order is (at, node, seq) order — node ids never
//!   contain `0x00`, so a shorter id sorts before every longer id it prefixes — which makes a
//!   time window one range scan returning rows already in the order [`MetricStore::query`]
//!   promises.
//! - `metric_seqs`: node id → the highest sample seq dealt with (stored or refused for good),
//!   u64 big-endian. Never pruned: a re-delivery of a pruned sample is still a duplicate.
//!
//! Invariants: [`MetricStore::append`] stores only seqs above the node's highest, and raises
//! the highest in the same transaction, so no (node, seq) is stored twice whatever the order
//! of calls. Writes are not durable until `Db::flush`. [`MetricStore::prune`] removes samples
//! older than a cutoff and nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use protocol::telemetry::Sample;
use protocol::{NodeId, ReleaseId, UnixSeconds};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

use super::drops::DropCounters;
use crate::db::{Db, DbError};

/// Most samples [`MetricStore::query`] returns (the oldest of the window): about 30 MB in
/// memory. [`MetricStore::query_limited`] says whether a window had more.
pub const MAX_QUERY_SAMPLES: usize = 100_000;

/// Rows removed per sled batch when pruning, so a large prune holds little memory.
const PRUNE_BATCH: usize = 10_000;

/// Which samples to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricQuery {
    /// `None` = every node.
    pub nodes: Option<Vec<NodeId>>,
    /// `None` = any version (also samples taken while no version was serving).
    pub version: Option<ReleaseId>,
    /// Inclusive, Unix seconds.
    pub from: UnixSeconds,
    /// Inclusive, Unix seconds.
    pub to: UnixSeconds,
}

/// One stored sample, with the labels its node had when it sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSample {
    pub node: NodeId,
    pub seq: u64,
    pub at: UnixSeconds,
    pub version: Option<ReleaseId>,
    pub labels: BTreeMap<String, String>,
    pub values: BTreeMap<String, f64>,
}

/// The result of [`MetricStore::query_limited`].
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPage {
    /// The oldest matching samples, at most the limit, ordered by (at, node, seq).
    pub samples: Vec<StoredSample>,
    /// More samples matched than the limit.
    pub truncated: bool,
}

/// A row's value.
#[derive(Serialize, Deserialize)]
struct Row {
    version: Option<ReleaseId>,
    labels: BTreeMap<String, String>,
    values: BTreeMap<String, f64>,
}

#[derive(Clone)]
pub struct MetricStore {
    samples: sled::Tree,
    seqs: sled::Tree,
    drops: Arc<Mutex<DropCounters>>,
}

impl MetricStore {
    /// Opens the metric trees of `db`. `now` starts the drop counters.
    pub fn open(db: &Db, now: UnixSeconds) -> Result<MetricStore, DbError> {
        Ok(MetricStore {
            samples: db.open_tree("metric_samples")?,
            seqs: db.open_tree("metric_seqs")?,
            drops: Arc::new(Mutex::new(DropCounters::new(now))),
        })
    }

    /// The counters of refused input, shared by every clone of this store.
    pub fn drops(&self) -> MutexGuard<'_, DropCounters> {
        // The counters stay consistent even if a holder panicked: every update is one step.
        self.drops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The highest seq dealt with for `node` (0 if none yet).
    pub fn highest_seq(&self, node: &NodeId) -> Result<u64, DbError> {
        let key = node.as_str().as_bytes();
        match self.seqs.get(key)? {
            Some(bytes) => decode_u64("metric seq", key, &bytes),
            None => Ok(0),
        }
    }

    /// Stores `samples` of `node` tagged with `labels`, skipping every seq at or below the
    /// node's highest seq dealt with, and raises that to the largest of `dealt_up_to` and the
    /// seqs given, in one transaction. Returns how many samples were stored. Not durable until
    /// `Db::flush`.
    pub fn append(
        &self,
        node: &NodeId,
        labels: &BTreeMap<String, String>,
        samples: &[Sample],
        dealt_up_to: u64,
    ) -> Result<usize, DbError> {
        let seq_key = node.as_str().as_bytes();
        let rows: Vec<(u64, Vec<u8>, Vec<u8>)> = samples
            .iter()
            .map(|sample| {
                let row = Row {
                    version: sample.version.clone(),
                    labels: labels.clone(),
                    values: sample.values.clone(),
                };
                let value = serde_json::to_vec(&row).expect("metric rows always serialize");
                (sample.seq, sample_key(sample.at, node, sample.seq), value)
            })
            .collect();
        let new_highest = rows
            .iter()
            .map(|(seq, _, _)| *seq)
            .fold(dealt_up_to, u64::max);
        let result = (&self.samples, &self.seqs).transaction(|(samples, seqs)| {
            let highest = match seqs.get(seq_key)? {
                Some(bytes) => decode_u64("metric seq", seq_key, &bytes)
                    .map_err(ConflictableTransactionError::Abort)?,
                None => 0,
            };
            let mut stored = 0;
            for (seq, key, value) in &rows {
                if *seq > highest {
                    samples.insert(key.as_slice(), value.as_slice())?;
                    stored += 1;
                }
            }
            if new_highest > highest {
                seqs.insert(seq_key, &new_highest.to_be_bytes()[..])?;
            }
            Ok::<_, ConflictableTransactionError<DbError>>(stored)
        });
        match result {
            Ok(stored) => Ok(stored),
            Err(TransactionError::Abort(error)) => Err(error),
            Err(TransactionError::Storage(error)) => Err(error.into()),
        }
    }

    /// Samples matching `query`, ordered by (at, node, seq): the oldest
    /// [`MAX_QUERY_SAMPLES`] of them if more match.
    pub fn query(&self, query: &MetricQuery) -> Result<Vec<StoredSample>, DbError> {
        Ok(self.query_limited(query, MAX_QUERY_SAMPLES)?.samples)
    }

    /// Like [`MetricStore::query`], at most `limit` samples, saying whether more matched. A
    /// range scan over the window; rows of other nodes are skipped without being decoded.
    pub fn query_limited(&self, query: &MetricQuery, limit: usize) -> Result<QueryPage, DbError> {
        let mut page = QueryPage {
            samples: Vec::new(),
            truncated: false,
        };
        if query.from > query.to {
            return Ok(page);
        }
        let nodes: Option<BTreeSet<&str>> = query
            .nodes
            .as_ref()
            .map(|nodes| nodes.iter().map(NodeId::as_str).collect());
        let start = Bound::Included(query.from.to_be_bytes().to_vec());
        let end = match query.to.checked_add(1) {
            Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        for kv in self.samples.range::<Vec<u8>, _>((start, end)) {
            let (key, value) = kv?;
            let (at, node, seq) = split_key(&key)?;
            if nodes.as_ref().is_some_and(|nodes| !nodes.contains(node)) {
                continue;
            }
            let row: Row = serde_json::from_slice(&value).map_err(|e| corrupt(&key, e))?;
            if query.version.is_some() && row.version != query.version {
                continue;
            }
            if page.samples.len() == limit {
                page.truncated = true;
                break;
            }
            page.samples.push(StoredSample {
                node: NodeId::new(node).map_err(|e| corrupt(&key, e))?,
                seq,
                at,
                version: row.version,
                labels: row.labels,
                values: row.values,
            });
        }
        Ok(page)
    }

    /// Removes every sample taken before `cutoff`; returns how many. Stops early (returning
    /// what it removed so far) when `stop` says so, between batches of removals.
    pub fn prune(&self, cutoff: UnixSeconds, stop: impl Fn() -> bool) -> Result<u64, DbError> {
        let end = cutoff.to_be_bytes();
        let mut removed = 0u64;
        loop {
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            for key in self.samples.range(..&end[..]).keys().take(PRUNE_BATCH) {
                batch.remove(key?);
                in_batch += 1;
            }
            if in_batch == 0 {
                return Ok(removed);
            }
            self.samples.apply_batch(batch)?;
            removed += in_batch;
            if stop() {
                return Ok(removed);
            }
        }
    }

    /// Number of stored samples (a full scan: for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

fn sample_key(at: UnixSeconds, node: &NodeId, seq: u64) -> Vec<u8> {
    let node = node.as_str().as_bytes();
    let mut key = Vec::with_capacity(8 + node.len() + 1 + 8);
    key.extend_from_slice(&at.to_be_bytes());
    key.extend_from_slice(node);
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// (at, node, seq) of a `metric_samples` key.
fn split_key(key: &[u8]) -> Result<(UnixSeconds, &str, u64), DbError> {
    let bad = || corrupt(key, "not at ++ node ++ 0 ++ seq");
    if key.len() < 8 + 1 + 1 + 8 {
        return Err(bad());
    }
    let (at, rest) = key.split_at(8);
    let (node, seq) = rest.split_at(rest.len() - 8);
    let node = node.strip_suffix(&[0]).ok_or_else(bad)?;
    let node = std::str::from_utf8(node).map_err(|_| bad())?;
    let at = u64::from_be_bytes(at.try_into().map_err(|_| bad())?);
    let seq = u64::from_be_bytes(seq.try_into().map_err(|_| bad())?);
    Ok((at, node, seq))
}

fn decode_u64(what: &'static str, key: &[u8], bytes: &[u8]) -> Result<u64, DbError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| DbError::Corrupt {
        what,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("{} bytes, want 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

fn corrupt(key: &[u8], reason: impl ToString) -> DbError {
    DbError::Corrupt {
        what: "metric sample",
        key: hex::encode(key),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{AppName, Version};

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn rel(version: &str) -> ReleaseId {
        ReleaseId::new(AppName::new("web").unwrap(), Version::new(version).unwrap())
    }

    fn sample(seq: u64, at: UnixSeconds, version: &str) -> Sample {
        Sample {
            seq,
            at,
            version: Some(rel(version)),
            values: BTreeMap::from([("host_load1".to_owned(), seq as f64)]),
        }
    }

    fn open() -> (tempfile::TempDir, MetricStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let store = MetricStore::open(&db, 0).unwrap();
        (dir, store)
    }

    fn ids(samples: &[StoredSample]) -> Vec<(u64, String, u64)> {
        samples
            .iter()
            .map(|s| (s.at, s.node.to_string(), s.seq))
            .collect()
    }

    fn window(from: UnixSeconds, to: UnixSeconds) -> MetricQuery {
        MetricQuery {
            nodes: None,
            version: None,
            from,
            to,
        }
    }

    #[test]
    fn keys_sort_by_time_then_node_then_seq() {
        let keys = [
            sample_key(1, &node("b"), 9),
            sample_key(2, &node("a"), 1),
            sample_key(2, &node("a"), 256),
            sample_key(2, &node("a0"), 1),
            sample_key(2, &node("b"), 0),
            sample_key(256, &node("a"), 0),
        ];
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys);
        assert_eq!(
            split_key(&sample_key(7, &node("a0"), u64::MAX)).unwrap(),
            (7, "a0", u64::MAX)
        );
        assert!(split_key(b"short").is_err());
    }

    #[test]
    fn queries_select_by_node_version_and_inclusive_window_in_time_order() {
        let (_dir, store) = open();
        let labels = BTreeMap::from([("ring".to_owned(), "canary".to_owned())]);
        store
            .append(
                &node("n2"),
                &labels,
                &[
                    sample(1, 100, "1"),
                    sample(2, 110, "2"),
                    sample(3, 120, "2"),
                ],
                0,
            )
            .unwrap();
        store
            .append(
                &node("n1"),
                &BTreeMap::new(),
                &[
                    sample(7, 100, "1"),
                    sample(8, 110, "1"),
                    sample(9, 130, "2"),
                ],
                0,
            )
            .unwrap();

        let all = store.query(&window(0, u64::MAX)).unwrap();
        assert_eq!(
            ids(&all),
            [
                (100, "n1".into(), 7),
                (100, "n2".into(), 1),
                (110, "n1".into(), 8),
                (110, "n2".into(), 2),
                (120, "n2".into(), 3),
                (130, "n1".into(), 9),
            ]
        );
        assert_eq!(all[1].labels, labels);
        assert_eq!(all[1].version, Some(rel("1")));
        assert_eq!(all[1].values["host_load1"], 1.0);

        assert_eq!(
            ids(&store.query(&window(110, 120)).unwrap()),
            [
                (110, "n1".into(), 8),
                (110, "n2".into(), 2),
                (120, "n2".into(), 3)
            ]
        );
        let n1_v2 = MetricQuery {
            nodes: Some(vec![node("n1")]),
            version: Some(rel("2")),
            ..window(0, 1000)
        };
        assert_eq!(ids(&store.query(&n1_v2).unwrap()), [(130, "n1".into(), 9)]);
        let none = MetricQuery {
            nodes: Some(vec![]),
            ..window(0, 1000)
        };
        assert!(store.query(&none).unwrap().is_empty());
        assert!(store.query(&window(121, 120)).unwrap().is_empty());
    }

    #[test]
    fn a_query_over_the_limit_returns_the_oldest_and_says_it_was_truncated() {
        let (_dir, store) = open();
        let samples: Vec<Sample> = (1..=5).map(|seq| sample(seq, 100 + seq, "1")).collect();
        store
            .append(&node("n1"), &BTreeMap::new(), &samples, 0)
            .unwrap();
        let page = store.query_limited(&window(0, 1000), 3).unwrap();
        assert!(page.truncated);
        assert_eq!(
            page.samples.iter().map(|s| s.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let page = store.query_limited(&window(0, 1000), 5).unwrap();
        assert!(!page.truncated);
        assert_eq!(page.samples.len(), 5);
    }

    #[test]
    fn a_seq_is_stored_at_most_once_and_the_highest_only_grows() {
        let (_dir, store) = open();
        let n1 = node("n1");
        assert_eq!(store.highest_seq(&n1).unwrap(), 0);
        let first = [sample(1, 100, "1"), sample(2, 101, "1")];
        assert_eq!(store.append(&n1, &BTreeMap::new(), &first, 2).unwrap(), 2);
        assert_eq!(store.highest_seq(&n1).unwrap(), 2);
        // A re-delivery with a different time would make a second row if not refused.
        let again = [sample(2, 105, "1"), sample(3, 106, "1")];
        assert_eq!(store.append(&n1, &BTreeMap::new(), &again, 3).unwrap(), 1);
        // Refused samples raise the highest without storing anything.
        assert_eq!(store.append(&n1, &BTreeMap::new(), &[], 10).unwrap(), 0);
        assert_eq!(store.highest_seq(&n1).unwrap(), 10);
        assert_eq!(store.append(&n1, &BTreeMap::new(), &[], 4).unwrap(), 0);
        assert_eq!(store.highest_seq(&n1).unwrap(), 10);
        assert_eq!(store.len(), 3);
        assert_eq!(store.highest_seq(&node("n2")).unwrap(), 0);
    }

    #[test]
    fn pruning_removes_samples_older_than_the_cutoff_and_keeps_the_seqs() {
        let (_dir, store) = open();
        let n1 = node("n1");
        // More than two prune batches' worth.
        let samples: Vec<Sample> = (1..=35_000).map(|seq| sample(seq, seq, "1")).collect();
        store.append(&n1, &BTreeMap::new(), &samples, 0).unwrap();
        assert_eq!(store.prune(20_001, || false).unwrap(), 20_000);
        let left = store.query(&window(0, u64::MAX)).unwrap();
        assert_eq!(left.len(), 15_000);
        assert_eq!(left[0].at, 20_001);
        assert_eq!(store.highest_seq(&n1).unwrap(), 35_000);
        assert_eq!(store.prune(20_001, || false).unwrap(), 0);
        // Asked to stop: after the first batch.
        assert_eq!(store.prune(u64::MAX, || true).unwrap(), PRUNE_BATCH as u64);
        assert_eq!(store.len(), 5_000);
    }
}
