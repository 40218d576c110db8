//! `bench-canary`: the canary judge's false-alarm and detection rates on synthetic metric
//! streams, next to a plain ratio judge measured on the same streams (issue 5).
//!
//! ```text
//! cargo run --release -p system-tests --bin bench-canary \
//!     [-- --runs 1000 --seed 1 --window-secs 1800 --anchor-secs 1800]
//! ```
//!
//! Each run simulates an anchor window (`anchor_secs`, every node on the old version, just
//! before the canary switches) and one judgment window (`window_secs`, after the warm-up)
//! of a fleet of nodes, sample by sample as the agent reports them, and judges the canary
//! nodes against the baseline nodes with the real `coordinator::canary::judge` and
//! `CanaryConfig::default()` (`--window-secs` and `--anchor-secs` override its judgment and
//! anchor windows, for sensitivity figures).
//!
//! **The simulated fleet** (chosen before the judge's defaults were tuned, and not changed
//! to suit them; see [`Fleet::REALISTIC`]):
//! - Every 10 s (the agent's default interval) each node answers Poisson(rate · 10 s)
//!   requests of the sample app. Each request fails (5xx) with the interval's error
//!   probability and takes a lognormal latency, recorded in a histogram with the sample
//!   app's buckets (`sample_app::metrics::LATENCY_BUCKETS`). The interval's metrics are
//!   derived as the agent derives them: request rate, errors/requests, and p50/p90/p99 by
//!   `protocol::telemetry::histogram_quantile` over the interval's bucket counts.
//! - Host metrics: CPU grows with the node's traffic, memory is a per-node level with
//!   little noise, the load average is a 1-minute moving average of a noisy run queue.
//! - Node-to-node variation: every node draws its own multiplicative factors (lognormal)
//!   for traffic, error rate, latency, CPU and memory, once per run. Interval-to-interval
//!   variation: traffic bursts, error bursts and latency jitter per node and interval.
//! - Drift: between the anchor window and the judgment window each of a node's factors
//!   moves by its own lognormal factor of σ 0.03 (a node's clients and neighbours change a
//!   little over ten minutes; chosen with the anchoring, before measuring it, as a small
//!   realistic drift, not fitted to the judge). Both windows draw their interval noise
//!   independently.
//! - Scenarios: A/A (canary nodes drawn like the baseline nodes); the error probability
//!   ×1.5 on the canary; a latency tail regression on the canary that raises the true p99
//!   by 30 % and leaves the median alone (the lognormal's σ grows by ln 1.3 / z₀.₉₉).
//!   Runs of the same index share their seed across scenarios (paired comparisons).
//!
//! **Figures**, per fleet, layout and scenario over `--runs` runs: A/A false alarms (verdict
//! fail or marginal) and detection (verdict fail) of
//! - our judge with `CanaryConfig::default()`, anchored on each node's own level;
//! - the same with anchoring off (`anchor_secs = 0`): to show what anchoring buys;
//! - a plain ratio judge that fails a canary when any metric our judge judged has a
//!   canary/baseline mean ratio outside [0.8, 1.2] (same samples, same means, no anchors).
//!
//! Rows: the realistic fleet for each layout, then the one-node canary on the same fleet
//! with identical nodes (no node differences, no drift) and with twice the node-to-node
//! variation and drift (sensitivity). Then the spread the judge measured in A/A runs, per
//! metric, with and without anchors: what `expected_node_spread` and `expected_node_drift`
//! are meant to expect.
//!
//! Prints the parameters and markdown tables on stdout, progress on stderr.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::thread;

use anyhow::{bail, Context as _, Result};
use coordinator::canary::{
    judge, Anchors, CanaryConfig, Direction, GroupSamples, Judgment, Verdict,
};
use protocol::telemetry::{histogram_quantile, names};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sample_app::metrics::LATENCY_BUCKETS;

/// The agent's default `--metrics-interval`.
const INTERVAL_SECS: f64 = 10.0;
/// The plain ratio judge's band.
const RATIO_BAND: (f64, f64) = (0.8, 1.2);
/// Canary nodes × baseline nodes: the end-to-end test's four agents with a one-node first
/// wave, then evenly split groups as Kayenta recommends.
const LAYOUTS: [(usize, usize); 3] = [(1, 3), (2, 2), (3, 3)];

