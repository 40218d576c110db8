//! App metrics per interval, derived from the difference between two consecutive scrapes of
//! the same process.
//!
//! Counters only mean something as differences: `http_requests_total` says how many
//! requests the process answered since it started, not in the last ten seconds. So each
//! scrape is reduced to a [`Snapshot`] of what the agent uses, and the [`Deriver`] keeps the
//! previous one as the baseline:
//! - `app_request_rate`: requests (summed over status codes) per second of the interval;
//! - `app_error_rate`: 5xx answers / requests over the interval (the `code` or `status` label
//!   of `http_requests_total`; without such labels, `http_request_errors_total`); absent
//!   when the interval had no requests;
//! - `app_latency_p50_ms`/`_p90_ms`/`_p99_ms`: quantiles of the interval's own histogram
//!   (bucket counts of `http_request_duration_seconds` minus the baseline's), interpolated
//!   within buckets by [`protocol::telemetry::histogram_quantile`]; absent when the
//!   interval had no requests;
//! - app-defined series, reported as `app:<name>`: every unlabelled gauge (or untyped
//!   series) as its current value, and every unlabelled counter as a per-second rate over
//!   the interval. Labelled series are not reported (a label set has no place in a flat
//!   sample), nor are the three standard families above. When they do not all fit in a
//!   sample, the first in name order are kept.
//!
//! **Invariants**: every value emitted is finite. All app values of one interval come from
//! the same process: a different release or port, or any counter going down (the process
//! restarted), yields no app values and makes the current scrape the new baseline. A scrape
//! that failed leaves the baseline as it was, so the next interval's rates cover the time
//! since the last good scrape.
//!
//! Pure: no I/O; scrape times are passed in.

use std::collections::BTreeMap;

use protocol::telemetry::{histogram_quantile, names, valid_metric_name, MAX_VALUES_PER_SAMPLE};
use protocol::ReleaseId;
use tokio::time::Instant;

use super::prom::{Exposition, Kind};

/// Requests answered, by status code.
pub const REQUESTS: &str = "http_requests_total";
/// Requests answered with a 5xx status, for apps that do not label `REQUESTS` by code.
pub const ERRORS: &str = "http_request_errors_total";
/// Request latency histogram, in seconds.
pub const LATENCY: &str = "http_request_duration_seconds";

/// The quantiles reported, and their names.
const QUANTILES: [(f64, &str); 3] = [
    (0.5, names::APP_LATENCY_P50_MS),
    (0.9, names::APP_LATENCY_P90_MS),
    (0.99, names::APP_LATENCY_P99_MS),
];

/// Which process a scrape came from: another release or another port is another process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessKey {
    pub release: ReleaseId,
    pub port: u16,
}

/// What the agent uses from one scrape. Only well-formed figures make it in: a family with
/// a non-finite or negative count, or a histogram that is not one, is left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    requests: Option<Requests>,
    latency: Option<Histogram>,
    gauges: BTreeMap<String, f64>,
    counters: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq)]
