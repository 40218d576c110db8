//! When to send a batch of buffered samples, and what goes in it.
//!
//! The delivery contract (see `protocol::telemetry`): the oldest unacknowledged samples
//! first, at most [`MAX_SAMPLES_PER_BATCH`] and [`MAX_BATCH_BYTES`] per batch, one batch in
//! flight; the coordinator acknowledges the highest seq it has dealt with, and a batch not
//! acknowledged within the resend timeout is sent again (the coordinator ignores seqs it has
//! already dealt with, so a re-send costs bandwidth, never a duplicate).
//!
//! A batch that keeps going unacknowledged while the link is up (the coordinator is down
//! behind a broker that is not) is sent again after a timeout that doubles with each
//! attempt up to [`MAX_RESEND_AFTER`], so a long backlog does not cost a full batch every
//! few seconds until the coordinator returns; an ack or a reconnection starts over at once.
//!
//! [`Delivery`] sends only while the broker link is up. While it is down nothing is queued
//! towards the broker at all: the MQTT client would hold every publish in memory until it
//! reconnects, and then send stale copies of batches the next one repeats anyway. Samples
//! wait in the durable buffer instead, and a reconnection sends at once.
//!
//! Pure: no I/O; the caller passes `now`.

use std::collections::BTreeMap;
use std::time::Duration;

use protocol::telemetry::{MetricBatch, Sample, MAX_BATCH_BYTES, MAX_SAMPLES_PER_BATCH};
use protocol::NodeId;
use tokio::time::Instant;

/// How long a batch may go unacknowledged before it is sent again (the first time).
pub const RESEND_AFTER: Duration = Duration::from_secs(5);
/// The longest wait between two copies of an unacknowledged batch.
pub const MAX_RESEND_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    last_seq: u64,
    sent_at: Instant,
    /// Copies sent without an ack in between, from 1.
    attempt: u32,
}

/// The sender's state: whether the link is up and which batch awaits its acknowledgement.
#[derive(Debug)]
pub struct Delivery {
    link_up: bool,
    in_flight: Option<InFlight>,
    resend_after: Duration,
}

impl Delivery {
    /// Link down, nothing in flight.
    pub fn new(resend_after: Duration) -> Delivery {
        Delivery {
            link_up: false,
            in_flight: None,
            resend_after,
        }
    }

    /// (Re)connected: whatever was in flight may have been lost with the old connection, so
    /// the oldest samples go again now.
    pub fn link_up(&mut self) {
        self.link_up = true;
        self.in_flight = None;
    }

    pub fn link_down(&mut self) {
        self.link_up = false;
        self.in_flight = None;
    }

    /// The coordinator has dealt with every seq up to `up_to`. The batch in flight is done if
    /// the ack covers its last sample; an older ack (a reply to an earlier copy) leaves it
    /// waiting for its own.
    pub fn acked(&mut self, up_to: u64) {
        if self.in_flight.is_some_and(|f| f.last_seq <= up_to) {
            self.in_flight = None;
        }
    }

    /// Whether a batch may be sent now (if there is anything to send).
    pub fn may_send(&self, now: Instant) -> bool {
        self.link_up && self.in_flight.is_none_or(|f| now >= self.due(f))
    }

    /// A batch ending with `last_seq` was handed to the broker connection at `now`. With a
    /// batch still in flight, this is another copy of it: the next wait is twice as long.
    pub fn sent(&mut self, last_seq: u64, now: Instant) {
        let attempt = self.in_flight.map_or(1, |f| f.attempt.saturating_add(1));
        self.in_flight = Some(InFlight {
            last_seq,
            sent_at: now,
            attempt,
        });
    }

    /// When the batch in flight is due to be sent again, if one is.
    pub fn resend_at(&self) -> Option<Instant> {
        self.in_flight.filter(|_| self.link_up).map(|f| self.due(f))
    }

    fn due(&self, in_flight: InFlight) -> Instant {
        let doublings = in_flight.attempt.saturating_sub(1).min(16);
        let wait = self
            .resend_after
            .saturating_mul(1 << doublings)
            .min(MAX_RESEND_AFTER.max(self.resend_after));
        in_flight.sent_at + wait
    }
}

/// A batch ready to publish.
#[derive(Debug)]
pub struct Encoded {
    pub payload: Vec<u8>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub samples: usize,
}

/// The JSON of a batch of the longest prefix of `samples` (oldest first) within
/// [`MAX_SAMPLES_PER_BATCH`] and [`MAX_BATCH_BYTES`]; `None` if `samples` is empty. A
/// single sample always goes, even alone over the byte limit, so that nothing can block the
/// buffer for good; none comes close (64 values with names of at most 64 bytes).
pub fn encode(
    node: &NodeId,
    labels: &BTreeMap<String, String>,
    dropped_total: u64,
    samples: &[Sample],
) -> Option<Encoded> {
    let mut batch = MetricBatch {
        protocol: protocol::PROTOCOL_VERSION,
        node: node.clone(),
        labels: labels.clone(),
        dropped_total,
        samples: Vec::new(),
    };
    // Compact JSON: the batch is its envelope plus each sample's own encoding, comma
    // separated, so sizes add up without encoding the batch again and again.
    let mut size = json_len(&batch);
    for sample in samples.iter().take(MAX_SAMPLES_PER_BATCH) {
        let added = json_len(sample) + usize::from(!batch.samples.is_empty());
        if !batch.samples.is_empty() && size + added > MAX_BATCH_BYTES {
            break;
        }
        size += added;
        batch.samples.push(sample.clone());
    }
    let first_seq = batch.samples.first()?.seq;
    let last_seq = batch.samples.last()?.seq;
    let payload = serde_json::to_vec(&batch).expect("batches serialize");
    debug_assert_eq!(payload.len(), size);
    Some(Encoded {
        payload,
        first_seq,
        last_seq,
        samples: batch.samples.len(),
    })
}

