//! Chunk-delivery counters since the coordinator started: what it sent over MQTT and HTTP,
//! and what nodes asked for. Read by `GET /api/stats` (body: [`crate::api::StatsView`]).
//!
//! One [`Stats`] per `serve`, shared by the HTTP server (chunks served, 404s) and the main loop
//! (chunk requests, fan-out decisions, frames handed to the MQTT client). Plain relaxed atomics:
//! each counter is exact on its own; a snapshot taken while traffic flows may mix counts from
//! slightly different instants.
//!
//! Invariant: every digest of a chunk request that the main loop acts on is counted exactly
//! once as queued, deduped, unknown or dropped, so `digests_requested` is their sum.

use std::sync::atomic::{AtomicU64, Ordering};

use protocol::UnixSeconds;

use crate::api::StatsView;

/// What happened to one requested digest in the main loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestOutcome {
    /// Queued to be read and published.
    Queued,
    /// Not queued: already queued, or published on the shared topic within the fan-out window.
    Deduped,
    /// The release does not list it.
    Unknown,
    /// The send queue was full; the agent asks again.
    Dropped,
}

#[derive(Debug)]
pub struct Stats {
    started_at: UnixSeconds,
    mqtt_frames: AtomicU64,
    mqtt_frame_bytes: AtomicU64,
    chunk_requests: AtomicU64,
    chunk_requests_refused: AtomicU64,
    digests_requested: AtomicU64,
    digests_queued: AtomicU64,
    digests_deduped: AtomicU64,
    digests_unknown: AtomicU64,
    digests_dropped: AtomicU64,
    http_chunks: AtomicU64,
    http_chunk_bytes: AtomicU64,
    http_not_found: AtomicU64,
}

fn add(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Stats {
    pub fn new(started_at: UnixSeconds) -> Stats {
        Stats {
            started_at,
            mqtt_frames: AtomicU64::new(0),
            mqtt_frame_bytes: AtomicU64::new(0),
            chunk_requests: AtomicU64::new(0),
            chunk_requests_refused: AtomicU64::new(0),
            digests_requested: AtomicU64::new(0),
            digests_queued: AtomicU64::new(0),
            digests_deduped: AtomicU64::new(0),
            digests_unknown: AtomicU64::new(0),
            digests_dropped: AtomicU64::new(0),
            http_chunks: AtomicU64::new(0),
            http_chunk_bytes: AtomicU64::new(0),
            http_not_found: AtomicU64::new(0),
        }
    }

    /// A chunk frame was handed to the MQTT client; `payload_bytes` is the whole MQTT payload
    /// (frame header and zstd frame).
    pub fn frame_published(&self, payload_bytes: usize) {
        add(&self.mqtt_frames, 1);
        add(&self.mqtt_frame_bytes, payload_bytes as u64);
    }

    /// A message arrived on a node's chunk-request topic; `refused` if it was not acted on at
    /// all (malformed, oversized, or for a release never published).
    pub fn chunk_request(&self, refused: bool) {
        add(&self.chunk_requests, 1);
        if refused {
            add(&self.chunk_requests_refused, 1);
        }
    }

    /// `count` digests of an acted-on chunk request ended as `outcome`.
    pub fn digests(&self, outcome: DigestOutcome, count: usize) {
        let count = count as u64;
        add(&self.digests_requested, count);
        let counter = match outcome {
            DigestOutcome::Queued => &self.digests_queued,
            DigestOutcome::Deduped => &self.digests_deduped,
            DigestOutcome::Unknown => &self.digests_unknown,
            DigestOutcome::Dropped => &self.digests_dropped,
        };
        add(counter, count);
    }

    /// `GET /chunks/{digest}` answered with a chunk of `body_bytes`.
    pub fn http_chunk_served(&self, body_bytes: usize) {
        add(&self.http_chunks, 1);
        add(&self.http_chunk_bytes, body_bytes as u64);
    }

    /// `GET /chunks/{digest}` answered 404.
    pub fn http_not_found(&self) {
        add(&self.http_not_found, 1);
    }

    pub fn snapshot(&self, now: UnixSeconds) -> StatsView {
        StatsView {
            started_at: self.started_at,
            uptime_secs: now.saturating_sub(self.started_at),
            mqtt_frames_published: read(&self.mqtt_frames),
            mqtt_frame_bytes: read(&self.mqtt_frame_bytes),
            chunk_requests: read(&self.chunk_requests),
            chunk_requests_refused: read(&self.chunk_requests_refused),
            digests_requested: read(&self.digests_requested),
            digests_queued: read(&self.digests_queued),
            digests_deduped: read(&self.digests_deduped),
            digests_unknown: read(&self.digests_unknown),
            digests_dropped: read(&self.digests_dropped),
            http_chunks_served: read(&self.http_chunks),
            http_chunk_bytes: read(&self.http_chunk_bytes),
            http_not_found: read(&self.http_not_found),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_digests_are_the_sum_of_their_outcomes() {
        let stats = Stats::new(100);
        stats.chunk_request(false);
        stats.digests(DigestOutcome::Queued, 5);
        stats.digests(DigestOutcome::Deduped, 3);
        stats.digests(DigestOutcome::Unknown, 1);
        stats.digests(DigestOutcome::Dropped, 2);
        stats.chunk_request(true);
        stats.frame_published(1000);
        stats.frame_published(33);
        stats.http_chunk_served(700);
        stats.http_not_found();
        let view = stats.snapshot(160);
        assert_eq!(view.uptime_secs, 60);
        assert_eq!((view.chunk_requests, view.chunk_requests_refused), (2, 1));
        assert_eq!(view.digests_requested, 11);
        assert_eq!(
            view.digests_requested,
            view.digests_queued
                + view.digests_deduped
                + view.digests_unknown
                + view.digests_dropped
        );
        assert_eq!(
            (view.mqtt_frames_published, view.mqtt_frame_bytes),
            (2, 1033)
        );
        assert_eq!(
            (
                view.http_chunks_served,
                view.http_chunk_bytes,
                view.http_not_found
            ),
            (1, 700, 1)
        );
    }
}
