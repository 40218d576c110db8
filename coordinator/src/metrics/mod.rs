//! Health telemetry on the coordinator: the metric store, the ingestion of agents' batches,
//! the counters of what was refused, and the `/api/metrics*` endpoints.
//!
//! - [`store`]: [`MetricStore`], samples in sled keyed by time so a time window is one range
//!   scan, and each node's highest sample seq dealt with; retention pruning.
//! - [`check`]: the pure gate every [`protocol::telemetry::MetricBatch`] passes through
//!   ([`check_batch`]): no I/O, no clock (`now` is a parameter).
//! - [`drops`]: in-memory counters of refused input per node and reason (bounded), and what
//!   each agent says it dropped.
//! - [`ingest`]: the ingester task between the main loop and the store: it checks and stores
//!   batches on the blocking pool, batches sled flushes, hands durable acks back to the main
//!   loop, and prunes old samples every minute.
//! - [`http`]: `GET /api/metrics` and `GET /api/metrics/drops`; [`view`]: their JSON bodies.
//!
//! Invariants:
//! - A sample is stored only if it came from a node the inventory knows (a state report was
//!   received), in a batch that names that node and is within every limit of
//!   `protocol::telemetry`, with a timestamp within [`MAX_FUTURE_SKEW_SECS`] ahead of the
//!   coordinator's clock and not older than the retention, and only finite values of at
//!   most [`MAX_ABS_VALUE`] under valid names. Everything else is dropped and counted.
//! - A node's sample is stored at most once: only if its `seq` is above the node's highest seq
//!   dealt with, which is raised in the same sled transaction that stores the samples (and
//!   also by samples refused for good, so they are not sent again).
//! - An ack leaves the coordinator only after the samples and seq it covers are flushed.
//! - The main loop never waits for metric work: it hands a batch over with `try_send` (a full
//!   queue drops the batch unacknowledged; the agent sends it again) and publishes acks
//!   with the MQTT client's `try_publish`.

pub mod check;
pub mod drops;
pub mod http;
pub mod ingest;
pub mod store;
pub mod view;

pub use check::{check_batch, BatchVerdict, CheckedBatch, Limits, Reason};
pub use drops::DropCounters;
pub use ingest::{ingest_channel, IngestLink, Ingester, PendingAcks};
pub use store::{MetricQuery, MetricStore, QueryPage, StoredSample, MAX_QUERY_SAMPLES};

/// How far ahead of the coordinator's clock a sample's time may be (clock skew between nodes).
pub const MAX_FUTURE_SKEW_SECS: u64 = 5 * 60;

/// Largest magnitude of a stored value. Far above any real gauge or rate, and low enough that
/// summing millions of values in a judgment cannot overflow to infinity (`1e308` is finite
/// and parses, but two of them add up to `inf`).
pub const MAX_ABS_VALUE: f64 = 1e15;

/// Default `--metrics-retention`.
pub const DEFAULT_RETENTION: &str = "7d";
