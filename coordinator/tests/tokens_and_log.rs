//! Operator tokens as separate identities and the deploy log: the admin creates a named token,
//! its holder's actions (done or refused) are logged under its name, in order, by
//! `coordinator log`; only the admin manages tokens; a revoked, unknown or absent token is
//! refused with a message that says what to do.

mod common;

use std::path::Path;

use anyhow::{bail, ensure, Context as _, Result};
use coordinator::cli::ClientArgs;
use coordinator::client::{ApiClient, PublishArgs};
use protocol::messages::SlotReport;
use protocol::{AppName, Digest, NodeId, ReleaseId, ReleaseKind, Version};
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::{node_state, release_tree, reporting_node_with, start, Running};

/// Runs the `coordinator` binary against `running` with `token`; its stdout, or an error with
/// its stderr.
async fn cli(running: &Running, token: &str, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .env_remove("COORDINATOR_TOKEN")
        .args(["--server", &format!("http://{}", running.http)])
        .args(["--token", token])
        .args(args)
        .output()
        .await
        .context("cannot run the coordinator binary")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("coordinator {args:?} failed ({}): {stderr}", output.status);
    }
    Ok(String::from_utf8(output.stdout)?)
}

async fn cli_json(running: &Running, token: &str, args: &[&str]) -> Result<Value> {
    let stdout = cli(running, token, args).await?;
    serde_json::from_str(&stdout).with_context(|| format!("{args:?} printed no JSON: {stdout}"))
}

/// A request with `token` (none if `None`): its status and JSON body.
async fn request(
    running: &Running,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let mut request =
        reqwest::Client::new().request(method, format!("http://{}{path}", running.http));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    let body = response
        .json()
        .await
        .with_context(|| format!("{path} answered {status} with no JSON"))?;
    Ok((status, body))
}

async fn publish_as(
    running: &Running,
    token: &str,
    src: &Path,
    version: &str,
    mirrors: &[String],
) -> Result<()> {
    let client = ApiClient::new(&ClientArgs {
        server: format!("http://{}", running.http),
        token: Some(token.to_owned()),
    })?;
    let release = PublishArgs {
        src,
        app: "web",
        version,
        kind: ReleaseKind::App,
        mirrors,
    };
    coordinator::client::publish(&client, release, true).await
}

fn slot(version: &str) -> Result<SlotReport> {
    Ok(SlotReport {
        release: ReleaseId::new(AppName::new("web")?, Version::new(version)?),
        manifest_digest: Digest::of(version.as_bytes()),
        slot_dir: format!("/var/lib/fleet/slots/web-{version}"),
    })
}

/// `(who, action, target, nodes joined by ",", outcome)` of a log entry.
type Row = (String, String, String, String, String);

