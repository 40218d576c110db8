//! The node agent: connects out to the broker, verifies the coordinator's signed commands
//! and manifests, stages releases into immutable slots, switches the active pointer
//! atomically and reports its state.
//!
//! - [`node`]: the deploy state machine, pure (no I/O, `now` passed in).
//! - [`journal`]: the durable, flushed record of that state.
//! - [`slots`]: slot directories and the atomic active pointer.
//! - [`fetch`]: a staging task: fetch missing chunks, verify, assemble.
//! - [`link`]: the broker connection with backoff.
//! - [`telemetry`]: health samples (host and app metrics), buffered durably and delivered.
//! - [`daemon`]: the run loop tying them together.
//! - [`cli`]: arguments, validation, `status`.

pub mod app;
pub mod cli;
pub mod daemon;
pub mod fault;
pub mod fetch;
pub mod journal;
pub mod link;
pub mod node;
pub mod serving;
pub mod slots;
pub mod telemetry;
