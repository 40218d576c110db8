//! Who is calling and what they did: the presented token resolved to an [`Identity`], the
//! token endpoints (`/api/tokens*`, create and revoke for `admin` only), the deploy-log
//! endpoint (`GET /api/log`), and [`Audit`], the deploy-log entry every operator request writes.
//!
//! Invariant: an operator request's log entry is written with the request's own writes and
//! made durable by the same flush (its save point); a refused or failed request's entry is
//! flushed before the refusal is sent. Requests without a valid token are not logged: they
//! have no identity, and logging them would let anyone grow the log.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use protocol::{NodeId, UnixSeconds};
use serde::Deserialize;

use super::{ApiError, AppState, Shared};
use crate::api::{TokenCreateRequest, TokenCreated, TokenView};
use crate::db::{Db, DbError, LogEntry};
use crate::token::{self, Identity};
use crate::tokens::{Resolved, TokenStoreError};
use crate::unix_now;

/// Longest target text kept from a request that may be garbage (an invalid name).
const MAX_TARGET_CHARS: usize = 80;

/// The caller's identity for an `Authorization` header: the admin token (compared in constant
/// time), else a named token by the hash of its secret (two point lookups). A missing,
/// unknown or revoked token is a 401 whose message says what to do.
pub(super) fn identify(state: &AppState, header: Option<&str>) -> Result<Identity, ApiError> {
    if state.token.authorizes(header) {
        return Ok(Identity::admin());
    }
    let unauthorized = |message: String| ApiError::new(StatusCode::UNAUTHORIZED, message);
    let Some(secret) = token::bearer(header) else {
        return Err(unauthorized(
            "no API token: send `Authorization: Bearer <token>` (the CLI: --token or COORDINATOR_TOKEN) with the admin token from DATA/admin.token of `coordinator serve`, or a token the admin created with `coordinator token create NAME`".to_owned(),
        ));
    };
    match state.tokens.resolve(secret)? {
        Resolved::Active(identity) => Ok(identity),
        Resolved::Revoked(name) => Err(unauthorized(format!(
            "the API token {name:?} has been revoked; ask the coordinator's admin for a new one (the admin runs `coordinator token create {name}`)"
        ))),
        Resolved::Unknown => Err(unauthorized(
            "unknown API token: use the admin token from DATA/admin.token of `coordinator serve`, or a token the admin created with `coordinator token create NAME`".to_owned(),
        )),
    }
}

/// The deploy-log entry of one operator request, filled in as the request learns what it
/// acts on, and written exactly once: by [`Audit::succeeded`] inside the request's save
/// point, or by [`Audit::finish`] for a request that was refused or failed.
pub(crate) struct Audit {
    who: Identity,
    action: &'static str,
    target: String,
    nodes: Vec<NodeId>,
    logged: bool,
}

impl Audit {
    pub(crate) fn new(who: Identity, action: &'static str) -> Audit {
        Audit {
            who,
            action,
            target: "-".to_owned(),
            nodes: Vec::new(),
            logged: false,
        }
    }

    /// What the request acts on (`web@2`, a token's name), cut to a sane length.
    pub(crate) fn target(&mut self, target: impl std::fmt::Display) {
        let text = target.to_string();
        self.target = if text.chars().count() > MAX_TARGET_CHARS {
            format!(
                "{}…",
                text.chars().take(MAX_TARGET_CHARS - 1).collect::<String>()
            )
        } else {
            text
        };
    }

    pub(crate) fn nodes(&mut self, nodes: &[NodeId]) {
        self.nodes = nodes.to_vec();
    }

    fn append(&mut self, db: &Db, outcome: String) -> Result<LogEntry, DbError> {
        let entry = db.append_log(LogEntry {
            id: 0,
            at: unix_now(),
            who: self.who.0.clone(),
            action: self.action.to_owned(),
            target: self.target.clone(),
            nodes: self.nodes.clone(),
            outcome,
        })?;
        self.logged = true;
        tracing::info!(id = entry.id, who = %entry.who, action = %entry.action, target = %entry.target, nodes = entry.nodes.len(), outcome = %entry.outcome, "deploy log");
        Ok(entry)
    }

