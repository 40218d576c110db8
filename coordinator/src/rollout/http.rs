//! The rollout endpoints (bodies in `view.rs` and `api.rs`). Starts and controls go to the
//! driver, which owns rollout state; status and the canary report read the store, so they
//! answer whatever the driver is doing.
//!
//! Every start or control writes a deploy-log entry: on success the driver writes it within
//! the step's save point; a refusal is logged here, and flushed before the refusal is sent.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use protocol::{AppName, NodeId, ReleaseId, Version};
use serde::Deserialize;

use super::driver::{Control, ControlFailure, StartError, StartRequest};
use super::engine::{GateOutcome, Status, WavePhase};
use super::fleet::Observed;
use super::plan::Selector;
use super::report;
use super::view::{canary_window, CanaryReport, RolloutView};
use crate::api::{RolloutRequest, RolloutResponse};
use crate::canary::Judgment;
use crate::db::{Db, LogEntry};
use crate::release;
use crate::server::{ApiError, AppState};
use crate::token::Identity;
use crate::unix_now;

type Shared = Arc<AppState>;

/// Finished rollouts listed after the running ones by `GET /api/rollouts`.
const RECENT: usize = 10;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/api/rollouts", post(start).get(list))
        .route("/api/rollouts/{id}", get(show))
        .route("/api/rollouts/{id}/canary", get(canary))
        .route("/api/rollouts/{id}/pause", post(pause))
        .route("/api/rollouts/{id}/resume", post(resume))
        .route("/api/rollouts/{id}/abort", post(abort))
        .route("/api/rollouts/{id}/rollback", post(rollback))
}

/// Logs a refused or failed request (`refused: …` for a 4xx, `failed: …` otherwise) and
/// flushes before the answer goes out; passes the answer through.
async fn logged<T>(
    db: &Db,
    who: &Identity,
    action: &str,
    target: String,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    let Err(error) = result else {
        return result;
    };
    let outcome = if error.status().is_client_error() {
        format!("refused: {}", error.message())
    } else {
        format!("failed: {}", error.message())
    };
    let entry = LogEntry {
        id: 0,
        at: unix_now(),
        who: who.0.clone(),
        action: action.to_owned(),
        target,
        nodes: Vec::new(),
        outcome,
    };
    let written = match db.append_log(entry) {
        Ok(_) => db.flush().await,
        Err(error) => Err(error),
    };
    if let Err(write) = written {
        tracing::error!(error = %write, action, who = %who, "cannot write the deploy-log entry of a refused request");
    }
    Err(error)
}

/// `POST /api/rollouts`.
async fn start(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RolloutResponse>), ApiError> {
    let mut target = "-".to_owned();
    let result = start_rollout(&state, &who, body, &mut target).await;
    logged(&state.db, &who, "rollout start", target, result).await
}

async fn start_rollout(
    state: &AppState,
    who: &Identity,
    body: Result<Bytes, BytesRejection>,
    target: &mut String,
) -> Result<(StatusCode, Json<RolloutResponse>), ApiError> {
    let body = body.map_err(ApiError::body)?;
    let request: RolloutRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"app\": ..., \"version\": ..., \"select\": {{label: value}}, \"plan\": {{waves, bake, ...}}}}: {e}"
        ))
    })?;
    let app = AppName::new(request.app).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let version =
        Version::new(request.version).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let id = ReleaseId::new(app, version);
    *target = id.to_string();
    let selector = Selector(request.select);
    selector
        .check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    request
        .plan
        .check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let info = state.db.release_info(&id)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "release {id} does not exist; publish it first with `coordinator release publish` (`coordinator release list` shows what exists)"
            ),
        )
    })?;
    let http_sources = release::http_sources(&info.mirrors, &state.public_url);
    let started = state
        .rollouts
        .start(
            StartRequest {
                release: id.clone(),
                info,
                selector,
                options: request.plan,
                http_sources: http_sources.clone(),
            },
            who.clone(),
        )
        .await
        .map_err(|error| {
            let status = match &error {
                StartError::Plan(_) => StatusCode::BAD_REQUEST,
                StartError::NoNodes
                | StartError::EmptySelection { .. }
                | StartError::Conflict(_) => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let message = match &error {
                StartError::Plan(plan) => format!("rollout of {id} refused: {plan}"),
                other => other.to_string(),
            };
            ApiError::new(status, message)
        })?;
    *target = format!("rollout {} ({id})", started.view.id);
    Ok((
        StatusCode::CREATED,
        Json(RolloutResponse {
            rollout: started.view.id,
            release: id.to_string(),
            app: id.app.to_string(),
            version: id.version.to_string(),
            nodes: started.waves.iter().flatten().cloned().collect(),
            waves: started.waves,
            http_sources,
            view: started.view,
        }),
    ))
}

/// `GET /api/rollouts`: running and paused rollouts, then the latest others, newest first.
async fn list(State(state): State<Shared>) -> Result<Json<Vec<RolloutView>>, ApiError> {
    let now = unix_now();
    let heads = state.rollouts.store().heads()?;
    let (active, done): (Vec<_>, Vec<_>) = heads.iter().partition(|h| h.status.is_active());
    Ok(Json(
        active
            .into_iter()
            .chain(done.into_iter().take(RECENT))
            .map(|head| RolloutView::new(head, None, now))
            .collect(),
    ))
}

fn not_found(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("there is no rollout {id}; `coordinator rollout status` lists them"),
    )
}

