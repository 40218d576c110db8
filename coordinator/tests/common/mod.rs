//! Shared by the coordinator's integration tests: `serve` started in-process on ephemeral
//! ports with its embedded broker, an MQTT client standing in for an agent, and a small
//! release tree.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use coordinator::cli::{ClientArgs, ServeArgs};
use coordinator::client::{ApiClient, PublishArgs};
use protocol::messages::{Action, Command, NodeState, Presence, SlotReport};
use protocol::{
    Envelope, Manifest, NodeId, NodeTopic, ReleaseKind, Topics, TrustedKeys, PROTOCOL_VERSION,
};
use rumqttc::{AsyncClient, MqttOptions, Publish, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(15);

pub fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub struct Running {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub token: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
}

pub async fn start(dir: &Path) -> Result<Running> {
    let (http, mqtt) = (free_addr()?, free_addr()?);
    let args = ServeArgs {
        data: dir.join("data"),
        keys: dir.join("keys"),
        broker: "embedded".into(),
        mqtt_listen: mqtt,
        http,
        topic_prefix: "fleet".into(),
        public_url: None,
        metrics_retention: std::time::Duration::from_secs(7 * 86_400),
    };
    let config = coordinator::config::ServeConfig::load(args)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(coordinator::serve::serve(config, async {
        let _ = stopped.await;
    }));
    let token = std::fs::read_to_string(dir.join("data/admin.token"))?
        .trim()
        .to_owned();
    let running = Running {
        http,
        mqtt,
        token,
        stop,
        task,
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while reqwest::Client::new()
        .get(format!("http://{http}/api/nodes"))
        .send()
        .await
        .is_err()
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the HTTP API never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(running)
}

impl Running {
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }

    pub fn client_args(&self) -> ClientArgs {
        ClientArgs {
            server: format!("http://{}", self.http),
            token: Some(self.token.clone()),
        }
    }

    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let response = reqwest::Client::new()
            .get(format!("http://{}{path}", self.http))
            .bearer_auth(&self.token)
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    /// `/api/stats` once `ready` holds for it (within `WAIT`).
    pub async fn wait_for_stats(
        &self,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stats = self.get_json("/api/stats").await?;
            if ready(&stats) {
                return Ok(stats);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "stats never got there: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Posts a JSON body; the status and the JSON answer, whatever the status.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(reqwest::StatusCode, serde_json::Value)> {
        let response = reqwest::Client::new()
            .post(format!("http://{}{path}", self.http))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let body = response
            .json()
            .await
            .with_context(|| format!("POST {path} answered {status} with no JSON"))?;
        Ok((status, body))
    }

    pub async fn rollout(&self, app: &str, version: &str) -> Result<serde_json::Value> {
        let response = reqwest::Client::new()
            .post(format!("http://{}/api/rollouts", self.http))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({"app": app, "version": version}))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "rollout: {}",
            response.status()
        );
        Ok(response.json().await?)
    }
}

/// An MQTT client standing in for an agent.
pub struct FakeNode {
    pub client: AsyncClient,
    pub messages: mpsc::UnboundedReceiver<Publish>,
}

pub async fn fake_node(mqtt: SocketAddr, id: &str, subscribe: &[String]) -> Result<FakeNode> {
    let mut options = MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
    options.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    for topic in subscribe {
        client.subscribe(topic, QoS::AtLeastOnce).await?;
    }
    let (tx, messages) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok(FakeNode { client, messages })
}

impl FakeNode {
    /// Publishes a state report for `state.node`, retained, as an agent does.
    pub async fn report_state(&self, state: &NodeState) -> Result<()> {
        self.client
            .publish(
                Topics::default().node(&state.node, NodeTopic::State),
                QoS::AtLeastOnce,
                true,
                serde_json::to_vec(state)?,
            )
            .await?;
        Ok(())
    }

    /// The next message on `topic` (others are skipped), within [`WAIT`].
    pub async fn next_on(&mut self, topic: &str) -> Result<Publish> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let message = tokio::time::timeout_at(deadline, self.messages.recv())
                .await
                .with_context(|| format!("nothing arrived on {topic}"))?
                .context("the fake node's connection ended")?;
            if message.topic == topic {
                return Ok(message);
            }
        }
    }
}