/// Parameters of the simulated fleet.
#[derive(Debug, Clone, Copy)]
struct Fleet {
    /// Median requests per second per node.
    request_rate: f64,
    /// Share of requests answered 5xx on a median node.
    error_rate: f64,
    /// Median request latency, seconds, and the σ of its logarithm within an interval.
    latency_median_secs: f64,
    latency_sigma: f64,
    /// σ of the log of the drift of each of a node's factors between the anchor window and
    /// the judgment window.
    node_drift_sigma: f64,
    /// σ of the log of each node's own factor (node-to-node variation).
    node_traffic_sigma: f64,
    node_error_sigma: f64,
    node_latency_sigma: f64,
    node_cpu_sigma: f64,
    node_mem_sigma: f64,
    /// σ of the log of per-interval factors (bursts and jitter), per node.
    interval_traffic_sigma: f64,
    interval_error_sigma: f64,
    interval_latency_sigma: f64,
    interval_cpu_sigma: f64,
    interval_run_queue_sigma: f64,
    /// Relative noise of the memory reading per interval.
    interval_mem_noise: f64,
    /// CPU percent at idle and per request per second.
    cpu_idle_percent: f64,
    cpu_percent_per_rps: f64,
    /// Memory used percent on a median node.
    mem_used_percent: f64,
}

impl Fleet {
    /// An edge node serving video segments to a few hundred viewers: ~50 requests/s,
    /// 0.5 % 5xx (upstream timeouts), 20 ms median with a long tail (p99 ≈ 80 ms). Nodes
    /// are meant to be alike but are not: traffic differs by ~20 % between nodes (different
    /// client populations), error rates by ~10 %, latency by ~5 % (hardware, neighbours).
    const REALISTIC: Fleet = Fleet {
        request_rate: 50.0,
        error_rate: 0.005,
        latency_median_secs: 0.020,
        latency_sigma: 0.6,
        node_drift_sigma: 0.03,
        node_traffic_sigma: 0.2,
        node_error_sigma: 0.1,
        node_latency_sigma: 0.05,
        node_cpu_sigma: 0.1,
        node_mem_sigma: 0.1,
        interval_traffic_sigma: 0.1,
        interval_error_sigma: 0.3,
        interval_latency_sigma: 0.05,
        interval_cpu_sigma: 0.1,
        interval_run_queue_sigma: 0.3,
        interval_mem_noise: 0.005,
        cpu_idle_percent: 3.0,
        cpu_percent_per_rps: 0.3,
        mem_used_percent: 45.0,
    };

    /// The same fleet with every node-to-node factor and the drift scaled by `scale` (0:
    /// identical nodes, sampling noise only), for the sensitivity rows.
    fn with_node_variation(self, scale: f64) -> Fleet {
        Fleet {
            node_drift_sigma: self.node_drift_sigma * scale,
            node_traffic_sigma: self.node_traffic_sigma * scale,
            node_error_sigma: self.node_error_sigma * scale,
            node_latency_sigma: self.node_latency_sigma * scale,
            node_cpu_sigma: self.node_cpu_sigma * scale,
            node_mem_sigma: self.node_mem_sigma * scale,
            ..self
        }
    }
}

/// What the canary's new version changes.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    label: &'static str,
    /// Multiplies the error probability.
    error_factor: f64,
    /// Multiplies the true p99 latency, by widening the lognormal (median unchanged).
    p99_factor: f64,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        label: "A/A",
        error_factor: 1.0,
        p99_factor: 1.0,
    },
    Scenario {
        label: "error rate +50 %",
        error_factor: 1.5,
        p99_factor: 1.0,
    },
    Scenario {
        label: "p99 latency +30 %",
        error_factor: 1.0,
        p99_factor: 1.3,
    },
];

/// z of the 0.99 quantile of the standard normal.
const Z_99: f64 = 2.326_347_874_040_841;

struct Args {
    runs: usize,
    seed: u64,
    /// Override the default `window_secs` and `anchor_secs` (judge and simulated windows
    /// alike).
    window_secs: Option<u64>,
    anchor_secs: Option<u64>,
}

