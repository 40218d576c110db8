//! The JSON bodies of the operator HTTP API, shared by the server (`server.rs`) and the CLI
//! client (`client.rs`) so the two cannot drift apart.
//!
//! ```text
//! POST /api/chunks/missing   {"digests":[hex..]}            → {"missing":[hex..]}
//! PUT  /api/chunks/{digest}?size=N   body: zstd frame        → {"digest":hex,"stored":bool}
//! POST /api/releases         PublishRequest                  → PublishResponse
//! GET  /api/releases                                         → [ReleaseView]
//! POST /api/rollouts         RolloutRequest                  → RolloutResponse
//! GET  /api/rollouts[/{id}[/canary]]                        → (bodies in `rollout/view.rs`)
//! POST /api/rollouts/{id}/{pause|resume|abort|rollback}     → RolloutView
//! GET  /api/nodes                                            → [NodeView]
//! POST /api/nodes/rollback   {"nodes":[id..]}                → NodeRollbackResponse
//! GET  /api/stats                                            → StatsView
//! POST /api/tokens           {"name"}  (admin only)          → TokenCreated (the secret, once)
//! GET  /api/tokens                                           → [TokenView]
//! DELETE /api/tokens/{name}  (admin only)                    → TokenView
//! GET  /api/log[?since=UNIX_SECS]                            → [LogEntry] (oldest first)
//! GET  /api/metrics?node=N[,N]&version=APP@VER&since=SECS|from=UNIX&to=UNIX → MetricsResponse
//! GET  /api/metrics/drops                                    → MetricDropsView
//! GET  /chunks/{digest}      (no token)                      → the zstd frame
//! ```
//! Every `/api/*` call needs `Authorization: Bearer <token>`: the admin token or a named one;
//! the deploy log records which. Errors are `{"error": "..."}`.

use std::collections::BTreeMap;

use protocol::messages::{Event, SlotReport, StagingProgress, UpdateReport};
use protocol::{Digest, Manifest, NodeId, ReleaseId, ReleaseKind, RunSpec, UnixSeconds};
use serde::{Deserialize, Serialize};

use crate::canary::CanaryConfig;
use crate::db::{NodeRecord, ReleaseInfo};
use crate::rollout::plan::PlanOptions;
use crate::rollout::view::RolloutView;
use crate::tokens::TokenRecord;

/// `GET /api/log` answers with the entries as stored: the record is already the public shape
/// (who, action, target, nodes, outcome, when).
pub use crate::db::LogEntry;
/// The metrics endpoints' bodies (`metrics/view.rs`; windows and limits in `metrics/http.rs`).
pub use crate::metrics::view::{LastRefusal, MetricDropsView, MetricsResponse, NodeDrops};

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
    /// Mirror base URLs, in the order deploy commands list them (before the coordinator).
    pub mirrors: Vec<String>,
    /// How the release runs on a node (the signed `[run]` section of its `release.toml`);
    /// `null` for a files-only release.
    #[serde(default)]
    pub run: Option<RunSpec>,
    /// The plan defaults of its rollouts (`release.toml` `[rollout]`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<PlanOptions>,
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
            mirrors: info.mirrors.clone(),
            run: info.run.clone(),
            rollout: info.rollout.clone(),
        }
    }
}

