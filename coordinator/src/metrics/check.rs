//! The gate between a node's metrics topic and the store: which samples of a batch are
//! stored, which are refused and why, and what is acknowledged. Pure: no I/O, no clock.
//!
//! A batch is refused whole (nothing in it is dealt with, its seqs are not acknowledged) when
//! it comes from a node the inventory does not know, is over [`MAX_BATCH_BYTES`], does not
//! parse, names another node than its topic, speaks a newer protocol, or carries more than
//! [`MAX_SAMPLES_PER_BATCH`] samples. Otherwise each sample is judged alone, in batch order:
//! a seq at or below the highest one dealt with is a duplicate (ignored, not an error); a
//! sample with a bad timestamp or bad values is refused for good (dealt with: acknowledged so
//! the agent stops sending it, never stored); the rest are stored.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use protocol::telemetry::{
    valid_metric_name, MetricBatch, Sample, MAX_BATCH_BYTES, MAX_SAMPLES_PER_BATCH,
    MAX_VALUES_PER_SAMPLE,
};
use protocol::{NodeId, UnixSeconds, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};

use super::{MAX_ABS_VALUE, MAX_FUTURE_SKEW_SECS};

/// Why input was dropped. Batch-level reasons count batches, sample-level ones samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// Batch from a node id the inventory has no state report for.
    UnknownNode,
    /// Batch over `MAX_BATCH_BYTES`, or with more than `MAX_SAMPLES_PER_BATCH` samples.
    Oversized,
    /// Batch that is not a `MetricBatch` in JSON (garbage, a number out of range, …).
    Malformed,
    /// Batch whose `node` is not the node of the topic it came on.
    WrongNode,
    /// Batch of a protocol newer than this coordinator's.
    NewerProtocol,
    /// Sample taken too far in the future or further back than the retention.
    BadTimestamp,
    /// Sample with too many values, an invalid metric name, or a value that is not finite or
    /// is beyond `MAX_ABS_VALUE`.
    BadValues,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::UnknownNode,
        Reason::Oversized,
        Reason::Malformed,
        Reason::WrongNode,
        Reason::NewerProtocol,
        Reason::BadTimestamp,
        Reason::BadValues,
    ];

    /// The name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownNode => "unknown_node",
            Reason::Oversized => "oversized",
            Reason::Malformed => "malformed",
            Reason::WrongNode => "wrong_node",
            Reason::NewerProtocol => "newer_protocol",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::BadValues => "bad_values",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a batch is judged against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The coordinator's clock, Unix seconds.
    pub now: UnixSeconds,
    /// Samples older than this are refused (they would be pruned at once).
    pub retention: Duration,
}

/// A refusal with the detail an operator needs to find the culprit.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: Reason,
    pub detail: String,
}

/// The outcome of [`check_batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum BatchVerdict {
    /// Nothing in the batch is dealt with.
    Refused(Refusal),
    Checked(CheckedBatch),
}

/// A batch that passed the batch-level checks, with each sample judged.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedBatch {
    pub labels: BTreeMap<String, String>,
    /// What the agent says it dropped while its buffer was full (a running total).
    pub dropped_total: u64,
    /// The samples to store, in batch order, seqs strictly increasing.
    pub accepted: Vec<Sample>,
    /// Samples refused for good, per reason.
    pub refused: BTreeMap<Reason, u64>,
    /// The first sample refusal, for the log.
    pub first_refusal: Option<Refusal>,
    /// Samples at or below the highest seq dealt with: re-deliveries, ignored.
    pub duplicates: u64,
    /// The highest seq dealt with after this batch: what is acknowledged.
    pub up_to: u64,
}