pub fn node_state(node: &NodeId) -> NodeState {
    NodeState {
        protocol: PROTOCOL_VERSION,
        node: node.clone(),
        labels: [("region".to_owned(), "eu".to_owned())].into(),
        agent_version: "fake".into(),
        current: None,
        previous: None,
        staged: None,
        staging: None,
        last_update: None,
        last_seq: 0,
        reported_at: 1,
    }
}

/// Polls `GET /api/nodes` until `node`'s entry satisfies `ready` (saying `what` if it never
/// does within [`WAIT`]); returns the entry.
pub async fn wait_for(
    running: &Running,
    node: &str,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let nodes = running.get_json("/api/nodes").await?;
        let entry = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node"] == node && ready(n)))
            .cloned();
        if let Some(entry) = entry {
            return Ok(entry);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{node} never {what}: {nodes}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_for_node(running: &Running, node: &str) -> Result<serde_json::Value> {
    wait_for(running, node, "showed up online", |n| {
        n["online"] == true && n["agent_version"] == "fake"
    })
    .await
}

/// A small release tree: a compressible text file and a binary one, several chunks in all.
pub fn release_tree(dir: &Path) -> Result<std::path::PathBuf> {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub"))?;
    std::fs::write(src.join("a.txt"), "alpha\n".repeat(10_000))?;
    std::fs::write(
        src.join("sub/b.bin"),
        (0..200_000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )?;
    Ok(src)
}

pub async fn publish(running: &Running, src: &Path, version: &str, mirrors: &[&str]) -> Result<()> {
    let mirrors: Vec<String> = mirrors.iter().map(|m| m.to_string()).collect();
    let release = PublishArgs {
        src,
        app: "web",
        version,
        kind: ReleaseKind::App,
        mirrors: &mirrors,
    };
    coordinator::client::publish(&ApiClient::new(&running.client_args())?, release, true).await
}

/// A fake node that reports itself online with a state, so rollouts include it.
pub async fn reporting_node(running: &Running, id: &str, subscribe: &[String]) -> Result<FakeNode> {
    reporting_node_with(running, subscribe, node_state(&NodeId::new(id)?)).await
}

/// A fake node that reports itself online with `state` (which names it).
pub async fn reporting_node_with(
    running: &Running,
    subscribe: &[String],
    state: NodeState,
) -> Result<FakeNode> {
    let topics = Topics::default();
    let node_id = state.node.clone();
    let id = node_id.as_str();
    let node = fake_node(running.mqtt, id, subscribe).await?;
    node.client
        .publish(
            topics.node(&node_id, NodeTopic::Presence),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&Presence { online: true })?,
        )
        .await?;
    node.client
        .publish(
            topics.node(&node_id, NodeTopic::State),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&state)?,
        )
        .await?;
    wait_for_node(running, id).await?;
    Ok(node)
}

/// Opens a stage or deploy command (a rollout sends a node `Stage`, then `Deploy` of the same
/// manifest once the node reports it staged) and the manifest it carries, both checked
/// against `trust`.
pub fn open_command(payload: &[u8], trust: &TrustedKeys) -> Result<(Command, Manifest)> {
    let command: Command = Envelope::open_bytes(payload, trust)?;
    let (Action::Deploy { manifest, .. } | Action::Stage { manifest, .. }) = &command.action else {
        bail!(
            "expected a stage or deploy command, got {:?}",
            command.action
        );
    };
    let manifest: Manifest = manifest.open(trust)?;
    Ok((command, manifest))
}

/// `state` as the node reports it once it has accepted `command` (a `Stage`) and holds the
/// release staged, so the rollout goes on to `Deploy`.
pub fn staged_state(mut state: NodeState, command: &Command, manifest: &Manifest) -> NodeState {
    state.last_seq = command.seq;
    state.staged = Some(SlotReport {
        release: manifest.release_id(),
        manifest_digest: protocol::Digest::of(b"staged"),
        slot_dir: "slots/staged".into(),
    });
    state
}

/// The coordinator's trust file, as agents are given it.
pub fn trust(dir: &Path) -> Result<TrustedKeys> {
    Ok(TrustedKeys::from_json(&std::fs::read(
        dir.join("keys/trust.json"),
    )?)?)
}
