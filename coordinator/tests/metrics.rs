//! Health telemetry through a real `coordinator serve`: hostile metric batches over MQTT
//! (unknown node, wrong node field, far-future and far-past timestamps, huge and
//! out-of-range values, oversized batches, garbage) are dropped and counted per node and
//! reason, nothing of them is stored and the coordinator keeps serving; a valid batch from a
//! known node is stored, acknowledged on its ack topic, and stored once however often it is
//! sent.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use protocol::telemetry::{names, MetricAck, MetricBatch, Sample, MAX_SAMPLES_PER_BATCH};
use protocol::{AppName, NodeId, NodeTopic, ReleaseId, Topics, Version, PROTOCOL_VERSION};
use rumqttc::QoS;
use serde_json::{json, Value};

use common::{fake_node, reporting_node, start, FakeNode, Running, WAIT};

fn now() -> u64 {
    coordinator::unix_now()
}

fn sample(seq: u64, at: u64) -> Sample {
    Sample {
        seq,
        at,
        version: Some(ReleaseId::new(
            AppName::new("web").expect("app"),
            Version::new("2").expect("version"),
        )),
        values: BTreeMap::from([
            (names::HOST_CPU_PERCENT.to_owned(), 12.5),
            (names::APP_ERROR_RATE.to_owned(), 0.01),
            (names::APP_LATENCY_P99_MS.to_owned(), 80.0),
        ]),
    }
}

fn batch(node: &str, samples: Vec<Sample>) -> MetricBatch {
    MetricBatch {
        protocol: PROTOCOL_VERSION,
        node: NodeId::new(node).expect("node"),
        labels: BTreeMap::from([("ring".to_owned(), "canary".to_owned())]),
        dropped_total: 2,
        samples,
    }
}

async fn send(node: &FakeNode, id: &str, payload: Vec<u8>) -> Result<()> {
    let topic = Topics::default().node(&NodeId::new(id)?, NodeTopic::Metrics);
    node.client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await?;
    Ok(())
}

/// Waits for an ack on `node`'s ack topic that covers `up_to` (earlier, lower acks are
/// skipped); fails if one names a higher seq.
async fn wait_for_ack(node: &mut FakeNode, id: &str, up_to: u64) -> Result<()> {
    let topic = Topics::default().node(&NodeId::new(id)?, NodeTopic::MetricsAck);
    loop {
        let message = node.next_on(&topic).await?;
        let ack: MetricAck = serde_json::from_slice(&message.payload)?;
        ensure!(ack.protocol == PROTOCOL_VERSION, "ack {ack:?}");
        ensure!(ack.up_to <= up_to, "acked {} before it was sent", ack.up_to);
        if ack.up_to == up_to {
            return Ok(());
        }
    }
}