/// Judges one message from `{prefix}/nodes/{node}/metrics`. `known` says whether the
/// inventory has a state report for `node`; `highest` is the highest seq dealt with for it.
/// `len` is the message's size: its bytes are not read when the node is unknown or `len` is
/// over [`MAX_BATCH_BYTES`], so a caller need not keep the bytes of such a message.
pub fn check_batch(
    node: &NodeId,
    known: bool,
    len: usize,
    payload: &[u8],
    highest: u64,
    limits: &Limits,
) -> BatchVerdict {
    let refuse = |reason, detail: String| BatchVerdict::Refused(Refusal { reason, detail });
    if !known {
        return refuse(
            Reason::UnknownNode,
            "no state report from this node yet (is it an agent of this fleet?)".to_owned(),
        );
    }
    if len > MAX_BATCH_BYTES {
        return refuse(
            Reason::Oversized,
            format!("{len} bytes, over the {MAX_BATCH_BYTES}-byte limit"),
        );
    }
    let batch: MetricBatch = match serde_json::from_slice(payload) {
        Ok(batch) => batch,
        Err(error) => return refuse(Reason::Malformed, error.to_string()),
    };
    if batch.node != *node {
        return refuse(
            Reason::WrongNode,
            format!("the batch names node {}", batch.node),
        );
    }
    if batch.protocol > PROTOCOL_VERSION {
        return refuse(
            Reason::NewerProtocol,
            format!(
                "protocol {} (this coordinator speaks {PROTOCOL_VERSION}; upgrade it)",
                batch.protocol
            ),
        );
    }
    if batch.samples.len() > MAX_SAMPLES_PER_BATCH {
        return refuse(
            Reason::Oversized,
            format!(
                "{} samples, over the limit of {MAX_SAMPLES_PER_BATCH}",
                batch.samples.len()
            ),
        );
    }

    let mut checked = CheckedBatch {
        labels: batch.labels,
        dropped_total: batch.dropped_total,
        accepted: Vec::new(),
        refused: BTreeMap::new(),
        first_refusal: None,
        duplicates: 0,
        up_to: highest,
    };
    for sample in batch.samples {
        if sample.seq <= checked.up_to {
            checked.duplicates += 1;
            continue;
        }
        checked.up_to = sample.seq;
        match check_sample(&sample, limits) {
            Ok(()) => checked.accepted.push(sample),
            Err(refusal) => {
                *checked.refused.entry(refusal.reason).or_default() += 1;
                checked.first_refusal.get_or_insert(refusal);
            }
        }
    }
    BatchVerdict::Checked(checked)
}

