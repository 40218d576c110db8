//! Health telemetry end to end: an agent sampling every second reports samples tagged with
//! its node, labels and version; while Mosquitto is down it keeps sampling into its buffer,
//! and afterwards every sample taken offline reaches the coordinator's store, in order, with
//! no gap in seq and none stored twice.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use system_tests::{now, write_tree, AgentOptions, Broker, Fleet};

/// Every sample stored for `node` over the last hour (`coordinator metrics --json`).
fn stored(fleet: &Fleet, node: &str) -> Result<Vec<Value>> {
    let out = fleet.cli(&["metrics", "--json", "--since", "1h", "--node", node])?;
    let answer: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "`metrics --json` printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    ensure!(answer["truncated"] == false, "the answer was truncated");
    answer["samples"]
        .as_array()
        .cloned()
        .context("no samples array in the answer")
}

fn seq(sample: &Value) -> u64 {
    sample["seq"].as_u64().unwrap_or(0)
}

fn at(sample: &Value) -> u64 {
    sample["at"].as_u64().unwrap_or(0)
}

#[test]
fn samples_taken_while_the_broker_is_down_arrive_afterwards_in_order_once_each() -> Result<()> {
    let fleet = Fleet::start(Broker::Mosquitto)?;
    let options = AgentOptions {
        labels: vec![("ring".to_owned(), "canary".to_owned())],
        metrics_interval: Some("1s".to_owned()),
        ..AgentOptions::default()
    };
    let [_n1] = fleet.agents_with(["n1"], &options)?;
    let src = fleet.scratch("v1")?;
    write_tree(&src, 7, 200_000)?;
    fleet.publish(&src, "web", "1")?;
    fleet.rollout("web", "1")?;
    fleet.wait_all_on("web", "1", Duration::from_secs(60))?;

    // Samples flow, tagged with the node, its labels and the version it runs.
    let tagged = |s: &Value| {
        s["node"] == "n1"
            && s["labels"]["ring"] == "canary"
            && s["version"] == serde_json::json!({"app": "web", "version": "1"})
    };
    fleet.wait_until(
        Duration::from_secs(30),
        "two samples of n1 on web@1 to be stored",
        || Ok(stored(&fleet, "n1")?.iter().filter(|s| tagged(s)).count() >= 2),
    )?;

    fleet.kill_broker()?;
    let down_at = now();
    // Down for a while, as a real broker outage would be; nothing is asserted on timing.
    std::thread::sleep(Duration::from_secs(6));
    let up_at = now();
    fleet.restart_broker()?;

    // The agent sends its backlog oldest first, so a sample taken after the restart is
    // stored only after every one taken offline.
    fleet.wait_until(
        Duration::from_secs(90),
        "a sample taken after the broker came back to be stored",
        || Ok(stored(&fleet, "n1")?.iter().any(|s| at(s) > up_at + 1)),
    )?;

    let samples = stored(&fleet, "n1")?;
    let seqs: Vec<u64> = samples.iter().map(seq).collect();
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    ensure!(
        distinct.len() == seqs.len(),
        "a sample was stored twice: {seqs:?}"
    );
    let mut by_seq = samples.clone();
    by_seq.sort_by_key(seq);
    let first = seq(&by_seq[0]);
    for (i, sample) in by_seq.iter().enumerate() {
        ensure!(
            seq(sample) == first + i as u64,
            "gap in seqs before {}: {seqs:?}",
            seq(sample)
        );
    }
    ensure!(first == 1, "the first samples are missing: {seqs:?}");
    ensure!(
        by_seq.windows(2).all(|w| at(&w[0]) <= at(&w[1])),
        "sample times are out of seq order: {by_seq:?}"
    );
    let offline: Vec<&Value> = samples
        .iter()
        .filter(|s| at(s) > down_at && at(s) < up_at)
        .collect();
    ensure!(
        offline.len() >= 3,
        "expected the samples of the {}s outage, got {}: {seqs:?}",
        up_at - down_at,
        offline.len()
    );
    ensure!(
        offline.iter().all(|s| tagged(s)),
        "samples taken offline lost their tags: {offline:?}"
    );

    // Nothing was refused for good, and the agent dropped nothing. (A batch sent before the
    // coordinator saw the node's first state report is refused as from an unknown node,
    // unacknowledged, and sent again: that is the one refusal allowed.)
    let out = fleet.cli(&["metrics", "drops", "--json"])?;
    let drops: Value = serde_json::from_slice(&out.stdout)?;
    let n1 = drops["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node"] == "n1"))
        .context("no counters for n1")?;
    let refused = n1["refused"].as_object().context("refused")?;
    ensure!(
        refused.keys().all(|reason| reason == "unknown_node"),
        "refused: {n1}"
    );
    ensure!(n1["agent_dropped_total"] == 0, "agent dropped: {n1}");
    ensure!(n1["stored"].as_u64() == Some(seqs.len() as u64), "{n1}");

    // The operator's table names the node and version.
    let out = fleet.cli(&["metrics", "--node", "n1", "--since", "10m"])?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        table.starts_with("TAKEN") && table.contains("web@1"),
        "{table}"
    );
    Ok(())
}
