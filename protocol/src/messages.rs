//! Message types: signed commands (coordinator → agent), state reports, presence and events
//! (agent → coordinator), chunk requests and chunk frames.
//!
//! Commands travel in an [`Envelope`](crate::Envelope); reports are unsigned because the
//! broker's per-node credentials and ACLs say who may publish them. Chunk frames are raw
//! bytes, verified against the digest in the signed manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, Signed};
use crate::format;
use crate::names::{NodeId, ReleaseId};
use crate::{Digest, UnixSeconds, PROTOCOL_VERSION};

/// A signed instruction for one node. The agent acts on it only if the signature verifies,
/// `node` is its own id, `seq` is above every seq it has acted on (no replay, no downgrade)
/// and `expires_at` is in the future (no freezing an old command in place).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub protocol: u32,
    pub node: NodeId,
    pub seq: u64,
    pub issued_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub action: Action,
}

impl Signed for Command {
    const PAYLOAD_TYPE: &'static str = "application/vnd.fleet.command.v1+json";
    // A command embeds a manifest envelope: base64 of up to MAX_MANIFEST_BYTES, plus room.
    const MAX_PAYLOAD_BYTES: usize = format::MAX_MANIFEST_BYTES / 3 * 4 + 64 * 1024;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// Stage this release and switch to it.
    Deploy {
        /// The signed manifest, verified on its own by the agent.
        manifest: Envelope,
        /// HTTP(S) base URLs serving chunks at `{base}/chunks/{digest}`, tried in order
        /// before MQTT.
        #[serde(default)]
        http_sources: Vec<String>,
    },
    /// Stage this release and hold it: fetch and assemble its slot, report it as `staged`,
    /// and switch only when a later `Deploy` of the same manifest arrives (which then needs
    /// no download). A node already running the release does nothing.
    Stage {
        manifest: Envelope,
        #[serde(default)]
        http_sources: Vec<String>,
    },
    /// Return to the previous version, with no download: a flip while it is still warm, a
    /// restart from its slot otherwise. Refused by a node that has no previous version.
    Rollback {},
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Deploy { .. } => "deploy",
            Action::Stage { .. } => "stage",
            Action::Rollback {} => "rollback",
        }
    }
}

/// Retained on the node's presence topic; the broker publishes `online: false` as the
/// node's last will when its connection drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub online: bool,
}

/// A version installed on the node and where it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotReport {
    pub release: ReleaseId,
    pub manifest_digest: Digest,
    pub slot_dir: String,
}

/// An update under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingProgress {
    pub release: ReleaseId,
    pub chunks_total: u64,
    pub chunks_have: u64,
    pub bytes_total: u64,
    pub bytes_have: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Switched,
    /// The update did not happen; the node stayed on the version it had.
    Failed {
        reason: String,
    },
    /// The node went back to its previous version: asked by an operator, or by itself when
    /// the new version failed during the switch or its probation (`reason` says which).
    RolledBack {
        reason: String,
    },
}

/// What the last update cost and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReport {
    pub release: ReleaseId,
    /// Compressed bytes received over MQTT that were used.
    pub bytes_fetched_mqtt: u64,
    /// Compressed bytes received over HTTP that were used.
    pub bytes_fetched_http: u64,
    /// Uncompressed bytes taken from data already on the node.
    pub bytes_reused: u64,
    pub chunks_fetched: u64,
    /// Chunks received that failed verification and were discarded.
    pub chunks_rejected: u64,
    pub staging_ms: u64,
    /// From the decision to switch (or roll back) to the version serving.
    pub switch_ms: u64,
    pub outcome: Outcome,
    pub finished_at: UnixSeconds,
    /// The app's last output lines when a version failed to start or stay healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_output: Vec<String>,
}

/// The node's whole state, retained on its state topic and rewritten on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub protocol: u32,
    pub node: NodeId,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub current: Option<SlotReport>,
    pub previous: Option<SlotReport>,
    pub staged: Option<SlotReport>,
    pub staging: Option<StagingProgress>,
    pub last_update: Option<UpdateReport>,
    /// The highest command seq this node has accepted.
    pub last_seq: u64,
    pub reported_at: UnixSeconds,
}

/// Something that happened on a node and that an operator may want to know about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub protocol: u32,
    pub node: NodeId,
    pub at: UnixSeconds,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A message was refused; the node keeps doing what it did.
    Rejected {
        what: String,
        reason: String,
    },
    StagingStarted {
        release: ReleaseId,
    },
    ChunkRejected {
        release: ReleaseId,
        digest: Digest,
        reason: String,
    },
    Switched {
        release: ReleaseId,
        from: Option<ReleaseId>,
    },
    UpdateFailed {
        release: ReleaseId,
        reason: String,
    },
    RolledBack {
        release: ReleaseId,
        from: Option<ReleaseId>,
        reason: String,
    },
}

impl Event {
    pub fn new(node: NodeId, at: UnixSeconds, kind: EventKind) -> Event {
        Event {
            protocol: PROTOCOL_VERSION,
            node,
            at,
            kind,
        }
    }
}

/// An agent asks for the chunks it is missing; the answer arrives as [`ChunkFrame`]s on the
/// release's shared chunk topic, so one publish serves every node that needs the chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub protocol: u32,
    pub release: ReleaseId,
    pub digests: Vec<Digest>,
    /// The sequence number of the first frame the agent received on the shared topic since
    /// it subscribed: every frame numbered from there on reaches it (MQTT keeps one
    /// publisher's order), so the coordinator need not send one again that it published
    /// at or after this number, however long ago; the frame is still queued for the agent
    /// in the broker. `None` when the agent has seen no frame yet, or has reason to think
    /// one was lost (it reconnected, or asks again for chunks that never came). A wrong
    /// claim costs one retry, never a chunk: the retry carries no claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_from: Option<u64>,
}

