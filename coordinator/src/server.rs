//! The HTTP side of `serve`: the operator API (`/api/*`, token required) and the public chunk
//! server (`/chunks/{digest}`). Bodies are defined in `api.rs`.
//!
//! `/chunks/{digest}` serves chunk files only: the path segment must parse as a digest (64
//! lowercase hex digits) and the file read is the one the chunk store names for it, so no
//! other file is reachable. Served chunks, their bytes and 404s are counted in [`Stats`].
//!
//! Save points, in order (the order is what makes a crash at any instant safe):
//! - publish: chunks are in the store (each fsynced by `put_verified`) → the sealed release is
//!   inserted into sled → flush → respond. A release is never visible before its chunks.
//! - rollout: the rollout driver's save point (`rollout/driver.rs`): seqs reserved, desired
//!   commands, rollout records and log entries written → flush → publish → respond.
//! - node rollback: every named node checked first (one refusal refuses the request, nothing
//!   is written) → seqs reserved, desired commands written → flush → publish → respond.
//!   Nothing leaves the process with a seq that is not durable, so no seq is ever reused
//!   after a crash.
//! - deploy log: every operator request appends its entry (who, what, target, nodes, outcome)
//!   with its own writes, before the flush above, so the action and its entry are durable
//!   together; a refused request appends its entry and flushes before the refusal is sent
//!   (`access::Audit`). Token create/revoke: token tree and entry written → flush → respond.

mod access;
pub mod connections;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use ed25519_dalek::SigningKey;
use images::{ChunkStore, StoreError};
use protocol::format::{self, FORMAT_VERSION};
use protocol::messages::Command;
use protocol::{ChunkRef, Digest, Envelope, Manifest, NodeId, ReleaseId, Signed as _};
use serde::Deserialize;
use tokio::sync::{mpsc, Mutex};

/// The deploy-log entry of an operator request, for every module's API handlers.
pub(crate) use self::access::Audit;
use crate::api::{
    ErrorBody, MissingRequest, MissingResponse, NodeRollbackRequest, NodeRollbackResponse,
    NodeView, PublishRequest, PublishResponse, ReleaseView, RollbackSent, StatsView, StoredChunk,
    MAX_MISSING_QUERY,
};
use crate::db::{Db, DbError, Inserted, ReleaseInfo};
use crate::hot_chunks::HotChunks;
use crate::main_loop::ApiRequest;
use crate::metrics::{self, MetricStore};
use crate::release::{self, RollbackRefused};
use crate::stats::Stats;
use crate::token::{AdminToken, Identity};
use crate::tokens::TokenStore;
use crate::unix_now;

/// Shared by every handler.
pub struct AppState {
    pub db: Db,
    pub chunks: ChunkStore,
    pub signing_key: SigningKey,
    pub token: AdminToken,
    /// The named operator tokens (the admin's is `token`).
    pub tokens: TokenStore,
    /// Base URL agents fetch chunks from.
    pub public_url: String,
    pub to_loop: mpsc::Sender<ApiRequest>,
    /// Requests that write commands (rollouts, rollbacks) are serialized so that for every
    /// node the newest desired command is also the last one queued for publishing.
    pub command_lock: Mutex<()>,
    /// Chunk-delivery counters, shared with the main loop.
    pub stats: Arc<Stats>,
    /// Health samples and the counters of refused metric input (`/api/metrics*`).
    pub metrics: MetricStore,
    /// The rollout driver's handle: starts and controls go through it; status reads its store.
    pub rollouts: crate::rollout::Rollouts,
    /// Chunk reads for `GET /chunks/*` under way ([`CHUNK_READS`] permits).
    pub chunk_reads: tokio::sync::Semaphore,
    /// The chunks `GET /chunks/*` served last ([`HOT_CHUNK_BYTES`]).
    pub hot_chunks: HotChunks,
}

/// Chunks read for `GET /chunks/*` at once. Each read holds the whole compressed chunk in
/// memory until it is handed to the connection; when a wave of a thousand nodes fetches at
/// once, the rest wait here rather than each holding a buffer of their own (loopback and
/// LAN sockets take a chunk as fast as it is read, so a few dozen keep the disk busy).
pub const CHUNK_READS: usize = 32;

