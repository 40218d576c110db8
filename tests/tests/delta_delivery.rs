//! Delta delivery: a node that runs v1 fetches for v2 exactly the chunks v2 adds, no byte
//! more, over whichever transport it uses, and ends with v2 byte for byte.
//!
//! What "exactly" means is computed here, not asked of the system: the test builds the
//! images of both trees itself and sums the compressed sizes of the chunks v2 has and v1
//! lacks; every node's report must match that sum to the byte.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use protocol::messages::{Outcome, UpdateReport};
use protocol::{ChunkRef, Digest};
use system_tests::chunks::{chunks_not_in, image_chunks, zsize_sum};
use system_tests::{assert_tree_eq, change_tree, copy_tree, write_tree, Agent, AgentOptions};
use system_tests::{Broker, Fleet};

const ROLLOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Mqtt,
    Http,
}

#[test]
fn over_mqtt_every_node_fetches_exactly_the_compressed_bytes_of_the_chunks_v2_adds() -> Result<()> {
    delta_delivery(Transport::Mqtt)
}

#[test]
fn over_http_every_node_fetches_exactly_the_compressed_bytes_of_the_chunks_v2_adds() -> Result<()> {
    delta_delivery(Transport::Http)
}

fn delta_delivery(transport: Transport) -> Result<()> {
    let fleet = Fleet::start(Broker::Embedded)?;
    let options = AgentOptions {
        no_http: transport == Transport::Mqtt,
        ..AgentOptions::default()
    };
    let nodes = fleet.agents_with(["n1", "n2", "n3"], &options)?;
    let v1 = fleet.scratch("v1")?;
    write_tree(&v1, 41, 4_000_000)?;
    let v2 = fleet.scratch("v2")?;
    copy_tree(&v1, &v2)?;
    change_tree(&v2, 42)?;

    let v1_chunks = image_chunks(&v1)?;
    let v2_chunks = image_chunks(&v2)?;
    let added = chunks_not_in(&v2_chunks, &v1_chunks);
    let kept: BTreeMap<Digest, ChunkRef> = v2_chunks
        .iter()
        .filter(|(d, _)| v1_chunks.contains_key(d))
        .map(|(d, c)| (*d, *c))
        .collect();
    ensure!(
        !added.is_empty() && added.len() * 4 < v2_chunks.len(),
        "change_tree should change a small part of the tree: v2 adds {} of its {} chunks",
        added.len(),
        v2_chunks.len()
    );
    eprintln!(
        "v1: {} chunks, {} compressed bytes; v2 adds {} chunks, {} compressed bytes",
        v1_chunks.len(),
        zsize_sum(v1_chunks.values()),
        added.len(),
        zsize_sum(added.values())
    );

    fleet.publish(&v1, "web", "1")?;
    fleet.rollout("web", "1")?;
    fleet.wait_all_on("web", "1", ROLLOUT)?;
    for node in &nodes {
        assert_tree_eq(&v1, &node.current_slot()?);
        let report = update_report(&fleet, node, "1")?;
        assert_fetched(node, &report, transport, &v1_chunks, 0);
    }

    fleet.publish(&v2, "web", "2")?;
    fleet.rollout("web", "2")?;
    fleet.wait_all_on("web", "2", ROLLOUT)?;
    let reused: u64 = kept.values().map(|c| u64::from(c.size)).sum();
    for node in &nodes {
        assert_tree_eq(&v2, &node.current_slot()?);
        assert_tree_eq(&v1, &node.previous_slot()?);
        let report = update_report(&fleet, node, "2")?;
        assert_fetched(node, &report, transport, &added, reused);
        assert!(
            node.fetch_store()?.is_empty(),
            "{}: the fetch store still holds chunks after the switch",
            node.node()
        );
    }
    Ok(())
}

fn update_report(fleet: &Fleet, node: &Agent, version: &str) -> Result<UpdateReport> {
    let report = fleet.wait_update(node, "web", version, ROLLOUT)?;
    ensure!(
        report.outcome == Outcome::Switched,
        "{}: the update to web@{version} did not switch: {report:?}",
        node.node()
    );
    Ok(report)
}

/// The node received exactly `fetched` (compressed bytes and count) over `transport`,
/// nothing over the other one, and took `reused` uncompressed bytes from its own disk.
#[track_caller]
fn assert_fetched(
    node: &Agent,
    report: &UpdateReport,
    transport: Transport,
    fetched: &BTreeMap<Digest, ChunkRef>,
    reused: u64,
) {
    let want = zsize_sum(fetched.values());
    let (used, other) = match transport {
        Transport::Mqtt => (report.bytes_fetched_mqtt, report.bytes_fetched_http),
        Transport::Http => (report.bytes_fetched_http, report.bytes_fetched_mqtt),
    };
    assert_eq!(
        used, want,
        "{} fetched {used} compressed bytes over {transport:?} for {}, but the chunks it lacked add up to {want}: {report:?}",
        node.node(), report.release
    );
    assert_eq!(
        other, 0,
        "{} fetched {other} bytes over the transport it should not use ({transport:?} only): {report:?}",
        node.node()
    );
    assert_eq!(
        report.chunks_fetched,
        fetched.len() as u64,
        "{}: chunks_fetched is not the number of chunks it lacked: {report:?}",
        node.node()
    );
    assert_eq!(
        report.chunks_rejected,
        0,
        "{}: chunks were rejected although every source was good: {report:?}",
        node.node()
    );
    assert_eq!(
        report.bytes_reused,
        reused,
        "{}: bytes_reused is not the uncompressed size of the chunks it already had: {report:?}",
        node.node()
    );
}
