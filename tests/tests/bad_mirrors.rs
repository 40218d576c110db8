//! A mirror is a convenience, never a trust anchor: whatever a mirror does (corrupt,
//! truncated, oversized or wrong bytes, a decompression bomb, error statuses, resets, or
//! not being there at all), the node rejects what does not verify, falls back to the next
//! source (the coordinator) and ends with a byte-identical slot. Bad bytes are counted as
//! rejected and never as fetched.
//!
//! Each test publishes a release with `--mirror` pointing at a test mirror that behaves
//! one way, and checks the mirror's own log to see that the node really tried it.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{ensure, Result};
use protocol::messages::{Outcome, UpdateReport};
use protocol::Digest;
use system_tests::chunks::{image_chunks, zsize_sum};
use system_tests::{assert_tree_eq, write_tree, Behaviour, Broker, Fleet, Mirror};

const ROLLOUT: Duration = Duration::from_secs(120);
/// A release of ~1 MB with a mirror that refuses connections is staged well within this:
/// falling back costs no per-chunk timeout.
const QUICK_FALLBACK: Duration = Duration::from_secs(15);

/// One node, one release published with `mirror` as its only mirror, rolled out; returns
/// the node's update report and the release's chunks, after checking the slot.
fn deploy_via(mirror_url: &str, mirror: Option<&Mirror>, seed: u64) -> Result<Deployed> {
    let fleet = Fleet::start(Broker::Embedded)?;
    if let Some(mirror) = mirror {
        mirror.serve_from(&fleet.chunks_dir())?;
    }
    let [n1] = fleet.agents(["n1"])?;
    let src = fleet.scratch("v1")?;
    write_tree(&src, seed, 1_000_000)?;
    let image = image_chunks(&src)?;
    let bytes = zsize_sum(image.values());
    let chunks: BTreeSet<Digest> = image.into_keys().collect();
    fleet.publish_with_mirrors(&src, "web", "1", &[mirror_url])?;
    fleet.rollout("web", "1")?;
    fleet.wait_all_on("web", "1", ROLLOUT)?;
    assert_tree_eq(&src, &n1.current_slot()?);
    let report = fleet.wait_update(&n1, "web", "1", ROLLOUT)?;
    ensure!(
        report.outcome == Outcome::Switched,
        "the update did not switch: {report:?}"
    );
    // Verified bytes are counted once each, whoever sent them; rejected bytes are not.
    assert_eq!(
        report.bytes_fetched_http + report.bytes_fetched_mqtt,
        bytes,
        "the bytes counted as fetched are not the release's compressed size: {report:?}"
    );
    Ok(Deployed { report, chunks })
}

struct Deployed {
    report: UpdateReport,
    chunks: BTreeSet<Digest>,
}

/// The node tried the mirror behaving as `behaviour`, asked it only for chunks of the
/// release, rejected what it sent if it sent bad bytes, and got the release anyway.
fn a_mirror_that(behaviour: Behaviour, seed: u64) -> Result<()> {
    let mirror = Mirror::start()?;
    let deployed = deploy_via(&mirror.url(behaviour), Some(&mirror), seed)?;
    let tried = mirror.requested(behaviour);
    eprintln!(
        "{behaviour:?}: the mirror got {} requests; report {:?}",
        tried.len(),
        deployed.report
    );
    assert!(
        !tried.is_empty(),
        "the node never tried the mirror ({behaviour:?}); it got: {:?}",
        mirror.requests()
    );
    let strangers: Vec<_> = tried
        .iter()
        .filter(|d| !deployed.chunks.contains(d))
        .collect();
    assert!(
        strangers.is_empty(),
        "the node asked the mirror for chunks that are not in the release: {strangers:?}"
    );
    if behaviour.sends_bad_bytes() {
        assert!(
            deployed.report.chunks_rejected > 0,
            "the mirror sent bad bytes ({behaviour:?}) for {} requests but the node counts no rejected chunk: {:?}",
            tried.len(),
            deployed.report
        );
    }
    // Everything the mirror could not deliver came from the coordinator, over HTTP.
    assert_eq!(
        deployed.report.bytes_fetched_mqtt, 0,
        "the node fell back to MQTT although the coordinator's HTTP works: {:?}",
        deployed.report
    );
    Ok(())
}

#[test]
fn a_good_mirror_serves_every_chunk_once_and_nothing_is_rejected() -> Result<()> {
    let mirror = Mirror::start()?;
    let deployed = deploy_via(&mirror.url(Behaviour::Serve), Some(&mirror), 80)?;
    let tried = mirror.requested(Behaviour::Serve);
    let asked: BTreeSet<Digest> = tried.iter().copied().collect();
    assert_eq!(
        asked, deployed.chunks,
        "the node did not take the release's chunks from its first source"
    );
    assert_eq!(
        tried.len(),
        asked.len(),
        "the node asked the mirror for some chunks more than once"
    );
    assert_eq!(deployed.report.chunks_rejected, 0, "{:?}", deployed.report);
    assert_eq!(
        deployed.report.bytes_fetched_mqtt, 0,
        "{:?}",
        deployed.report
    );
    Ok(())
}

#[test]
fn a_mirror_serving_corrupt_bytes_is_rejected_and_the_coordinator_serves_the_chunks() -> Result<()>
{
    a_mirror_that(Behaviour::Corrupt, 81)
}

#[test]
fn a_mirror_cutting_bodies_short_is_passed_over_and_the_coordinator_serves_the_chunks() -> Result<()>
{
    a_mirror_that(Behaviour::Truncate, 82)
}

#[test]
fn a_mirror_sending_bodies_beyond_the_chunk_size_limit_is_rejected() -> Result<()> {
    a_mirror_that(Behaviour::Oversize, 83)
}

#[test]
fn a_mirror_sending_a_decompression_bomb_is_rejected_without_inflating_it() -> Result<()> {
    a_mirror_that(Behaviour::Bomb, 84)
}

#[test]
fn a_mirror_sending_another_chunks_valid_bytes_is_rejected() -> Result<()> {
    a_mirror_that(Behaviour::WrongChunk, 85)
}

#[test]
fn a_mirror_answering_500_is_passed_over() -> Result<()> {
    a_mirror_that(Behaviour::Status(500), 86)
}

#[test]
fn a_mirror_answering_404_is_passed_over() -> Result<()> {
    a_mirror_that(Behaviour::Status(404), 87)
}

#[test]
fn a_mirror_resetting_connections_is_passed_over() -> Result<()> {
    a_mirror_that(Behaviour::Reset, 88)
}

#[test]
fn a_mirror_that_is_down_is_passed_over_quickly() -> Result<()> {
    // A port nothing listens on: connections are refused.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let deployed = deploy_via(&format!("http://127.0.0.1:{port}/down"), None, 89)?;
    assert!(
        Duration::from_millis(deployed.report.staging_ms) < QUICK_FALLBACK,
        "staging took {} ms with a refused mirror: falling back is not quick",
        deployed.report.staging_ms
    );
    assert_eq!(
        deployed.report.bytes_fetched_mqtt, 0,
        "{:?}",
        deployed.report
    );
    Ok(())
}