fn main() -> ExitCode {
    match parse_args().and_then(|args| bench(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench-canary: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        runs: 1000,
        seed: 1,
        window_secs: None,
        anchor_secs: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => args.runs = value()?.parse().context("--runs: a count")?,
            "--seed" => args.seed = value()?.parse().context("--seed: a number")?,
            "--window-secs" => {
                args.window_secs = Some(value()?.parse().context("--window-secs: seconds")?)
            }
            "--anchor-secs" => {
                args.anchor_secs = Some(value()?.parse().context("--anchor-secs: seconds")?)
            }
            other => {
                bail!("unknown argument {other:?} (expected --runs N, --seed N, --window-secs N, --anchor-secs N)")
            }
        }
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(args)
}

/// One row of the figures: a fleet, a layout and a scenario.
#[derive(Clone, Copy)]
struct Row {
    fleet_label: &'static str,
    fleet: Fleet,
    layout: (usize, usize),
    scenario: Scenario,
}

impl Row {
    fn is_aa(&self) -> bool {
        self.scenario.error_factor == 1.0 && self.scenario.p99_factor == 1.0
    }
}

/// Alarm counts of one row: A/A counts fail or marginal, a detection row counts fail.
#[derive(Debug, Default, Clone)]
struct Tally {
    runs: usize,
    /// Our judge with the defaults (anchored).
    ours: usize,
    /// Our judge with anchoring off.
    unanchored: usize,
    /// The plain ratio judge.
    ratio: usize,
    /// Runs in which our judge anchored every judged metric.
    all_anchored: usize,
    /// Our judge's alarms by the metric listed first (the one the summary names).
    alarm_metrics: BTreeMap<String, usize>,
    /// Per metric: the sum of squared measured spreads (anchored, unanchored) and their
    /// count, for the RMS spread.
    spreads: BTreeMap<String, Spread>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Spread {
    anchored: (f64, usize),
    unanchored: (f64, usize),
}

impl Spread {
    fn add(&mut self, other: Spread) {
        self.anchored.0 += other.anchored.0;
        self.anchored.1 += other.anchored.1;
        self.unanchored.0 += other.unanchored.0;
        self.unanchored.1 += other.unanchored.1;
    }
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.runs += other.runs;
        self.ours += other.ours;
        self.unanchored += other.unanchored;
        self.ratio += other.ratio;
        self.all_anchored += other.all_anchored;
        for (name, count) in other.alarm_metrics {
            *self.alarm_metrics.entry(name).or_default() += count;
        }
        for (name, spread) in other.spreads {
            self.spreads.entry(name).or_default().add(spread);
        }
    }

    fn record(&mut self, aa: bool, ours: &Judgment, unanchored: &Judgment) {
        let alarm = |judgment: &Judgment| match judgment.verdict {
            Verdict::Fail => true,
            Verdict::Marginal => aa,
            Verdict::Pass => false,
        };
        self.runs += 1;
        if alarm(ours) {
            self.ours += 1;
            if let Some(worst) = ours.metrics.first() {
                *self.alarm_metrics.entry(worst.name.clone()).or_default() += 1;
            }
        }
        self.unanchored += usize::from(alarm(unanchored));
        self.all_anchored += usize::from(
            ours.metrics
                .iter()
                .filter(|m| m.counted)
                .all(|m| m.anchored),
        );
        // Same samples, same means: the plain judge reads the unanchored judgment's ratios
        // (canary mean over baseline mean).
        let outside = unanchored.metrics.iter().any(|m| {
            m.counted
                && m.ratio
                    .is_some_and(|r| !(RATIO_BAND.0..=RATIO_BAND.1).contains(&r))
        });
        self.ratio += usize::from(outside);
        for (judgment, anchored) in [(ours, true), (unanchored, false)] {
            for metric in &judgment.metrics {
                let Some(spread) = metric.node_spread.filter(|_| metric.anchored == anchored)
                else {
                    continue;
                };
                let entry = self.spreads.entry(metric.name.clone()).or_default();
                let sum = if anchored {
                    &mut entry.anchored
                } else {
                    &mut entry.unanchored
                };
                sum.0 += spread * spread;
                sum.1 += 1;
            }
        }
    }
}

fn bench(args: &Args) -> Result<()> {
    let mut config = CanaryConfig::default();
    if let Some(window_secs) = args.window_secs {
        config.window_secs = window_secs;
    }
    if let Some(anchor_secs) = args.anchor_secs {
        config.anchor_secs = anchor_secs;
    }
    config
        .validate()
        .context("the default canary configuration")?;
    let unanchored = CanaryConfig {
        anchor_secs: 0,
        ..config.clone()
    };
    let windows = Windows {
        anchor: (config.anchor_secs as f64 / INTERVAL_SECS).floor() as usize,
        judged: (config.window_secs as f64 / INTERVAL_SECS).floor() as usize,
    };
    let threads = thread::available_parallelism().map_or(1, |n| n.get());
    print_parameters(args, &config, &Fleet::REALISTIC, windows);

    let mut rows = Vec::new();
    for layout in LAYOUTS {
        for scenario in SCENARIOS {
            rows.push(Row {
                fleet_label: "realistic",
                fleet: Fleet::REALISTIC,
                layout,
                scenario,
            });
        }
    }
    // Sensitivity: the one-node canary on fleets with less and more node-to-node variation.
    for (fleet_label, scale) in [("identical nodes", 0.0), ("node variation ×2", 2.0)] {
        for scenario in SCENARIOS {
            rows.push(Row {
                fleet_label,
                fleet: Fleet::REALISTIC.with_node_variation(scale),
                layout: LAYOUTS[0],
                scenario,
            });
        }
    }

    let mut results = Vec::new();
    for row in rows {
        let started = std::time::Instant::now();
        let tally = thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|worker| {
                    let (config, unanchored) = (&config, &unanchored);
                    scope.spawn(move || {
                        let mut tally = Tally::default();
                        for run in (worker..args.runs).step_by(threads) {
                            // The seed depends on the layout and the run only: scenarios
                            // and fleets are compared on the same draws.
                            let key = (row.layout.0 as u64) << 40 | (row.layout.1 as u64) << 32;
                            let seed = splitmix(args.seed ^ splitmix(key | run as u64));
                            let mut rng = StdRng::seed_from_u64(seed);
                            let (canary, baseline, anchors) = simulate_run(
                                &mut rng,
                                &row.fleet,
                                row.layout,
                                row.scenario,
                                windows,
                            );
                            // Anchoring off ignores the anchors: the same call otherwise.
                            tally.record(
                                row.is_aa(),
                                &judge(config, &canary, &baseline, Some(&anchors)),
                                &judge(unanchored, &canary, &baseline, Some(&anchors)),
                            );
                        }
                        tally
                    })
                })
                .collect();
            let mut total = Tally::default();
            for worker in workers {
                // A worker only panics on a bug; re-raise it here.
                match worker.join() {
                    Ok(tally) => total.add(tally),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            total
        });
        eprintln!(
            "{}, {} vs {}, {}: {} runs in {:.1} s",
            row.fleet_label,
            row.layout.0,
            row.layout.1,
            row.scenario.label,
            tally.runs,
            started.elapsed().as_secs_f64()
        );
        results.push((row, tally));
    }
    print_results(&results);
    print_spreads(&results);
    Ok(())
}