struct Requests {
    total: f64,
    /// `None` when the app says nothing about which requests failed.
    errors: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
struct Histogram {
    /// Finite upper bounds, ascending.
    bounds: Vec<f64>,
    /// Cumulative counts per bound.
    cumulative: Vec<f64>,
    /// The `+Inf` bucket: every observation.
    total: f64,
}

impl Snapshot {
    pub fn new(exposition: &Exposition) -> Snapshot {
        let mut snapshot = Snapshot {
            requests: requests(exposition),
            latency: histogram(exposition, &format!("{LATENCY}_bucket")),
            ..Snapshot::default()
        };
        for series in &exposition.series {
            if !series.labels.is_empty() || is_standard(&series.name) {
                continue;
            }
            let into = match exposition.kind_of(&series.name) {
                Kind::Gauge | Kind::Untyped if series.value.is_finite() => &mut snapshot.gauges,
                Kind::Counter if is_count(series.value) => &mut snapshot.counters,
                _ => continue,
            };
            // The first MAX_VALUES_PER_SAMPLE names of each kind are all a sample could
            // ever hold, whatever the other kind contributes.
            if valid_metric_name(&names::app_defined(&series.name))
                && (into.len() < MAX_VALUES_PER_SAMPLE || into.contains_key(&series.name))
            {
                into.insert(series.name.clone(), series.value);
            }
        }
        snapshot
    }
}

fn is_standard(name: &str) -> bool {
    name == REQUESTS || name == ERRORS || name.starts_with(LATENCY)
}

fn is_count(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

fn requests(exposition: &Exposition) -> Option<Requests> {
    let mut total = 0.0;
    let mut errors = 0.0;
    let mut seen = false;
    let mut labelled = false;
    for series in exposition.series.iter().filter(|s| s.name == REQUESTS) {
        if !is_count(series.value) {
            return None;
        }
        seen = true;
        total += series.value;
        if let Some(code) = series.label("code").or_else(|| series.label("status")) {
            labelled = true;
            if code.len() == 3 && code.starts_with('5') {
                errors += series.value;
            }
        }
    }
    if !seen {
        return None;
    }
    let errors = if labelled {
        Some(errors)
    } else {
        errors_counter(exposition)
    };
    Some(Requests { total, errors })
}

/// The sum of the `ERRORS` counter; `None` if it is absent or any of its values unusable.
fn errors_counter(exposition: &Exposition) -> Option<f64> {
    let mut counter = exposition
        .series
        .iter()
        .filter(|s| s.name == ERRORS)
        .peekable();
    counter.peek()?;
    // A sum of options is `None` as soon as one is.
    counter.map(|s| is_count(s.value).then_some(s.value)).sum()
}

/// The histogram whose bucket series are named `bucket`, summed over any labels besides
/// `le`.
fn histogram(exposition: &Exposition, bucket: &str) -> Option<Histogram> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for series in exposition.series.iter().filter(|s| s.name == bucket) {
        let le = match series.label("le")? {
            "+Inf" => f64::INFINITY,
            le => le.parse::<f64>().ok().filter(|b| b.is_finite())?,
        };
        if !is_count(series.value) {
            return None;
        }
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, count)) => *count += series.value,
            None => buckets.push((le, series.value)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (last, total) = buckets.pop()?;
    if last != f64::INFINITY {
        return None;
    }
    let (bounds, cumulative): (Vec<f64>, Vec<f64>) = buckets.into_iter().unzip();
    let monotonic = cumulative
        .iter()
        .chain([&total])
        .try_fold(0.0, |below, &c| (c >= below).then_some(c))
        .is_some();
    monotonic.then_some(Histogram {
        bounds,
        cumulative,
        total,
    })
}

/// Why an interval has no app values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebaseline {
    /// No earlier scrape to compare with.
    First,
    /// The previous scrape was of another process (release or port).
    OtherProcess,
    /// A counter went down: the process restarted.
    CounterReset,
}

/// The outcome of one scrape.
#[derive(Debug, Clone, PartialEq)]
pub enum Derived {
    /// The interval's app values (possibly none, if the app reports nothing usable).
    Values(BTreeMap<String, f64>),
    /// No app values this interval; the scrape is the new baseline.
    Rebaselined(Rebaseline),
}

/// Holds the baseline scrape between intervals.
#[derive(Debug, Default)]
pub struct Deriver {
    baseline: Option<(ProcessKey, Snapshot, Instant)>,
}

impl Deriver {
    /// Forgets the baseline: the next scrape only starts a new one.
    pub fn reset(&mut self) {
        self.baseline = None;
    }

    /// The app values for the interval that ends with this scrape of `key` taken `at`, at
    /// most `room` of them (the standard ones first, then app-defined ones in name order).
    pub fn observe(
        &mut self,
        key: ProcessKey,
        current: Snapshot,
        at: Instant,
        room: usize,
    ) -> Derived {
        let derived = match self.baseline.take() {
            None => Derived::Rebaselined(Rebaseline::First),
            Some((previous_key, _, _)) if previous_key != key => {
                Derived::Rebaselined(Rebaseline::OtherProcess)
            }
            Some((previous_key, previous, since)) => {
                let seconds = at.saturating_duration_since(since).as_secs_f64();
                if seconds <= 0.0 {
                    // Two scrapes at one instant say nothing about a rate; keep the older
                    // baseline so the next interval is measured from it.
                    self.baseline = Some((previous_key, previous, since));
                    return Derived::Values(BTreeMap::new());
                }
                match interval_values(&previous, &current, seconds, room) {
                    Some(values) => Derived::Values(values),
                    None => Derived::Rebaselined(Rebaseline::CounterReset),
                }
            }
        };
        self.baseline = Some((key, current, at));
        derived
    }
}

