//! What the rollout engine knows about each node: an [`Observed`] summary of the node's last
//! inventory record, and the [`NodeObserver`] through which the main loop hands every
//! inventory change to the rollout driver.
//!
//! Why a mailbox and not a channel: the main loop must never wait on the driver, and a node
//! that reports ten times while the driver is busy only matters by its last report. So the
//! observer keeps one pending entry per node (the newest), under a lock held for a map
//! insert, and wakes the driver; the driver takes the whole map at once. Memory is bounded by
//! the number of nodes, and no state report is parsed twice: the main loop already parsed it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use protocol::messages::Outcome;
use protocol::{NodeId, ReleaseId, UnixSeconds};
use tokio::sync::Notify;

use crate::db::NodeRecord;

/// How a node's last update ended, as the engine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    Switched,
    Failed(String),
    RolledBack(String),
}

/// A node's last finished update: which release (for a rollback, the one it went back to),
/// how it ended and when (by the node's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastUpdate {
    pub release: ReleaseId,
    pub outcome: UpdateOutcome,
    pub finished_at: UnixSeconds,
}

/// One node as the rollout engine sees it: only nodes that have sent a state report exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Presence says online; a node whose presence was never seen counts as online (its
    /// state report came from somewhere), as `coordinator nodes` shows it.
    pub online: bool,
    pub last_seen: Option<UnixSeconds>,
    pub labels: BTreeMap<String, String>,
    pub current: Option<ReleaseId>,
    pub previous: Option<ReleaseId>,
    pub staged: Option<ReleaseId>,
    /// The highest command seq the node has accepted.
    pub last_seq: u64,
    pub last_update: Option<LastUpdate>,
}

impl Observed {
    /// The summary of an inventory record; `None` until the node has sent a state report.
    pub fn of(record: &NodeRecord) -> Option<Observed> {
        let state = record.state.as_ref()?;
        Some(Observed {
            online: record.online != Some(false),
            last_seen: record.last_seen,
            labels: state.labels.clone(),
            current: state.current.as_ref().map(|s| s.release.clone()),
            previous: state.previous.as_ref().map(|s| s.release.clone()),
            staged: state.staged.as_ref().map(|s| s.release.clone()),
            last_seq: state.last_seq,
            last_update: state.last_update.as_ref().map(|u| LastUpdate {
                release: u.release.clone(),
                outcome: match &u.outcome {
                    Outcome::Switched => UpdateOutcome::Switched,
                    Outcome::Failed { reason } => UpdateOutcome::Failed(reason.clone()),
                    Outcome::RolledBack { reason } => UpdateOutcome::RolledBack(reason.clone()),
                },
                finished_at: u.finished_at,
            }),
        })
    }
}

/// Read access to the fleet for the engine.
pub trait FleetView {
    fn get(&self, node: &NodeId) -> Option<&Observed>;
}

impl FleetView for HashMap<NodeId, Observed> {
    fn get(&self, node: &NodeId) -> Option<&Observed> {
        HashMap::get(self, node)
    }
}

#[derive(Default)]
struct Mailbox {
    /// The newest observation per node since the driver last looked (`None`: the node has a
    /// record but no state report).
    pending: HashMap<NodeId, Option<Observed>>,
}

/// The main loop's side of the mailbox: call [`NodeObserver::observe`] after every inventory
/// write. Cheap to clone.
#[derive(Clone, Default)]
pub struct NodeObserver {
    mailbox: Arc<Mutex<Mailbox>>,
    wake: Arc<Notify>,
}

impl NodeObserver {
    pub fn new() -> NodeObserver {
        NodeObserver::default()
    }

    /// Records a node's new inventory record and wakes the driver. Never blocks for long:
    /// one map insert under the lock.
    pub fn observe(&self, node: &NodeId, record: &NodeRecord) {
        let observed = Observed::of(record);
        match self.mailbox.lock() {
            Ok(mut mailbox) => {
                mailbox.pending.insert(node.clone(), observed);
            }
            Err(poisoned) => {
                poisoned.into_inner().pending.insert(node.clone(), observed);
            }
        }
        self.wake.notify_one();
    }

    /// Everything observed since the last call (the driver's side).
    pub fn take(&self) -> HashMap<NodeId, Option<Observed>> {
        let mut mailbox = match self.mailbox.lock() {
            Ok(mailbox) => mailbox,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::take(&mut mailbox.pending)
    }

    /// Completes when something was observed since the last wake-up.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::messages::{NodeState, SlotReport, UpdateReport};
    use protocol::{AppName, Digest, Version, PROTOCOL_VERSION};

    fn web(version: &str) -> ReleaseId {
        ReleaseId::new(
            AppName::new("web").expect("app"),
            Version::new(version).expect("version"),
        )
    }

    #[test]
    fn a_record_is_summarised_and_the_newest_observation_per_node_wins() {
        let node = NodeId::new("n1").expect("node");
        let slot = |v: &str| SlotReport {
            release: web(v),
            manifest_digest: Digest::of(v.as_bytes()),
            slot_dir: format!("/s/{v}"),
        };
        let mut record = NodeRecord {
            online: Some(false),
            last_seen: Some(7),
            ..NodeRecord::default()
        };
        let observer = NodeObserver::new();
        observer.observe(&node, &record);
        record.state = Some(NodeState {
            protocol: PROTOCOL_VERSION,
            node: node.clone(),
            labels: [("region".to_owned(), "eu".to_owned())].into(),
            agent_version: "a".into(),
            current: Some(slot("2")),
            previous: Some(slot("1")),
            staged: None,
            staging: None,
            last_update: Some(UpdateReport {
                release: web("2"),
                bytes_fetched_mqtt: 0,
                bytes_fetched_http: 0,
                bytes_reused: 0,
                chunks_fetched: 0,
                chunks_rejected: 0,
                staging_ms: 0,
                switch_ms: 0,
                outcome: Outcome::Failed {
                    reason: "disk".into(),
                },
                finished_at: 5,
                app_output: Vec::new(),
            }),
            last_seq: 4,
            reported_at: 6,
        });
        observer.observe(&node, &record);
        let taken = observer.take();
        assert_eq!(taken.len(), 1);
        let observed = taken[&node].clone().expect("has a state report");
        assert!(!observed.online);
        assert_eq!(observed.current, Some(web("2")));
        assert_eq!(observed.previous, Some(web("1")));
        assert_eq!(observed.last_seq, 4);
        assert_eq!(
            observed.last_update.map(|u| u.outcome),
            Some(UpdateOutcome::Failed("disk".into()))
        );
        assert!(observer.take().is_empty());
    }
}