fn print_parameters(args: &Args, config: &CanaryConfig, fleet: &Fleet, windows: Windows) {
    println!("## bench-canary");
    println!();
    println!(
        "{} runs per row, seed {}; anchor window {} s = {} samples per node, then judgment window {} s (after a {} s warm-up) = {} samples per node, at the agent's {INTERVAL_SECS} s interval.",
        args.runs,
        args.seed,
        config.anchor_secs,
        windows.anchor,
        config.window_secs,
        config.warmup_secs,
        windows.judged
    );
    println!(
        "Judge: `CanaryConfig::default()`{}: confidence {}, pass ≥ {}, marginal ≥ {}, min {} samples, node_spread_factor {}, node_spread_prior_df {}.",
        match (args.window_secs, args.anchor_secs) {
            (None, None) => String::new(),
            _ => format!(
                " with window_secs = {}, anchor_secs = {}",
                config.window_secs, config.anchor_secs
            ),
        },
        config.confidence,
        config.pass_score,
        config.marginal_score,
        config.min_samples,
        config.node_spread_factor,
        config.node_spread_prior_df
    );
    for (name, spec) in config.enabled_metrics() {
        let allowed = match spec.direction {
            Direction::Increase => format!("≤ ×{}", spec.allowed_increase),
            Direction::Decrease => format!("≥ ×{}", spec.allowed_decrease),
            Direction::Either => format!("×{}–×{}", spec.allowed_decrease, spec.allowed_increase),
        };
        println!(
            "- `{name}`: allowed {allowed}, expected node spread {} / drift {}, group {} (weight {}){}",
            spec.expected_node_spread,
            spec.expected_node_drift,
            spec.group,
            config.groups.get(&spec.group).copied().unwrap_or(1.0),
            if spec.critical { ", critical" } else { "" }
        );
    }
    println!();
    println!(
        "Fleet (realistic): {} req/s per node (median), {} % 5xx, latency lognormal median {} ms σ {} (sample-app buckets, p50/p90/p99 by histogram_quantile); \
         node-to-node σ (log): traffic {}, errors {}, latency {}, CPU {}, memory {}; drift of each factor between the windows σ (log) {}; per interval σ (log): traffic {}, errors {}, latency {}, CPU {}, run queue {}; memory noise {} %; \
         CPU {} % + {} % per req/s; memory {} % used.",
        fleet.request_rate,
        fleet.error_rate * 100.0,
        fleet.latency_median_secs * 1000.0,
        fleet.latency_sigma,
        fleet.node_traffic_sigma,
        fleet.node_error_sigma,
        fleet.node_latency_sigma,
        fleet.node_cpu_sigma,
        fleet.node_mem_sigma,
        fleet.node_drift_sigma,
        fleet.interval_traffic_sigma,
        fleet.interval_error_sigma,
        fleet.interval_latency_sigma,
        fleet.interval_cpu_sigma,
        fleet.interval_run_queue_sigma,
        fleet.interval_mem_noise * 100.0,
        fleet.cpu_idle_percent,
        fleet.cpu_percent_per_rps,
        fleet.mem_used_percent,
    );
    println!();
}

