//! The JSON bodies of `GET /api/metrics` and `GET /api/metrics/drops`, shared by the server
//! and the CLI client (re-exported from `api.rs`).

use std::collections::BTreeMap;

use protocol::{NodeId, UnixSeconds};
use serde::{Deserialize, Serialize};

use super::check::Reason;
use super::store::StoredSample;

/// `GET /api/metrics`: the samples of a window, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsResponse {
    /// The window, inclusive, Unix seconds.
    pub from: UnixSeconds,
    pub to: UnixSeconds,
    /// Ordered by (at, node, seq); at most `limit`.
    pub samples: Vec<StoredSample>,
    /// Most samples one answer carries.
    pub limit: usize,
    /// More samples matched: these are the oldest `limit`. Narrow the window or the nodes.
    pub truncated: bool,
}

/// `GET /api/metrics/drops`: what was refused since `coordinator serve` started (counters
/// reset on restart), per node, plus what each agent says it dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricDropsView {
    /// When the counters started, Unix seconds.
    pub since: UnixSeconds,
    /// Ordered by node id.
    pub nodes: Vec<NodeDrops>,
    /// Batches from unknown node ids beyond the first `drops::MAX_UNKNOWN_NODES` distinct
    /// ones, which are not tracked one by one.
    pub untracked_unknown_batches: u64,
    /// Batches dropped unread because the ingestion queue was full; not acknowledged, so the
    /// agents send them again.
    pub overloaded_batches: u64,
}

/// One node's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDrops {
    pub node: NodeId,
    /// Refused input per reason: batches for batch-level reasons (`unknown_node`,
    /// `oversized`, `malformed`, `wrong_node`, `newer_protocol`), samples for `bad_timestamp`
    /// and `bad_values`.
    pub refused: BTreeMap<Reason, u64>,
    /// Samples stored.
    pub stored: u64,
    /// Samples received again after they were dealt with (ignored; normal after a lost ack).
    pub duplicates: u64,
    /// The agent's own count of samples it dropped (oldest first) while its buffer was full,
    /// as of its latest accepted batch; `None` until one was accepted.
    pub agent_dropped_total: Option<u64>,
    pub last_refusal: Option<LastRefusal>,
}

/// The latest refusal for a node, with its detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRefusal {
    pub at: UnixSeconds,
    pub reason: Reason,
    pub detail: String,
}
