//! `serve` in one process with its embedded broker, and a fake node speaking MQTT: the
//! release path through the coordinator (publish, inventory, rollout: a signed retained
//! `Stage`, chunk frames over MQTT and HTTP, then `Deploy` once the node reports the release
//! staged), the retained command and the rollout coming back after a restart onto an empty
//! broker, a release's mirrors in the commands, and the chunk-delivery counters of
//! `GET /api/stats`.

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use protocol::messages::{Action, ChunkFrame, ChunkRequest, Presence};
use protocol::{
    AppName, Digest, NodeId, NodeTopic, ReleaseId, Topics, TrustedKeys, Version, PROTOCOL_VERSION,
};
use rumqttc::QoS;

use common::{
    fake_node, node_state, open_command, publish, release_tree, reporting_node, staged_state,
    start, wait_for_node, FakeNode,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_reaches_a_node_as_a_signed_command_and_chunk_frames_and_survives_a_restart(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let trust = TrustedKeys::from_json(&std::fs::read(dir.path().join("keys/trust.json"))?)?;
    let src = release_tree(dir.path())?;

    let topics = Topics::default();
    let n1 = NodeId::new("n1")?;
    let release = ReleaseId::new(AppName::new("web")?, Version::new("1")?);
    let running = start(dir.path()).await?;

    publish(&running, &src, "1", &[]).await?;

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
    let Action::Stage { http_sources, .. } = &command.action else {
        bail!(
            "expected the rollout's stage command, got {:?}",
            command.action
        );
    };
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
        receiving_from: None,
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
    // and the rollout carries on: once the node reports the release staged, it is sent the
    // deploy of the same manifest, with the next seq.
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
    let stage = command;
    late.report_state(&staged_state(node_state(&n1), &stage, &manifest))
        .await?;
    // `late` may be sent the stage once more (retained on subscribe and republished live on
    // the coordinator's connect); an agent ignores a seq it has seen, and so does this.
    let (command, deployed) = loop {
        let message = late.next_on(&command_topic).await?;
        let (command, manifest) = open_command(&message.payload, &trust)?;
        if command.seq != stage.seq {
            break (command, manifest);
        }
    };
    assert_eq!(command.seq, 2);
    assert!(
        matches!(command.action, Action::Deploy { .. }),
        "{:?}",
        command.action
    );
    assert_eq!(deployed, manifest);
    let rollout = running.get_json("/api/rollouts/1").await?;
    assert_eq!(rollout["status"], "running", "{rollout}");
    assert_eq!(rollout["waves"][0]["phase"], "switching", "{rollout}");
    running.stop().await
}

fn command_sources(payload: &[u8], trust: &TrustedKeys) -> Result<Vec<String>> {
    let (command, _) = open_command(payload, trust)?;
    let (Action::Deploy { http_sources, .. } | Action::Stage { http_sources, .. }) = command.action
    else {
        bail!(
            "expected a stage or deploy command, got {:?}",
            command.action
        );
    };
    Ok(http_sources)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_commands_list_the_release_mirrors_in_order_then_the_coordinator_and_a_republish_replaces_them(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let trust = TrustedKeys::from_json(&std::fs::read(dir.path().join("keys/trust.json"))?)?;
    let src = release_tree(dir.path())?;
    let running = start(dir.path()).await?;
    let coordinator_url = format!("http://{}", running.http);

    let refused = publish(&running, &src, "1", &["https://cdn.example/x?sig=1"]).await;
    let error = format!(
        "{:#}",
        refused.expect_err("a mirror with a query is refused")
    );
    assert!(error.contains("--mirror"), "{error}");

    publish(
        &running,
        &src,
        "1",
        &["https://cdn.example/fleet/", "http://mirror.lan:8080"],
    )
    .await?;
    let releases = running.get_json("/api/releases").await?;
    assert_eq!(
        releases[0]["mirrors"],
        serde_json::json!(["https://cdn.example/fleet", "http://mirror.lan:8080"]),
        "{releases}"
    );

    let command_topic = Topics::default().node(&NodeId::new("n1")?, NodeTopic::Command);
    let mut node = reporting_node(&running, "n1", std::slice::from_ref(&command_topic)).await?;
    let rollout = running.rollout("web", "1").await?;
    assert_eq!(
        rollout["http_sources"],
        serde_json::json!([
            "https://cdn.example/fleet",
            "http://mirror.lan:8080",
            coordinator_url
        ])
    );
    let message = node.next_on(&command_topic).await?;
    assert_eq!(
        command_sources(&message.payload, &trust)?,
        [
            "https://cdn.example/fleet",
            "http://mirror.lan:8080",
            coordinator_url.as_str()
        ]
    );

    // The same content with another list: accepted, the list replaced, the release unchanged.
    let before = releases[0].clone();
    publish(&running, &src, "1", &["http://mirror.lan:8080"]).await?;
    let after = running.get_json("/api/releases").await?[0].clone();
    assert_eq!(
        after["mirrors"],
        serde_json::json!(["http://mirror.lan:8080"])
    );
    assert_eq!(after["manifest_digest"], before["manifest_digest"]);
    assert_eq!(after["published_at"], before["published_at"]);
    // The node holds the first rollout until it ends; aborting it frees the node.
    let (status, aborted) = running
        .post_json("/api/rollouts/1/abort", &serde_json::json!({}))
        .await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{aborted}");
    assert_eq!(aborted["status"], "aborted", "{aborted}");
    running.rollout("web", "1").await?;
    let message = node.next_on(&command_topic).await?;
    assert_eq!(
        command_sources(&message.payload, &trust)?,
        ["http://mirror.lan:8080", coordinator_url.as_str()]
    );

    // The API checks mirrors itself, whatever the client.
    let (_, manifest) = open_command(&message.payload, &trust)?;
    let response = reqwest::Client::new()
        .post(format!("{coordinator_url}/api/releases"))
        .bearer_auth(&running.token)
        .json(&serde_json::json!({"manifest": manifest, "mirrors": ["ftp://m"]}))
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await?;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("ftp://m")),
        "{body}"
    );
    running.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_frames_and_their_bytes_fanout_dedup_and_http_chunks_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let src = release_tree(dir.path())?;
    let running = start(dir.path()).await?;
    let base = format!("http://{}", running.http);
    publish(&running, &src, "1", &[]).await?;
    let release = ReleaseId::new(AppName::new("web")?, Version::new("1")?);

    let unauthorized = reqwest::get(format!("{base}/api/stats")).await?;
    assert_eq!(unauthorized.status(), reqwest::StatusCode::UNAUTHORIZED);
    let stats = running.get_json("/api/stats").await?;
    assert_eq!(stats["mqtt_frames_published"], 0, "{stats}");
    assert_eq!(stats["http_chunks_served"], 0, "{stats}");

    // Every chunk of the release, each named twice in one request (as when nodes ask at the
    // same moment), and one it does not list: one frame per chunk.
    let topics = Topics::default();
    let n1 = NodeId::new("n1")?;
    let chunk_topic = topics.chunks(&release);
    let mut node = fake_node(running.mqtt, "n1", std::slice::from_ref(&chunk_topic)).await?;
    let releases = running.get_json("/api/releases").await?;
    let chunk_count = releases[0]["chunks"].as_u64().context("chunks")? as usize;
    let mut store = images::ChunkStore::open(dir.path().join("data/chunks"))?.digests()?;
    store.sort();
    ensure!(
        store.len() == chunk_count,
        "{} chunks stored, release lists {chunk_count}",
        store.len()
    );
    let mut digests = store.clone();
    digests.extend(store.iter().copied());
    digests.push(Digest::of(b"not in the release"));
    node.client
        .publish(
            topics.node(&n1, NodeTopic::ChunkRequests),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&ChunkRequest {
                protocol: PROTOCOL_VERSION,
                release: release.clone(),
                digests,
                receiving_from: None,
            })?,
        )
        .await?;
    let mut frame_bytes = 0u64;
    let mut got = Vec::new();
    let mut seqs = Vec::new();
    while got.len() < store.len() {
        let message = node.next_on(&chunk_topic).await?;
        frame_bytes += message.payload.len() as u64;
        let frame = ChunkFrame::decode(&message.payload)?;
        got.push(frame.digest);
        seqs.push(frame.seq);
    }
    got.sort();
    assert_eq!(got, store);
    // Numbered in the order they went out, which is the order they arrive.
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // Counted before the frames were handed to the broker, so already visible.
    let stats = running.get_json("/api/stats").await?;
    let n = store.len() as u64;
    assert_eq!(stats["mqtt_frames_published"], n, "{stats}");
    assert_eq!(stats["mqtt_frame_bytes"], frame_bytes, "{stats}");
    assert_eq!(stats["chunk_requests"], 1, "{stats}");
    assert_eq!(stats["digests_requested"], 2 * n + 1, "{stats}");
    assert_eq!(stats["digests_queued"], n, "{stats}");
    assert_eq!(stats["digests_deduped"], n, "{stats}");
    assert_eq!(stats["digests_unknown"], 1, "{stats}");

    // Past the fan-out window, a node that says it has been receiving the topic since the
    // first of those frames is not sent them again (they are on the way to it); one that
    // started receiving after the last is.
    tokio::time::sleep(ChunkRequest::FANOUT_WINDOW + Duration::from_millis(100)).await;
    let ask_claiming = |receiving_from: u64| {
        serde_json::to_vec(&ChunkRequest {
            protocol: PROTOCOL_VERSION,
            release: release.clone(),
            digests: store.clone(),
            receiving_from: Some(receiving_from),
        })
    };
    let request_topic = topics.node(&n1, NodeTopic::ChunkRequests);
    node.client
        .publish(
            &request_topic,
            QoS::AtLeastOnce,
            false,
            ask_claiming(seqs[0])?,
        )
        .await?;
    let stats = running
        .wait_for_stats(|stats| stats["chunk_requests"] == 2)
        .await?;
    assert_eq!(stats["mqtt_frames_published"], n, "{stats}");
    assert_eq!(stats["digests_deduped"], 2 * n, "{stats}");
    node.client
        .publish(
            &request_topic,
            QoS::AtLeastOnce,
            false,
            ask_claiming(seqs[seqs.len() - 1] + 1)?,
        )
        .await?;
    let mut again = Vec::new();
    while again.len() < store.len() {
        let message = node.next_on(&chunk_topic).await?;
        again.push(ChunkFrame::decode(&message.payload)?.digest);
    }
    again.sort();
    assert_eq!(again, store);
    let stats = running.get_json("/api/stats").await?;
    assert_eq!(stats["mqtt_frames_published"], 2 * n, "{stats}");
    assert_eq!(stats["digests_queued"], 2 * n, "{stats}");

    // HTTP: the exact file, typed and sized; HEAD is not counted as bytes sent.
    let http = reqwest::Client::new();
    let mut body_bytes = 0u64;
    for digest in &store {
        let response = http.get(format!("{base}/chunks/{digest}")).send().await?;
        ensure!(
            response.status().is_success(),
            "GET /chunks/{digest}: {}",
            response.status()
        );
        assert_eq!(
            response.headers()[reqwest::header::CONTENT_TYPE],
            "application/zstd"
        );
        let length: u64 = response.headers()[reqwest::header::CONTENT_LENGTH]
            .to_str()?
            .parse()?;
        let body = response.bytes().await?;
        assert_eq!(length, body.len() as u64);
        let on_disk = std::fs::read(
            dir.path()
                .join("data/chunks")
                .join(&digest.to_hex()[..2])
                .join(digest.to_hex()),
        )?;
        assert_eq!(body.as_ref(), on_disk);
        body_bytes += length;
    }
    let head = http
        .head(format!("{base}/chunks/{}", store[0]))
        .send()
        .await?;
    assert!(head.status().is_success());

    // Nothing but chunk files: absent digests and anything that is not one are 404s.
    let absent = Digest::of(b"absent");
    for path in [
        format!("/chunks/{absent}"),
        format!("/chunks/{}", store[0].to_hex().to_uppercase()),
        "/chunks/..%2Fadmin.token".to_owned(),
        "/chunks/%2e%2e%2f%2e%2e%2fdata%2fadmin.token".to_owned(),
        format!("/chunks/{}x", store[0]),
    ] {
        let response = http.get(format!("{base}{path}")).send().await?;
        assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND, "{path}");
        let body = response.text().await?;
        assert!(
            body.len() < 200 && !body.contains(&running.token),
            "{path}: {body}"
        );
    }
    let stats = running.get_json("/api/stats").await?;
    assert_eq!(stats["http_chunks_served"], n, "{stats}");
    assert_eq!(stats["http_chunk_bytes"], body_bytes, "{stats}");
    assert_eq!(stats["http_not_found"], 5, "{stats}");
    running.stop().await
}