fn print_results(results: &[(Row, Tally)]) {
    println!("| fleet | canary vs baseline nodes | figure | our judge, anchored (95 % CI) | without anchoring (95 % CI) | plain ratio judge [0.8, 1.2] | target |");
    println!("|---|---|---|---|---|---|---|");
    for (row, tally) in results {
        let (figure, target) = if row.is_aa() {
            ("A/A false alarms (fail or marginal)".to_owned(), "≤ 2 %")
        } else {
            (
                format!("detection (fail), {}", row.scenario.label),
                "≥ 95 %",
            )
        };
        println!(
            "| {} | {} vs {} | {figure} | **{}** ({}) | {} ({}) | {} | {target} |",
            row.fleet_label,
            row.layout.0,
            row.layout.1,
            percent(tally.ours, tally.runs),
            wilson(tally.ours, tally.runs),
            percent(tally.unanchored, tally.runs),
            wilson(tally.unanchored, tally.runs),
            percent(tally.ratio, tally.runs),
        );
    }
    let (anchored, runs) = results.iter().fold((0, 0), |(anchored, runs), (_, t)| {
        (anchored + t.all_anchored, runs + t.runs)
    });
    println!();
    println!(
        "Runs in which every judged metric was anchored: {} of {runs} (the others fell back, metric by metric, e.g. on an error-free anchor window).",
        anchored
    );
    println!();
    println!("The metric our judge's alarms named first:");
    println!();
    println!("| fleet | canary vs baseline nodes | scenario | alarms by metric |");
    println!("|---|---|---|---|");
    for (row, tally) in results {
        println!(
            "| {} | {} vs {} | {} | {} |",
            row.fleet_label,
            row.layout.0,
            row.layout.1,
            row.scenario.label,
            breakdown(&tally.alarm_metrics)
        );
    }
}

/// The RMS of the spreads the judge measured in the realistic fleet's A/A runs (all
/// layouts): what the priors stand for.
fn print_spreads(results: &[(Row, Tally)]) {
    let mut total: BTreeMap<String, Spread> = BTreeMap::new();
    for (_, tally) in results
        .iter()
        .filter(|(row, _)| row.is_aa() && row.fleet_label == "realistic")
    {
        for (name, spread) in &tally.spreads {
            total.entry(name.clone()).or_default().add(*spread);
        }
    }
    let rms = |(sum, count): (f64, usize)| {
        if count == 0 {
            "-".to_owned()
        } else {
            format!("{:.3}", (sum / count as f64).sqrt())
        }
    };
    println!();
    println!("Relative spread of per-node means (unanchored) and of per-node changes (anchored) the judge measured, RMS over the realistic fleet's A/A runs:");
    println!();
    println!("| metric | per-node means | per-node changes |");
    println!("|---|---|---|");
    for (name, spread) in total {
        println!(
            "| `{name}` | {} | {} |",
            rms(spread.unanchored),
            rms(spread.anchored)
        );
    }
}

