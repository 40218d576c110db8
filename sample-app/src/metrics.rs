//! The app's Prometheus metrics and their text exposition (format 0.0.4), written by hand.
//!
//! What is counted: every *traffic* request (`/`, `/work`, `/files/…` and unknown paths),
//! not the control endpoints (`/healthz`, `/metrics`, `/version`), so that the agent's
//! health checks and scrapes do not dilute the request and error rates a canary is judged
//! on. Latency is measured from request arrival to the response head (for a streamed file,
//! before its body is sent), including any injected latency.
//!
//! **Invariant:** all series live under one lock and are rendered from one snapshot, so a
//! scrape always sees `_bucket{le="+Inf"} == _count` and cumulative buckets that never
//! decrease.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;

/// Upper bounds (seconds) of the `http_request_duration_seconds` histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics registry of one app process.
#[derive(Debug)]
pub struct Metrics {
    version: String,
    inner: Mutex<Series>,
}

#[derive(Debug)]
struct Series {
    /// Requests by status code.
    requests: BTreeMap<u16, u64>,
    /// Requests answered with a 5xx status.
    errors: u64,
    /// Non-cumulative count per bucket of [`LATENCY_BUCKETS`]; observations above the
    /// last bound are only in `count`.
    buckets: [u64; LATENCY_BUCKETS.len()],
    sum_seconds: f64,
    count: u64,
}

impl Metrics {
    /// An empty registry for an app running `version`. The 200 and 500 series start at 0
    /// so that rates are defined from the first scrape on.
    pub fn new(version: &str) -> Self {
        Metrics {
            version: version.to_owned(),
            inner: Mutex::new(Series {
                requests: BTreeMap::from([(200, 0), (500, 0)]),
                errors: 0,
                buckets: [0; LATENCY_BUCKETS.len()],
                sum_seconds: 0.0,
                count: 0,
            }),
        }
    }

    /// Records one answered traffic request.
    pub fn observe(&self, status: StatusCode, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let mut series = self.lock();
        *series.requests.entry(status.as_u16()).or_insert(0) += 1;
        if status.is_server_error() {
            series.errors += 1;
        }
        if let Some(bucket) = LATENCY_BUCKETS.iter().position(|&le| seconds <= le) {
            series.buckets[bucket] += 1;
        }
        series.sum_seconds += seconds;
        series.count += 1;
    }

    /// The exposition text; `uptime` is the time since the process started.
    pub fn render(&self, uptime: Duration) -> String {
        let series = self.lock();
        let mut out = String::with_capacity(2048);
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            out,
            "# HELP http_requests_total Traffic requests answered, by status code.\n\
             # TYPE http_requests_total counter"
        );
        for (code, count) in &series.requests {
            let _ = writeln!(out, "http_requests_total{{code=\"{code}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP http_request_errors_total Traffic requests answered with a 5xx status.\n\
             # TYPE http_request_errors_total counter\n\
             http_request_errors_total {}",
            series.errors
        );
        let _ = writeln!(
            out,
            "# HELP http_request_duration_seconds Time from request arrival to response head.\n\
             # TYPE http_request_duration_seconds histogram"
        );
        let mut cumulative = 0;
        for (le, count) in LATENCY_BUCKETS.iter().zip(series.buckets) {
            cumulative += count;
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             http_request_duration_seconds_sum {sum}\n\
             http_request_duration_seconds_count {count}",
            count = series.count,
            sum = series.sum_seconds,
        );
        let _ = writeln!(
            out,
            "# HELP process_uptime_seconds Seconds since the app process started.\n\
             # TYPE process_uptime_seconds gauge\n\
             process_uptime_seconds {}\n\
             # HELP app_info The running app's version, as a label; always 1.\n\
             # TYPE app_info gauge\n\
             app_info{{version=\"{}\"}} 1",
            uptime.as_secs_f64(),
            escape_label_value(&self.version),
        );
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Series> {
        // The series are plain counters updated in single statements; a panic elsewhere
        // while holding the lock cannot leave them in a state worth refusing to report.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Escapes a label value as the text format requires: backslash, double quote, newline.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn a_fresh_registry_reports_zeroes_for_200_and_500() {
        let text = Metrics::new("v1").render(Duration::from_secs(3));
        assert_eq!(value(&text, r#"http_requests_total{code="200"}"#), 0.0);
        assert_eq!(value(&text, r#"http_requests_total{code="500"}"#), 0.0);
        assert_eq!(value(&text, "http_request_duration_seconds_count"), 0.0);
        assert_eq!(value(&text, "process_uptime_seconds"), 3.0);
        assert_eq!(value(&text, r#"app_info{version="v1"}"#), 1.0);
    }

    #[test]
    fn observations_land_in_codes_errors_and_cumulative_buckets() {
        let metrics = Metrics::new("v1");
        metrics.observe(StatusCode::OK, Duration::from_millis(3));
        metrics.observe(StatusCode::OK, Duration::from_millis(30));
        metrics.observe(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(30));
        metrics.observe(StatusCode::NOT_FOUND, Duration::from_secs(60));
        let text = metrics.render(Duration::ZERO);
        assert_eq!(value(&text, r#"http_requests_total{code="200"}"#), 2.0);
        assert_eq!(value(&text, r#"http_requests_total{code="404"}"#), 1.0);
        assert_eq!(value(&text, r#"http_requests_total{code="503"}"#), 1.0);
        assert_eq!(value(&text, "http_request_errors_total"), 1.0);
        let bucket = |le: &str| {
            value(
                &text,
                &format!("http_request_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.005"), 1.0);
        assert_eq!(bucket("0.025"), 1.0);
        assert_eq!(bucket("0.05"), 3.0);
        assert_eq!(bucket("30"), 3.0, "60 s is above the last finite bound");
        assert_eq!(bucket("+Inf"), 4.0);
        assert_eq!(value(&text, "http_request_duration_seconds_count"), 4.0);
        let sum = value(&text, "http_request_duration_seconds_sum");
        assert!((sum - 60.063).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn every_sample_belongs_to_a_family_declared_with_help_and_type() {
        let metrics = Metrics::new("v1");
        metrics.observe(StatusCode::OK, Duration::from_millis(1));
        let text = metrics.render(Duration::ZERO);
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "{name} has no HELP"
                );
                declared.push(name.to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| declared.iter().any(|d| d == base))
                    .unwrap_or(name);
                assert_eq!(declared.last().map(String::as_str), Some(family), "{line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let text = Metrics::new("a\"b\\c\nd").render(Duration::ZERO);
        assert!(
            text.contains(r#"app_info{version="a\"b\\c\nd"} 1"#),
            "{text}"
        );
    }
}