/// Memory for the chunks `GET /chunks/*` served last: a wave's new chunks (a 1 MB change
/// to a release is ~15 chunks) many times over, and a 10 MB release whole.
pub const HOT_CHUNK_BYTES: usize = 32 * 1024 * 1024;
/// How long a chunk nobody asks for stays in [`HOT_CHUNK_BYTES`]. A wave's nodes ask for
/// its chunks within seconds of each other; a chunk asked for again later costs one read.
pub const HOT_CHUNK_IDLE: std::time::Duration = std::time::Duration::from_secs(20);

type Shared = Arc<AppState>;

/// An error response: `{"error": message}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        tracing::error!(error = %message, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn body(rejection: BytesRejection) -> ApiError {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body is over this endpoint's size limit".to_owned()
        } else {
            rejection.body_text()
        };
        ApiError::new(status, message)
    }
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> ApiError {
        ApiError::internal(error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route(
            "/api/chunks/missing",
            post(missing_chunks).layer(DefaultBodyLimit::max(2 * 1024 * 1024)),
        )
        .route(
            "/api/chunks/{digest}",
            put(put_chunk).layer(DefaultBodyLimit::max(format::MAX_COMPRESSED_CHUNK_SIZE)),
        )
        .route(
            "/api/releases",
            post(publish_release)
                .get(list_releases)
                // The manifest plus its mirror list.
                .layer(DefaultBodyLimit::max(
                    format::MAX_MANIFEST_BYTES + 64 * 1024,
                )),
        )
        .merge(crate::rollout::http::routes())
        .route("/api/nodes", get(list_nodes))
        .route("/api/nodes/rollback", post(rollback_nodes))
        .route("/api/stats", get(stats))
        .route(
            "/api/tokens",
            post(access::create_token).get(access::list_tokens),
        )
        .route("/api/tokens/{name}", delete(access::revoke_token))
        .route("/api/log", get(access::read_log))
        .route("/api/metrics", get(metrics::http::get_metrics))
        .route("/api/metrics/drops", get(metrics::http::get_drops))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/chunks/{digest}", get(get_chunk))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// Resolves the presented token to its [`Identity`] (`access::identify`) and hands it to the
/// handler as an extension; anything else is answered here (401 with what to do).
async fn require_token(State(state): State<Shared>, mut request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match access::identify(&state, header) {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(error) => {
            let unauthorized = error.status == StatusCode::UNAUTHORIZED;
            let mut response = error.into_response();
            if unauthorized {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

fn parse_digest(text: &str) -> Result<Digest, ApiError> {
    text.parse()
        .map_err(|e: protocol::digest::DigestParseError| ApiError::bad_request(e.to_string()))
}

/// Runs blocking chunk-store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("chunk store task failed: {e}")))
}

/// `POST /api/chunks/missing`: which of these digests the store lacks.
async fn missing_chunks(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<MissingResponse>, ApiError> {
    let body = body.map_err(ApiError::body)?;
    let request: MissingRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{\"digests\": [hex, ...]}}: {e}")))?;
    if request.digests.len() > MAX_MISSING_QUERY {
        return Err(ApiError::bad_request(format!(
            "{} digests in one query; ask about at most {MAX_MISSING_QUERY} at a time",
            request.digests.len()
        )));
    }
    let chunks = state.chunks.clone();
    let missing = blocking(move || {
        request
            .digests
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|d| !chunks.contains(d))
            .collect()
    })
    .await?;
    Ok(Json(MissingResponse { missing }))
}

#[derive(Deserialize)]
struct SizeQuery {
    size: u32,
}

/// `PUT /api/chunks/{digest}?size=N`: store a compressed chunk after verifying it decodes to
/// `size` bytes hashing to `digest`.
async fn put_chunk(
    State(state): State<Shared>,
    Path(digest): Path<String>,
    query: Result<Query<SizeQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<StoredChunk>), ApiError> {
    let digest = parse_digest(&digest)?;
    let Query(SizeQuery { size }) = query.map_err(|_| {
        ApiError::bad_request("give the chunk's uncompressed size: PUT /api/chunks/{digest}?size=N")
    })?;
    let body = body.map_err(ApiError::body)?;
    if size == 0 || size as usize > format::MAX_CHUNK_SIZE {
        return Err(ApiError::bad_request(format!(
            "chunk size {size} is outside 1..={}",
            format::MAX_CHUNK_SIZE
        )));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("empty chunk body"));
    }
    let chunk = ChunkRef {
        digest,
        size,
        zsize: body.len() as u32,
    };
    let chunks = state.chunks.clone();
    let stored = blocking(move || {
        if chunks.contains(&digest) {
            return Ok(false);
        }
        chunks.put_verified(&chunk, &body).map(|()| true)
    })
    .await?;
    match stored {
        Ok(true) => Ok((
            StatusCode::CREATED,
            Json(StoredChunk {
                digest,
                stored: true,
            }),
        )),
        Ok(false) => Ok((
            StatusCode::OK,
            Json(StoredChunk {
                digest,
                stored: false,
            }),
        )),
        Err(StoreError::Chunk(error)) => Err(ApiError::bad_request(format!(
            "chunk {digest} does not verify, not stored: {error}"
        ))),
        Err(error) => Err(ApiError::internal(format!(
            "cannot store chunk {digest}: {error}"
        ))),
    }
}

/// `GET /chunks/{digest}` (and `HEAD`): the compressed chunk file, for agents and mirrors.
/// No token: agents verify every chunk against the signed manifest. The file is read once, at
/// most one byte over the largest valid chunk, and sent with its exact length.
async fn get_chunk(
    State(state): State<Shared>,
    method: Method,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = |message: String| {
        state.stats.http_not_found();
        ApiError::new(StatusCode::NOT_FOUND, message)
    };
    // Strict: exactly 64 lowercase hex digits, so the path below is always a chunk file's.
    // The text is not echoed back.
    let Ok(digest) = digest.parse::<Digest>() else {
        return Err(not_found(
            "not a chunk digest (64 lowercase hex digits)".to_owned(),
        ));
    };
    let bytes = match state.hot_chunks.get(&digest) {
        Some(bytes) => bytes,
        None => {
            let bytes = read_chunk(&state, digest)
                .await?
                .ok_or_else(|| not_found(format!("no chunk {digest}")))?;
            state.hot_chunks.insert(digest, bytes.clone());
            bytes
        }
    };
    if method != Method::HEAD {
        state.stats.http_chunk_served(bytes.len());
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/zstd"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(bytes.len())),
            // Content-addressed: the bytes for a digest never change.
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// Reads a chunk from the store for `GET /chunks/*`, at most [`CHUNK_READS`] at once.
async fn read_chunk(state: &AppState, digest: Digest) -> Result<Option<Bytes>, ApiError> {
    let chunks = state.chunks.clone();
    let _reading = state
        .chunk_reads
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the chunk server is shutting down".to_owned()))?;
    let bytes = match blocking(move || chunks.get(&digest)).await? {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(error) => {
            return Err(ApiError::internal(format!(
                "cannot read chunk {digest}: {error}"
            )))
        }
    };
    if bytes.len() > format::MAX_COMPRESSED_CHUNK_SIZE {
        return Err(ApiError::internal(format!(
            "stored chunk {digest} is over the size limit; not serving it (the chunk store may be damaged)"
        )));
    }
    Ok(Some(Bytes::from(bytes)))
}

/// `POST /api/releases`: validate, check chunks, seal and store an immutable release with its
/// mirror list; or, for a release already published with the same content, replace its
/// mirror list.
async fn publish_release(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<PublishResponse>), ApiError> {
    let mut audit = Audit::new(who, "release publish");
    let result = publish(&state, &mut audit, body).await;
    audit.finish(&state.db, result).await
}

/// The work of [`publish_release`]; its success is logged in `audit` within its save point.
async fn publish(
    state: &AppState,
    audit: &mut Audit,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<PublishResponse>), ApiError> {
    let body = body.map_err(ApiError::body)?;
    let PublishRequest {
        manifest,
        mirrors,
        rollout,
        canary,
    } = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"manifest\": <release manifest>, \"mirrors\": [url, ...], \"rollout\": {{plan defaults}}, \"canary\": {{judge settings}}}}: {e}"
        ))
    })?;
    let id = manifest.release_id();
    audit.target(&id);
    let mirrors = release::mirror_list(&mirrors)
        .map_err(|e| ApiError::bad_request(format!("invalid mirror for release {id}: {e}")))?;
    if manifest.format != FORMAT_VERSION {
        return Err(ApiError::bad_request(format!(
            "release {id} is image format {}, this coordinator publishes format {FORMAT_VERSION}; rebuild it with a matching `coordinator`",
            manifest.format
        )));
    }
    manifest
        .validate()
        .map_err(|e| ApiError::bad_request(format!("release {id} is not valid: {e}")))?;
    release::check_run_command(&manifest)
        .map_err(|e| ApiError::bad_request(format!("release {id} is not valid: {e}")))?;

    let digests: BTreeSet<Digest> = manifest.chunks().map(|c| c.digest).collect();
    let total = digests.len();
    let chunks = state.chunks.clone();
    let missing: Vec<Digest> = blocking(move || {
        digests
            .into_iter()
            .filter(|d| !chunks.contains(d))
            .collect()
    })
    .await?;
    if let Some(first) = missing.first() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{} of the {total} chunks of release {id} are not on the coordinator (first: {first}); upload them with PUT /api/chunks/{{digest}}?size=N first (`coordinator release publish` does this)",
                missing.len()
            ),
        ));
    }

    if let Some(existing) = state.db.release_envelope(&id)? {
        return already_published(state, audit, &id, &manifest, &existing, &mirrors).await;
    }

    let sealed = Envelope::seal(&manifest, &state.signing_key);
    let envelope = sealed.to_bytes();
    let payload_len = serde_json::to_vec(&manifest)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if payload_len > Manifest::MAX_PAYLOAD_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the manifest of {id} is {payload_len} bytes, over the {}-byte limit agents accept; split the release",
                Manifest::MAX_PAYLOAD_BYTES
            ),
        ));
    }
    if let Some(defaults) = &rollout {
        defaults.check().map_err(|e| {
            ApiError::bad_request(format!(
                "release {id}: its [rollout] defaults are not valid: {e}"
            ))
        })?;
    }
    if let Some(canary) = &canary {
        canary.validate().map_err(|e| {
            ApiError::bad_request(format!(
                "release {id}: its [canary] section is not valid: {e}"
            ))
        })?;
    }
    let mut info = release::summarize(&manifest, &sealed, mirrors.clone(), unix_now());
    info.rollout = rollout;
    info.canary = canary;
    match state.db.insert_release(&info, &envelope)? {
        Inserted::New => {}
        // Someone published the same id between our check and the insert.
        Inserted::Existing(existing) => {
            return already_published(state, audit, &id, &manifest, &existing, &mirrors).await
        }
    }
    audit.succeeded(&state.db, "new release")?;
    state.db.flush().await?;
    tracing::info!(release = %id, files = info.files, bytes = info.bytes, chunks = info.chunks, mirrors = ?info.mirrors, "release published");
    Ok((
        StatusCode::CREATED,
        Json(PublishResponse {
            release: ReleaseView::from(&info),
            created: true,
            mirrors_updated: false,
        }),
    ))
}