/// `POST /api/releases`: the unsigned manifest (the coordinator signs it) and the release's
/// mirrors, which are not signed and may be replaced by publishing the same content again.
#[derive(Debug, Serialize, Deserialize)]
pub struct PublishRequest {
    pub manifest: Manifest,
    /// Base URLs serving `{URL}/chunks/{digest}`, in the order agents should try them.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// `release.toml` `[rollout]`: the plan defaults of this release's rollouts.
    #[serde(default)]
    pub rollout: Option<PlanOptions>,
    /// `release.toml` `[canary]`: how this release's canaries are judged (`None`: defaults).
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PublishResponse {
    #[serde(flatten)]
    pub release: ReleaseView,
    /// False when this release had been published before with the same content.
    pub created: bool,
    /// True when the release existed and this call replaced its mirror list (rollouts
    /// started from now on list the new mirrors).
    #[serde(default)]
    pub mirrors_updated: bool,
}

/// `POST /api/rollouts`: roll a published release out to the nodes whose labels hold every
/// `select` pair (all nodes when empty), by `plan` (each knob optional: the release's
/// `[rollout]` defaults, then the built-in ones, fill the rest).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    pub app: String,
    pub version: String,
    #[serde(default)]
    pub select: BTreeMap<String, String>,
    #[serde(default)]
    pub plan: PlanOptions,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RolloutResponse {
    pub rollout: u64,
    /// `app@version`.
    pub release: String,
    pub app: String,
    pub version: String,
    /// Every selected node.
    pub nodes: Vec<NodeId>,
    /// The nodes of each wave, in order.
    #[serde(default)]
    pub waves: Vec<Vec<NodeId>>,
    /// The HTTP chunk sources the commands list, in the order agents try them (the
    /// release's mirrors, then the coordinator); MQTT comes after them.
    #[serde(default)]
    pub http_sources: Vec<String>,
    /// The rollout as it stands (its plan with every default filled in).
    pub view: RolloutView,
}

/// `POST /api/nodes/rollback`: send these nodes back to their previous version. Names are
/// plain strings so that an invalid one is refused with a message naming it.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeRollbackRequest {
    pub nodes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeRollbackResponse {
    /// One entry per node, in the order asked (duplicates dropped).
    pub nodes: Vec<RollbackSent>,
}

/// A rollback command stored and handed to the broker for one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackSent {
    pub node: NodeId,
    /// The command's seq: above every command sent before, so a later rollout supersedes it.
    pub seq: u64,
    /// The node's current version as it last reported it.
    pub from: Option<ReleaseId>,
    /// The previous version it last reported: the one it goes back to.
    pub to: ReleaseId,
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

/// `GET /api/stats`: chunk-delivery counters since `coordinator serve` started (they reset on
/// restart). Byte counts are payload bytes: MQTT message payloads handed to the MQTT client,
/// HTTP response bodies handed to the HTTP server; protocol framing (MQTT, TCP, TLS, HTTP
/// headers) is not included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// When the counters started (the coordinator's start), Unix seconds.
    pub started_at: UnixSeconds,
    pub uptime_secs: u64,
    /// Chunk frames published on releases' shared chunk topics.
    pub mqtt_frames_published: u64,
    /// Their MQTT payload bytes: each frame's header (33 bytes) plus the zstd frame.
    pub mqtt_frame_bytes: u64,
    /// Messages received on nodes' chunk-request topics.
    pub chunk_requests: u64,
    /// Of those, requests not acted on at all: malformed, over `ChunkRequest::MAX_DIGESTS`,
    /// or for a release that was never published.
    pub chunk_requests_refused: u64,
    /// Digests named in the requests acted on; the sum of the four below.
    pub digests_requested: u64,
    /// Digests queued to be published.
    pub digests_queued: u64,
    /// Digests not queued by the fan-out dedup: already queued, published on the shared
    /// topic less than `ChunkRequest::FANOUT_WINDOW` ago (one frame served every asker), or
    /// published since the asker started receiving that topic (its frame is on the way).
    pub digests_deduped: u64,
    /// Digests the release does not list.
    pub digests_unknown: u64,
    /// Digests dropped because the send queue was full (the agent asks again).
    pub digests_dropped: u64,
    /// `GET /chunks/{digest}` answered with the chunk.
    pub http_chunks_served: u64,
    /// Their body bytes (the compressed chunk files).
    pub http_chunk_bytes: u64,
    /// `GET /chunks/{digest}` answered 404 (no such chunk, or not a digest).
    pub http_not_found: u64,
}

/// `POST /api/tokens`: create a named operator token (admin only).
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenCreateRequest {
    pub name: String,
}

/// The answer to `POST /api/tokens`: the only time the secret is ever shown.
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenCreated {
    pub name: String,
    pub secret: String,
    pub created_at: UnixSeconds,
    pub created_by: String,
}

/// A named token as `GET /api/tokens` lists it: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub created_at: UnixSeconds,
    pub created_by: String,
    /// Set once revoked; the token's secret is refused from then on.
    pub revoked_at: Option<UnixSeconds>,
    pub revoked_by: Option<String>,
}

impl From<&TokenRecord> for TokenView {
    fn from(record: &TokenRecord) -> Self {
        TokenView {
            name: record.name.clone(),
            created_at: record.created_at,
            created_by: record.created_by.clone(),
            revoked_at: record.revoked_at,
            revoked_by: record.revoked_by.clone(),
        }
    }
}