/// What one fake staging node saw: chunk requests it sent, frames it received.
struct Staged {
    requests: usize,
    frames: usize,
}

/// Stands in for an agent staging `wanted`: asks for what it lacks in requests of at most
/// `ChunkRequest::MAX_DIGESTS`, asks again for what has not arrived `RETRY_FIRST` later.
async fn stage(
    mut node: FakeNode,
    id: &str,
    release: &ReleaseId,
    wanted: &[Digest],
    start: &tokio::sync::Barrier,
) -> Result<Staged> {
    let topics = Topics::default();
    let request_topic = topics.node(&NodeId::new(id)?, NodeTopic::ChunkRequests);
    let chunk_topic = topics.chunks(release);
    let mut missing: std::collections::BTreeSet<Digest> = wanted.iter().copied().collect();
    let (mut requests, mut frames) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    start.wait().await;
    while !missing.is_empty() {
        let ask: Vec<Digest> = missing.iter().copied().collect();
        for digests in ask.chunks(ChunkRequest::MAX_DIGESTS) {
            let request = ChunkRequest {
                protocol: PROTOCOL_VERSION,
                release: release.clone(),
                digests: digests.to_vec(),
                receiving_from: None,
            };
            node.client
                .publish(
                    &request_topic,
                    QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&request)?,
                )
                .await?;
            requests += 1;
        }
        let retry = tokio::time::Instant::now() + ChunkRequest::RETRY_FIRST;
        while !missing.is_empty() {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{id} still lacks {} chunks",
                missing.len()
            );
            let Ok(message) = tokio::time::timeout_at(retry, node.messages.recv()).await else {
                break;
            };
            let message = message.context("the fake node's connection ended")?;
            if message.topic == chunk_topic {
                frames += 1;
                missing.remove(&ChunkFrame::decode(&message.payload)?.digest);
            }
        }
    }
    Ok(Staged { requests, frames })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_nodes_staging_the_same_release_at_once_share_the_chunk_frames() -> Result<()> {
    const NODES: usize = 50;
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    // 1 MiB that zstd cannot shrink much: about 16 chunks.
    let mut x = 1u64;
    let noise: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(src.join("noise.bin"), noise)?;
    let running = start(dir.path()).await?;
    publish(&running, &src, "1", &[]).await?;
    let release = ReleaseId::new(AppName::new("web")?, Version::new("1")?);
    let wanted = images::ChunkStore::open(dir.path().join("data/chunks"))?.digests()?;

    let chunk_topic = Topics::default().chunks(&release);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(NODES));
    let mut nodes = tokio::task::JoinSet::new();
    for i in 0..NODES {
        let id = format!("n{i}");
        let node = fake_node(running.mqtt, &id, std::slice::from_ref(&chunk_topic)).await?;
        let (release, wanted, barrier) = (release.clone(), wanted.clone(), barrier.clone());
        nodes.spawn(async move { stage(node, &id, &release, &wanted, &barrier).await });
    }
    let began = std::time::Instant::now();
    let mut received = 0;
    while let Some(staged) = nodes.join_next().await {
        let staged = staged??;
        ensure!(staged.requests >= 1);
        received += staged.frames;
    }
    let elapsed = began.elapsed();
    let stats = running.get_json("/api/stats").await?;
    let published = stats["mqtt_frames_published"].as_u64().context("frames")?;
    eprintln!(
        "{NODES} nodes, {} chunks: {published} frames published, {received} received, {:?}; {stats}",
        wanted.len(),
        elapsed
    );
    // Without the shared topic and the dedup each node would need its own copy of each chunk.
    // A node still waiting RETRY_FIRST after asking (the broker is slow to deliver to fifty
    // subscribers in a debug build) asks again and the chunk goes out again, so a few copies
    // are expected; far fewer than one per node.
    let unshared = (NODES * wanted.len()) as u64;
    ensure!(
        published * 4 <= unshared,
        "{published} frames for {} chunks and {NODES} nodes: the fan-out did not share them; {stats}",
        wanted.len()
    );
    running.stop().await
}
