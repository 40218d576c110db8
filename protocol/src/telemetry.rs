//! Health telemetry: the samples an agent reports and the coordinator judges canaries on.
//!
//! An agent takes one [`Sample`] per interval: host metrics (CPU, memory, disk, load) and the
//! running app's own metrics derived from its Prometheus endpoint, tagged with the version
//! that produced them and the time. Samples are numbered per node (`seq`, from 1, never
//! reused) and sent oldest first in [`MetricBatch`]es; the coordinator stores each seq at
//! most once and answers with a [`MetricAck`] naming the highest seq it has dealt with, after
//! which the agent forgets those samples. So a sample is delivered at least once, stored at
//! most once, and in order.
//!
//! Standard metric names live in [`names`], so the agent that produces them and the judge's
//! defaults that refer to them cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::{NodeId, ReleaseId};
use crate::UnixSeconds;

/// Most samples in one batch.
pub const MAX_SAMPLES_PER_BATCH: usize = 120;
/// Most metric values in one sample.
pub const MAX_VALUES_PER_SAMPLE: usize = 64;
/// Largest batch payload either side sends or accepts, in bytes.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Longest metric name.
pub const MAX_METRIC_NAME: usize = 64;

/// The standard metric names. App-defined series are reported as `app:` + their Prometheus
/// name (see [`app_defined`]).
pub mod names {
    /// Share of one core's worth of CPU time used by the whole host, 0–100 × cores.
    pub const HOST_CPU_PERCENT: &str = "host_cpu_percent";
    /// Used memory as a share of total memory, 0–100.
    pub const HOST_MEM_USED_PERCENT: &str = "host_mem_used_percent";
    /// Used space on the filesystem holding the agent's data directory, 0–100.
    pub const HOST_DISK_USED_PERCENT: &str = "host_disk_used_percent";
    /// One-minute load average.
    pub const HOST_LOAD1: &str = "host_load1";
    /// Traffic requests per second answered by the app over the interval.
    pub const APP_REQUEST_RATE: &str = "app_request_rate";
    /// Share of the interval's requests answered with a 5xx status, 0–1. Absent when the
    /// interval had no requests.
    pub const APP_ERROR_RATE: &str = "app_error_rate";
    /// Latency percentiles over the interval's requests, in milliseconds, interpolated within
    /// the app's histogram buckets. Absent when the interval had no requests.
    pub const APP_LATENCY_P50_MS: &str = "app_latency_p50_ms";
    pub const APP_LATENCY_P90_MS: &str = "app_latency_p90_ms";
    pub const APP_LATENCY_P99_MS: &str = "app_latency_p99_ms";

    /// The name an app-defined Prometheus series is reported under.
    pub fn app_defined(prometheus_name: &str) -> String {
        format!("app:{prometheus_name}")
    }
}

/// Whether `name` is an acceptable metric name: 1 to [`MAX_METRIC_NAME`] characters from
/// `a-z A-Z 0-9 _ :`, not starting with a digit.
pub fn valid_metric_name(name: &str) -> bool {
    (1..=MAX_METRIC_NAME).contains(&name.len())
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':'))
}

/// One interval's measurements on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Per-node sample number, from 1, increasing by one per sample taken (a gap means the
    /// agent dropped samples while its buffer was full).
    pub seq: u64,
    /// When the sample was taken (the end of its interval).
    pub at: UnixSeconds,
    /// The version that was taking traffic during the interval; `None` when none was.
    pub version: Option<ReleaseId>,
    /// Metric name → value. Values are always finite.
    pub values: BTreeMap<String, f64>,
}

/// Agent → coordinator on the node's metrics topic: buffered samples, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricBatch {
    pub protocol: u32,
    pub node: NodeId,
    /// The node's labels, which tag every sample of the batch.
    pub labels: BTreeMap<String, String>,
    /// Samples the agent dropped, oldest first, because its buffer was full while the broker
    /// was unreachable; a running total since the node's data directory was created.
    pub dropped_total: u64,
    pub samples: Vec<Sample>,
}