/// The values over `seconds` between two scrapes of one process; `None` if a counter went
/// down.
fn interval_values(
    previous: &Snapshot,
    current: &Snapshot,
    seconds: f64,
    room: usize,
) -> Option<BTreeMap<String, f64>> {
    let mut values = BTreeMap::new();
    if let (Some(before), Some(now)) = (&previous.requests, &current.requests) {
        let requests = now.total - before.total;
        if requests < 0.0 {
            return None;
        }
        put(
            &mut values,
            names::APP_REQUEST_RATE.to_owned(),
            requests / seconds,
        );
        if let (Some(before), Some(now)) = (before.errors, now.errors) {
            let errors = now - before;
            if errors < 0.0 {
                return None;
            }
            if requests > 0.0 && errors <= requests {
                put(
                    &mut values,
                    names::APP_ERROR_RATE.to_owned(),
                    errors / requests,
                );
            }
        }
    }
    if let (Some(before), Some(now)) = (&previous.latency, &current.latency) {
        if now.bounds == before.bounds {
            let mut cumulative = Vec::with_capacity(now.cumulative.len());
            for (now, before) in now.cumulative.iter().zip(&before.cumulative) {
                cumulative.push(count_delta(*now, *before)?);
            }
            let total = count_delta(now.total, before.total)?;
            for (q, name) in QUANTILES {
                if let Some(seconds) = histogram_quantile(&now.bounds, &cumulative, total, q) {
                    put(&mut values, name.to_owned(), seconds * 1000.0);
                }
            }
        }
    }
    let mut defined = BTreeMap::new();
    for (name, value) in &current.counters {
        if let Some(before) = previous.counters.get(name) {
            let increase = value - before;
            if increase < 0.0 {
                return None;
            }
            put(&mut defined, names::app_defined(name), increase / seconds);
        }
    }
    for (name, value) in &current.gauges {
        put(&mut defined, names::app_defined(name), *value);
    }
    let room = room.saturating_sub(values.len());
    values.extend(defined.into_iter().take(room));
    Some(values)
}

/// Records `value` unless it is not finite.
fn put(values: &mut BTreeMap<String, f64>, name: String, value: f64) {
    if value.is_finite() {
        values.insert(name, value);
    }
}