impl ChunkRequest {
    /// Most digests in one request; keeps the request itself small.
    pub const MAX_DIGESTS: usize = 256;
    /// An agent asks again for a chunk that has not arrived this long after it asked (and
    /// backs off from there while nothing arrives).
    pub const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(2);
    /// The coordinator publishes a chunk on the release's shared topic at most once per this
    /// window, so nodes asking at the same moment share one frame. It must stay shorter than
    /// [`ChunkRequest::RETRY_FIRST`], or an agent's retry would be swallowed.
    pub const FANOUT_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
    /// How long the coordinator remembers the sequence number a chunk was published under,
    /// to answer requests that carry [`ChunkRequest::receiving_from`]. A frame queued in a
    /// broker longer than this may be sent twice; nothing worse.
    pub const SEQUENCE_MEMORY: std::time::Duration = std::time::Duration::from_secs(30);
}

/// One compressed chunk on the wire: a version byte, the sequence number the coordinator
/// published it under (big-endian u64, increasing in publish order), the 32-byte digest,
/// the zstd frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkFrame<'a> {
    pub seq: u64,
    pub digest: Digest,
    pub compressed: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkFrameError {
    #[error("chunk frame too short ({0} bytes)")]
    Short(usize),
    #[error("chunk frame version {0} is not {version}; coordinator and agent builds differ, upgrade the older one", version = ChunkFrame::VERSION)]
    Version(u8),
    #[error("chunk frame of {0} bytes is over the limit")]
    TooLarge(usize),
}

impl<'a> ChunkFrame<'a> {
    const VERSION: u8 = 2;
    const SEQ: std::ops::Range<usize> = 1..9;
    const HEADER: usize = Self::SEQ.end + Digest::LEN;

    /// A frame numbered 0; the publisher numbers it with [`ChunkFrame::number`] as it
    /// goes out, since frames are read in parallel but published in order.
    pub fn encode(digest: &Digest, compressed: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEADER + compressed.len());
        out.push(Self::VERSION);
        out.extend_from_slice(&0u64.to_be_bytes());
        out.extend_from_slice(digest.as_bytes());
        out.extend_from_slice(compressed);
        out
    }

    /// Sets the sequence number of an encoded frame.
    ///
    /// # Panics
    /// If `frame` is shorter than a header: only frames from [`ChunkFrame::encode`] are
    /// numbered.
    pub fn number(frame: &mut [u8], seq: u64) {
        frame[Self::SEQ].copy_from_slice(&seq.to_be_bytes());
    }

    pub fn decode(bytes: &'a [u8]) -> Result<ChunkFrame<'a>, ChunkFrameError> {
        if bytes.len() <= Self::HEADER {
            return Err(ChunkFrameError::Short(bytes.len()));
        }
        if bytes.len() > Self::HEADER + format::MAX_COMPRESSED_CHUNK_SIZE {
            return Err(ChunkFrameError::TooLarge(bytes.len()));
        }
        if bytes[0] != Self::VERSION {
            return Err(ChunkFrameError::Version(bytes[0]));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&bytes[Self::SEQ]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&bytes[Self::SEQ.end..Self::HEADER]);
        Ok(ChunkFrame {
            seq: u64::from_be_bytes(seq),
            digest: Digest::from_bytes(digest),
            compressed: &bytes[Self::HEADER..],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{AppName, Version};

    #[test]
    fn chunk_frames_round_trip_and_refuse_garbage() {
        let d = Digest::of(b"abc");
        let mut bytes = ChunkFrame::encode(&d, b"zstd-bytes");
        assert_eq!(ChunkFrame::decode(&bytes).unwrap().seq, 0);
        ChunkFrame::number(&mut bytes, 0x0102_0304_0506_0708);
        let frame = ChunkFrame::decode(&bytes).unwrap();
        assert_eq!(frame.seq, 0x0102_0304_0506_0708);
        assert_eq!(frame.digest, d);
        assert_eq!(frame.compressed, b"zstd-bytes");
        assert!(ChunkFrame::decode(&bytes[..20]).is_err());
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert_eq!(ChunkFrame::decode(&wrong), Err(ChunkFrameError::Version(9)));
    }

    /// The wire format is a contract: a change here must be deliberate.
    #[test]
    fn wire_format_of_reports_is_stable() {
        let release = ReleaseId::new(AppName::new("web").unwrap(), Version::new("2").unwrap());
        let event = Event::new(
            NodeId::new("n1").unwrap(),
            5,
            EventKind::UpdateFailed {
                release: release.clone(),
                reason: "disk".into(),
            },
        );
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"protocol":1,"node":"n1","at":5,"event":"update_failed","release":{"app":"web","version":"2"},"reason":"disk"}"#
        );
        let request = ChunkRequest {
            protocol: 1,
            release,
            digests: vec![Digest::from_bytes([0xab; 32])],
            receiving_from: None,
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            format!(
                r#"{{"protocol":1,"release":{{"app":"web","version":"2"}},"digests":["{}"]}}"#,
                "ab".repeat(32)
            )
        );
        let claiming = ChunkRequest {
            receiving_from: Some(7),
            ..request
        };
        let text = serde_json::to_string(&claiming).unwrap();
        assert!(text.ends_with(r#","receiving_from":7}"#), "{text}");
        assert_eq!(
            serde_json::from_str::<ChunkRequest>(&text).unwrap(),
            claiming
        );
    }
}
