//! Staged rollouts that run themselves: plans, the pure engine, its driver task, storage, the
//! `/api/rollouts*` endpoints and the canary gate and report.
//!
//! - [`plan`]: flags, API request and `release.toml` `[rollout]` defaults → a checked
//!   [`plan::Plan`]; wave sizes resolved against the selection; nodes put in waves by a
//!   stable hash of app and node.
//! - [`fleet`]: what the engine knows of a node ([`fleet::Observed`]) and the mailbox through
//!   which the main loop hands it every inventory change ([`fleet::NodeObserver`]).
//! - [`engine`]: the state machine (no I/O, no clock): waves, gates, controls, the node
//!   phases and what each report means.
//! - [`store`]: the sled layout of a rollout (head, per-node progress), old records.
//! - [`driver`]: the one task that owns every loaded rollout: it starts them, applies
//!   operator controls, steps them on node reports and a timer, judges the canary, and
//!   persists, flushes and asks the main loop to publish (in that order).
//! - [`report`]: the canary and baseline groups, their samples, the judgment.
//! - [`http`]: the handlers; [`view`]: their JSON bodies (shared with the CLI client).
//!
//! **Architecture invariants**: the engine does no I/O and reads no clock; only the driver
//! writes rollout state, and it writes and flushes a step's state, desired commands and
//! deploy-log entries before it asks the main loop to publish them; one running rollout
//! per node.

pub mod driver;
pub mod engine;
pub mod fleet;
pub mod http;
pub mod plan;
pub mod report;
pub mod store;
pub mod view;

pub use driver::{Driver, Rollouts};
pub use fleet::NodeObserver;
