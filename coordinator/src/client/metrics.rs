//! The client commands about health telemetry: `metrics` (stored samples, one row each) and
//! `metrics drops` (refused metric input per node and reason). Output goes to stdout; errors
//! are returned, never printed.

use std::time::Duration;

use anyhow::Context as _;
use protocol::telemetry::names;
use protocol::{human_duration, NodeId, UnixSeconds};

use super::{ago, table, ApiClient};
use crate::api::{MetricDropsView, MetricsResponse, NodeDrops};
use crate::cli::MetricsQueryArgs;
use crate::metrics::http::parse_release;
use crate::metrics::StoredSample;
use crate::unix_now;

/// Characters of a refusal's detail shown in the drops table (the JSON has all of it).
const DETAIL_SHOWN: usize = 60;

/// `coordinator metrics`.
pub async fn metrics(client: &ApiClient, args: &MetricsQueryArgs) -> anyhow::Result<()> {
    let path = metrics_path(args)?;
    let what = "reading health samples";
    if args.json {
        let value: serde_json::Value = client.get_json(what, &path).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&value).context("cannot format the result")?
        );
        return Ok(());
    }
    let response: MetricsResponse = client.get_json(what, &path).await?;
    if response.samples.is_empty() {
        println!(
            "no samples in the last {}{} (`coordinator metrics drops` shows refused input)",
            human_duration(args.since),
            filter_text(args)
        );
        return Ok(());
    }
    print!("{}", samples_table(&response.samples, unix_now()));
    if response.truncated {
        println!(
            "only the oldest {} samples of the window are shown; narrow it with --since or --node",
            response.limit
        );
    }
    Ok(())
}

/// The API path for the flags, each checked here so that a typo fails with the flag's name.
fn metrics_path(args: &MetricsQueryArgs) -> anyhow::Result<String> {
    let mut path = format!("/api/metrics?since={}", args.since.as_secs());
    if !args.nodes.is_empty() {
        for node in &args.nodes {
            NodeId::new(node.as_str()).context("invalid --node")?;
        }
        path.push_str("&node=");
        path.push_str(&args.nodes.join(","));
    }
    if let Some(version) = &args.version {
        let release = parse_release(version)
            .map_err(|e| anyhow::anyhow!("invalid --version (want APP@VERSION): {e}"))?;
        path.push_str(&format!("&version={release}"));
    }
    Ok(path)
}

/// " for node n1, n2 on web@2", or "".
fn filter_text(args: &MetricsQueryArgs) -> String {
    let mut text = String::new();
    if !args.nodes.is_empty() {
        text.push_str(&format!(" for node {}", args.nodes.join(", ")));
    }
    if let Some(version) = &args.version {
        text.push_str(&format!(" on {version}"));
    }
    text
}

/// One row per sample: when it was taken, node, version, then the standard metrics ("-"
/// where absent).
fn samples_table(samples: &[StoredSample], now: UnixSeconds) -> String {
    let header = [
        "TAKEN", "NODE", "VERSION", "CPU%", "MEM%", "DISK%", "LOAD1", "REQ/S", "ERR%", "P50 MS",
        "P90 MS", "P99 MS",
    ]
    .map(String::from);
    let mut rows = vec![header];
    for sample in samples {
        let value = |name: &str, scale: f64, decimals: usize| {
            sample
                .values
                .get(name)
                .map_or_else(|| "-".to_owned(), |v| format!("{:.decimals$}", v * scale))
        };
        rows.push([
            age(now, sample.at),
            sample.node.to_string(),
            sample
                .version
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string),
            value(names::HOST_CPU_PERCENT, 1.0, 1),
            value(names::HOST_MEM_USED_PERCENT, 1.0, 1),
            value(names::HOST_DISK_USED_PERCENT, 1.0, 1),
            value(names::HOST_LOAD1, 1.0, 2),
            value(names::APP_REQUEST_RATE, 1.0, 1),
            value(names::APP_ERROR_RATE, 100.0, 2),
            value(names::APP_LATENCY_P50_MS, 1.0, 1),
            value(names::APP_LATENCY_P90_MS, 1.0, 1),
            value(names::APP_LATENCY_P99_MS, 1.0, 1),
        ]);
    }
    table(&rows)
}

/// `coordinator metrics drops`.
pub async fn metric_drops(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let what = "reading the refused-metrics counters";
    let path = "/api/metrics/drops";
    if json {
        let value: serde_json::Value = client.get_json(what, path).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&value).context("cannot format the result")?
        );
        return Ok(());
    }
    let view: MetricDropsView = client.get_json(what, path).await?;
    print!("{}", drops_text(&view, unix_now()));
    Ok(())
}

