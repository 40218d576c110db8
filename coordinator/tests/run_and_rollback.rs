//! A release's `release.toml` at publish (its `[run]` section signed into the manifest, or
//! the publish refused naming the file and the field with nothing uploaded), and per-node
//! rollback (`POST /api/nodes/rollback`): a signed, retained command above every earlier seq,
//! all or nothing, with the node's report of the outcome shown in the inventory.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use coordinator::client::ApiClient;
use protocol::messages::{Action, Command, NodeState, Outcome, SlotReport, UpdateReport};
use protocol::{
    AppName, Digest, Envelope, NodeId, NodeTopic, ReleaseId, Topics, TrustedKeys, Version,
};
use reqwest::StatusCode;
use serde_json::json;

use common::{
    fake_node, node_state, open_command, publish, release_tree, reporting_node,
    reporting_node_with, start, trust, wait_for, Running,
};

const RELEASE_TOML: &str = r#"
[run]
command = "bin/app"
args = ["--greeting", "hello"]
env = { RUST_LOG = "info" }
probation_secs = 3
[run.health]
http = "/healthz"
[run.front_door]
listen = "0.0.0.0:8080"
"#;

/// The release tree plus an executable `bin/app` and `release.toml` with `toml`.
fn runnable_tree(dir: &Path, toml: &str) -> Result<PathBuf> {
    let src = release_tree(dir)?;
    std::fs::create_dir_all(src.join("bin"))?;
    let app = src.join("bin/app");
    std::fs::write(&app, "#!/bin/sh\nexec sleep 1000\n")?;
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(src.join("release.toml"), toml)?;
    Ok(src)
}

fn web(version: &str) -> Result<ReleaseId> {
    Ok(ReleaseId::new(AppName::new("web")?, Version::new(version)?))
}

fn slot(version: &str) -> Result<SlotReport> {
    Ok(SlotReport {
        release: web(version)?,
        manifest_digest: Digest::of(version.as_bytes()),
        slot_dir: format!("/var/lib/fleet/slots/web-{version}"),
    })
}

/// A node's report: running web@2 with web@1 as its previous version.
fn state_with_previous(id: &str) -> Result<NodeState> {
    let mut state = node_state(&NodeId::new(id)?);
    state.current = Some(slot("2")?);
    state.previous = Some(slot("1")?);
    Ok(state)
}

fn command_topic(id: &str) -> Result<String> {
    Ok(Topics::default().node(&NodeId::new(id)?, NodeTopic::Command))
}

fn open_plain_command(payload: &[u8], trust: &TrustedKeys) -> Result<Command> {
    Ok(Envelope::open_bytes(payload, trust)?)
}