fn json_len(value: &impl serde::Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

#[cfg(test)]
mod tests {
    use protocol::telemetry::{names, MetricBatch, MAX_METRIC_NAME, MAX_VALUES_PER_SAMPLE};

    use super::*;

    /// A sample with `values` values of the longest names; `long_values` makes each value
    /// print as long as an f64 can.
    fn sample(seq: u64, values: usize, long_values: bool) -> Sample {
        let value = if long_values {
            -1.234_567_890_123_456_7e-300
        } else {
            0.5
        };
        Sample {
            seq,
            at: 1_700_000_000 + seq % 1_000,
            version: None,
            values: (0..values)
                .map(|i| {
                    let name = format!("app:{i:0>width$}", width = MAX_METRIC_NAME - 4);
                    (name, value)
                })
                .collect(),
        }
    }

    fn node() -> NodeId {
        NodeId::new("n1").unwrap()
    }

    #[test]
    fn sends_only_while_connected_one_batch_at_a_time() {
        let t0 = Instant::now();
        let mut d = Delivery::new(RESEND_AFTER);
        assert!(!d.may_send(t0), "not before the first connection");
        d.link_up();
        assert!(d.may_send(t0));
        d.sent(10, t0);
        assert!(!d.may_send(t0 + Duration::from_secs(1)), "one in flight");
        assert_eq!(d.resend_at(), Some(t0 + RESEND_AFTER));
        // An ack for an earlier copy does not release the batch in flight...
        d.acked(7);
        assert!(!d.may_send(t0 + Duration::from_secs(1)));
        // ...its own ack does.
        d.acked(10);
        assert!(d.may_send(t0 + Duration::from_secs(1)));
        assert_eq!(d.resend_at(), None);
    }

    #[test]
    fn an_unacknowledged_batch_goes_again_after_the_timeout_or_a_reconnection() {
        let t0 = Instant::now();
        let mut d = Delivery::new(RESEND_AFTER);
        d.link_up();
        d.sent(3, t0);
        assert!(!d.may_send(t0 + RESEND_AFTER - Duration::from_millis(1)));
        assert!(d.may_send(t0 + RESEND_AFTER));
        d.sent(3, t0);
        d.link_down();
        assert!(!d.may_send(t0 + RESEND_AFTER * 10), "nothing while offline");
        assert_eq!(d.resend_at(), None);
        d.link_up();
        assert!(d.may_send(t0), "at once after reconnecting");
    }

    #[test]
    fn repeated_copies_wait_longer_each_time_until_an_ack_or_a_reconnection() {
        let t0 = Instant::now();
        let mut d = Delivery::new(RESEND_AFTER);
        d.link_up();
        let mut at = t0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            d.sent(3, at);
            let due = d.resend_at().unwrap();
            waits.push((due - at).as_secs());
            assert!(!d.may_send(due - Duration::from_millis(1)));
            assert!(d.may_send(due));
            at = due;
        }
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        // An ack starts over: the next batch's first wait is the short one.
        d.acked(3);
        d.sent(4, at);
        assert_eq!(d.resend_at(), Some(at + RESEND_AFTER));
        // So does a reconnection.
        d.sent(4, at);
        d.link_down();
        d.link_up();
        d.sent(4, at);
        assert_eq!(d.resend_at(), Some(at + RESEND_AFTER));
    }

    #[test]
    fn a_batch_holds_the_oldest_samples_within_both_limits() {
        let labels = BTreeMap::from([("ring".to_owned(), "canary".to_owned())]);
        let small: Vec<Sample> = (1..=200).map(|seq| sample(seq, 1, false)).collect();
        let batch = encode(&node(), &labels, 7, &small).unwrap();
        assert_eq!(batch.samples, MAX_SAMPLES_PER_BATCH);
        assert_eq!((batch.first_seq, batch.last_seq), (1, 120));
        let decoded: MetricBatch = serde_json::from_slice(&batch.payload).unwrap();
        assert_eq!(decoded.samples, small[..MAX_SAMPLES_PER_BATCH]);
        assert_eq!(decoded.dropped_total, 7);
        assert_eq!(decoded.labels, labels);
        assert_eq!(decoded.node, node());

        // Full samples: far fewer fit in the byte limit, and the limit holds exactly.
        let full: Vec<Sample> = (5..200)
            .map(|seq| sample(seq, MAX_VALUES_PER_SAMPLE, true))
            .collect();
        let batch = encode(&node(), &labels, 0, &full).unwrap();
        assert!(
            batch.payload.len() <= MAX_BATCH_BYTES,
            "{}",
            batch.payload.len()
        );
        assert!(batch.samples > 10 && batch.samples < MAX_SAMPLES_PER_BATCH);
        let one_more = encode(&node(), &labels, 0, &full[..batch.samples + 1]).unwrap();
        assert_eq!(one_more.samples, batch.samples, "the next one did not fit");
        assert_eq!(batch.first_seq, 5);
        assert_eq!(batch.last_seq, 4 + batch.samples as u64);
        assert!(encode(&node(), &labels, 0, &[]).is_none());
    }

    #[test]
    fn the_largest_sample_is_far_below_the_batch_limit() {
        let mut largest = sample(u64::MAX, MAX_VALUES_PER_SAMPLE, true);
        largest
            .values
            .insert(names::HOST_LOAD1.to_owned(), f64::MAX);
        let len = serde_json::to_vec(&largest).unwrap().len();
        assert!(len * 20 < MAX_BATCH_BYTES, "{len}");
    }
}