/// The counters as a table, one row per node, then the totals not kept per node.
fn drops_text(view: &MetricDropsView, now: UnixSeconds) -> String {
    let mut out = String::new();
    if view.nodes.is_empty() {
        out.push_str(&format!(
            "no metric batches since the coordinator started ({})\n",
            ago(now, view.since)
        ));
    } else {
        let header = [
            "NODE",
            "STORED",
            "DUPLICATES",
            "REFUSED",
            "AGENT DROPPED",
            "LAST REFUSAL",
        ]
        .map(String::from);
        let mut rows = vec![header];
        for node in &view.nodes {
            rows.push([
                node.node.to_string(),
                node.stored.to_string(),
                node.duplicates.to_string(),
                refused_text(node),
                node.agent_dropped_total
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                node.last_refusal.as_ref().map_or_else(
                    || "-".to_owned(),
                    |last| {
                        let mut detail: String = last.detail.chars().take(DETAIL_SHOWN).collect();
                        if last.detail.chars().count() > DETAIL_SHOWN {
                            detail.push('…');
                        }
                        format!("{} {}: {detail}", last.reason, ago(now, last.at))
                    },
                ),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if view.untracked_unknown_batches > 0 {
        out.push_str(&format!(
            "{} more batches came from unknown node ids not tracked one by one\n",
            view.untracked_unknown_batches
        ));
    }
    if view.overloaded_batches > 0 {
        out.push_str(&format!(
            "{} batches were dropped unread because ingestion was busy (agents send them again)\n",
            view.overloaded_batches
        ));
    }
    out
}

/// "bad_timestamp 3, malformed 1", or "-".
fn refused_text(node: &NodeDrops) -> String {
    let parts: Vec<String> = node
        .refused
        .iter()
        .filter(|(_, &count)| count > 0)
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// How long before `now` a sample was taken: "now", "42s ago", "5m 03s ago".
fn age(now: UnixSeconds, at: UnixSeconds) -> String {
    match now.saturating_sub(at) {
        0 => "now".to_owned(),
        secs => format!("{} ago", human_duration(Duration::from_secs(secs))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::LastRefusal;
    use crate::metrics::Reason;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn values(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn sample_times_read_as_ages() {
        assert_eq!(age(100, 100), "now");
        assert_eq!(age(100, 400), "now");
        assert_eq!(age(100, 58), "42s ago");
        assert_eq!(age(1000, 817), "3m 03s ago");
    }

    #[test]
    fn the_samples_table_has_one_aligned_row_per_sample_with_dashes_for_absent_metrics() {
        let sample = |id: &str, values| StoredSample {
            node: node(id),
            seq: 1,
            at: 1_000,
            version: parse_release("web@2").ok(),
            labels: BTreeMap::new(),
            values,
        };
        let text = samples_table(
            &[
                sample(
                    "edge-1",
                    values(&[
                        (names::HOST_CPU_PERCENT, 12.345),
                        (names::APP_ERROR_RATE, 0.0125),
                        (names::APP_LATENCY_P99_MS, 250.0),
                    ]),
                ),
                sample("n2", values(&[(names::HOST_LOAD1, 0.5)])),
            ],
            1_090,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("TAKEN       NODE    VERSION  CPU%"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("1m 30s ago  edge-1  web@2    12.3"),
            "{text}"
        );
        assert!(lines[1].contains("1.25"), "{text}");
        assert!(lines[1].ends_with("250.0"), "{text}");
        assert!(lines[2].contains("0.50"), "{text}");
        assert!(lines[2].ends_with('-'), "{text}");
        assert_eq!(lines[1].find("web@2"), lines[2].find("web@2"));
    }

    #[test]
    fn the_drops_text_names_each_reason_count_and_the_last_refusal() {
        let view = MetricDropsView {
            since: 0,
            nodes: vec![NodeDrops {
                node: node("n1"),
                refused: BTreeMap::from([(Reason::BadTimestamp, 3), (Reason::Malformed, 1)]),
                stored: 10,
                duplicates: 2,
                agent_dropped_total: Some(4),
                last_refusal: Some(LastRefusal {
                    at: 90,
                    reason: Reason::BadTimestamp,
                    detail: format!("sample 7: {}", "x".repeat(100)),
                }),
            }],
            untracked_unknown_batches: 5,
            overloaded_batches: 0,
        };
        let text = drops_text(&view, 100);
        assert!(text.contains("malformed 1, bad_timestamp 3"), "{text}");
        assert!(
            text.contains("bad_timestamp 10s ago: sample 7: xxx"),
            "{text}"
        );
        assert!(text.contains('…'), "{text}");
        assert!(
            text.contains("5 more batches came from unknown node ids"),
            "{text}"
        );
        assert!(!text.contains("busy"), "{text}");
        let empty = MetricDropsView {
            nodes: Vec::new(),
            untracked_unknown_batches: 0,
            ..view
        };
        assert!(drops_text(&empty, 100).starts_with("no metric batches"));
    }

    #[test]
    fn flags_become_a_checked_query() {
        let args = |nodes: &[&str], version: Option<&str>| MetricsQueryArgs {
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            version: version.map(str::to_owned),
            since: Duration::from_secs(600),
            json: false,
        };
        assert_eq!(
            metrics_path(&args(&[], None)).unwrap(),
            "/api/metrics?since=600"
        );
        assert_eq!(
            metrics_path(&args(&["n1", "n2"], Some("web@2"))).unwrap(),
            "/api/metrics?since=600&node=n1,n2&version=web@2"
        );
        assert!(metrics_path(&args(&["a&b"], None)).is_err());
        assert!(metrics_path(&args(&[], Some("web"))).is_err());
    }
}