/// Polls `GET /api/metrics/drops` until `ready` holds for it; returns it.
async fn wait_for_drops(
    running: &Running,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let drops = running.get_json("/api/metrics/drops").await?;
        if ready(&drops) {
            return Ok(drops);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never {what}: {drops:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_drops<'a>(drops: &'a Value, id: &str) -> Option<&'a Value> {
    drops["nodes"].as_array()?.iter().find(|n| n["node"] == id)
}

/// Every sample ever stored, whatever its time.
async fn all_samples(running: &Running) -> Result<Vec<Value>> {
    let answer = running
        .get_json(&format!("/api/metrics?from=0&to={}", u64::MAX))
        .await?;
    answer["samples"]
        .as_array()
        .cloned()
        .context("no samples array")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_metric_batches_are_counted_never_stored_and_valid_ones_are_stored_and_acked(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    coordinator::keys::keygen(&dir.path().join("keys"))?;
    let running = start(dir.path()).await?;
    let topics = Topics::default();
    let n1_id = NodeId::new("n1")?;
    let mut n1 = reporting_node(
        &running,
        "n1",
        &[topics.node(&n1_id, NodeTopic::MetricsAck)],
    )
    .await?;
    let ghost = fake_node(running.mqtt, "ghost", &[]).await?;
    let now = now();

    // A node the inventory has never heard from.
    send(
        &ghost,
        "ghost",
        serde_json::to_vec(&batch("ghost", vec![sample(1, now)]))?,
    )
    .await?;
    // Garbage, and a number outside f64's range (serde_json refuses it: malformed).
    send(&n1, "n1", b"\x00\xffnot json at all".to_vec()).await?;
    let out_of_range =
        serde_json::to_string(&batch("n1", vec![sample(1, now)]))?.replace("12.5", "1e400");
    send(&n1, "n1", out_of_range.into_bytes()).await?;
    // Another node's batch on n1's topic.
    send(
        &n1,
        "n1",
        serde_json::to_vec(&batch("n2", vec![sample(1, now)]))?,
    )
    .await?;
    // Over the byte limit, and over the sample limit.
    let mut huge = batch("n1", vec![sample(1, now)]);
    huge.labels.insert("padding".into(), "x".repeat(300 * 1024));
    send(&n1, "n1", serde_json::to_vec(&huge)?).await?;
    let many = (1..=MAX_SAMPLES_PER_BATCH as u64 + 1)
        .map(|seq| sample(seq, now))
        .collect();
    send(&n1, "n1", serde_json::to_vec(&batch("n1", many))?).await?;
    // A well-formed batch whose every sample is bad: refused for good, and acknowledged.
    let mut huge_value = sample(3, now);
    huge_value.values.insert("app:queue_depth".into(), 1e308);
    let mut bad_name = sample(4, now);
    bad_name.values.insert("bad-name".into(), 1.0);
    let mut too_many = sample(5, now);
    too_many
        .values
        .extend((0..64).map(|i| (format!("app:m{i}"), 1.0)));
    let bad = batch(
        "n1",
        vec![
            sample(1, now + 3600),
            sample(2, now - 8 * 86_400),
            huge_value,
            bad_name,
            too_many,
        ],
    );
    send(&n1, "n1", serde_json::to_vec(&bad)?).await?;
    wait_for_ack(&mut n1, "n1", 5).await?;

    let expected_n1 = json!({
        "malformed": 2, "wrong_node": 1, "oversized": 2, "bad_timestamp": 2, "bad_values": 3
    });
    let drops = wait_for_drops(&running, "counted every refusal", |drops| {
        node_drops(drops, "n1").is_some_and(|n| n["refused"] == expected_n1)
            && node_drops(drops, "ghost")
                .is_some_and(|n| n["refused"] == json!({"unknown_node": 1}))
    })
    .await?;
    let n1_drops = node_drops(&drops, "n1").context("n1")?;
    assert_eq!(n1_drops["stored"], 0);
    assert_eq!(n1_drops["last_refusal"]["reason"], "bad_timestamp");
    assert!(
        all_samples(&running).await?.is_empty(),
        "refused input was stored"
    );
    // Still serving, over HTTP and MQTT.
    running.get_json("/api/nodes").await?;

    let good = batch(
        "n1",
        (6..=8).map(|seq| sample(seq, now - 30 + seq)).collect(),
    );
    send(&n1, "n1", serde_json::to_vec(&good)?).await?;
    wait_for_ack(&mut n1, "n1", 8).await?;
    let stored = all_samples(&running).await?;
    let seqs: Vec<&Value> = stored.iter().map(|s| &s["seq"]).collect();
    assert_eq!(seqs, [6, 7, 8]);
    assert_eq!(stored[0]["node"], "n1");
    assert_eq!(stored[0]["labels"]["ring"], "canary");
    assert_eq!(stored[0]["version"], json!({"app": "web", "version": "2"}));
    assert_eq!(stored[0]["values"][names::APP_LATENCY_P99_MS], 80.0);

    // Sent again (a lost ack): counted as duplicates, acknowledged again, stored once.
    send(&n1, "n1", serde_json::to_vec(&good)?).await?;
    wait_for_ack(&mut n1, "n1", 8).await?;
    let drops = wait_for_drops(&running, "counted the duplicates", |drops| {
        node_drops(drops, "n1").is_some_and(|n| n["duplicates"] == 3)
    })
    .await?;
    let n1_drops = node_drops(&drops, "n1").context("n1")?;
    assert_eq!(
        (&n1_drops["stored"], &n1_drops["agent_dropped_total"]),
        (&json!(3), &json!(2))
    );
    assert_eq!(all_samples(&running).await?.len(), 3);

    // The filters of the API: by node, by version, by window.
    let by = |query: &str| {
        let running = &running;
        let path = format!("/api/metrics?{query}");
        async move { running.get_json(&path).await }
    };
    assert_eq!(
        by("node=n1&version=web@2").await?["samples"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    assert_eq!(by("version=web@1").await?["samples"], json!([]));
    assert_eq!(by("node=ghost").await?["samples"], json!([]));
    let window = by(&format!("from={}&to={}", now - 23, now - 23)).await?;
    assert_eq!(window["samples"].as_array().map(Vec::len), Some(1));
    assert_eq!(window["truncated"], false);

    running.stop().await
}