fn breakdown(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    let mut sorted: Vec<(&String, &usize)> = counts.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    sorted
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn percent(count: usize, runs: usize) -> String {
    format!("{:.1} %", 100.0 * count as f64 / runs.max(1) as f64)
}

/// The Wilson score interval (95 %) of a proportion, in percent.
fn wilson(count: usize, runs: usize) -> String {
    let (n, z) = (runs.max(1) as f64, 1.959_963_984_540_054);
    let p = count as f64 / n;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    format!(
        "{:.1}–{:.1}",
        100.0 * (centre - half).max(0.0),
        100.0 * (centre + half).min(1.0)
    )
}

/// Samples per node in each window.
#[derive(Debug, Clone, Copy)]
struct Windows {
    anchor: usize,
    judged: usize,
}

/// One node's own factors, drawn once per run.
struct Node {
    traffic: f64,
    errors: f64,
    latency: f64,
    cpu: f64,
    mem_percent: f64,
}

impl Node {
    fn draw(rng: &mut StdRng, fleet: &Fleet) -> Node {
        Node {
            traffic: lognormal(rng, fleet.node_traffic_sigma),
            errors: lognormal(rng, fleet.node_error_sigma),
            latency: lognormal(rng, fleet.node_latency_sigma),
            cpu: lognormal(rng, fleet.node_cpu_sigma),
            mem_percent: fleet.mem_used_percent * lognormal(rng, fleet.node_mem_sigma),
        }
    }

    /// The same node a little later: each factor moved by its own drift.
    fn drifted(&self, rng: &mut StdRng, fleet: &Fleet) -> Node {
        let mut drift = || lognormal(rng, fleet.node_drift_sigma);
        Node {
            traffic: self.traffic * drift(),
            errors: self.errors * drift(),
            latency: self.latency * drift(),
            cpu: self.cpu * drift(),
            mem_percent: self.mem_percent * drift(),
        }
    }
}

/// Canary and baseline samples of one run, and every node's anchor window before: the first
/// `layout.0` nodes run the new version in the judgment window, all nodes the old one in the
/// anchor window.
fn simulate_run(
    rng: &mut StdRng,
    fleet: &Fleet,
    layout: (usize, usize),
    scenario: Scenario,
    windows: Windows,
) -> (GroupSamples, GroupSamples, Anchors) {
    // Node factors and drifts first, so that a scenario changes nothing but the canary's
    // behaviour in the judgment window.
    let before: Vec<Node> = (0..layout.0 + layout.1)
        .map(|_| Node::draw(rng, fleet))
        .collect();
    let after: Vec<Node> = before.iter().map(|node| node.drifted(rng, fleet)).collect();
    let nodes = layout.0 + layout.1;
    let mut anchors = Anchors::default();
    let (mut canary, mut baseline) = (GroupSamples::new(), GroupSamples::new());
    for (index, node) in before.iter().enumerate() {
        let group = if index < layout.0 {
            &mut anchors.canary
        } else {
            &mut anchors.baseline
        };
        for (name, values) in simulate_node(rng, fleet, node, SCENARIOS[0], windows.anchor) {
            push_node(group, name, index, layout.0, nodes, values);
        }
    }
    for (index, node) in after.iter().enumerate() {
        let (group, effect) = if index < layout.0 {
            (&mut canary, scenario)
        } else {
            (&mut baseline, SCENARIOS[0])
        };
        for (name, values) in simulate_node(rng, fleet, node, effect, windows.judged) {
            push_node(group, name, index, layout.0, nodes, values);
        }
    }
    (canary, baseline, anchors)
}

/// Puts node `index`'s values of `name` in its place in its group (canary nodes first, then
/// the baseline's), so that each node meets its own anchor even if a node had no values.
fn push_node(
    group: &mut GroupSamples,
    name: String,
    index: usize,
    canary_nodes: usize,
    nodes: usize,
    values: Vec<f64>,
) {
    let (position, size) = if index < canary_nodes {
        (index, canary_nodes)
    } else {
        (index - canary_nodes, nodes - canary_nodes)
    };
    group.entry(name).or_insert_with(|| vec![Vec::new(); size])[position] = values;
}

/// One node's samples over the window, metric by metric, as the agent would report them.
fn simulate_node(
    rng: &mut StdRng,
    fleet: &Fleet,
    node: &Node,
    effect: Scenario,
    intervals: usize,
) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut put = |name: &str, value: f64| out.entry(name.to_owned()).or_default().push(value);
    let sigma = fleet.latency_sigma + effect.p99_factor.ln() / Z_99;
    // The load average is an exponentially weighted 1-minute average of the run queue.
    let decay = (-INTERVAL_SECS / 60.0).exp();
    let mut load = None;
    for _ in 0..intervals {
        let expected = fleet.request_rate
            * node.traffic
            * lognormal(rng, fleet.interval_traffic_sigma)
            * INTERVAL_SECS;
        let requests = poisson(rng, expected);
        let error_probability = (fleet.error_rate
            * node.errors
            * effect.error_factor
            * lognormal(rng, fleet.interval_error_sigma))
        .min(1.0);
        let log_median = (fleet.latency_median_secs
            * node.latency
            * lognormal(rng, fleet.interval_latency_sigma))
        .ln();
        let mut buckets = [0u64; LATENCY_BUCKETS.len()];
        let mut errors = 0u64;
        for _ in 0..requests {
            if rng.gen::<f64>() < error_probability {
                errors += 1;
            }
            let latency = (log_median + sigma * standard_normal(rng)).exp();
            if let Some(bucket) = LATENCY_BUCKETS.iter().position(|&le| latency <= le) {
                buckets[bucket] += 1;
            }
        }
        let rate = requests as f64 / INTERVAL_SECS;
        put(names::APP_REQUEST_RATE, rate);
        if requests > 0 {
            put(names::APP_ERROR_RATE, errors as f64 / requests as f64);
            let cumulative: Vec<u64> = buckets
                .iter()
                .scan(0, |sum, &count| {
                    *sum += count;
                    Some(*sum)
                })
                .collect();
            for (q, name) in [
                (0.5, names::APP_LATENCY_P50_MS),
                (0.9, names::APP_LATENCY_P90_MS),
                (0.99, names::APP_LATENCY_P99_MS),
            ] {
                if let Some(seconds) =
                    histogram_quantile(&LATENCY_BUCKETS, &cumulative, requests, q)
                {
                    put(name, seconds * 1000.0);
                }
            }
        }
        let cpu = (fleet.cpu_idle_percent + fleet.cpu_percent_per_rps * rate)
            * node.cpu
            * lognormal(rng, fleet.interval_cpu_sigma);
        put(names::HOST_CPU_PERCENT, cpu);
        let mem = node.mem_percent * (1.0 + fleet.interval_mem_noise * standard_normal(rng));
        put(names::HOST_MEM_USED_PERCENT, mem.clamp(0.0, 100.0));
        let run_queue = cpu / 100.0 * lognormal(rng, fleet.interval_run_queue_sigma);
        let next = match load {
            None => run_queue,
            Some(load) => load * decay + (1.0 - decay) * run_queue,
        };
        load = Some(next);
        put(names::HOST_LOAD1, next);
    }
    out
}

