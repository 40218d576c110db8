//! Whole-system test harness: real `coordinator` and `agent` processes, a real MQTT broker
//! (the coordinator's embedded one or Mosquitto), real files in temp directories.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use system_tests::*;
//! # fn main() -> anyhow::Result<()> {
//! let fleet = Fleet::start(Broker::Embedded)?;
//! let [n1] = fleet.agents(["n1"])?;
//! let src = fleet.scratch("v1")?;
//! write_tree(&src, 1, 1_000_000)?;
//! fleet.publish(&src, "web", "1")?;
//! fleet.rollout("web", "1")?;
//! fleet.wait_all_on("web", "1", Duration::from_secs(60))?;
//! assert_tree_eq(&src, &n1.current_slot()?);
//! # Ok(()) }
//! ```
//!
//! Rules the harness keeps so tests stay honest: no fixed ports (every address is picked
//! by binding `127.0.0.1:0`), no sleeps as assertions (every wait polls a condition with a
//! deadline and fails saying what it waited for, the fleet's state and each log's tail),
//! and every process is SIGKILLed and reaped when its owner is dropped.

pub mod app_release;
pub mod bench_data;
pub mod bins;
pub mod chunks;
pub mod fleet;
pub mod mirror;
pub mod mosquitto;
pub mod mqtt;
pub mod netns;
pub mod privilege;
pub mod process;
pub mod rollout;
pub mod sign;
pub mod swarm;
pub mod tmpfs;
pub mod traffic;
pub mod tree;
pub mod usage;
pub mod wait;

pub use app_release::AppRelease;
pub use bins::Bins;
pub use fleet::{release, Agent, AgentOptions, Broker, Fleet, FleetOptions};
pub use mirror::{Behaviour, Mirror};
pub use mosquitto::Mosquitto;
pub use mqtt::TestClient;
pub use netns::NetNs;
pub use privilege::require_root;
pub use rollout::EventWatch;
pub use swarm::{Swarm, SwarmOptions};
pub use tmpfs::Tmpfs;
pub use traffic::{http_get, version_at, Traffic, TrafficReport};
pub use tree::{assert_tree_eq, change_tree, copy_tree, tree_diff, write_tree};
pub use wait::{wait_for, wait_until};

/// Seconds since the Unix epoch, as on the wire.
pub fn now() -> protocol::UnixSeconds {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