/// The answer when `id` exists: the same content is a success that replaces the mirror list
/// (mirrors are not part of the signed release), anything else a conflict (releases are
/// immutable).
async fn already_published(
    state: &AppState,
    audit: &mut Audit,
    id: &ReleaseId,
    manifest: &Manifest,
    existing: &[u8],
    mirrors: &[String],
) -> Result<(StatusCode, Json<PublishResponse>), ApiError> {
    let (_, stored) = release::stored_manifest(existing)
        .map_err(|e| ApiError::internal(format!("release {id}: {e}")))?;
    if !release::same_content(&stored, manifest) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("release {id} already exists with different content; releases are immutable: publish a new version"),
        ));
    }
    let missing_summary = || ApiError::internal(format!("release {id} has no stored summary"));
    let before: ReleaseInfo = state.db.release_info(id)?.ok_or_else(missing_summary)?;
    let info = state
        .db
        .set_release_mirrors(id, mirrors)?
        .ok_or_else(missing_summary)?;
    let mirrors_updated = info.mirrors != before.mirrors;
    // Save point: the new list, if any, and the log entry are durable before the operator is
    // told.
    audit.succeeded(
        &state.db,
        if mirrors_updated {
            "mirror list replaced"
        } else {
            "already published with the same content, unchanged"
        },
    )?;
    state.db.flush().await?;
    if mirrors_updated {
        tracing::info!(release = %id, from = ?before.mirrors, to = ?info.mirrors, "release mirror list replaced; new rollouts use it");
    }
    Ok((
        StatusCode::OK,
        Json(PublishResponse {
            release: ReleaseView::from(&info),
            created: false,
            mirrors_updated,
        }),
    ))
}

