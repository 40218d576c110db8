//! Losing the broker mid-transfer costs time, not correctness: agents that were staging
//! when Mosquitto was SIGKILLed finish, byte for byte, once it is back on the same port.

use std::time::Duration;

use anyhow::Result;
use system_tests::{assert_tree_eq, release, write_tree, AgentOptions, Broker, Fleet};

#[test]
fn staging_agents_finish_after_the_broker_is_killed_and_restarted_mid_transfer() -> Result<()> {
    let fleet = Fleet::start(Broker::Mosquitto)?;
    let slow = AgentOptions {
        max_fetch_rate: Some(2_000_000),
        ..AgentOptions::default()
    };
    let nodes = fleet.agents_with(["n1", "n2", "n3"], &slow)?;
    let src = fleet.scratch("v1")?;
    write_tree(&src, 31, 12_000_000)?;
    fleet.publish(&src, "web", "1")?;
    fleet.rollout("web", "1")?;

    fleet.wait_until(
        Duration::from_secs(60),
        "every agent to have some chunks of web@1",
        || {
            for node in &nodes {
                if node.status()?.staging.map_or(0, |s| s.chunks_have) == 0 {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    fleet.kill_broker()?;
    let v1 = release("web", "1")?;
    for node in &nodes {
        assert_ne!(
            node.current_release()?,
            Some(v1.clone()),
            "{} finished before the broker was killed: the transfer is too fast for this test",
            node.node()
        );
    }
    // Down for a while, as a real broker restart would be; nothing is asserted on timing.
    std::thread::sleep(Duration::from_secs(1));
    fleet.restart_broker()?;

    fleet.wait_all_on("web", "1", Duration::from_secs(180))?;
    for node in &nodes {
        assert_tree_eq(&src, &node.current_slot()?);
    }
    Ok(())
}