/// exp(σ·Z): a multiplicative factor with median 1.
fn lognormal(rng: &mut StdRng, sigma: f64) -> f64 {
    (sigma * standard_normal(rng)).exp()
}

/// Box–Muller (one of the pair; the bench is not bound by this).
fn standard_normal(rng: &mut StdRng) -> f64 {
    // 1 − u is in (0, 1], so its log is finite.
    let u: f64 = 1.0 - rng.gen::<f64>();
    let v: f64 = rng.gen();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// An exact Poisson draw: the sum of Poisson draws of at most 30 each, each by inversion
/// (e^−30 is far from underflow).
fn poisson(rng: &mut StdRng, mean: f64) -> u64 {
    let mut remaining = mean.max(0.0);
    let mut total = 0;
    while remaining > 0.0 {
        let part = remaining.min(30.0);
        remaining -= part;
        let mut u: f64 = rng.gen();
        let mut k = 0;
        let mut probability = (-part).exp();
        let mut cumulative = probability;
        while u > cumulative {
            k += 1;
            probability *= part / k as f64;
            cumulative += probability;
            if probability < 1e-300 {
                // Rounding left u above the total mass: take the tail as reached.
                u = cumulative;
            }
        }
        total += k;
    }
    total
}

/// SplitMix64: independent-looking seeds from consecutive integers.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
