//! `GET /api/metrics` and `GET /api/metrics/drops` (token-protected, routed in `server.rs`).
//!
//! ```text
//! GET /api/metrics?node=N[,N..]&version=APP@VER&since=SECS   → MetricsResponse
//! GET /api/metrics?from=UNIX[&to=UNIX]&…                      → MetricsResponse
//! GET /api/metrics/drops                                      → MetricDropsView
//! ```
//! The window is `since` seconds back from now, or `from` to `to` (inclusive; `to` defaults
//! to now), or the last [`DEFAULT_WINDOW_SECS`] if neither is given. "Now" reaches
//! [`MAX_FUTURE_SKEW_SECS`](super::MAX_FUTURE_SKEW_SECS) ahead, so every stored sample of the
//! window is found even from a node whose clock runs a little fast.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use protocol::{AppName, NodeId, ReleaseId, UnixSeconds, Version};
use serde::Deserialize;

use super::store::MetricQuery;
use super::view::{MetricDropsView, MetricsResponse};
use super::MAX_FUTURE_SKEW_SECS;
use crate::server::{ApiError, AppState};
use crate::unix_now;

/// Window of `GET /api/metrics` when none is given, and of `coordinator metrics`.
pub const DEFAULT_WINDOW_SECS: u64 = 600;
/// Most samples in one answer (the oldest of the window; the answer says it was truncated).
pub const MAX_SAMPLES_PER_ANSWER: usize = 10_000;

/// The query string of `GET /api/metrics`, as given.
#[derive(Debug, Default, Deserialize)]
pub struct MetricsParams {
    pub node: Option<String>,
    pub version: Option<String>,
    pub since: Option<u64>,
    pub from: Option<u64>,
    pub to: Option<u64>,
}

/// `app@version` as operators write it.
pub fn parse_release(text: &str) -> Result<ReleaseId, String> {
    let (app, version) = text
        .split_once('@')
        .ok_or_else(|| format!("{text:?} is not APP@VERSION"))?;
    let app = AppName::new(app).map_err(|e| e.to_string())?;
    let version = Version::new(version).map_err(|e| e.to_string())?;
    Ok(ReleaseId::new(app, version))
}

/// The store query a request asks for, at `now`. Pure, so the rules are tested directly.
pub fn metric_query(params: &MetricsParams, now: UnixSeconds) -> Result<MetricQuery, String> {
    let nodes = match &params.node {
        None => None,
        Some(list) => Some(
            list.split(',')
                .map(|id| NodeId::new(id.trim()).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let version = params.version.as_deref().map(parse_release).transpose()?;
    let latest = now.saturating_add(MAX_FUTURE_SKEW_SECS);
    let (from, to) = match (params.since, params.from, params.to) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err("give either since=SECONDS or from=UNIX[&to=UNIX], not both".to_owned())
        }
        (Some(since), None, None) => (now.saturating_sub(since), latest),
        (None, Some(from), to) => (from, to.unwrap_or(latest)),
        (None, None, Some(_)) => return Err("to= needs from=".to_owned()),
        (None, None, None) => (now.saturating_sub(DEFAULT_WINDOW_SECS), latest),
    };
    if from > to {
        return Err(format!("the window is empty: from={from} is after to={to}"));
    }
    Ok(MetricQuery {
        nodes,
        version,
        from,
        to,
    })
}

/// `GET /api/metrics`: stored samples, oldest first.
pub async fn get_metrics(
    State(state): State<Arc<AppState>>,
    params: Result<Query<MetricsParams>, QueryRejection>,
) -> Result<Json<MetricsResponse>, ApiError> {
    let Query(params) = params.map_err(|e| {
        ApiError::bad_request(format!(
            "{}; use node=N[,N..], version=APP@VER, since=SECONDS or from=UNIX&to=UNIX",
            e.body_text()
        ))
    })?;
    let query = metric_query(&params, unix_now()).map_err(ApiError::bad_request)?;
    let store = state.metrics.clone();
    let (from, to) = (query.from, query.to);
    let page =
        tokio::task::spawn_blocking(move || store.query_limited(&query, MAX_SAMPLES_PER_ANSWER))
            .await
            .map_err(|e| ApiError::internal(format!("metric query task failed: {e}")))??;
    Ok(Json(MetricsResponse {
        from,
        to,
        samples: page.samples,
        limit: MAX_SAMPLES_PER_ANSWER,
        truncated: page.truncated,
    }))
}

/// `GET /api/metrics/drops`: refused metric input per node and reason since start.
pub async fn get_drops(State(state): State<Arc<AppState>>) -> Json<MetricDropsView> {
    Json(state.metrics.drops().snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixSeconds = 10_000;

    /// The query string as axum's `Query` decodes it (the values here need no unescaping).
    fn params(query: &str) -> MetricsParams {
        let mut params = MetricsParams::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap();
            let number = || value.parse::<u64>().unwrap();
            match key {
                "node" => params.node = Some(value.to_owned()),
                "version" => params.version = Some(value.to_owned()),
                "since" => params.since = Some(number()),
                "from" => params.from = Some(number()),
                "to" => params.to = Some(number()),
                _ => panic!("{key}"),
            }
        }
        params
    }

    #[test]
    fn the_window_is_since_or_from_to_or_the_default() {
        let latest = NOW + MAX_FUTURE_SKEW_SECS;
        let window = |q: &str| metric_query(&params(q), NOW).map(|m| (m.from, m.to));
        assert_eq!(window(""), Ok((NOW - DEFAULT_WINDOW_SECS, latest)));
        assert_eq!(window("since=60"), Ok((NOW - 60, latest)));
        assert_eq!(window("since=99999"), Ok((0, latest)));
        assert_eq!(window("from=5"), Ok((5, latest)));
        assert_eq!(window("from=5&to=9"), Ok((5, 9)));
        assert!(window("since=5&from=1").is_err());
        assert!(window("to=9").is_err());
        assert!(window("from=9&to=5").unwrap_err().contains("empty"));
    }

    #[test]
    fn nodes_and_versions_are_validated() {
        let query = metric_query(&params("node=n1,n2&version=web@2"), NOW).unwrap();
        assert_eq!(
            query.nodes,
            Some(vec![NodeId::new("n1").unwrap(), NodeId::new("n2").unwrap()])
        );
        assert_eq!(query.version.unwrap().to_string(), "web@2");
        assert!(metric_query(&params("node=a/b"), NOW).is_err());
        assert!(metric_query(&params("version=web"), NOW).is_err());
        assert!(metric_query(&params("version=web@"), NOW).is_err());
        assert!(metric_query(&params("node=n1,"), NOW).is_err());
    }
}
