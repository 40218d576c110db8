//! The release path: a published release reaches every node byte for byte, and an update
//! keeps the version it replaced as the node's previous one, on either broker.

use std::time::Duration;

use anyhow::Result;
use system_tests::{assert_tree_eq, change_tree, copy_tree, release, write_tree, Broker, Fleet};

const ROLLOUT: Duration = Duration::from_secs(120);

#[test]
fn three_nodes_run_byte_identical_releases_and_keep_the_previous_one_with_the_embedded_broker(
) -> Result<()> {
    release_path(Broker::Embedded)
}

#[test]
fn three_nodes_run_byte_identical_releases_and_keep_the_previous_one_with_mosquitto() -> Result<()>
{
    release_path(Broker::Mosquitto)
}

fn release_path(broker: Broker) -> Result<()> {
    let fleet = Fleet::start(broker)?;
    let nodes = fleet.agents(["n1", "n2", "n3"])?;
    let v1 = fleet.scratch("v1")?;
    write_tree(&v1, 1, 5_000_000)?;
    let v2 = fleet.scratch("v2")?;
    copy_tree(&v1, &v2)?;
    change_tree(&v2, 2)?;

    fleet.publish(&v1, "web", "1")?;
    fleet.rollout("web", "1")?;
    fleet.wait_all_on("web", "1", ROLLOUT)?;
    for node in &nodes {
        let slot = node.current_slot()?;
        assert_tree_eq(&v1, &slot);
        assert_eq!(
            node.current_link()?,
            slot.canonicalize()?,
            "{}: DATA/current does not point at the current slot",
            node.node()
        );
    }

    let v2_dir = v2.to_str().expect("temp paths are UTF-8");
    let published = fleet.cli(&[
        "release",
        "publish",
        v2_dir,
        "--app",
        "web",
        "--version",
        "2",
        "--json",
    ])?;
    let published: serde_json::Value = serde_json::from_slice(&published.stdout)?;
    fleet.rollout("web", "2")?;
    fleet.wait_all_on("web", "2", ROLLOUT)?;
    for node in &nodes {
        let status = node.status()?;
        assert_eq!(
            status.previous.as_ref().map(|p| &p.release),
            Some(&release("web", "1")?),
            "{}: v1 is not kept as the previous version",
            node.node()
        );
        let (current, previous) = (node.current_slot()?, node.previous_slot()?);
        assert_ne!(
            current,
            previous,
            "{}: one slot for two versions",
            node.node()
        );
        assert_tree_eq(&v2, &current);
        assert_tree_eq(&v1, &previous);
        assert_eq!(node.current_link()?, current.canonicalize()?);
        assert_eq!(
            status
                .current
                .as_ref()
                .map(|c| c.manifest_digest.to_string()),
            published["manifest_digest"].as_str().map(str::to_owned),
            "{}: node and coordinator name the manifest differently",
            node.node()
        );
    }
    Ok(())
}
