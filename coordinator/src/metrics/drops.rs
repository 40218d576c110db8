//! Counters of refused metric input, in memory since `coordinator serve` started: per node
//! and reason, plus each agent's own count of dropped samples. Read by
//! `GET /api/metrics/drops` ([`DropCounters::snapshot`]).
//!
//! Invariant: memory is bounded. Node ids the inventory does not know are tracked one by one
//! up to [`MAX_UNKNOWN_NODES`]; batches from further unknown ids only add to one total. Known
//! nodes are as many as the inventory holds. Details are cut to [`MAX_DETAIL`] characters.

use std::collections::BTreeMap;

use protocol::{NodeId, UnixSeconds};

use super::check::{CheckedBatch, Reason, Refusal};
use super::view::{LastRefusal, MetricDropsView, NodeDrops};

/// Distinct unknown node ids tracked one by one.
pub const MAX_UNKNOWN_NODES: usize = 256;
/// Longest refusal detail kept, in characters.
pub const MAX_DETAIL: usize = 200;

#[derive(Debug)]
pub struct DropCounters {
    since: UnixSeconds,
    nodes: BTreeMap<NodeId, NodeDrops>,
    /// Entries created for a batch from an unknown node.
    unknown_entries: usize,
    untracked_unknown_batches: u64,
    overloaded_batches: u64,
}

impl DropCounters {
    pub fn new(since: UnixSeconds) -> DropCounters {
        DropCounters {
            since,
            nodes: BTreeMap::new(),
            unknown_entries: 0,
            untracked_unknown_batches: 0,
            overloaded_batches: 0,
        }
    }

    /// Counts a batch refused whole. Returns whether it is the node's first refusal for this
    /// reason (worth a warning in the log; the rest are counted only).
    pub fn batch_refused(&mut self, node: &NodeId, refusal: &Refusal, now: UnixSeconds) -> bool {
        let Some(entry) = self.entry(node, refusal.reason == Reason::UnknownNode) else {
            self.untracked_unknown_batches += 1;
            return false;
        };
        refuse(entry, refusal, 1, now)
    }

    /// Counts what became of a checked batch: `stored` samples stored, its duplicates and
    /// refusals, and the agent's dropped total. Returns whether it holds the node's first
    /// refusal for some reason.
    pub fn batch_checked(
        &mut self,
        node: &NodeId,
        batch: &CheckedBatch,
        stored: usize,
        now: UnixSeconds,
    ) -> bool {
        let Some(entry) = self.entry(node, false) else {
            return false;
        };
        entry.stored += stored as u64;
        entry.duplicates += batch.duplicates;
        entry.agent_dropped_total = Some(batch.dropped_total);
        let mut first = false;
        for (&reason, &count) in &batch.refused {
            let detail = match &batch.first_refusal {
                Some(refusal) if refusal.reason == reason => refusal.detail.clone(),
                _ => String::new(),
            };
            first |= refuse(entry, &Refusal { reason, detail }, count, now);
        }
        // The detail of the batch's first refusal is the one worth keeping.
        if let Some(refusal) = &batch.first_refusal {
            entry.last_refusal = Some(last_refusal(refusal, now));
        }
        first
    }

    /// Counts a batch dropped unread because the ingestion queue was full.
    pub fn overloaded(&mut self) {
        self.overloaded_batches += 1;
    }

    pub fn snapshot(&self) -> MetricDropsView {
        MetricDropsView {
            since: self.since,
            nodes: self.nodes.values().cloned().collect(),
            untracked_unknown_batches: self.untracked_unknown_batches,
            overloaded_batches: self.overloaded_batches,
        }
    }

    /// The node's entry; `None` when it would be one unknown node too many.
    fn entry(&mut self, node: &NodeId, unknown: bool) -> Option<&mut NodeDrops> {
        if !self.nodes.contains_key(node) {
            if unknown {
                if self.unknown_entries >= MAX_UNKNOWN_NODES {
                    return None;
                }
                self.unknown_entries += 1;
            }
            self.nodes.insert(
                node.clone(),
                NodeDrops {
                    node: node.clone(),
                    refused: BTreeMap::new(),
                    stored: 0,
                    duplicates: 0,
                    agent_dropped_total: None,
                    last_refusal: None,
                },
            );
        }
        self.nodes.get_mut(node)
    }
}

