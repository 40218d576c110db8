//! Rollout requests the coordinator refuses before anything starts (a release that does not
//! exist, no node reported, a selection that matches nothing, waves that do not add up, a
//! second rollout for nodes a running one holds), each with its reason, nothing written
//! but the deploy-log entry of the refusal; the first wave's stage commands of one it
//! accepts; and a node that first reports after a rollout succeeded getting its release
//! (the fleet target) once.

mod common;

use anyhow::{Context as _, Result};
use protocol::messages::Action;
use protocol::{NodeId, NodeTopic, Topics};
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::{
    node_state, open_command, publish, release_tree, reporting_node_with, start, trust, Running,
};

async fn start_rollout(running: &Running, body: Value) -> Result<(StatusCode, Value)> {
    running.post_json("/api/rollouts", &body).await
}

fn error(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_cannot_start_is_refused_with_its_reason_and_nothing_starts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let trust = trust(dir.path())?;
    let src = release_tree(dir.path())?;
    let running = start(dir.path()).await?;
    publish(&running, &src, "1", &[]).await?;

    let (status, body) = start_rollout(&running, json!({"app": "web", "version": "1"})).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        error(&body).starts_with("no nodes have reported yet"),
        "{body}"
    );

    let topics = Topics::default();
    let mut nodes = Vec::new();
    for (id, region) in [("n1", "eu"), ("n2", "eu"), ("n3", "us")] {
        let node = NodeId::new(id)?;
        let mut state = node_state(&node);
        state.labels = [("region".to_owned(), region.to_owned())].into();
        let topic = topics.node(&node, NodeTopic::Command);
        nodes.push((
            topic.clone(),
            reporting_node_with(&running, &[topic], state).await?,
        ));
    }

    let refusals = [
        (
            json!({"app": "web", "version": "9"}),
            StatusCode::NOT_FOUND,
            "release web@9 does not exist; publish it first",
        ),
        (
            json!({"app": "web", "version": "1", "select": {"region": "mars", "ring": "canary"}}),
            StatusCode::CONFLICT,
            "no node matches the selection region=mars,ring=canary: region=mars matches no node (region has: eu, us); ring=canary matches no node (no node has the label ring)",
        ),
        (
            json!({"app": "web", "version": "1", "plan": {"waves": ["1", "50%"]}}),
            StatusCode::BAD_REQUEST,
            "the last wave is 50%, not 100%",
        ),
        (
            json!({"app": "web", "version": "1", "plan": {"waves": ["30%", "10%", "100%"]}}),
            StatusCode::BAD_REQUEST,
            "waves must increase: 10% comes after 30%",
        ),
        (
            json!({"app": "web", "version": "1", "select": {"region": "eu"}, "plan": {"waves": ["5", "100%"]}}),
            StatusCode::BAD_REQUEST,
            "wave 1 asks for 5 nodes but the selection has 2",
        ),
        (
            json!({"app": "web", "version": "1", "plan": {"wave": ["100%"]}}),
            StatusCode::BAD_REQUEST,
            "unknown field `wave`",
        ),
    ];
    for (request, expected_status, expected) in &refusals {
        let (status, body) = start_rollout(&running, request.clone()).await?;
        assert_eq!(status, *expected_status, "{request}: {body}");
        assert!(error(&body).contains(expected), "{request}: {body}");
    }
    assert_eq!(running.get_json("/api/rollouts").await?, json!([]));

    // One running rollout per node: the second, for all nodes, names the first and its nodes.
    let (status, first) = start_rollout(
        &running,
        json!({"app": "web", "version": "1", "select": {"region": "eu"}}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["nodes"], json!(["n1", "n2"]), "{first}");
    let (status, body) = start_rollout(&running, json!({"app": "web", "version": "1"})).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        error(&body).starts_with("rollout 1 (web@1, running) holds n1, n2;"),
        "{body}"
    );
    // Nodes it does not hold are free.
    let (status, other) = start_rollout(
        &running,
        json!({"app": "web", "version": "1", "select": {"region": "us"}}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{other}");

    // The accepted ones sent their first (and only) wave a stage command, nothing else.
    for (topic, node) in &mut nodes {
        let (command, manifest) = open_command(&node.next_on(topic).await?.payload, &trust)?;
        assert!(
            matches!(command.action, Action::Stage { .. }),
            "{:?}",
            command.action
        );
        assert_eq!(manifest.release_id().to_string(), "web@1");
    }

    // Every refusal is in the deploy log, by whom and why.
    let log = running.get_json("/api/log").await?;
    let refused: Vec<&Value> = log
        .as_array()
        .context("a list")?
        .iter()
        .filter(|e| e["action"] == "rollout start")
        .filter(|e| {
            e["outcome"]
                .as_str()
                .is_some_and(|o| o.starts_with("refused: "))
        })
        .collect();
    assert_eq!(refused.len(), refusals.len() + 2, "{log:#}");
    assert!(refused.iter().all(|e| e["who"] == "admin"), "{log:#}");
    running.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_first_reports_after_a_rollout_succeeded_gets_its_release_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let trust = trust(dir.path())?;
    let src = release_tree(dir.path())?;
    let running = start(dir.path()).await?;
    publish(&running, &src, "1", &[]).await?;
    let topics = Topics::default();

    // n1 takes the release the way an agent does: staged, then switched.
    let n1 = NodeId::new("n1")?;
    let n1_topic = topics.node(&n1, NodeTopic::Command);
    let mut node1 =
        reporting_node_with(&running, std::slice::from_ref(&n1_topic), node_state(&n1)).await?;
    let (status, _) = start_rollout(&running, json!({"app": "web", "version": "1"})).await?;
    assert_eq!(status, StatusCode::CREATED);
    let (stage, manifest) = open_command(&node1.next_on(&n1_topic).await?.payload, &trust)?;
    let staged = common::staged_state(node_state(&n1), &stage, &manifest);
    node1.report_state(&staged).await?;
    let (deploy, _) = open_command(&node1.next_on(&n1_topic).await?.payload, &trust)?;
    assert!(matches!(deploy.action, Action::Deploy { .. }));
    node1
        .report_state(&running_state(staged, deploy.seq, &manifest))
        .await?;
    wait_rollout(&running, 1, |r| r["status"] == "succeeded").await?;

    // n2 appears afterwards: the rollout's release is the fleet target, sent once.
    let n2 = NodeId::new("n2")?;
    let n2_topic = topics.node(&n2, NodeTopic::Command);
    let mut node2 =
        reporting_node_with(&running, std::slice::from_ref(&n2_topic), node_state(&n2)).await?;
    let (late, _) = open_command(&node2.next_on(&n2_topic).await?.payload, &trust)?;
    assert!(
        matches!(late.action, Action::Deploy { .. }),
        "a late node is deployed directly: {:?}",
        late.action
    );
    assert!(late.seq > deploy.seq);
    node2
        .report_state(&running_state(node_state(&n2), late.seq, &manifest))
        .await?;
    let rollout = wait_rollout(&running, 1, |r| r["late"]["switched"] == 1).await?;
    assert_eq!(rollout["status"], "succeeded", "{rollout}");
    let log = running.get_json("/api/log").await?;
    let entry = log
        .as_array()
        .context("a list")?
        .iter()
        .find(|e| e["action"] == "fleet target")
        .with_context(|| format!("no fleet-target entry: {log:#}"))?;
    assert_eq!(entry["nodes"], json!(["n2"]), "{entry}");
    assert_eq!(entry["who"], "coordinator");
    assert_eq!(entry["target"], "rollout 1");
    running.stop().await
}

/// `state` once the node runs the manifest's release, having accepted command `seq`.
fn running_state(
    mut state: protocol::messages::NodeState,
    seq: u64,
    manifest: &protocol::Manifest,
) -> protocol::messages::NodeState {
    state.last_seq = seq;
    state.staged = None;
    state.current = Some(protocol::messages::SlotReport {
        release: manifest.release_id(),
        manifest_digest: protocol::Digest::of(b"current"),
        slot_dir: "slots/current".into(),
    });
    state
}

/// Polls `GET /api/rollouts/{id}` until `ready` holds.
async fn wait_rollout(running: &Running, id: u64, ready: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let rollout = running.get_json(&format!("/api/rollouts/{id}")).await?;
        if ready(&rollout) {
            return Ok(rollout);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "rollout {id} never got there: {rollout:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