#[derive(Deserialize)]
struct ShowQuery {
    /// `false`: the waves and counts only (what `--watch` polls), without reading every
    /// node's record.
    #[serde(default = "yes")]
    nodes: bool,
}

fn yes() -> bool {
    true
}

/// `GET /api/rollouts/{id}[?nodes=false]`: the rollout, with every node's progress.
async fn show(
    State(state): State<Shared>,
    Path(id): Path<u64>,
    query: Result<Query<ShowQuery>, QueryRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let Query(ShowQuery { nodes }) =
        query.map_err(|_| ApiError::bad_request("use ?nodes=true or ?nodes=false"))?;
    let store = state.rollouts.store();
    let now = unix_now();
    if !nodes {
        let head = store.head(id)?.ok_or_else(|| not_found(id))?;
        return Ok(Json(RolloutView::new(&head, None, now)));
    }
    let rollout = store.load(id)?.ok_or_else(|| not_found(id))?;
    Ok(Json(RolloutView::new(
        rollout.head(),
        Some(rollout.nodes()),
        now,
    )))
}

async fn control(
    state: &AppState,
    who: Identity,
    id: u64,
    control: Control,
) -> Result<Json<RolloutView>, ApiError> {
    let action = format!("rollout {}", control.as_str());
    let result = state
        .rollouts
        .control(id, control, who.clone())
        .await
        .map(Json)
        .map_err(|failure| {
            let status = match &failure {
                ControlFailure::NotFound(_) => StatusCode::NOT_FOUND,
                ControlFailure::Refused(_) => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            ApiError::new(status, failure.to_string())
        });
    logged(&state.db, &who, &action, format!("rollout {id}"), result).await
}

/// `POST /api/rollouts/{id}/pause`.
async fn pause(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    Path(id): Path<u64>,
) -> Result<Json<RolloutView>, ApiError> {
    control(&state, who, id, Control::Pause).await
}

/// `POST /api/rollouts/{id}/resume`.
async fn resume(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    Path(id): Path<u64>,
) -> Result<Json<RolloutView>, ApiError> {
    control(&state, who, id, Control::Resume).await
}

/// `POST /api/rollouts/{id}/abort`.
async fn abort(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    Path(id): Path<u64>,
) -> Result<Json<RolloutView>, ApiError> {
    control(&state, who, id, Control::Abort).await
}

/// `POST /api/rollouts/{id}/rollback`.
async fn rollback(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    Path(id): Path<u64>,
) -> Result<Json<RolloutView>, ApiError> {
    control(&state, who, id, Control::Rollback).await
}

/// `GET /api/rollouts/{id}/canary`: the gate's stored judgment, or (before the gate judged)
/// one computed now over the window so far.
async fn canary(
    State(state): State<Shared>,
    Path(id): Path<u64>,
) -> Result<Json<CanaryReport>, ApiError> {
    let rollout = state
        .rollouts
        .store()
        .load(id)?
        .ok_or_else(|| not_found(id))?;
    let head = rollout.head();
    let report = |live: bool, result: &super::engine::CanaryResult, judgment: Option<Judgment>| {
        CanaryReport {
            rollout: id,
            release: head.release.to_string(),
            status: head.status,
            live,
            outcome: result.outcome,
            score: result.score,
            summary: result.summary.clone(),
            from: result.from,
            to: result.to,
            canary_nodes: result.canary_nodes.clone(),
            baseline_nodes: result.baseline_nodes.clone(),
            judgment,
        }
    };
    if let Some(stored) = &head.canary {
        let judgment = stored
            .judgment
            .clone()
            .map(serde_json::from_value::<Judgment>)
            .transpose()
            .map_err(|e| {
                ApiError::internal(format!(
                    "the stored canary judgment of rollout {id} does not read back: {e}"
                ))
            })?;
        return Ok(Json(report(false, stored, judgment)));
    }
    let refuse = |message: String| ApiError::new(StatusCode::CONFLICT, message);
    if head.status == Status::Legacy {
        return Err(refuse(format!(
            "rollout {id} was started before staged rollouts; it has no canary"
        )));
    }
    let Some((from, _)) = canary_window(head) else {
        let phase = head.waves.first().map_or(WavePhase::Pending, |w| w.phase);
        return Err(refuse(format!(
            "the first wave of rollout {id} has not switched yet (it is {phase:?}); the canary report has data once it has",
            phase = phase
        )));
    };
    let now = unix_now();
    if now < from {
        return Err(refuse(format!(
            "the canary of rollout {id} is in its warm-up for {}s more; its samples are judged from then on",
            from - now
        )));
    }
    let fleet: HashMap<NodeId, Observed> = state
        .db
        .nodes()?
        .into_iter()
        .filter_map(|(node, record)| Observed::of(&record).map(|o| (node, o)))
        .collect();
    let groups = report::groups(&rollout, None, &fleet);
    let config = match state.db.release_info(&head.release)? {
        Some(info) => report::canary_config(&info),
        None => Default::default(),
    };
    let (metrics, release) = (state.metrics.clone(), head.release.clone());
    let (result, judgment) = tokio::task::spawn_blocking(move || {
        report::judge(&metrics, &config, &release, &groups, from, now, now)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the canary judgment task failed: {e}")))??;
    let mut live = report(true, &result, judgment);
    if live.outcome == GateOutcome::Skipped && live.judgment.is_none() {
        live.summary = format!(
            "{} (computed now; the gate has not judged yet)",
            live.summary
        );
    }
    Ok(Json(live))
}
