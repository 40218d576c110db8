//! The ingester: the task between the main loop and the metric store.
//!
//! The main loop hands each message from a node's metrics topic to [`IngestLink::offer`]
//! (never waiting: a full queue drops the batch unacknowledged, and the agent sends it again
//! after its timeout). The [`Ingester`] task, in arrival order, looks the node up in the
//! inventory, runs [`check_batch`] and stores what passes, on the blocking pool, then counts
//! the outcome in the store's [`DropCounters`](super::DropCounters).
//!
//! Save points: samples and the node's highest seq are written in one sled transaction → the
//! batched flush (at most one per [`FLUSH_DELAY`], started by the first batch that needs an
//! ack) → the acks of every batch before it go to the main loop, the newest per node, which
//! publishes them ([`PendingAcks`]). So an ack never names a sample that a crash could lose.
//!
//! Every [`PRUNE_EVERY`] (and at start) samples older than the retention are removed on the
//! blocking pool, while ingestion goes on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::telemetry::{MetricAck, MAX_BATCH_BYTES};
use protocol::{NodeId, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::check::{check_batch, BatchVerdict, Limits};
use super::store::MetricStore;
use crate::db::{Db, DbError};
use crate::unix_now;

/// Batches waiting for the ingester. Each holds at most `MAX_BATCH_BYTES` (larger messages
/// are passed on as their size only), so the queue holds at most 16 MiB.
const QUEUE: usize = 64;
/// Longest an ack waits for the flush that makes it durable; also the shortest time between
/// two flushes.
pub const FLUSH_DELAY: Duration = Duration::from_millis(500);
/// Wait before retrying a failed flush.
const FLUSH_RETRY: Duration = Duration::from_secs(1);
/// How often samples past the retention are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Acks made durable, the newest per node: (node, highest seq dealt with).
pub type Acks = Vec<(NodeId, u64)>;

/// One message from a node's metrics topic.
struct Incoming {
    node: NodeId,
    /// The message's size.
    len: usize,
    /// Its bytes; empty when `len` is over `MAX_BATCH_BYTES` (refused unread).
    payload: Vec<u8>,
}

/// The main loop's end of the ingester.
pub struct IngestLink {
    batches: mpsc::Sender<Incoming>,
    acks: mpsc::Receiver<Acks>,
    store: MetricStore,
}

/// The ingester task's state; [`Ingester::run`] drives it.
pub struct Ingester {
    batches: mpsc::Receiver<Incoming>,
    acks: mpsc::Sender<Acks>,
    store: MetricStore,
    db: Db,
    retention: Duration,
}

/// The two ends: the main loop keeps the link, the caller spawns [`Ingester::run`]. The
/// ingester ends when the link is dropped.
pub fn ingest_channel(store: MetricStore, db: Db, retention: Duration) -> (IngestLink, Ingester) {
    let (batches_tx, batches) = mpsc::channel(QUEUE);
    let (acks_tx, acks) = mpsc::channel(16);
    (
        IngestLink {
            batches: batches_tx,
            acks,
            store: store.clone(),
        },
        Ingester {
            batches,
            acks: acks_tx,
            store,
            db,
            retention,
        },
    )
}

impl IngestLink {
    /// Queues a message from `node`'s metrics topic without waiting.
    pub fn offer(&self, node: NodeId, payload: &[u8]) {
        let len = payload.len();
        let payload = if len > MAX_BATCH_BYTES {
            Vec::new()
        } else {
            payload.to_vec()
        };
        match self.batches.try_send(Incoming { node, len, payload }) {
            Ok(()) => {}
            Err(TrySendError::Full(incoming)) => {
                self.store.drops().overloaded();
                tracing::debug!(node = %incoming.node, "metric ingestion queue full; dropped a batch unacknowledged (the agent sends it again)");
            }
            // Only while shutting down.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// The next acks made durable. Pending forever once the ingester has stopped.
    pub async fn durable_acks(&mut self) -> Acks {
        match self.acks.recv().await {
            Some(acks) => acks,
            None => std::future::pending().await,
        }
    }
}

impl Ingester {
    /// Runs until the [`IngestLink`] is dropped, then stops pruning and flushes.
    pub async fn run(mut self) {
        let mut pending: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut flush_at: Option<Instant> = None;
        let mut prune_tick = tokio::time::interval(PRUNE_EVERY);
        prune_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pruning: JoinSet<Result<u64, DbError>> = JoinSet::new();
        let stop_pruning = Arc::new(AtomicBool::new(false));
        loop {
            tokio::select! {
                // A batch from the main loop; `None` when it stopped.
                incoming = self.batches.recv() => {
                    let Some(incoming) = incoming else { break };
                    if let Some((node, up_to)) = self.ingest(incoming).await {
                        let newest = pending.entry(node).or_insert(up_to);
                        *newest = (*newest).max(up_to);
                        flush_at.get_or_insert_with(|| Instant::now() + FLUSH_DELAY);
                    }
                }
                // Time to make the pending acks durable and hand them over.
                () = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    match self.db.flush().await {
                        Ok(()) => {
                            flush_at = None;
                            let acks: Acks = std::mem::take(&mut pending).into_iter().collect();
                            if self.acks.send(acks).await.is_err() {
                                break;
                            }
                        }
                        Err(error) => {
                            tracing::error!(%error, "cannot flush the database; metric acks wait and the flush is retried");
                            flush_at = Some(Instant::now() + FLUSH_RETRY);
                        }
                    }
                }
                // Retention: one prune at a time.
                _ = prune_tick.tick(), if pruning.is_empty() => {
                    let store = self.store.clone();
                    let cutoff = unix_now().saturating_sub(self.retention.as_secs());
                    let stop = stop_pruning.clone();
                    pruning.spawn_blocking(move || store.prune(cutoff, || stop.load(Ordering::Relaxed)));
                }
                Some(done) = pruning.join_next(), if !pruning.is_empty() => match done {
                    Ok(Ok(0)) => {}
                    Ok(Ok(removed)) => tracing::info!(removed, retention = %protocol::human_duration(self.retention), "pruned metric samples past the retention"),
                    Ok(Err(error)) => tracing::error!(%error, "cannot prune old metric samples; retrying in a minute"),
                    Err(error) => tracing::error!(%error, "the metric prune task failed; retrying in a minute"),
                },
            }
        }
        stop_pruning.store(true, Ordering::Relaxed);
        while pruning.join_next().await.is_some() {}
        if let Err(error) = self.db.flush().await {
            tracing::error!(%error, "cannot flush the metric store at shutdown");
        }
    }

    /// Checks and stores one batch on the blocking pool; the ack it earns, if any.
    async fn ingest(&self, incoming: Incoming) -> Option<(NodeId, u64)> {
        let (store, db, retention) = (self.store.clone(), self.db.clone(), self.retention);
        let node = incoming.node.clone();
        let work = move || ingest(&store, &db, incoming, retention, unix_now());
        match tokio::task::spawn_blocking(work).await {
            Ok(up_to) => up_to.map(|up_to| (node, up_to)),
            Err(error) => {
                tracing::error!(node = %node, %error, "a metric ingestion task failed");
                None
            }
        }
    }
}

/// Checks and stores one batch, and counts the outcome. Returns the ack owed: the highest
/// seq dealt with, for every batch from a known node; `None` for unknown nodes and when the
/// store could not be read or written (no ack, so the agent sends the batch again).
fn ingest(
    store: &MetricStore,
    db: &Db,
    incoming: Incoming,
    retention: Duration,
    now: protocol::UnixSeconds,
) -> Option<u64> {
    let Incoming { node, len, payload } = incoming;
    let known = match db.node(&node) {
        Ok(record) => record.is_some_and(|r| r.state.is_some()),
        Err(error) => {
            tracing::error!(node = %node, %error, "cannot read the node's inventory record; metric batch not ingested");
            return None;
        }
    };
    let highest = if known {
        match store.highest_seq(&node) {
            Ok(highest) => highest,
            Err(error) => {
                tracing::error!(node = %node, %error, "cannot read the node's highest metric seq; batch not ingested");
                return None;
            }
        }
    } else {
        0
    };
    let limits = Limits { now, retention };
    match check_batch(&node, known, len, &payload, highest, &limits) {
        BatchVerdict::Refused(refusal) => {
            if store.drops().batch_refused(&node, &refusal, now) {
                tracing::warn!(
                    node = %node, reason = %refusal.reason, detail = refusal.detail,
                    "refused a metric batch; further refusals of this kind from this node are only counted (coordinator metrics drops)"
                );
            }
            known.then_some(highest)
        }
        BatchVerdict::Checked(batch) => {
            let stored = match store.append(&node, &batch.labels, &batch.accepted, batch.up_to) {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::error!(node = %node, %error, "cannot store metric samples; the agent sends them again");
                    return None;
                }
            };
            if store.drops().batch_checked(&node, &batch, stored, now) {
                if let Some(refusal) = &batch.first_refusal {
                    tracing::warn!(
                        node = %node, reason = %refusal.reason, detail = refusal.detail,
                        "refused metric samples; further refusals of this kind from this node are only counted (coordinator metrics drops)"
                    );
                }
            }
            tracing::debug!(node = %node, stored, duplicates = batch.duplicates, up_to = batch.up_to, "metric batch ingested");
            Some(batch.up_to)
        }
    }
}

/// Acks waiting for room in the MQTT client, the newest per node. Kept by the main loop.
#[derive(Debug, Default)]
pub struct PendingAcks {
    acks: BTreeMap<NodeId, u64>,
}

impl PendingAcks {
    /// Adds durable acks; a node keeps only its highest.
    pub fn add(&mut self, acks: Acks) {
        for (node, up_to) in acks {
            let newest = self.acks.entry(node).or_insert(up_to);
            *newest = (*newest).max(up_to);
        }
    }

    /// The next ack to publish: the node and the [`MetricAck`] payload. Put it back with
    /// [`PendingAcks::put_back`] if the MQTT client has no room.
    pub fn pop(&mut self) -> Option<(NodeId, u64, Vec<u8>)> {
        let (node, up_to) = self.acks.pop_first()?;
        let ack = MetricAck {
            protocol: PROTOCOL_VERSION,
            up_to,
        };
        let payload = serde_json::to_vec(&ack).expect("acks always serialize");
        Some((node, up_to, payload))
    }

    pub fn put_back(&mut self, node: NodeId, up_to: u64) {
        self.add(vec![(node, up_to)]);
    }

    pub fn is_empty(&self) -> bool {
        self.acks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use protocol::messages::NodeState;
    use protocol::telemetry::{MetricBatch, Sample};

    use super::*;
    use crate::db::NodeRecord;
    use crate::metrics::{MetricQuery, Reason};

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn known(db: &Db, id: &str) {
        let state: NodeState = serde_json::from_value(serde_json::json!({
            "protocol": PROTOCOL_VERSION, "node": id, "labels": {}, "agent_version": "test",
            "current": null, "previous": null, "staging": null, "last_update": null,
            "last_seq": 0, "reported_at": 1
        }))
        .unwrap();
        let record = NodeRecord {
            state: Some(state),
            ..NodeRecord::default()
        };
        db.put_node(&node(id), &record).unwrap();
    }

    fn batch(id: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let now = unix_now();
        serde_json::to_vec(&MetricBatch {
            protocol: PROTOCOL_VERSION,
            node: node(id),
            labels: BTreeMap::new(),
            dropped_total: 1,
            samples: seqs
                .map(|seq| Sample {
                    seq,
                    at: now,
                    version: None,
                    values: BTreeMap::from([("host_load1".to_owned(), 0.5)]),
                })
                .collect(),
        })
        .unwrap()
    }

    #[test]
    fn acks_keep_the_newest_per_node() {
        let mut acks = PendingAcks::default();
        acks.add(vec![(node("b"), 5), (node("a"), 3)]);
        acks.add(vec![(node("b"), 4), (node("a"), 9)]);
        let (first, up_to, payload) = acks.pop().unwrap();
        assert_eq!((first.as_str(), up_to), ("a", 9));
        let ack: MetricAck = serde_json::from_slice(&payload).unwrap();
        assert_eq!(ack.up_to, 9);
        acks.put_back(first, up_to);
        assert_eq!(acks.pop().map(|(n, u, _)| (n, u)), Some((node("a"), 9)));
        assert_eq!(acks.pop().map(|(n, u, _)| (n, u)), Some((node("b"), 5)));
        assert!(acks.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_from_known_nodes_are_stored_and_acknowledged_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        known(&db, "n1");
        let store = MetricStore::open(&db, 0).unwrap();
        let (mut link, ingester) =
            ingest_channel(store.clone(), db.clone(), Duration::from_secs(86_400));
        let task = tokio::spawn(ingester.run());

        link.offer(node("ghost"), &batch("ghost", 1..=3));
        link.offer(node("n1"), b"\x00garbage");
        link.offer(node("n1"), &batch("n1", 1..=3));
        link.offer(node("n1"), &batch("n1", 2..=4));
        let mut acks = PendingAcks::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let durable = tokio::time::timeout_at(deadline, link.durable_acks())
                .await
                .expect("acks within 10s");
            acks.add(durable);
            if let Some((n, up_to, _)) = acks.pop() {
                assert_eq!(n, node("n1"), "only the known node is acknowledged");
                if up_to == 4 {
                    break;
                }
            }
        }

        let stored = store
            .query(&MetricQuery {
                nodes: None,
                version: None,
                from: 0,
                to: u64::MAX,
            })
            .unwrap();
        let seqs: Vec<u64> = stored.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        let drops = store.drops().snapshot();
        let of = |id: &str| drops.nodes.iter().find(|n| n.node == node(id)).unwrap();
        assert_eq!(
            of("ghost").refused,
            BTreeMap::from([(Reason::UnknownNode, 1)])
        );
        let n1 = of("n1");
        assert_eq!(n1.refused, BTreeMap::from([(Reason::Malformed, 1)]));
        assert_eq!(
            (n1.stored, n1.duplicates, n1.agent_dropped_total),
            (4, 2, Some(1))
        );

        drop(link);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the ingester stops when the main loop drops its link")
            .unwrap();
    }
}