/// Adds `count` refusals; true if they are the first for their reason.
fn refuse(entry: &mut NodeDrops, refusal: &Refusal, count: u64, now: UnixSeconds) -> bool {
    let counter = entry.refused.entry(refusal.reason).or_default();
    let first = *counter == 0;
    *counter += count;
    entry.last_refusal = Some(last_refusal(refusal, now));
    first
}

fn last_refusal(refusal: &Refusal, now: UnixSeconds) -> LastRefusal {
    LastRefusal {
        at: now,
        reason: refusal.reason,
        detail: refusal.detail.chars().take(MAX_DETAIL).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn refusal(reason: Reason) -> Refusal {
        Refusal {
            reason,
            detail: "x".repeat(1000),
        }
    }

    #[test]
    fn refusals_are_counted_per_node_and_reason_and_the_first_of_each_is_flagged() {
        let mut counters = DropCounters::new(5);
        assert!(counters.batch_refused(&node("n1"), &refusal(Reason::Malformed), 10));
        assert!(!counters.batch_refused(&node("n1"), &refusal(Reason::Malformed), 11));
        assert!(counters.batch_refused(&node("n1"), &refusal(Reason::WrongNode), 12));
        let checked = CheckedBatch {
            labels: BTreeMap::new(),
            dropped_total: 7,
            accepted: Vec::new(),
            refused: BTreeMap::from([(Reason::BadTimestamp, 2), (Reason::BadValues, 1)]),
            first_refusal: Some(Refusal {
                reason: Reason::BadValues,
                detail: "sample 3: bad".to_owned(),
            }),
            duplicates: 4,
            up_to: 9,
        };
        assert!(counters.batch_checked(&node("n2"), &checked, 6, 13));
        assert!(!counters.batch_checked(&node("n2"), &checked, 1, 14));

        let view = counters.snapshot();
        assert_eq!(view.since, 5);
        let n1 = &view.nodes[0];
        assert_eq!(
            n1.refused,
            BTreeMap::from([(Reason::Malformed, 2), (Reason::WrongNode, 1)])
        );
        let last = n1.last_refusal.as_ref().unwrap();
        assert_eq!((last.at, last.reason), (12, Reason::WrongNode));
        assert_eq!(last.detail.chars().count(), MAX_DETAIL);
        let n2 = &view.nodes[1];
        assert_eq!(
            n2.refused,
            BTreeMap::from([(Reason::BadTimestamp, 4), (Reason::BadValues, 2)])
        );
        assert_eq!((n2.stored, n2.duplicates), (7, 8));
        assert_eq!(n2.agent_dropped_total, Some(7));
        assert_eq!(n2.last_refusal.as_ref().unwrap().detail, "sample 3: bad");
    }

    #[test]
    fn unknown_node_ids_beyond_the_cap_are_counted_in_one_total() {
        let mut counters = DropCounters::new(0);
        for i in 0..MAX_UNKNOWN_NODES + 10 {
            counters.batch_refused(
                &node(&format!("ghost-{i}")),
                &refusal(Reason::UnknownNode),
                1,
            );
        }
        // A tracked unknown node keeps being counted; a known node is always tracked.
        counters.batch_refused(&node("ghost-0"), &refusal(Reason::UnknownNode), 2);
        counters.batch_refused(&node("real"), &refusal(Reason::Malformed), 2);
        counters.overloaded();
        let view = counters.snapshot();
        assert_eq!(view.nodes.len(), MAX_UNKNOWN_NODES + 1);
        assert_eq!(view.untracked_unknown_batches, 10);
        assert_eq!(view.overloaded_batches, 1);
        let ghost = view
            .nodes
            .iter()
            .find(|n| n.node == node("ghost-0"))
            .unwrap();
        assert_eq!(ghost.refused[&Reason::UnknownNode], 2);
        assert!(view.nodes.iter().any(|n| n.node == node("real")));
    }
}