/// The checks of one sample after its seq was found new.
fn check_sample(sample: &Sample, limits: &Limits) -> Result<(), Refusal> {
    let seq = sample.seq;
    let refuse = |reason, detail: String| Refusal {
        reason,
        detail: format!("sample {seq}: {detail}"),
    };
    let latest = limits.now.saturating_add(MAX_FUTURE_SKEW_SECS);
    if sample.at > latest {
        return Err(refuse(
            Reason::BadTimestamp,
            format!(
                "taken at {}, {}s ahead of the coordinator's clock (is the node's clock right?)",
                sample.at,
                sample.at - limits.now
            ),
        ));
    }
    let earliest = limits.now.saturating_sub(limits.retention.as_secs());
    if sample.at < earliest {
        return Err(refuse(
            Reason::BadTimestamp,
            format!(
                "taken at {}, older than the retention ({}s)",
                sample.at,
                limits.retention.as_secs()
            ),
        ));
    }
    if sample.values.len() > MAX_VALUES_PER_SAMPLE {
        return Err(refuse(
            Reason::BadValues,
            format!(
                "{} values, over the limit of {MAX_VALUES_PER_SAMPLE}",
                sample.values.len()
            ),
        ));
    }
    for (name, value) in &sample.values {
        if !valid_metric_name(name) {
            let shown: String = name.chars().take(80).collect();
            return Err(refuse(
                Reason::BadValues,
                format!("invalid metric name {shown:?}"),
            ));
        }
        if !value.is_finite() || value.abs() > MAX_ABS_VALUE {
            return Err(refuse(
                Reason::BadValues,
                format!("{name} = {value:e} is not a finite value within ±{MAX_ABS_VALUE:e}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::telemetry::names;
    use protocol::{AppName, ReleaseId, Version};

    const NOW: UnixSeconds = 1_700_000_000;
    const WEEK: Duration = Duration::from_secs(7 * 86_400);

    fn n1() -> NodeId {
        NodeId::new("n1").unwrap()
    }

    fn limits() -> Limits {
        Limits {
            now: NOW,
            retention: WEEK,
        }
    }

    fn sample(seq: u64, at: UnixSeconds) -> Sample {
        Sample {
            seq,
            at,
            version: Some(ReleaseId::new(
                AppName::new("web").unwrap(),
                Version::new("1").unwrap(),
            )),
            values: BTreeMap::from([
                (names::HOST_CPU_PERCENT.to_owned(), 12.5),
                (names::APP_ERROR_RATE.to_owned(), 0.01),
            ]),
        }
    }

    fn batch(samples: Vec<Sample>) -> MetricBatch {
        MetricBatch {
            protocol: PROTOCOL_VERSION,
            node: n1(),
            labels: BTreeMap::from([("ring".to_owned(), "canary".to_owned())]),
            dropped_total: 3,
            samples,
        }
    }

    fn check(payload: &[u8], highest: u64) -> BatchVerdict {
        check_batch(&n1(), true, payload.len(), payload, highest, &limits())
    }

    fn checked(batch: &MetricBatch, highest: u64) -> CheckedBatch {
        match check(&serde_json::to_vec(batch).unwrap(), highest) {
            BatchVerdict::Checked(checked) => checked,
            BatchVerdict::Refused(refusal) => panic!("refused: {refusal:?}"),
        }
    }

    fn refused(verdict: BatchVerdict) -> Reason {
        match verdict {
            BatchVerdict::Refused(refusal) => refusal.reason,
            BatchVerdict::Checked(checked) => panic!("accepted: {checked:?}"),
        }
    }

    #[test]
    fn a_valid_batch_is_accepted_whole_and_acknowledged_up_to_its_last_seq() {
        let batch = batch(vec![
            sample(1, NOW - 20),
            sample(2, NOW - 10),
            sample(3, NOW),
        ]);
        let checked = checked(&batch, 0);
        assert_eq!(checked.accepted, batch.samples);
        assert_eq!(checked.up_to, 3);
        assert_eq!((checked.duplicates, checked.refused.len()), (0, 0));
        assert_eq!(checked.dropped_total, 3);
        assert_eq!(checked.labels["ring"], "canary");
    }

    #[test]
    fn samples_at_or_below_the_highest_seq_are_duplicates_not_errors() {
        let batch = batch(vec![sample(4, NOW), sample(5, NOW), sample(6, NOW)]);
        let checked = checked(&batch, 5);
        assert_eq!(checked.accepted, vec![sample(6, NOW)]);
        assert_eq!(checked.duplicates, 2);
        assert!(checked.refused.is_empty());
        assert_eq!(checked.up_to, 6);

        // A batch out of order: the later, lower seq is a duplicate of what was dealt with.
        let checked = self::checked(
            &self::batch(vec![sample(9, NOW), sample(8, NOW), sample(10, NOW)]),
            0,
        );
        let seqs: Vec<u64> = checked.accepted.iter().map(|s| s.seq).collect();
        assert_eq!(
            (seqs, checked.duplicates, checked.up_to),
            (vec![9, 10], 1, 10)
        );

        // All duplicates: nothing new, the ack repeats the highest seq.
        let checked = self::checked(&self::batch(vec![sample(1, NOW)]), 10);
        assert_eq!((checked.accepted.len(), checked.up_to), (0, 10));
    }

    #[test]
    fn unknown_nodes_are_refused_before_their_payload_is_read() {
        let payload = serde_json::to_vec(&batch(vec![sample(1, NOW)])).unwrap();
        let verdict = check_batch(&n1(), false, payload.len(), &payload, 0, &limits());
        assert_eq!(refused(verdict), Reason::UnknownNode);
        assert_eq!(
            refused(check_batch(&n1(), false, 7, b"garbage", 0, &limits())),
            Reason::UnknownNode
        );
    }

    #[test]
    fn malformed_payloads_are_refused() {
        for payload in [
            &b"\xff\x00garbage"[..],
            b"",
            b"{}",
            b"[1,2,3]",
            br#"{"protocol":1,"node":"n1","labels":{},"dropped_total":0,"samples":[{"seq":1,"at":1,"version":null,"values":{"x":NaN}}]}"#,
        ] {
            assert_eq!(refused(check(payload, 0)), Reason::Malformed, "{payload:?}");
        }
        // 1e400 is out of f64's range: serde_json refuses the number, so the whole batch.
        let text = serde_json::to_string(&batch(vec![sample(1, NOW)]))
            .unwrap()
            .replace("12.5", "1e400");
        assert!(text.contains("1e400"));
        assert_eq!(refused(check(text.as_bytes(), 0)), Reason::Malformed);
    }

    #[test]
    fn oversized_batches_are_refused_by_bytes_and_by_sample_count() {
        let mut big = batch(vec![sample(1, NOW)]);
        big.labels
            .insert("padding".to_owned(), "x".repeat(MAX_BATCH_BYTES));
        assert_eq!(
            refused(check(&serde_json::to_vec(&big).unwrap(), 0)),
            Reason::Oversized
        );
        // The bytes of an oversized message need not be kept: they are not read.
        let verdict = check_batch(&n1(), true, 16 << 20, b"", 0, &limits());
        match verdict {
            BatchVerdict::Refused(refusal) => {
                assert_eq!(refusal.reason, Reason::Oversized);
                assert!(
                    refusal.detail.starts_with("16777216 bytes"),
                    "{}",
                    refusal.detail
                );
            }
            BatchVerdict::Checked(checked) => panic!("accepted: {checked:?}"),
        }
        let many = batch(
            (1..=MAX_SAMPLES_PER_BATCH as u64 + 1)
                .map(|seq| sample(seq, NOW))
                .collect(),
        );
        assert_eq!(
            refused(check(&serde_json::to_vec(&many).unwrap(), 0)),
            Reason::Oversized
        );
        let full = batch(
            (1..=MAX_SAMPLES_PER_BATCH as u64)
                .map(|seq| sample(seq, NOW))
                .collect(),
        );
        assert_eq!(checked(&full, 0).accepted.len(), MAX_SAMPLES_PER_BATCH);
    }

    #[test]
    fn a_batch_naming_another_node_or_a_newer_protocol_is_refused() {
        let mut other = batch(vec![sample(1, NOW)]);
        other.node = NodeId::new("n2").unwrap();
        assert_eq!(
            refused(check(&serde_json::to_vec(&other).unwrap(), 0)),
            Reason::WrongNode
        );
        let mut newer = batch(vec![sample(1, NOW)]);
        newer.protocol = PROTOCOL_VERSION + 1;
        assert_eq!(
            refused(check(&serde_json::to_vec(&newer).unwrap(), 0)),
            Reason::NewerProtocol
        );
    }

    #[test]
    fn samples_from_the_far_future_or_past_are_refused_for_good_and_acknowledged() {
        let batch = batch(vec![
            sample(1, NOW + MAX_FUTURE_SKEW_SECS + 1),
            sample(2, NOW + MAX_FUTURE_SKEW_SECS),
            sample(3, NOW - WEEK.as_secs() - 1),
            sample(4, NOW - WEEK.as_secs()),
            sample(5, 0),
            sample(6, u64::MAX),
        ]);
        let checked = checked(&batch, 0);
        let seqs: Vec<u64> = checked.accepted.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, [2, 4]);
        assert_eq!(checked.refused, BTreeMap::from([(Reason::BadTimestamp, 4)]));
        assert_eq!(checked.up_to, 6, "refused samples are dealt with too");
        let first = checked.first_refusal.expect("a refusal");
        assert!(first.detail.starts_with("sample 1: "), "{}", first.detail);
    }

    #[test]
    fn samples_with_bad_names_too_many_values_or_huge_values_are_refused() {
        let with = |seq: u64, values: Vec<(String, f64)>| Sample {
            values: values.into_iter().collect(),
            ..sample(seq, NOW)
        };
        let batch = batch(vec![
            with(1, vec![("bad-name".to_owned(), 1.0)]),
            with(2, vec![("x".to_owned(), 1e308)]),
            with(3, vec![("x".to_owned(), -1e300)]),
            with(
                4,
                (0..=MAX_VALUES_PER_SAMPLE)
                    .map(|i| (format!("m{i}"), 1.0))
                    .collect(),
            ),
            with(
                5,
                vec![("x".to_owned(), MAX_ABS_VALUE), ("y".to_owned(), -0.0)],
            ),
            with(6, vec![(String::new(), 1.0)]),
        ]);
        let checked = checked(&batch, 0);
        let seqs: Vec<u64> = checked.accepted.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, [5]);
        assert_eq!(checked.refused, BTreeMap::from([(Reason::BadValues, 5)]));
    }

    #[test]
    fn non_finite_values_are_refused_even_if_they_got_past_the_parser() {
        let mut bad = sample(1, NOW);
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            bad.values.insert("x".to_owned(), value);
            assert_eq!(
                check_sample(&bad, &limits()).map_err(|r| r.reason),
                Err(Reason::BadValues)
            );
        }
    }

    #[test]
    fn reasons_have_stable_names() {
        for reason in Reason::ALL {
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::Value::from(reason.as_str())
            );
        }
    }
}