    /// Appends the entry of a request that did what it asked: outcome `ok: {detail}`. Call it
    /// with the request's own writes, before the flush that makes them durable. Not durable
    /// until [`Db::flush`].
    pub(crate) fn succeeded(&mut self, db: &Db, detail: &str) -> Result<(), DbError> {
        self.append(db, format!("ok: {detail}"))?;
        Ok(())
    }

    /// Passes the request's answer through. A request that ended in an error before it was
    /// logged is logged here (`refused: …` for a 4xx, `failed: …` otherwise) and flushed
    /// before the error is sent. If that write fails, the error is traced and the request's
    /// own error is still the answer.
    pub(crate) async fn finish<T>(
        mut self,
        db: &Db,
        result: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let Err(error) = result else {
            debug_assert!(self.logged, "{} succeeded without a log entry", self.action);
            return result;
        };
        if self.logged {
            return Err(error);
        }
        let outcome = if error.status.is_client_error() {
            format!("refused: {}", error.message)
        } else {
            format!("failed: {}", error.message)
        };
        let logged = match self.append(db, outcome) {
            Ok(_) => db.flush().await,
            Err(write) => Err(write),
        };
        if let Err(write) = logged {
            tracing::error!(error = %write, action = self.action, who = %self.who, "cannot write the deploy-log entry of a refused request");
        }
        Err(error)
    }
}

fn forbidden_unless_admin(who: &Identity, what: &str) -> Result<(), ApiError> {
    if *who == Identity::admin() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "only the admin may {what}; this request used the token {who:?}; use the admin token from DATA/admin.token of `coordinator serve`",
            who = who.0
        ),
    ))
}

impl From<TokenStoreError> for ApiError {
    fn from(error: TokenStoreError) -> ApiError {
        let status = match &error {
            TokenStoreError::InvalidName(_) | TokenStoreError::Reserved(_) => {
                StatusCode::BAD_REQUEST
            }
            TokenStoreError::Exists(_) | TokenStoreError::AlreadyRevoked { .. } => {
                StatusCode::CONFLICT
            }
            TokenStoreError::NoSuchToken(_) => StatusCode::NOT_FOUND,
            TokenStoreError::Db(db) => return ApiError::internal(db.to_string()),
        };
        ApiError::new(status, error.to_string())
    }
}

/// `POST /api/tokens`: create a named token (admin only); the answer carries its secret, which
/// is stored nowhere.
pub(super) async fn create_token(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let mut audit = Audit::new(who.clone(), "token create");
    let result = async {
        let body = body.map_err(ApiError::body)?;
        let TokenCreateRequest { name } = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("expected {{\"name\": ...}}: {e}")))?;
        audit.target(&name);
        forbidden_unless_admin(&who, "create tokens")?;
        let (record, secret) = state.tokens.create(&name, &who, unix_now())?;
        // Save point: the token's hash and its log entry are durable before the secret is
        // handed out.
        audit.succeeded(&state.db, "created")?;
        state.db.flush().await?;
        Ok((
            StatusCode::CREATED,
            Json(TokenCreated {
                name: record.name,
                secret,
                created_at: record.created_at,
                created_by: record.created_by,
            }),
        ))
    }
    .await;
    audit.finish(&state.db, result).await
}

