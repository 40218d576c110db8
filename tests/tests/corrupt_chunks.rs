//! A corrupt chunk in the coordinator's store never reaches a slot: the node discards it,
//! reports it, stays on its version, and finishes once the store serves good bytes again
//! (it asks again for chunks it is still missing).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use protocol::messages::EventKind;
use protocol::NodeTopic;
use rand::{RngCore as _, SeedableRng as _};
use system_tests::{assert_tree_eq, release, write_tree, Broker, Fleet};

const ROLLOUT: Duration = Duration::from_secs(120);
/// Long enough for the agent's re-request timeout.
const RECOVERY: Duration = Duration::from_secs(240);

#[test]
fn a_node_rejects_a_corrupt_chunk_keeps_its_version_and_finishes_once_the_chunk_is_good_again(
) -> Result<()> {
    let fleet = Fleet::start(Broker::Embedded)?;
    let [n1] = fleet.agents(["n1"])?;
    let v1 = fleet.scratch("v1")?;
    write_tree(&v1, 21, 300_000)?;
    fleet.publish(&v1, "web", "1")?;
    fleet.rollout("web", "1")?;
    fleet.wait_all_on("web", "1", ROLLOUT)?;

    // v2 is fresh data, so every chunk it adds to the store is one n1 must fetch.
    let before: BTreeSet<_> = fleet.chunk_files()?.into_iter().collect();
    let v2 = fleet.scratch("v2")?;
    write_tree(&v2, 22, 2_000_000)?;
    fleet.publish(&v2, "web", "2")?;
    let added: Vec<_> = fleet
        .chunk_files()?
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    ensure!(
        !added.is_empty(),
        "publishing v2 added no chunk files under DATA/chunks"
    );
    let victim = &added[added.len() / 2];
    let good = std::fs::read(victim)?;
    let mut garbage = vec![0u8; good.len()];
    rand::rngs::StdRng::seed_from_u64(23).fill_bytes(&mut garbage);
    std::fs::write(victim, &garbage)?;

    let mut events = fleet.mqtt_client()?;
    events.subscribe(&fleet.topics().node(n1.node(), NodeTopic::Events))?;
    fleet.rollout("web", "2")?;
    let v2_release = release("web", "2")?;
    fleet.wait_until(ROLLOUT, "n1 to report a rejected chunk", || {
        let event = events.next_message(Duration::ZERO, |m| {
            serde_json::from_slice::<protocol::messages::Event>(&m.payload)
                .is_ok_and(|e| matches!(e.kind, EventKind::ChunkRejected { .. }))
        })?;
        let in_status = n1
            .status()?
            .last_update
            .is_some_and(|u| u.release == v2_release && u.chunks_rejected > 0);
        Ok(event.is_some() || in_status)
    })?;
    assert_eq!(
        n1.current_release()?,
        Some(release("web", "1")?),
        "n1 left v1 although a chunk of v2 was corrupt"
    );

    std::fs::write(victim, &good)?;
    fleet.wait_all_on("web", "2", RECOVERY)?;
    assert_tree_eq(&v2, &n1.current_slot()?);
    let report = n1.status()?.last_update;
    assert!(
        report
            .as_ref()
            .is_some_and(|u| u.release == v2_release && u.chunks_rejected > 0),
        "the update report does not count the rejected chunk: {report:?}"
    );
    Ok(())
}
