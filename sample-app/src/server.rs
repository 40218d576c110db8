//! The HTTP surface: routes, the misbehaviour middleware, and serving until shutdown.
//!
//! Routes are split in two kinds. *Traffic* (`/`, `/work`, `/files/{path}`, unknown paths)
//! is what users and load generators hit: it gets the injected latency and errors and is
//! counted in the metrics. *Control* (`/healthz`, `/metrics`, `/version`) is what the agent
//! and the demo use to watch the app: it is never delayed, never fails at random and is not
//! counted; only `fail_health` changes `/healthz`.
//!
//! This module never exits the process; the crash knobs are the binary's business.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::Knobs;
use crate::files;
use crate::metrics::{self, Metrics};

/// Paths that are control endpoints: no injected faults, not counted.
const CONTROL_PATHS: [&str; 3] = ["/healthz", "/metrics", "/version"];

/// Longest sleep `/work?ms=N` accepts, so a typo cannot park a connection for hours.
pub const MAX_WORK_MS: u64 = 60_000;

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    root: PathBuf,
    version: String,
    knobs: Knobs,
    metrics: Metrics,
    started: Instant,
    /// Only used when a knob needs randomness; a mutex because choices are rare and cheap
    /// (one draw per request) and a seeded sequence must be shared to be reproducible.
    rng: Mutex<StdRng>,
}

impl AppState {
    /// State for an app serving `canonical_root` (already canonicalized: containment
    /// checks compare against it) as `version`, misbehaving as `knobs` say.
    pub fn new(canonical_root: PathBuf, version: String, knobs: Knobs) -> Self {
        let rng = match knobs.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        AppState {
            root: canonical_root,
            metrics: Metrics::new(&version),
            version,
            knobs,
            started: Instant::now(),
            rng: Mutex::new(rng),
        }
    }

    /// Whether this request gets an injected 500, and how long it is delayed first.
    fn draw_faults(&self) -> (bool, Duration) {
        let knobs = &self.knobs;
        if knobs.error_rate == 0.0 && knobs.latency_jitter_ms == 0 {
            // The common case takes no lock.
            return (false, Duration::from_millis(knobs.added_latency_ms));
        }
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        // `gen_bool(1.0)` is always true and `gen_bool(0.0)` always false, exactly.
        let fail = knobs.error_rate > 0.0 && rng.gen_bool(knobs.error_rate);
        let jitter = match knobs.latency_jitter_ms {
            0 => 0,
            max => rng.gen_range(0..=max),
        };
        (
            fail,
            Duration::from_millis(knobs.added_latency_ms.saturating_add(jitter)),
        )
    }
}

/// The app's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/work", get(work))
        .route("/files/{*path}", get(file))
        .route("/healthz", get(healthz))
        .route("/version", get(version))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), traffic))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` completes, then stops accepting, lets
/// in-flight requests (including streaming bodies) finish, and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Applies the injected latency and errors to traffic requests and counts them.
async fn traffic(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if CONTROL_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let arrived = Instant::now();
    let (fail, delay) = state.draw_faults();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = if fail {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected error (error_rate knob)\n",
        )
            .into_response()
    } else {
        next.run(request).await
    };
    state.metrics.observe(response.status(), arrived.elapsed());
    response
}

async fn index(State(state): State<Arc<AppState>>) -> String {
    format!("sample-app {}\n", state.version)
}

#[derive(Debug, Deserialize)]
struct WorkParams {
    #[serde(default)]
    ms: u64,
}

/// A cheap endpoint with a controllable service time: sleeps `ms` milliseconds.
async fn work(Query(params): Query<WorkParams>) -> Response {
    if params.ms > MAX_WORK_MS {
        return (
            StatusCode::BAD_REQUEST,
            format!("ms={} is above the limit of {MAX_WORK_MS}\n", params.ms),
        )
            .into_response();
    }
    tokio::time::sleep(Duration::from_millis(params.ms)).await;
    format!("worked {} ms\n", params.ms).into_response()
}

async fn file(State(state): State<Arc<AppState>>, Path(path): Path<String>) -> Response {
    match files::serve(&state.root, &path).await {
        Ok(response) => response,
        Err(error) => {
            if matches!(error, files::FileError::Io { .. }) {
                tracing::warn!(%error, "file request failed");
            }
            error.into_response()
        }
    }
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.knobs.fail_health {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: the fail_health knob is set\n",
        )
            .into_response()
    } else {
        "ok\n".into_response()
    }
}

async fn version(State(state): State<Arc<AppState>>) -> String {
    format!("{}\n", state.version)
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(state.started.elapsed()),
    )
        .into_response()
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(knobs: Knobs) -> AppState {
        AppState::new(PathBuf::from("/nonexistent"), "t".to_owned(), knobs)
    }

    #[test]
    fn error_rate_zero_and_one_are_exact() {
        let never = state(Knobs::default());
        let always = state(Knobs {
            error_rate: 1.0,
            ..Knobs::default()
        });
        for _ in 0..1000 {
            assert!(!never.draw_faults().0);
            assert!(always.draw_faults().0);
        }
    }

    #[test]
    fn a_seed_repeats_the_sequence_of_choices() {
        let knobs = Knobs {
            error_rate: 0.5,
            latency_jitter_ms: 100,
            added_latency_ms: 10,
            seed: Some(42),
            ..Knobs::default()
        };
        let first = state(knobs.clone());
        let second = state(knobs);
        let a: Vec<_> = (0..64).map(|_| first.draw_faults()).collect();
        let b: Vec<_> = (0..64).map(|_| second.draw_faults()).collect();
        assert_eq!(a, b);
        let failures = a.iter().filter(|(fail, _)| *fail).count();
        assert!((1..64).contains(&failures), "{failures} of 64 at rate 0.5");
        assert!(a
            .iter()
            .all(|(_, d)| (10..=110).contains(&(d.as_millis() as u64))));
    }

    #[test]
    fn fixed_latency_without_jitter_is_exact() {
        let s = state(Knobs {
            added_latency_ms: 25,
            ..Knobs::default()
        });
        assert_eq!(s.draw_faults(), (false, Duration::from_millis(25)));
    }
}