/// `DELETE /api/tokens/{name}`: revoke a named token (admin only).
pub(super) async fn revoke_token(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let mut audit = Audit::new(who.clone(), "token revoke");
    audit.target(&name);
    let result = async {
        forbidden_unless_admin(&who, "revoke tokens")?;
        if name == Identity::admin().0 {
            return Err(ApiError::bad_request(
                "the admin token cannot be revoked over the API: stop `coordinator serve`, delete DATA/admin.token and start it again to get a new one",
            ));
        }
        let record = state.tokens.revoke(&name, &who, unix_now())?;
        // Save point: the revocation and its log entry are durable before it is confirmed.
        audit.succeeded(&state.db, "revoked")?;
        state.db.flush().await?;
        Ok(Json(TokenView::from(&record)))
    }
    .await;
    audit.finish(&state.db, result).await
}

/// `GET /api/tokens`: every named token, revoked ones included; never a secret.
pub(super) async fn list_tokens(
    State(state): State<Shared>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    Ok(Json(
        state.tokens.list()?.iter().map(TokenView::from).collect(),
    ))
}

#[derive(Deserialize)]
pub(super) struct LogQuery {
    /// Unix seconds, inclusive; absent: the whole log.
    since: Option<UnixSeconds>,
}

/// `GET /api/log?since=SECS`: deploy-log entries at or after `since`, oldest first.
pub(super) async fn read_log(
    State(state): State<Shared>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Json<Vec<LogEntry>>, ApiError> {
    let Query(LogQuery { since }) = query.map_err(|_| {
        ApiError::bad_request("`since` is a time in Unix seconds: GET /api/log?since=SECS")
    })?;
    Ok(Json(state.db.log_since(since.unwrap_or(0))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("db")).expect("open");
        (dir, db)
    }

    fn audit(action: &'static str) -> Audit {
        let mut audit = Audit::new(Identity("alice".into()), action);
        audit.target("web@2");
        audit.nodes(&[NodeId::new("n1").expect("node")]);
        audit
    }

    #[tokio::test]
    async fn a_refused_or_failed_request_is_logged_with_the_reason_it_was_given() {
        let (_dir, db) = db();
        let refused: Result<(), ApiError> = Err(ApiError::new(
            StatusCode::CONFLICT,
            "release web@2 already exists",
        ));
        let answer = audit("release publish").finish(&db, refused).await;
        assert_eq!(
            answer.map_err(|e| (e.status, e.message)),
            Err((StatusCode::CONFLICT, "release web@2 already exists".into()))
        );
        let failed: Result<(), ApiError> = Err(ApiError::internal("disk on fire"));
        let _ = audit("node rollback").finish(&db, failed).await;

        let log = db.log_since(0).expect("log");
        let rows: Vec<(&str, &str, &str, &str, usize)> = log
            .iter()
            .map(|e| {
                (
                    e.who.as_str(),
                    e.action.as_str(),
                    e.target.as_str(),
                    e.outcome.as_str(),
                    e.nodes.len(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "alice",
                    "release publish",
                    "web@2",
                    "refused: release web@2 already exists",
                    1
                ),
                ("alice", "node rollback", "web@2", "failed: disk on fire", 1),
            ]
        );
    }

    #[tokio::test]
    async fn a_request_is_logged_once_even_if_it_fails_after_its_entry_was_written() {
        let (_dir, db) = db();
        let mut audit = audit("node rollback");
        audit.succeeded(&db, "rollback sent").expect("append");
        // E.g. the coordinator shutting down after the flush: the action stands as logged.
        let late: Result<(), ApiError> = Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
        ));
        assert!(audit.finish(&db, late).await.is_err());
        let outcomes: Vec<String> = db
            .log_since(0)
            .expect("log")
            .into_iter()
            .map(|e| e.outcome)
            .collect();
        assert_eq!(outcomes, ["ok: rollback sent"]);
    }

    #[test]
    fn a_long_or_garbage_target_is_cut_to_a_readable_length() {
        let mut audit = Audit::new(Identity::admin(), "token create");
        audit.target("x".repeat(500));
        assert_eq!(audit.target.chars().count(), MAX_TARGET_CHARS);
        assert!(audit.target.ends_with('…'));
    }
}
