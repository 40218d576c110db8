//! `serve` in one process with its embedded broker, and a fake node speaking MQTT: the
//! release path through the coordinator (publish, inventory, rollout, signed retained
//! command, chunk frames over MQTT and HTTP), and the retained command coming back after a
//! restart onto an empty broker.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use coordinator::cli::{ClientArgs, ServeArgs};
use protocol::messages::{Action, ChunkFrame, ChunkRequest, Command, NodeState, Presence};
use protocol::{
    AppName, Digest, Envelope, Manifest, NodeId, NodeTopic, ReleaseId, ReleaseKind, Topics,
    TrustedKeys, Version, PROTOCOL_VERSION,
};
use rumqttc::{AsyncClient, MqttOptions, Publish, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(15);

fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

struct Running {
    http: SocketAddr,
    mqtt: SocketAddr,
    token: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
}

async fn start(dir: &Path) -> Result<Running> {
    let (http, mqtt) = (free_addr()?, free_addr()?);
    let args = ServeArgs {
        data: dir.join("data"),
        keys: dir.join("keys"),
        broker: "embedded".into(),
        mqtt_listen: mqtt,
        http,
        topic_prefix: "fleet".into(),
        public_url: None,
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
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }

    fn client_args(&self) -> ClientArgs {
        ClientArgs {
            server: format!("http://{}", self.http),
            token: Some(self.token.clone()),
        }
    }

    async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
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

    async fn rollout(&self, app: &str, version: &str) -> Result<serde_json::Value> {
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
struct FakeNode {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<Publish>,
}

async fn fake_node(mqtt: SocketAddr, id: &str, subscribe: &[String]) -> Result<FakeNode> {
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
    async fn next_on(&mut self, topic: &str) -> Result<Publish> {
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

fn node_state(node: &NodeId) -> NodeState {
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

async fn wait_for_node(running: &Running, node: &str) -> Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let nodes = running.get_json("/api/nodes").await?;
        let entry = nodes
            .as_array()
            .and_then(|a| {
                a.iter().find(|n| {
                    n["node"] == node && n["online"] == true && n["agent_version"] == "fake"
                })
            })
            .cloned();
        if let Some(entry) = entry {
            return Ok(entry);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{node} never showed up online: {nodes}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn open_command(payload: &[u8], trust: &TrustedKeys) -> Result<(Command, Manifest)> {
    let command: Command = Envelope::open_bytes(payload, trust)?;
    let Action::Deploy { manifest, .. } = &command.action;
    let manifest: Manifest = manifest.open(trust)?;
    Ok((command, manifest))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_reaches_a_node_as_a_signed_command_and_chunk_frames_and_survives_a_restart(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let trust = TrustedKeys::from_json(&std::fs::read(dir.path().join("keys/trust.json"))?)?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub"))?;
    std::fs::write(src.join("a.txt"), "alpha\n".repeat(10_000))?;
    std::fs::write(
        src.join("sub/b.bin"),
        (0..200_000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )?;

    let topics = Topics::default();
    let n1 = NodeId::new("n1")?;
    let release = ReleaseId::new(AppName::new("web")?, Version::new("1")?);
    let running = start(dir.path()).await?;

    let client = coordinator::client::ApiClient::new(&running.client_args())?;
    coordinator::client::publish(&client, &src, "web", "1", ReleaseKind::App, true).await?;

    let command_topic = topics.node(&n1, NodeTopic::Command);
    let chunk_topic = topics.chunks(&release);
    let mut node = fake_node(
        running.mqtt,
        "n1",
        &[command_topic.clone(), chunk_topic.clone()],
    )
    .await?;
    let presence = serde_json::to_vec(&Presence { online: true })?;
    node.client
        .publish(
            topics.node(&n1, NodeTopic::Presence),
            QoS::AtLeastOnce,
            true,
            presence,
        )
        .await?;
    node.client
        .publish(
            topics.node(&n1, NodeTopic::State),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&node_state(&n1))?,
        )
        .await?;
    let entry = wait_for_node(&running, "n1").await?;
    assert_eq!(entry["labels"]["region"], "eu");

    let rollout = running.rollout("web", "1").await?;
    assert_eq!(rollout["nodes"], serde_json::json!(["n1"]));
    let message = node.next_on(&command_topic).await?;
    let (command, manifest) = open_command(&message.payload, &trust)?;
    assert_eq!((command.node.as_str(), command.seq), ("n1", 1));
    assert!(command.expires_at > command.issued_at);
    let Action::Deploy { http_sources, .. } = &command.action;
    assert_eq!(http_sources, &vec![format!("http://{}", running.http)]);
    assert_eq!(manifest.release_id(), release);

    // Ask for every chunk plus one the release does not list: only the listed ones come.
    let mut wanted: Vec<Digest> = manifest.chunks().map(|c| c.digest).collect();
    wanted.sort();
    wanted.dedup();
    let mut digests = wanted.clone();
    digests.push(Digest::of(b"not in the release"));
    let request = ChunkRequest {
        protocol: PROTOCOL_VERSION,
        release: release.clone(),
        digests,
    };
    node.client
        .publish(
            topics.node(&n1, NodeTopic::ChunkRequests),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&request)?,
        )
        .await?;
    let mut got = Vec::new();
    while got.len() < wanted.len() {
        let message = node.next_on(&chunk_topic).await?;
        let frame = ChunkFrame::decode(&message.payload)?;
        let chunk = manifest
            .chunks()
            .find(|c| c.digest == frame.digest)
            .with_context(|| {
                format!(
                    "a frame for {} which the release does not list",
                    frame.digest
                )
            })?;
        images::chunk::decompress_verified(chunk, frame.compressed)?;
        let over_http =
            reqwest::get(format!("http://{}/chunks/{}", running.http, frame.digest)).await?;
        ensure!(
            over_http.status().is_success(),
            "GET /chunks: {}",
            over_http.status()
        );
        assert_eq!(over_http.bytes().await?.as_ref(), frame.compressed);
        got.push(frame.digest);
    }
    got.sort();
    assert_eq!(got, wanted);

    let unauthorized = reqwest::get(format!("http://{}/api/nodes", running.http)).await?;
    assert_eq!(unauthorized.status(), reqwest::StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = unauthorized.json().await?;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("admin.token")),
        "{body}"
    );

    running.stop().await?;

    // A fresh (empty) broker: the coordinator republishes the retained command on connect,
    // and the next command's seq is above the first.
    let running = start(dir.path()).await?;
    let mut late = fake_node(running.mqtt, "n1", std::slice::from_ref(&command_topic)).await?;
    let message = late.next_on(&command_topic).await?;
    let (command, _) = open_command(&message.payload, &trust)?;
    assert_eq!(command.seq, 1);
    // Whether `late` got it live or as a replay, the broker now holds it retained.
    let mut later = fake_node(
        running.mqtt,
        "n1-later",
        std::slice::from_ref(&command_topic),
    )
    .await?;
    if !later.next_on(&command_topic).await?.retain {
        bail!("the republished command is not retained");
    }
    let nodes = running.get_json("/api/nodes").await?;
    assert_eq!(
        nodes[0]["node"], "n1",
        "the inventory did not survive the restart: {nodes}"
    );
    running.rollout("web", "1").await?;
    let message = late.next_on(&command_topic).await?;
    let (command, _) = open_command(&message.payload, &trust)?;
    assert_eq!(command.seq, 2);
    running.stop().await
}
