//! Every MQTT topic string, under a configurable fleet prefix. Nothing else in the workspace
//! formats or parses a topic.
//!
//! ```text
//! {prefix}/nodes/{node}/in/command      coordinator → agent  signed Command, retained (latest wins)
//! {prefix}/nodes/{node}/in/metrics-ack  coordinator → agent  MetricAck
//! {prefix}/nodes/{node}/state           agent → coordinator  NodeState, retained
//! {prefix}/nodes/{node}/presence        agent → coordinator  Presence, retained; last will = offline
//! {prefix}/nodes/{node}/events          agent → coordinator  Event
//! {prefix}/nodes/{node}/chunk-req       agent → coordinator  ChunkRequest
//! {prefix}/nodes/{node}/metrics         agent → coordinator  MetricBatch
//! {prefix}/releases/{app}/{version}/chunks  coordinator → agents  ChunkFrame (shared by all)
//! ```
//!
//! What goes to a node sits under its `in/` level, so an agent subscribes once
//! ([`Topics::node_inbox`]): a broker keeps state per subscription, and the embedded one
//! about 200 KiB per filter before any message, which a thousand nodes multiply.

use crate::names::{NodeId, ReleaseId};

pub const DEFAULT_PREFIX: &str = "fleet";

/// Per-node topics, as parsed back from a topic string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeTopic {
    Command,
    State,
    Presence,
    Events,
    ChunkRequests,
    Metrics,
    MetricsAck,
}

impl NodeTopic {
    const ALL: [NodeTopic; 7] = [
        NodeTopic::Command,
        NodeTopic::State,
        NodeTopic::Presence,
        NodeTopic::Events,
        NodeTopic::ChunkRequests,
        NodeTopic::Metrics,
        NodeTopic::MetricsAck,
    ];

    fn leaf(self) -> &'static str {
        match self {
            NodeTopic::Command => "in/command",
            NodeTopic::State => "state",
            NodeTopic::Presence => "presence",
            NodeTopic::Events => "events",
            NodeTopic::ChunkRequests => "chunk-req",
            NodeTopic::Metrics => "metrics",
            NodeTopic::MetricsAck => "in/metrics-ack",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic prefix {0:?}: use one or more '/'-separated levels without '+', '#' or empty levels")]
pub struct PrefixError(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Topics {
    pub fn new(prefix: &str) -> Result<Topics, PrefixError> {
        let ok = !prefix.is_empty()
            && prefix
                .split('/')
                .all(|level| !level.is_empty() && !level.contains(['+', '#', '\0']));
        if ok {
            Ok(Topics {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(PrefixError(prefix.to_owned()))
        }
    }

    pub fn node(&self, node: &NodeId, which: NodeTopic) -> String {
        format!("{}/nodes/{}/{}", self.prefix, node, which.leaf())
    }

    /// The one filter an agent subscribes to for everything sent to it: its commands and its
    /// metrics acks.
    pub fn node_inbox(&self, node: &NodeId) -> String {
        format!("{}/nodes/{}/in/+", self.prefix, node)
    }

    /// The filter matching `which` for every node.
    pub fn all_nodes(&self, which: NodeTopic) -> String {
        format!("{}/nodes/+/{}", self.prefix, which.leaf())
    }

    pub fn chunks(&self, release: &ReleaseId) -> String {
        format!(
            "{}/releases/{}/{}/chunks",
            self.prefix, release.app, release.version
        )
    }

    /// Splits a per-node topic into its node and kind; `None` for anything else, including
    /// node levels that are not valid node ids.
    pub fn parse_node_topic(&self, topic: &str) -> Option<(NodeId, NodeTopic)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix("/nodes/")?;
        let (node, leaf) = rest.split_once('/')?;
        let which = NodeTopic::ALL.into_iter().find(|t| t.leaf() == leaf)?;
        Some((NodeId::new(node).ok()?, which))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbox_filter_matches_exactly_what_goes_to_the_node() {
        let topics = Topics::default();
        let node = NodeId::new("edge-7").unwrap();
        let inbox = topics.node_inbox(&node);
        let level = inbox
            .strip_suffix('+')
            .expect("ends in a one-level wildcard");
        for which in NodeTopic::ALL {
            let topic = topics.node(&node, which);
            // `+` matches exactly one non-empty level.
            let matched = topic
                .strip_prefix(level)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
            let to_node = matches!(which, NodeTopic::Command | NodeTopic::MetricsAck);
            assert_eq!(matched, to_node, "{topic}");
        }
    }

    #[test]
    fn node_topics_round_trip() {
        let topics = Topics::new("acme/prod").unwrap();
        let node = NodeId::new("edge-7").unwrap();
        for which in NodeTopic::ALL {
            let topic = topics.node(&node, which);
            assert_eq!(topics.parse_node_topic(&topic), Some((node.clone(), which)));
        }
        assert_eq!(
            topics.parse_node_topic("acme/prod/nodes/edge-7/other"),
            None
        );
        assert_eq!(topics.parse_node_topic("other/nodes/edge-7/state"), None);
        assert_eq!(
            topics.all_nodes(NodeTopic::State),
            "acme/prod/nodes/+/state"
        );
    }

    #[test]
    fn prefixes_with_wildcards_are_refused() {
        for bad in ["", "a/+", "#", "a//b", "/a"] {
            assert!(Topics::new(bad).is_err(), "{bad:?}");
        }
    }
}