/// The increase of a count between two scrapes, `None` if it went down.
fn count_delta(now: f64, before: f64) -> Option<u64> {
    // Both are finite, non-negative counts (checked when the snapshot was taken); the
    // format writes them as floats, hence the rounding.
    (now >= before).then(|| (now - before).round() as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use protocol::{AppName, Version};

    use super::*;
    use crate::telemetry::prom::parse;

    fn key(version: &str, port: u16) -> ProcessKey {
        ProcessKey {
            release: ReleaseId::new(AppName::new("web").unwrap(), Version::new(version).unwrap()),
            port,
        }
    }

    /// An exposition like the sample app's with buckets at 0.1, 0.2, 0.4 s.
    fn scrape(ok: u64, failed: u64, buckets: [u64; 3], extra: &str) -> Snapshot {
        let [b1, b2, b3] = buckets;
        let text = format!(
            "# TYPE http_requests_total counter\n\
             http_requests_total{{code=\"200\"}} {ok}\n\
             http_requests_total{{code=\"503\"}} {failed}\n\
             http_request_errors_total {failed}\n\
             # TYPE http_request_duration_seconds histogram\n\
             http_request_duration_seconds_bucket{{le=\"0.1\"}} {b1}\n\
             http_request_duration_seconds_bucket{{le=\"0.2\"}} {b2}\n\
             http_request_duration_seconds_bucket{{le=\"0.4\"}} {b3}\n\
             http_request_duration_seconds_bucket{{le=\"+Inf\"}} {total}\n\
             http_request_duration_seconds_count {total}\n\
             {extra}",
            total = ok + failed,
        );
        Snapshot::new(&parse(&text).unwrap())
    }

    fn values(derived: Derived) -> BTreeMap<String, f64> {
        match derived {
            Derived::Values(values) => values,
            other => panic!("expected values, got {other:?}"),
        }
    }

    fn close(values: &BTreeMap<String, f64>, name: &str, expected: f64) {
        let got = values.get(name).copied();
        assert!(
            got.is_some_and(|v| (v - expected).abs() < 1e-9),
            "{name}: expected {expected}, got {got:?} in {values:?}"
        );
    }

    #[test]
    fn rates_error_share_and_quantiles_come_from_the_interval_alone() {
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        // Before the interval: 1 fast request answered.
        let first = deriver.observe(key("1", 9000), scrape(1, 0, [1, 1, 1], ""), t0, 64);
        assert_eq!(first, Derived::Rebaselined(Rebaseline::First));
        // Over 10 s: 18 OK + 2 failed = 20 requests; 10 under 0.1 s, 10 in (0.1, 0.2].
        let later = t0 + Duration::from_secs(10);
        let v = values(deriver.observe(key("1", 9000), scrape(19, 2, [11, 21, 21], ""), later, 64));
        close(&v, names::APP_REQUEST_RATE, 2.0);
        close(&v, names::APP_ERROR_RATE, 0.1);
        // Ranks over 20: p50 = 10 → the end of the first bucket; p90 = 18 → 8/10 into the
        // second; p99 = 19.8 → 9.8/10 into it.
        close(&v, names::APP_LATENCY_P50_MS, 100.0);
        close(&v, names::APP_LATENCY_P90_MS, 180.0);
        close(&v, names::APP_LATENCY_P99_MS, 198.0);
        assert_eq!(v.len(), 5, "{v:?}");
    }

    #[test]
    fn an_idle_interval_has_a_zero_rate_and_no_error_rate_or_latency() {
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        deriver.observe(key("1", 9000), scrape(5, 1, [6, 6, 6], ""), t0, 64);
        let v = values(deriver.observe(
            key("1", 9000),
            scrape(5, 1, [6, 6, 6], ""),
            t0 + Duration::from_secs(5),
            64,
        ));
        assert_eq!(
            v,
            BTreeMap::from([(names::APP_REQUEST_RATE.to_owned(), 0.0)])
        );
    }

    #[test]
    fn a_counter_going_down_or_another_process_rebaselines() {
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        deriver.observe(
            key("1", 9000),
            scrape(100, 0, [100, 100, 100], ""),
            s(0),
            64,
        );
        // The process restarted: fewer requests than before.
        assert_eq!(
            deriver.observe(key("1", 9000), scrape(3, 0, [3, 3, 3], ""), s(10), 64),
            Derived::Rebaselined(Rebaseline::CounterReset)
        );
        // Measured from the restarted process's scrape.
        let v = values(deriver.observe(key("1", 9000), scrape(13, 0, [13, 13, 13], ""), s(20), 64));
        close(&v, names::APP_REQUEST_RATE, 1.0);
        // Only the histogram went down: still a reset.
        assert_eq!(
            deriver.observe(key("1", 9000), scrape(14, 0, [1, 1, 1], ""), s(30), 64),
            Derived::Rebaselined(Rebaseline::CounterReset)
        );
        // Another version, then another port: no values, whatever the counters say.
        assert_eq!(
            deriver.observe(key("2", 9000), scrape(50, 0, [50, 50, 50], ""), s(40), 64),
            Derived::Rebaselined(Rebaseline::OtherProcess)
        );
        assert_eq!(
            deriver.observe(key("2", 9001), scrape(60, 0, [60, 60, 60], ""), s(50), 64),
            Derived::Rebaselined(Rebaseline::OtherProcess)
        );
        deriver.reset();
        assert_eq!(
            deriver.observe(key("2", 9001), scrape(70, 0, [70, 70, 70], ""), s(60), 64),
            Derived::Rebaselined(Rebaseline::First)
        );
    }

    #[test]
    fn app_defined_gauges_and_counters_are_reported_under_app_names() {
        let extra = "# TYPE queue_depth gauge\nqueue_depth 7\n\
                     # TYPE jobs_total counter\njobs_total 30\n\
                     app_info{version=\"1\"} 1\n\
                     # TYPE weird gauge\nweird NaN\n\
                     # TYPE s summary\ns{quantile=\"0.5\"} 1\ns_count 3\ns_sum 2\n";
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        deriver.observe(
            key("1", 9000),
            scrape(0, 0, [0, 0, 0], &extra.replace("30", "10")),
            t0,
            64,
        );
        let v = values(deriver.observe(
            key("1", 9000),
            scrape(0, 0, [0, 0, 0], extra),
            t0 + Duration::from_secs(4),
            64,
        ));
        close(&v, "app:queue_depth", 7.0);
        close(&v, "app:jobs_total", 5.0);
        let app: Vec<&String> = v.keys().filter(|k| k.starts_with("app:")).collect();
        assert_eq!(app, ["app:jobs_total", "app:queue_depth"], "{v:?}");
    }

    #[test]
    fn app_defined_series_are_capped_and_invalid_names_skipped() {
        let mut extra = String::new();
        for i in 0..100 {
            extra.push_str(&format!("# TYPE g{i:03} gauge\ng{i:03} {i}\n"));
        }
        let too_long = "x".repeat(61);
        extra.push_str(&format!("{too_long} 1\n"));
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        deriver.observe(key("1", 9000), scrape(0, 0, [0, 0, 0], &extra), t0, 10);
        let v = values(deriver.observe(
            key("1", 9000),
            scrape(0, 0, [0, 0, 0], &extra),
            t0 + Duration::from_secs(1),
            10,
        ));
        assert_eq!(v.len(), 10, "{v:?}");
        assert!(v.contains_key(names::APP_REQUEST_RATE));
        close(&v, "app:g000", 0.0);
        close(&v, "app:g008", 8.0);
        assert!(!v.contains_key(&format!("app:{too_long}")));
    }

    #[test]
    fn non_finite_or_negative_counts_are_never_used() {
        let text = "http_requests_total{code=\"200\"} NaN\n\
                    http_request_duration_seconds_bucket{le=\"0.1\"} 1\n\
                    http_request_duration_seconds_bucket{le=\"+Inf\"} +Inf\n\
                    # TYPE c counter\nc -1\n# TYPE g gauge\ng +Inf\n";
        let snapshot = Snapshot::new(&parse(text).unwrap());
        assert_eq!(snapshot, Snapshot::default());
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        deriver.observe(key("1", 1), snapshot.clone(), t0, 64);
        let v = values(deriver.observe(key("1", 1), snapshot, t0 + Duration::from_secs(1), 64));
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn without_code_labels_the_errors_counter_counts_failures() {
        let text =
            |n: u64, e: u64| format!("http_requests_total {n}\nhttp_request_errors_total {e}\n");
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        deriver.observe(
            key("1", 1),
            Snapshot::new(&parse(&text(10, 1)).unwrap()),
            t0,
            64,
        );
        let v = values(deriver.observe(
            key("1", 1),
            Snapshot::new(&parse(&text(50, 5)).unwrap()),
            t0 + Duration::from_secs(2),
            64,
        ));
        close(&v, names::APP_REQUEST_RATE, 20.0);
        close(&v, names::APP_ERROR_RATE, 0.1);
        assert!(!v.contains_key(names::APP_LATENCY_P50_MS));
    }

    #[test]
    fn a_histogram_that_is_not_one_gives_no_latency() {
        for buckets in [
            // No +Inf bucket.
            "h_bucket{le=\"0.1\"} 1\n",
            // Cumulative counts going down.
            "h_bucket{le=\"0.1\"} 5\nh_bucket{le=\"0.2\"} 3\nh_bucket{le=\"+Inf\"} 5\n",
            // A bound that is not a number.
            "h_bucket{le=\"fast\"} 1\nh_bucket{le=\"+Inf\"} 1\n",
        ] {
            let text = buckets.replace("h_", &format!("{LATENCY}_"));
            assert_eq!(
                Snapshot::new(&parse(&text).unwrap()).latency,
                None,
                "{text}"
            );
        }
    }
}