/// The rows of each entry, in log order; the ids must grow.
fn log_rows(log: &Value) -> Result<Vec<Row>> {
    let entries = log.as_array().context("the log is a JSON array")?;
    let ids: Vec<u64> = entries.iter().filter_map(|e| e["id"].as_u64()).collect();
    ensure!(
        ids.len() == entries.len() && ids.windows(2).all(|w| w[0] < w[1]),
        "log ids not increasing: {ids:?}"
    );
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    Ok(entries
        .iter()
        .map(|e| {
            let nodes: Vec<String> = e["nodes"]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default();
            (
                text(&e["who"]),
                text(&e["action"]),
                text(&e["target"]),
                nodes.join(","),
                text(&e["outcome"]),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_token_acts_as_its_own_identity_in_the_deploy_log_and_only_the_admin_manages_tokens(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let src = release_tree(dir.path())?;
    let running = start(dir.path()).await?;
    let admin = running.token.clone();

    // The admin creates alice's token; the secret is printed once and never listed.
    let created = cli_json(&running, &admin, &["token", "create", "alice", "--json"]).await?;
    let alice = created["secret"]
        .as_str()
        .context("the secret is printed")?
        .to_owned();
    assert_eq!(
        (&created["name"], &created["created_by"]),
        (&json!("alice"), &json!("admin"))
    );
    let listed = cli(&running, &alice, &["token", "list", "--json"]).await?;
    assert!(
        !listed.contains(&alice),
        "the list shows the secret: {listed}"
    );
    let listed: Value = serde_json::from_str(&listed)?;
    assert_eq!(listed[0]["name"], "alice", "{listed}");
    assert_eq!(listed[0]["revoked_at"], Value::Null, "{listed}");

    // Alice publishes, publishes again with a mirror, and tries other content as the same version.
    publish_as(&running, &alice, &src, "1", &[]).await?;
    publish_as(&running, &alice, &src, "1", &["https://cdn.example".into()]).await?;
    std::fs::write(src.join("a.txt"), "changed\n")?;
    let refused = publish_as(&running, &alice, &src, "1", &[])
        .await
        .expect_err("different content under the same version was published");
    assert!(format!("{refused:#}").contains("immutable"), "{refused:#}");

    // Alice rolls back an unknown node (refused, nothing sent), then one that can go back.
    let mut state = node_state(&NodeId::new("n1")?);
    state.current = Some(slot("2")?);
    state.previous = Some(slot("1")?);
    let _node = reporting_node_with(&running, &[], state).await?;
    let rollback = |nodes: Value| {
        request(
            &running,
            reqwest::Method::POST,
            "/api/nodes/rollback",
            Some(&alice),
            Some(json!({ "nodes": nodes })),
        )
    };
    let (status, body) = rollback(json!(["n1", "ghost"])).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = rollback(json!(["n1"])).await?;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Alice may not manage tokens.
    let (status, body) = request(
        &running,
        reqwest::Method::POST,
        "/api/tokens",
        Some(&alice),
        Some(json!({ "name": "mallory" })),
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("only the admin may create tokens")),
        "{body}"
    );
    let error = cli(&running, &alice, &["token", "revoke", "alice"])
        .await
        .expect_err("alice revoked a token");
    assert!(error.to_string().contains("HTTP 403"), "{error:#}");

    // The log, read with alice's own token, shows everything in order, each under its identity.
    let log = cli_json(&running, &alice, &["log", "--json"]).await?;
    let rows = log_rows(&log)?;
    let expected = [
        ("admin", "token create", "alice", "", "ok: created"),
        ("alice", "release publish", "web@1", "", "ok: new release"),
        (
            "alice",
            "release publish",
            "web@1",
            "",
            "ok: mirror list replaced",
        ),
        (
            "alice",
            "release publish",
            "web@1",
            "",
            "refused: release web@1 already exists with different content",
        ),
        (
            "alice",
            "node rollback",
            "previous version",
            "n1,ghost",
            "refused: ",
        ),
        ("alice", "node rollback", "web@1", "n1", "ok: rollback sent"),
        (
            "alice",
            "token create",
            "mallory",
            "",
            "refused: only the admin may create tokens",
        ),
        (
            "alice",
            "token revoke",
            "alice",
            "",
            "refused: only the admin may revoke tokens",
        ),
    ];
    assert_eq!(rows.len(), expected.len(), "{log:#}");
    for (row, (who, action, target, nodes, outcome)) in rows.iter().zip(expected) {
        assert_eq!(
            (
                row.0.as_str(),
                row.1.as_str(),
                row.2.as_str(),
                row.3.as_str()
            ),
            (who, action, target, nodes),
            "{log:#}"
        );
        assert!(row.4.starts_with(outcome), "{} is not {outcome}…", row.4);
    }
    assert!(
        rows[4].4.contains("ghost"),
        "the refusal gives no reason: {}",
        rows[4].4
    );

    // The table names the same entries; --since narrows the log by time.
    let table = cli(&running, &alice, &["log", "--since", "1h"]).await?;
    assert!(table.starts_with("TIME (UTC)"), "{table}");
    assert_eq!(table.lines().count(), 1 + expected.len(), "{table}");
    let (status, future) = request(
        &running,
        reqwest::Method::GET,
        "/api/log?since=99999999999",
        Some(&alice),
        None,
    )
    .await?;
    assert_eq!((status, future), (StatusCode::OK, json!([])));

    // Revoked: alice is refused with a message saying so; a wrong or absent token too.
    cli(&running, &admin, &["token", "revoke", "alice"]).await?;
    let (status, body) = request(
        &running,
        reqwest::Method::GET,
        "/api/nodes",
        Some(&alice),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("revoked")),
        "{body}"
    );
    let error = cli(&running, &alice, &["log"])
        .await
        .expect_err("a revoked token read the log");
    assert!(
        error.to_string().contains("\"alice\" has been revoked"),
        "{error:#}"
    );
    for token in [None, Some("not-a-token")] {
        let (status, body) =
            request(&running, reqwest::Method::GET, "/api/log", token, None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("coordinator token create")),
            "{body}"
        );
    }

    let log = cli_json(&running, &admin, &["log", "--json"]).await?;
    let last = log_rows(&log)?.pop().context("an entry")?;
    assert_eq!(
        last,
        (
            "admin".into(),
            "token revoke".into(),
            "alice".into(),
            String::new(),
            "ok: revoked".into()
        )
    );
    assert_eq!(
        log_rows(&log)?.len(),
        expected.len() + 1,
        "refused 401s are not logged"
    );
    running.stop().await
}