/// `GET /api/releases`.
async fn list_releases(State(state): State<Shared>) -> Result<Json<Vec<ReleaseView>>, ApiError> {
    Ok(Json(
        state.db.releases()?.iter().map(ReleaseView::from).collect(),
    ))
}

/// Seals a node's command and stores it as the node's desired command, replacing the one
/// before. Not durable and not sent until [`flush_and_publish`].
fn store_command(state: &AppState, command: &Command) -> Result<(), ApiError> {
    let sealed = release::seal_command(command, &state.signing_key)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    state.db.set_desired(&command.node, &sealed)?;
    Ok(())
}

/// The save point of every request that sends commands: whatever it stored (seqs, desired
/// commands, records) is made durable, and only then is the main loop asked to publish the
/// nodes' desired commands. `what` names the request in the error ("the rollout").
async fn flush_and_publish(
    state: &AppState,
    nodes: Vec<NodeId>,
    what: &str,
) -> Result<(), ApiError> {
    state.db.flush().await?;
    state
        .to_loop
        .send(ApiRequest::PublishCommands(nodes))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the coordinator is shutting down; {what} is stored and its commands are sent when it is back"),
            )
        })
}

/// `POST /api/nodes/rollback`: send each named node back to its previous version. All or
/// nothing: every node is checked against its last report before any command is written.
async fn rollback_nodes(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<NodeRollbackResponse>, ApiError> {
    let mut audit = Audit::new(who, "node rollback");
    audit.target("previous version");
    let result = rollback(&state, &mut audit, body).await;
    audit.finish(&state.db, result).await
}

/// The work of [`rollback_nodes`]; its success is logged in `audit` within its save point.
async fn rollback(
    state: &AppState,
    audit: &mut Audit,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<NodeRollbackResponse>, ApiError> {
    let body = body.map_err(ApiError::body)?;
    let request: NodeRollbackRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("expected {{\"nodes\": [node id, ...]}}: {e}"))
    })?;
    let mut nodes: Vec<NodeId> = Vec::with_capacity(request.nodes.len());
    for name in request.nodes {
        let node = NodeId::new(name).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if !nodes.contains(&node) {
            nodes.push(node);
        }
    }
    audit.nodes(&nodes);
    if nodes.is_empty() {
        return Err(ApiError::bad_request("name at least one node to roll back"));
    }

    let _serialized = state.command_lock.lock().await;
    let mut targets = Vec::with_capacity(nodes.len());
    let mut refused = Vec::new();
    for node in &nodes {
        match release::rollback_target(node, state.db.node(node)?.as_ref()) {
            Ok(target) => targets.push(target),
            Err(refusal) => refused.push(refusal),
        }
    }
    if !refused.is_empty() {
        let unknown = refused
            .iter()
            .any(|r| matches!(r, RollbackRefused::Unknown(_)));
        let reasons: Vec<String> = refused.iter().map(ToString::to_string).collect();
        let mut message = format!("{}; no rollback was sent to any node", reasons.join("; "));
        if unknown {
            message.push_str(" (`coordinator nodes` lists the nodes that have reported)");
        }
        let status = if unknown {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::CONFLICT
        };
        return Err(ApiError::new(status, message));
    }

    let seqs = state.db.reserve_seqs(nodes.len() as u64)?;
    let now = unix_now();
    let mut sent = Vec::with_capacity(nodes.len());
    for ((node, (from, to)), seq) in nodes.iter().zip(targets).zip(seqs) {
        store_command(state, &release::rollback_command(node.clone(), seq, now))?;
        sent.push(RollbackSent {
            node: node.clone(),
            seq,
            from,
            to,
        });
    }
    let versions: BTreeSet<String> = sent.iter().map(|s| s.to.to_string()).collect();
    audit.target(versions.into_iter().collect::<Vec<_>>().join(", "));
    audit.succeeded(&state.db, "rollback sent")?;
    flush_and_publish(state, nodes, "the rollback").await?;
    for s in &sent {
        match &s.from {
            Some(from) => {
                tracing::info!(node = %s.node, seq = s.seq, from = %from, to = %s.to, "rollback sent")
            }
            None => tracing::info!(node = %s.node, seq = s.seq, to = %s.to, "rollback sent"),
        }
    }
    Ok(Json(NodeRollbackResponse { nodes: sent }))
}

/// `GET /api/nodes`: the inventory.
async fn list_nodes(State(state): State<Shared>) -> Result<Json<Vec<NodeView>>, ApiError> {
    Ok(Json(
        state
            .db
            .nodes()?
            .into_iter()
            .map(|(node, record)| NodeView::new(node, record))
            .collect(),
    ))
}

/// `GET /api/stats`: chunk-delivery counters since start.
async fn stats(State(state): State<Shared>) -> Json<StatsView> {
    Json(state.stats.snapshot(unix_now()))
}
