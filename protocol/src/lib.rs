//! The wire contract between the coordinator and its agents.
//!
//! Owns every topic string ([`topics`]), every message type ([`messages`], [`manifest`]),
//! the signed envelope ([`envelope`]) and the pinned image-format parameters ([`format`]).
//!
//! **Architecture invariant**: this crate does no I/O. It turns bytes into checked values and
//! back; where the bytes come from is the caller's business.

pub mod broker;
pub mod digest;
pub mod envelope;
pub mod format;
pub mod manifest;
pub mod messages;
pub mod names;
pub mod run;
pub mod telemetry;
pub mod topics;
pub mod units;

pub use broker::BrokerAddr;
pub use digest::Digest;
pub use envelope::{Envelope, EnvelopeError, KeyId, Signed, TrustedKeys};
pub use manifest::{ChunkRef, Entry, Manifest, ManifestError, RelPath, ReleaseKind};
pub use names::{AppName, NameError, NodeId, ReleaseId, Version};
pub use run::RunSpec;
pub use topics::{NodeTopic, Topics};
pub use units::{human_bytes, human_duration, parse_duration, DurationError};

/// Version of this wire contract. Every message carries it; a peer refuses messages from a
/// newer major protocol rather than guessing at their meaning.
pub const PROTOCOL_VERSION: u32 = 1;

/// Seconds since the Unix epoch: the one time unit on the wire.
pub type UnixSeconds = u64;