/// Coordinator → agent on the node's metrics-ack topic: every sample up to and including
/// `up_to` has been stored (or refused for good, e.g. a bad timestamp) and need not be sent
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricAck {
    pub protocol: u32,
    pub up_to: u64,
}

/// The `q` quantile (0 < q < 1) of a histogram given as cumulative counts per upper bound
/// (Prometheus `le` buckets, ascending, without `+Inf`) and the total count (the `+Inf`
/// bucket), by linear interpolation within the bucket it falls in, as Prometheus'
/// `histogram_quantile` does. Observations above the last bound are reported at the last
/// bound. `None` when there are no observations or the input is not a histogram.
pub fn histogram_quantile(bounds: &[f64], cumulative: &[u64], total: u64, q: f64) -> Option<f64> {
    if total == 0 || bounds.len() != cumulative.len() || !(q > 0.0 && q < 1.0) {
        return None;
    }
    if cumulative.windows(2).any(|w| w[1] < w[0]) || cumulative.last().is_some_and(|&c| c > total) {
        return None;
    }
    let rank = q * total as f64;
    let mut lower_bound = 0.0;
    let mut below = 0u64;
    for (&bound, &count) in bounds.iter().zip(cumulative) {
        if count as f64 >= rank {
            let in_bucket = (count - below) as f64;
            let fraction = if in_bucket > 0.0 {
                (rank - below as f64) / in_bucket
            } else {
                1.0
            };
            return Some(lower_bound + (bound - lower_bound) * fraction);
        }
        lower_bound = bound;
        below = count;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{AppName, Version};

    #[test]
    fn metric_names_are_prometheus_like_and_bounded() {
        for good in [names::APP_ERROR_RATE, "app:queue_depth", "x", "A_b:c9"] {
            assert!(valid_metric_name(good), "{good}");
        }
        for bad in ["", "9x", "a-b", "a b", "é", &"a".repeat(65)] {
            assert!(!valid_metric_name(bad), "{bad}");
        }
        assert_eq!(names::app_defined("queue_depth"), "app:queue_depth");
    }

    #[test]
    fn histogram_quantiles_interpolate_within_the_bucket() {
        let bounds = [0.1, 0.2, 0.4];
        // 10 below 0.1, 10 in (0.1, 0.2], none in (0.2, 0.4], 0 above.
        let cumulative = [10, 20, 20];
        assert_eq!(histogram_quantile(&bounds, &cumulative, 20, 0.5), Some(0.1));
        let p75 = histogram_quantile(&bounds, &cumulative, 20, 0.75).unwrap();
        assert!((p75 - 0.15).abs() < 1e-12, "{p75}");
        // Everything above the last bound: reported at the last bound.
        assert_eq!(histogram_quantile(&bounds, &[0, 0, 0], 5, 0.99), Some(0.4));
        assert_eq!(histogram_quantile(&bounds, &[0, 0, 0], 0, 0.5), None);
        assert_eq!(histogram_quantile(&bounds, &[5, 3, 9], 9, 0.5), None);
        assert_eq!(histogram_quantile(&bounds, &cumulative, 20, 1.0), None);
    }

    /// The wire format is a contract: a change here must be deliberate.
    #[test]
    fn wire_format_of_batches_is_stable() {
        let batch = MetricBatch {
            protocol: 1,
            node: NodeId::new("n1").unwrap(),
            labels: BTreeMap::from([("ring".to_owned(), "canary".to_owned())]),
            dropped_total: 2,
            samples: vec![Sample {
                seq: 7,
                at: 100,
                version: Some(ReleaseId::new(
                    AppName::new("web").unwrap(),
                    Version::new("2").unwrap(),
                )),
                values: BTreeMap::from([(names::APP_ERROR_RATE.to_owned(), 0.5)]),
            }],
        };
        assert_eq!(
            serde_json::to_string(&batch).unwrap(),
            r#"{"protocol":1,"node":"n1","labels":{"ring":"canary"},"dropped_total":2,"samples":[{"seq":7,"at":100,"version":{"app":"web","version":"2"},"values":{"app_error_rate":0.5}}]}"#
        );
        let ack = MetricAck {
            protocol: 1,
            up_to: 7,
        };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"protocol":1,"up_to":7}"#
        );
    }
}