async fn rollback(running: &Running, nodes: &[&str]) -> Result<(StatusCode, serde_json::Value)> {
    running
        .post_json("/api/nodes/rollback", &json!({ "nodes": nodes }))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_section_of_release_toml_is_signed_into_the_manifest_nodes_receive() -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let trust = trust(dir.path())?;
    let src = runnable_tree(dir.path(), RELEASE_TOML)?;
    let running = start(dir.path()).await?;
    publish(&running, &src, "1", &[]).await?;

    let releases = running.get_json("/api/releases").await?;
    assert_eq!(releases[0]["run"]["command"], "bin/app", "{releases}");
    assert_eq!(
        releases[0]["run"]["front_door"]["listen"], "0.0.0.0:8080",
        "{releases}"
    );

    let topic = command_topic("n1")?;
    let mut node = reporting_node(&running, "n1", std::slice::from_ref(&topic)).await?;
    running.rollout("web", "1").await?;
    let (_, manifest) = open_command(&node.next_on(&topic).await?.payload, &trust)?;
    let expected = coordinator::release_file::parse(Path::new("release.toml"), RELEASE_TOML)?.run;
    assert!(expected.is_some());
    assert_eq!(manifest.run, expected);
    assert!(
        manifest
            .entries
            .iter()
            .any(|e| e.path().as_str() == "release.toml"),
        "release.toml does not ship as a file of the release"
    );

    // The API itself refuses a run command the release does not ship, whatever the client.
    let mut broken = manifest.clone();
    broken.version = Version::new("2")?;
    if let Some(run) = broken.run.as_mut() {
        run.command = "bin/ap".into();
    }
    let (status, body) = running
        .post_json("/api/releases", &json!({ "manifest": broken }))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let error = body["error"].as_str().context("an error message")?;
    assert!(
        error.contains("web@2") && error.contains("run.command \"bin/ap\" is not a file"),
        "{error}"
    );
    running.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_release_toml_is_refused_naming_the_file_and_field_before_anything_is_uploaded(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let running = start(dir.path()).await?;
    let door = "[run.front_door]\nlisten = \"0.0.0.0:8080\"\n";
    let cases = [
        (
            format!("[run]\ncommand = \"bin/app\"\n[run.health]\nhttp = \"/h\"\ntcp = true\n{door}"),
            "release.toml: run.health: choose at most one of http, tcp and command",
        ),
        (
            format!("[run]\ncommand = \"bin/app\"\nprobaton_secs = 5\n{door}"),
            "release.toml: run.probaton_secs: unknown field `probaton_secs`",
        ),
        (
            format!("[run]\ncommand = \"bin/app\"\nprobation_secs = \"ten\"\n{door}"),
            "release.toml: run.probation_secs: invalid type: string \"ten\", expected u32 (line 3, column 18)",
        ),
        (
            format!("[run]\ncommand = \"bin/missing\"\n{door}"),
            "release.toml: run.command \"bin/missing\" is not a file of the release",
        ),
    ];
    for (i, (toml, expected)) in cases.iter().enumerate() {
        let case_dir = dir.path().join(format!("case{i}"));
        let src = runnable_tree(&case_dir, toml)?;
        let error = match publish(&running, &src, "1", &[]).await {
            Ok(()) => bail!("published with release.toml:\n{toml}"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(expected), "{error}");
        assert!(
            error.starts_with(&src.join("release.toml").display().to_string()),
            "{error}"
        );
    }
    let releases = running.get_json("/api/releases").await?;
    assert_eq!(releases, json!([]));
    let stored = images::ChunkStore::open(dir.path().join("data/chunks"))?.digests()?;
    assert!(stored.is_empty(), "{} chunks were uploaded", stored.len());
    running.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rollback_is_a_signed_retained_command_above_every_earlier_seq_and_a_later_rollout_goes_above_it(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let trust = trust(dir.path())?;
    let src = release_tree(dir.path())?;
    let running = start(dir.path()).await?;
    publish(&running, &src, "1", &[]).await?;
    let topic = command_topic("n1")?;
    let mut node = reporting_node_with(
        &running,
        std::slice::from_ref(&topic),
        state_with_previous("n1")?,
    )
    .await?;

    running.rollout("web", "1").await?;
    let (deploy, _) = open_command(&node.next_on(&topic).await?.payload, &trust)?;

    let (status, body) = rollback(&running, &["n1"]).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "nodes": [{
            "node": "n1",
            "seq": deploy.seq + 1,
            "from": { "app": "web", "version": "2" },
            "to": { "app": "web", "version": "1" },
        }]})
    );
    let command = open_plain_command(&node.next_on(&topic).await?.payload, &trust)?;
    assert_eq!(command.action, Action::Rollback {});
    assert_eq!((command.node.as_str(), command.seq), ("n1", deploy.seq + 1));
    assert!(command.expires_at > command.issued_at);
    // Retained: a node connecting now (or after a broker restart) finds it waiting.
    let mut late = fake_node(running.mqtt, "n1-late", std::slice::from_ref(&topic)).await?;
    let message = late.next_on(&topic).await?;
    assert!(message.retain, "the rollback command is not retained");
    assert_eq!(open_plain_command(&message.payload, &trust)?, command);

    // The node reports the outcome; the inventory shows it with the app's output.
    let mut after = state_with_previous("n1")?;
    after.current = Some(slot("1")?);
    after.previous = Some(slot("2")?);
    after.last_seq = command.seq;
    after.last_update = Some(UpdateReport {
        release: web("1")?,
        bytes_fetched_mqtt: 0,
        bytes_fetched_http: 0,
        bytes_reused: 0,
        chunks_fetched: 0,
        chunks_rejected: 0,
        staging_ms: 0,
        switch_ms: 3,
        outcome: Outcome::RolledBack {
            reason: "asked by an operator".into(),
        },
        finished_at: 2,
        app_output: vec!["web 2: listening on 127.0.0.1:41000".into()],
    });
    node.report_state(&after).await?;
    let entry = wait_for(&running, "n1", "reported its rollback", |n| {
        n["last_update"]["outcome"]["result"] == "rolled_back"
    })
    .await?;
    assert_eq!(entry["last_update"]["switch_ms"], 3, "{entry}");
    assert_eq!(
        entry["last_update"]["outcome"]["reason"],
        "asked by an operator"
    );
    assert_eq!(
        entry["last_update"]["app_output"],
        json!(["web 2: listening on 127.0.0.1:41000"])
    );
    assert_eq!(entry["current"]["release"]["version"], "1", "{entry}");

    // A later rollout supersedes the rollback: its first command has a higher seq. (The
    // first rollout left n1 alone once it accepted the operator's rollback, and so ended.)
    publish(&running, &src, "3", &[]).await?;
    running.rollout("web", "3").await?;
    let (redeploy, manifest) = open_command(&node.next_on(&topic).await?.payload, &trust)?;
    assert_eq!(redeploy.seq, command.seq + 1);
    assert_eq!(manifest.release_id(), web("3")?);
    let first = running.get_json("/api/rollouts/1").await?;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(first["nodes"][0]["phase"], "overridden", "{first}");

    // The CLI's path: the client call succeeds and the next command is a rollback again.
    let client = ApiClient::new(&running.client_args())?;
    coordinator::client::node_rollback(&client, &["n1".to_owned()], false).await?;
    let again = open_plain_command(&node.next_on(&topic).await?.payload, &trust)?;
    assert_eq!(
        (again.action, again.seq),
        (Action::Rollback {}, redeploy.seq + 1)
    );
    running.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_naming_an_unknown_node_or_one_without_a_previous_version_sends_nothing(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let trust = trust(dir.path())?;
    let running = start(dir.path()).await?;
    let topic = command_topic("n1")?;
    let mut n1 = reporting_node_with(
        &running,
        std::slice::from_ref(&topic),
        state_with_previous("n1")?,
    )
    .await?;
    let _n2 = reporting_node(&running, "n2", &[]).await?;

    let (status, body) = rollback(&running, &["n1", "n9"]).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let error = body["error"].as_str().context("an error message")?;
    assert!(error.contains("n9 is not in the inventory"), "{error}");
    assert!(
        error.contains("; no rollback was sent to any node"),
        "{error}"
    );

    let (status, body) = rollback(&running, &["n1", "n2"]).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let error = body["error"].as_str().context("an error message")?;
    assert!(
        error.starts_with("n2 has no previous version to roll back to"),
        "{error}"
    );

    let (status, _) = rollback(&running, &[]).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = rollback(&running, &["n1", "../n1"]).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].to_string().contains("../n1"), "{body}");

    let client = ApiClient::new(&running.client_args())?;
    let refused = coordinator::client::node_rollback(&client, &["n2".to_owned()], false).await;
    let error = format!("{:#}", refused.expect_err("n2 has nothing to go back to"));
    assert!(
        error.contains("n2 has no previous version to roll back to") && error.contains("HTTP 409"),
        "{error}"
    );

    // Nothing was sent and no seq was used: n1, subscribed all along, receives as its first
    // command the first rollback that is accepted, with the first seq.
    let (status, body) = rollback(&running, &["n1"]).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let command = open_plain_command(&n1.next_on(&topic).await?.payload, &trust)?;
    assert_eq!((command.action, command.seq), (Action::Rollback {}, 1));
    running.stop().await
}
