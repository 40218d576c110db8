//! The JSON bodies of the operator HTTP API, shared by the server (`server.rs`) and the CLI
//! client (`client.rs`) so the two cannot drift apart.
//!
//! ```text
//! POST /api/chunks/missing   {"digests":[hex..]}            → {"missing":[hex..]}
//! PUT  /api/chunks/{digest}?size=N   body: zstd frame        → {"digest":hex,"stored":bool}
//! POST /api/releases         body: unsigned Manifest JSON    → PublishResponse
//! GET  /api/releases                                         → [ReleaseView]
//! POST /api/rollouts         {"app","version"}               → RolloutResponse
//! GET  /api/nodes                                            → [NodeView]
//! GET  /chunks/{digest}      (no token)                      → the zstd frame
//! ```
//! Every `/api/*` call needs `Authorization: Bearer <token>`. Errors are `{"error": "..."}`.

use std::collections::BTreeMap;

use protocol::messages::{Event, SlotReport, StagingProgress, UpdateReport};
use protocol::{Digest, NodeId, ReleaseKind, UnixSeconds};
use serde::{Deserialize, Serialize};

use crate::db::{NodeRecord, ReleaseInfo};

/// Most digests in one `POST /api/chunks/missing`.
pub const MAX_MISSING_QUERY: usize = 10_000;

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MissingRequest {
    pub digests: Vec<Digest>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MissingResponse {
    pub missing: Vec<Digest>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StoredChunk {
    pub digest: Digest,
    /// False when the chunk was already there.
    pub stored: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseView {
    /// `app@version`.
    pub release: String,
    pub app: String,
    pub version: String,
    pub kind: ReleaseKind,
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub manifest_digest: Digest,
    pub created_at: UnixSeconds,
    pub published_at: UnixSeconds,
}

impl From<&ReleaseInfo> for ReleaseView {
    fn from(info: &ReleaseInfo) -> Self {
        ReleaseView {
            release: info.release.to_string(),
            app: info.release.app.to_string(),
            version: info.release.version.to_string(),
            kind: info.kind,
            files: info.files,
            bytes: info.bytes,
            chunks: info.chunks,
            manifest_digest: info.manifest_digest,
            created_at: info.created_at,
            published_at: info.published_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PublishResponse {
    #[serde(flatten)]
    pub release: ReleaseView,
    /// False when this exact release had been published before (the call changed nothing).
    pub created: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RolloutRequest {
    pub app: String,
    pub version: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RolloutResponse {
    pub rollout: u64,
    /// `app@version`.
    pub release: String,
    pub app: String,
    pub version: String,
    pub nodes: Vec<NodeId>,
}

/// One node of the inventory, as reported by the node itself plus what the coordinator saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub node: NodeId,
    /// `None` until the node's presence was seen.
    pub online: Option<bool>,
    pub labels: BTreeMap<String, String>,
    pub agent_version: Option<String>,
    pub current: Option<SlotReport>,
    pub previous: Option<SlotReport>,
    pub staged: Option<SlotReport>,
    pub staging: Option<StagingProgress>,
    pub last_update: Option<UpdateReport>,
    /// The highest command seq the node has accepted.
    pub last_seq: Option<u64>,
    pub last_seen: Option<UnixSeconds>,
    pub last_event: Option<Event>,
}

impl NodeView {
    pub fn new(node: NodeId, record: NodeRecord) -> NodeView {
        let state = record.state;
        NodeView {
            node,
            online: record.online,
            labels: state.as_ref().map(|s| s.labels.clone()).unwrap_or_default(),
            agent_version: state.as_ref().map(|s| s.agent_version.clone()),
            last_seq: state.as_ref().map(|s| s.last_seq),
            current: state.as_ref().and_then(|s| s.current.clone()),
            previous: state.as_ref().and_then(|s| s.previous.clone()),
            staged: state.as_ref().and_then(|s| s.staged.clone()),
            staging: state.as_ref().and_then(|s| s.staging.clone()),
            last_update: state.and_then(|s| s.last_update),
            last_seen: record.last_seen,
            last_event: record.last_event,
        }
    }
}
