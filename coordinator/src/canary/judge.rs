//! The judgment: every configured metric of a canary group against its baseline group,
//! then a score and a verdict.
//!
//! Per metric (values that are not finite are dropped first):
//! 1. **No data** when either group has fewer than `min_samples` values.
//! 2. **Anchoring**: given [`Anchors`] (each node's samples from before the first canary
//!    switch, all nodes then on the old version) and a usable level for *every* node of both
//!    groups (at least `min_samples` anchor values, their mean finite and positive), each
//!    node's values are divided by its own level: from here on the metric is judged on
//!    per-node relative changes, and `anchored` says so. Otherwise (no anchors, a node
//!    without enough of them, a zero level) the metric is judged on the values as they are.
//! 3. **The test**: the two-sided Mann–Whitney U test on the pooled values (anchored: the
//!    pooled changes) of each group. Only a change significant at `p < 1 − confidence` can
//!    fail a metric.
//! 4. **The effect**: the ratio of the canary mean to the baseline mean. A zero baseline
//!    mean gives `+∞` for a positive canary mean (not "no data", as in Kayenta) and 1 for a
//!    zero one; for a negative baseline mean the ratio is `1 + (canary − baseline)/|baseline|`.
//!    Anchored, it is the mean canary node's change over the mean baseline node's change
//!    (each node weighing the same): how much more the canary moved than the baseline did
//!    over the same time, whatever each node's own level.
//! 5. **The bounds**: the ratio must clear two bars to count: the metric's allowed ratio
//!    (the smallest change worth failing a canary for) and what node-to-node variation
//!    alone produces (below): `upper = max(allowed_increase, w)`, `lower =
//!    min(allowed_decrease, 1/w)`. High: increases are bad, the test is significant and the
//!    ratio is above `upper`. Low: the mirror image. Otherwise pass.
//!
//! **Why node-to-node variation sets a bound.** The samples of one node are not independent
//! of each other: a node has its own hardware, neighbours and clients, so its mean differs
//! from another node's by more than its samples' noise says. With sixty samples a node the
//! U test declares almost any two nodes different, and a one-node canary that differs from
//! the baseline nodes only as much as they differ among themselves would fail. So the
//! effect is also judged the way a comparison of per-node means would judge it:
//! - `s_obs`: the pooled relative standard deviation of per-node means (each node mean
//!   divided by its group's mean of node means; `nodes − 1` degrees of freedom per group,
//!   nodes with at least two values), measured over both groups. It includes each node
//!   mean's sampling noise, which a fixed ratio bound ignores for sparse metrics.
//! - Three baseline nodes give `s_obs` two degrees of freedom: far too few to trust alone
//!   (one time in ten it is under a third of the truth). So it is pooled with the metric's
//!   `expected_node_spread` `s₀`, weighted as `node_spread_prior_df` degrees of freedom:
//!   `s² = (d₀·s₀² + d·s_obs²)/(d₀ + d)` (the moderated variance of empirical-Bayes tests).
//!   With one node a side nothing is measured and `s = s₀`; with many nodes the measurement
//!   dominates.
//! - `w = 1 + node_spread_factor · s · √(1/k_c + 1/k_b)` for `k_c` canary and `k_b` baseline
//!   nodes: the ratio must exceed that many standard errors of the canary/baseline ratio
//!   under node-to-node variation. More nodes per group, tighter bound.
//!
//! **Why anchoring, and what it cannot do.** A node's own level persists: the node that
//! served 20 % more errors than the others yesterday does so today, on either version. One
//! canary node cannot tell "this node is worse" from "this version is worse", but the node
//! before its switch can: dividing by its own level removes its persistent difference, and
//! what is left between nodes is each window's sampling noise and how far a node's level
//! drifted in between. The same bound applies to the changes, with `s_obs` measured on the
//! per-node changes and the metric's `expected_node_drift` as `s₀`. The gain is the node
//! differences removed, the cost the anchor window's own sampling noise added: anchoring
//! helps most where nodes differ by more than their samples' noise (traffic, CPU, latency
//! under a busy histogram), least for sparse counts (a few errors per interval), where a
//! longer `anchor_secs` is what lowers the noise. Every node of both groups needs a level:
//! a comparison of some nodes' changes with other nodes' levels would mix the two scales.
//!
//! **Score and verdict.** A metric counts if it was judged, or has no data under
//! `no_data = "fail"` (then it counts as failing). Per group, the share of counted metrics
//! that pass; the score is `100 ·` the weighted mean of those shares over the groups with a
//! counted metric. Any critical metric counted and not passing fails the canary; otherwise
//! `pass_score` and `marginal_score` decide. Nothing counted is *marginal* (nothing to
//! judge is not evidence either way; a human decides). Metrics are listed hottest first:
//! failing critical, failing, passing, without data; within each, the ratio furthest
//! towards or beyond its bound first.
//!
//! Invariants: pure (no I/O, no clock); the same input gives the same judgment; the
//! configuration is assumed to have passed [`CanaryConfig::validate`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::config::{CanaryConfig, Direction, MetricSpec, NoDataPolicy};
use super::mann_whitney::mann_whitney;

/// Per metric name, one `Vec` of values per node of the group, in the group's node order
/// (a node without values of the metric has an empty `Vec`, so that the order holds). The
/// order matters only next to [`Anchors`].
pub type GroupSamples = BTreeMap<String, Vec<Vec<f64>>>;

/// Every node's samples from the anchor window, before the first canary node switched, when
/// all nodes of both groups ran the old version: node `i` of `canary[metric]` is node `i` of
/// the judged canary group's `metric`, likewise for the baseline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Anchors {
    pub canary: GroupSamples,
    pub baseline: GroupSamples,
}

/// The outcome of a canary judgment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Marginal,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Marginal => "marginal",
            Verdict::Fail => "fail",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One metric's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    Pass,
    /// Significantly and materially higher on the canary, and increases are bad.
    High,
    /// Significantly and materially lower on the canary, and decreases are bad.
    Low,
    /// Too few samples in either group.
    NoData,
}

impl Classification {
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Pass => "pass",
            Classification::High => "high",
            Classification::Low => "low",
            Classification::NoData => "no data",
        }
    }
}

impl std::fmt::Display for Classification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The judgment of a canary group against its baseline group (the canary report's JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgment {
    pub verdict: Verdict,
    /// Weighted share of passing metrics, 0–100.
    pub score: f64,
    /// One line for an operator: the verdict and why, naming the worst metric.
    pub summary: String,
    /// Every enabled metric, hottest first.
    pub metrics: Vec<MetricJudgment>,
    /// The thresholds and level the judgment used.
    pub pass_score: f64,
    pub marginal_score: f64,
    pub confidence: f64,
}

/// One metric of a judgment. Floats that may be infinite (the ratio, when the baseline
/// mean is zero) are written as `"inf"` / `"-inf"` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricJudgment {
    pub name: String,
    pub group: String,
    pub classification: Classification,
    pub critical: bool,
    /// Whether the metric entered the score (judged, or no data under `no_data = "fail"`).
    pub counted: bool,
    /// Canary mean / baseline mean (see the module doc for a zero baseline).
    #[serde(with = "extended_float", default)]
    pub ratio: Option<f64>,
    /// The bounds the ratio was held to (allowed ratio or node-spread bound, whichever is
    /// wider); `None` for a side that is not bad.
    #[serde(with = "extended_float", default)]
    pub lower_bound: Option<f64>,
    #[serde(with = "extended_float", default)]
    pub upper_bound: Option<f64>,
    #[serde(with = "extended_float", default)]
    pub canary_mean: Option<f64>,
    #[serde(with = "extended_float", default)]
    pub baseline_mean: Option<f64>,
    pub canary_samples: usize,
    pub baseline_samples: usize,
    pub canary_nodes: usize,
    pub baseline_nodes: usize,
    /// The Mann–Whitney two-sided p-value.
    #[serde(with = "extended_float", default)]
    pub p_value: Option<f64>,
    /// The measured relative standard deviation of per-node means (of per-node changes,
    /// when anchored) before pooling with the expected spread; `None` with one node a side.
    #[serde(with = "extended_float", default)]
    pub node_spread: Option<f64>,
    /// Judged on each node's change against its own anchor level (the ratio is then mean
    /// canary change / mean baseline change, not canary mean / baseline mean). Judgments
    /// stored before anchoring existed read as `false`, which is what they were.
    #[serde(default)]
    pub anchored: bool,
}

impl MetricJudgment {
    fn failing(&self) -> bool {
        self.counted && self.classification != Classification::Pass
    }

    /// How far the ratio went towards its nearest bound, in log terms: 1 at the bound,
    /// above 1 beyond it, 0 for no change or a change in a direction that is not bad.
    fn heat(&self) -> f64 {
        let Some(ratio) = self.ratio else { return 0.0 };
        let side = |bound: Option<f64>, beyond: bool| -> f64 {
            match bound {
                Some(_) if !beyond => 0.0,
                Some(bound) if (bound - 1.0).abs() < 1e-12 => f64::INFINITY,
                Some(bound) => (ratio.max(0.0).ln() / bound.ln()).max(0.0),
                None => 0.0,
            }
        };
        let heat = side(self.upper_bound, ratio > 1.0).max(side(self.lower_bound, ratio < 1.0));
        if heat.is_nan() {
            0.0
        } else {
            heat
        }
    }

    /// Order class: failing critical, failing, passing, without data (not counted).
    fn rank(&self) -> u8 {
        match (self.failing(), self.critical, self.counted) {
            (true, true, _) => 0,
            (true, false, _) => 1,
            (false, _, true) => 2,
            (false, _, false) => 3,
        }
    }
}

/// Judges `canary` against `baseline` under `config` (which passed `validate`); each metric
/// whose every node has a usable level in `anchors` is judged on the nodes' changes, unless
/// `anchor_secs` is 0 (anchoring off: `anchors` is ignored).
pub fn judge(
    config: &CanaryConfig,
    canary: &GroupSamples,
    baseline: &GroupSamples,
    anchors: Option<&Anchors>,
) -> Judgment {
    let anchors = anchors.filter(|_| config.anchor_secs > 0);
    let empty = Vec::new();
    let mut metrics: Vec<MetricJudgment> = config
        .enabled_metrics()
        .map(|(name, spec)| {
            let anchors = anchors.map(|anchors| {
                (
                    anchors.canary.get(name).unwrap_or(&empty).as_slice(),
                    anchors.baseline.get(name).unwrap_or(&empty).as_slice(),
                )
            });
            judge_metric(
                config,
                name,
                spec,
                canary.get(name).unwrap_or(&empty),
                baseline.get(name).unwrap_or(&empty),
                anchors,
            )
        })
        .collect();
    metrics.sort_by(|a, b| {
        a.rank()
            .cmp(&b.rank())
            .then(b.heat().total_cmp(&a.heat()))
            .then_with(|| a.name.cmp(&b.name))
    });

    // Per group: (passing, counted).
    let mut groups: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for metric in metrics.iter().filter(|m| m.counted) {
        let entry = groups.entry(metric.group.as_str()).or_default();
        entry.1 += 1.0;
        if !metric.failing() {
            entry.0 += 1.0;
        }
    }
    let (weighted, weights) =
        groups
            .iter()
            .fold((0.0, 0.0), |(sum, weights), (group, (passing, counted))| {
                // A group missing from a validated configuration cannot happen; weigh it 1.
                let weight = config.groups.get(*group).copied().unwrap_or(1.0);
                (sum + weight * passing / counted, weights + weight)
            });
    let score = if weights > 0.0 {
        100.0 * weighted / weights
    } else {
        0.0
    };
    let critical_failure = metrics.iter().any(|m| m.failing() && m.critical);
    let verdict = if groups.is_empty() {
        Verdict::Marginal
    } else if critical_failure || score < config.marginal_score {
        Verdict::Fail
    } else if score < config.pass_score {
        Verdict::Marginal
    } else {
        Verdict::Pass
    };
    let summary = summarize(config, verdict, score, &metrics, critical_failure);
    Judgment {
        verdict,
        score,
        summary,
        metrics,
        pass_score: config.pass_score,
        marginal_score: config.marginal_score,
        confidence: config.confidence,
    }
}

/// One metric's anchor values of the canary nodes and of the baseline nodes.
type NodeAnchors<'a> = (&'a [Vec<f64>], &'a [Vec<f64>]);

fn judge_metric(
    config: &CanaryConfig,
    name: &str,
    spec: &MetricSpec,
    canary: &[Vec<f64>],
    baseline: &[Vec<f64>],
    anchors: Option<NodeAnchors<'_>>,
) -> MetricJudgment {
    // Each node's values as changes against its own level, if every node has a level.
    let changes = anchors.and_then(|(canary_anchors, baseline_anchors)| {
        Some((
            changes(canary, canary_anchors, config.min_samples)?,
            changes(baseline, baseline_anchors, config.min_samples)?,
        ))
    });
    let canary = finite_nodes(canary);
    let baseline = finite_nodes(baseline);
    let canary_values: Vec<f64> = canary.iter().flatten().copied().collect();
    let baseline_values: Vec<f64> = baseline.iter().flatten().copied().collect();
    let mut judgment = MetricJudgment {
        name: name.to_owned(),
        group: spec.group.clone(),
        classification: Classification::NoData,
        critical: spec.critical,
        counted: spec.no_data == NoDataPolicy::Fail,
        ratio: None,
        lower_bound: None,
        upper_bound: None,
        canary_mean: mean(&canary_values),
        baseline_mean: mean(&baseline_values),
        canary_samples: canary_values.len(),
        baseline_samples: baseline_values.len(),
        canary_nodes: canary.len(),
        baseline_nodes: baseline.len(),
        p_value: None,
        node_spread: None,
        anchored: changes.is_some(),
    };
    // What is compared: the values themselves, or each node's changes (then only sampling
    // noise and drift remain between nodes, and the drift is the prior).
    let (judged_canary, judged_baseline, expected_spread) = match &changes {
        Some((canary, baseline)) => (canary, baseline, spec.expected_node_drift),
        None => (&canary, &baseline, spec.expected_node_spread),
    };
    let observed = node_spread(judged_canary, judged_baseline);
    judgment.node_spread = observed.map(|(spread, _)| spread);
    if canary_values.len() < config.min_samples || baseline_values.len() < config.min_samples {
        return judgment;
    }
    let (Some(canary_mean), Some(baseline_mean)) = (judgment.canary_mean, judgment.baseline_mean)
    else {
        // Unreachable with min_samples ≥ 1 and finite values; no data is the safe reading.
        return judgment;
    };
    // Anchored, each node weighs the same in its group's mean change: each node is one
    // comparison of a node with itself.
    let (test, ratio) = match &changes {
        Some((canary, baseline)) => (
            mann_whitney(&canary.concat(), &baseline.concat()),
            mean_of_node_means(canary)
                .zip(mean_of_node_means(baseline))
                .map(|(canary, baseline)| mean_ratio(canary, baseline)),
        ),
        None => (
            mann_whitney(&canary_values, &baseline_values),
            Some(mean_ratio(canary_mean, baseline_mean)),
        ),
    };
    let (Some(test), Some(ratio)) = (test, ratio) else {
        // As unreachable as above.
        return judgment;
    };
    // The measured spread pooled with the expected one, each by its degrees of freedom.
    let (measured, freedom) = observed.unwrap_or((0.0, 0));
    let prior = config.node_spread_prior_df;
    let pooled_freedom = prior + freedom as f64;
    let spread = if pooled_freedom > 0.0 {
        ((prior * expected_spread.powi(2) + freedom as f64 * measured.powi(2)) / pooled_freedom)
            .sqrt()
    } else {
        0.0
    };
    let node_bound = 1.0
        + config.node_spread_factor
            * spread
            * (1.0 / canary.len() as f64 + 1.0 / baseline.len() as f64).sqrt();
    let judges_increase = matches!(spec.direction, Direction::Increase | Direction::Either);
    let judges_decrease = matches!(spec.direction, Direction::Decrease | Direction::Either);
    let upper = judges_increase.then_some(spec.allowed_increase.max(node_bound));
    let lower = judges_decrease.then_some(spec.allowed_decrease.min(1.0 / node_bound));
    let significant = test.p_value < 1.0 - config.confidence;
    judgment.classification = match (upper, lower) {
        (Some(upper), _) if significant && ratio > upper => Classification::High,
        (_, Some(lower)) if significant && ratio < lower => Classification::Low,
        _ => Classification::Pass,
    };
    judgment.counted = true;
    judgment.ratio = Some(ratio);
    judgment.upper_bound = upper;
    judgment.lower_bound = lower;
    judgment.p_value = Some(test.p_value);
    judgment
}

/// Each node's finite values divided by its own anchor level (the mean of its finite anchor
/// values), nodes without values dropped as [`finite_nodes`] drops them; `None` when a node
/// with values has no usable level: fewer than `min_samples` anchor values, or a mean that
/// is not positive (a ratio to zero or across signs says nothing) or not finite.
fn changes(nodes: &[Vec<f64>], anchors: &[Vec<f64>], min_samples: usize) -> Option<Vec<Vec<f64>>> {
    let mut changes = Vec::new();
    for (index, values) in nodes.iter().enumerate() {
        let values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            continue;
        }
        let anchor: Vec<f64> = anchors
            .get(index)?
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        if anchor.len() < min_samples {
            return None;
        }
        let level = mean(&anchor).filter(|level| level.is_finite() && *level > 0.0)?;
        let node: Vec<f64> = values.iter().map(|v| v / level).collect();
        // A level so close to zero that the changes overflow is no level either.
        if !node.iter().all(|v| v.is_finite()) {
            return None;
        }
        changes.push(node);
    }
    Some(changes)
}

fn mean_of_node_means(nodes: &[Vec<f64>]) -> Option<f64> {
    let means: Vec<f64> = nodes.iter().filter_map(|values| mean(values)).collect();
    mean(&means)
}

/// The nodes' finite values; nodes left without any are dropped.
fn finite_nodes(nodes: &[Vec<f64>]) -> Vec<Vec<f64>> {
    nodes
        .iter()
        .map(|values| {
            values
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .collect::<Vec<_>>()
        })
        .filter(|values| !values.is_empty())
        .collect()
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Canary mean over baseline mean, defined for every pair of finite means.
fn mean_ratio(canary: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        canary / baseline
    } else if baseline == 0.0 {
        if canary > 0.0 {
            f64::INFINITY
        } else if canary < 0.0 {
            f64::NEG_INFINITY
        } else {
            1.0
        }
    } else {
        1.0 + (canary - baseline) / baseline.abs()
    }
}

/// The pooled relative standard deviation of per-node means over both groups and its degrees
/// of freedom (nodes with at least two values; a group contributes `nodes − 1`), or `None`
/// when no group has two such nodes.
fn node_spread(canary: &[Vec<f64>], baseline: &[Vec<f64>]) -> Option<(f64, usize)> {
    let (mut squares, mut freedom) = (0.0, 0usize);
    for group in [canary, baseline] {
        let means: Vec<f64> = group
            .iter()
            .filter(|values| values.len() >= 2)
            .filter_map(|values| mean(values))
            .collect();
        let Some(centre) = mean(&means).filter(|_| means.len() >= 2) else {
            continue;
        };
        if centre != 0.0 {
            squares += means
                .iter()
                .map(|m| (m / centre - 1.0).powi(2))
                .sum::<f64>();
        } else if means.iter().any(|&m| m != 0.0) {
            // Means of both signs around zero: no relative spread to speak of.
            continue;
        }
        freedom += means.len() - 1;
    }
    (freedom > 0).then(|| ((squares / freedom as f64).sqrt(), freedom))
}

fn summarize(
    config: &CanaryConfig,
    verdict: Verdict,
    score: f64,
    metrics: &[MetricJudgment],
    critical_failure: bool,
) -> String {
    let counted = metrics.iter().filter(|m| m.counted).count();
    let ignored = metrics.len() - counted;
    let Some(worst) = metrics.first() else {
        return format!("{verdict}: no metric is configured");
    };
    if counted == 0 {
        return format!(
            "{verdict}: nothing to judge, no metric has {} samples in each group (e.g. {}: canary {}, baseline {})",
            config.min_samples, worst.name, worst.canary_samples, worst.baseline_samples
        );
    }
    let mut line = if critical_failure {
        format!(
            "{verdict}: critical {}; score {score:.1}",
            describe(worst, config)
        )
    } else if worst.failing() {
        let threshold = match verdict {
            Verdict::Fail => format!(" < {} (marginal)", config.marginal_score),
            Verdict::Marginal => format!(" < {} (pass)", config.pass_score),
            Verdict::Pass => String::new(),
        };
        format!(
            "{verdict}: score {score:.1}{threshold}; worst: {}",
            describe(worst, config)
        )
    } else {
        format!(
            "{verdict}: score {score:.1}, all {counted} judged metrics within bounds; closest: {}",
            describe(worst, config)
        )
    };
    if ignored > 0 {
        let _ = write!(line, "; {ignored} without data (ignored)");
    }
    line
}

/// `app_error_rate high: canary 0.0075 vs baseline 0.005 (×1.5, bound ≤ ×1.31, p = 3.2e-6)`;
/// an anchored ratio reads `(anchored ×1.5, …)`, as it is not the quotient of the means.
fn describe(metric: &MetricJudgment, config: &CanaryConfig) -> String {
    let name = &metric.name;
    match (metric.classification, metric.ratio) {
        (Classification::NoData, _) | (_, None) => format!(
            "{name} has no data: canary {} samples, baseline {} (need {} each)",
            metric.canary_samples, metric.baseline_samples, config.min_samples
        ),
        (classification, Some(ratio)) => {
            let upper = || {
                metric
                    .upper_bound
                    .map(|b| format!(", bound ≤ ×{}", number(b)))
            };
            let lower = || {
                metric
                    .lower_bound
                    .map(|b| format!(", bound ≥ ×{}", number(b)))
            };
            let bound = match classification {
                Classification::High => upper(),
                Classification::Low => lower(),
                _ if ratio >= 1.0 => upper(),
                _ => lower(),
            };
            format!(
                "{name} {classification}: canary {} vs baseline {} ({}×{}{}, p = {})",
                metric.canary_mean.map_or_else(|| "-".into(), number),
                metric.baseline_mean.map_or_else(|| "-".into(), number),
                if metric.anchored { "anchored " } else { "" },
                number(ratio),
                bound.unwrap_or_default(),
                metric.p_value.map_or_else(|| "-".into(), p_value),
            )
        }
    }
}

/// Four significant digits, without trailing zeros; `inf` for infinities.
pub(crate) fn number(value: f64) -> String {
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let magnitude = value.abs().log10().floor() as i32;
    if !(-4..6).contains(&magnitude) {
        return format!("{value:.3e}");
    }
    let decimals = (3 - magnitude).max(0) as usize;
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

fn p_value(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        number(p)
    }
}

/// `Option<f64>` in JSON: a number, `"inf"`, `"-inf"`, or null (also for NaN, which JSON
/// cannot carry).
mod extended_float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) if v.is_finite() => serializer.serialize_f64(*v),
            Some(v) if *v == f64::INFINITY => serializer.serialize_str("inf"),
            Some(v) if *v == f64::NEG_INFINITY => serializer.serialize_str("-inf"),
            _ => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<f64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f64),
            Text(String),
        }
        match Option::<Repr>::deserialize(deserializer)? {
            None => Ok(None),
            Some(Repr::Number(v)) => Ok(Some(v)),
            Some(Repr::Text(text)) => match text.as_str() {
                "inf" => Ok(Some(f64::INFINITY)),
                "-inf" => Ok(Some(f64::NEG_INFINITY)),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"inf\" or \"-inf\", found {other:?}"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::config::MetricSpec;
    use protocol::telemetry::names;

    /// `nodes` nodes × `samples` values: `level · node_factor · (1 + wiggle)`, with a
    /// deterministic wiggle of ±`noise` that differs per node and sample.
    fn nodes(levels: &[f64], samples: usize, noise: f64) -> Vec<Vec<f64>> {
        levels
            .iter()
            .enumerate()
            .map(|(node, &level)| {
                (0..samples)
                    .map(|i| level * (1.0 + noise * ((i * 7 + node * 13) as f64).sin()))
                    .collect()
            })
            .collect()
    }

    fn samples(metrics: &[(&str, Vec<Vec<f64>>)]) -> GroupSamples {
        metrics
            .iter()
            .map(|(name, nodes)| ((*name).to_owned(), nodes.clone()))
            .collect()
    }

    /// A configuration judging only `metrics` (default specs where there are some).
    fn only(metrics: &[&str]) -> CanaryConfig {
        let mut config = CanaryConfig::default();
        for (name, spec) in config.metrics.iter_mut() {
            spec.enabled = metrics.contains(&name.as_str());
        }
        for name in metrics {
            config
                .metrics
                .entry((*name).to_owned())
                .or_insert_with(MetricSpec::generic);
        }
        config.validate().expect("valid test configuration");
        config
    }

    fn metric<'a>(judgment: &'a Judgment, name: &str) -> &'a MetricJudgment {
        judgment
            .metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} judged"))
    }

    /// Healthy sample-app-like streams: 30 samples per node.
    fn healthy(node_levels: &[f64]) -> GroupSamples {
        let scaled = |base: f64| -> Vec<f64> { node_levels.iter().map(|f| f * base).collect() };
        samples(&[
            (names::APP_ERROR_RATE, nodes(&scaled(0.005), 30, 0.3)),
            (names::APP_LATENCY_P50_MS, nodes(&scaled(20.0), 30, 0.05)),
            (names::APP_LATENCY_P90_MS, nodes(&scaled(45.0), 30, 0.08)),
            (names::APP_LATENCY_P99_MS, nodes(&scaled(85.0), 30, 0.15)),
            (names::APP_REQUEST_RATE, nodes(&scaled(50.0), 30, 0.1)),
            (names::HOST_CPU_PERCENT, nodes(&scaled(20.0), 30, 0.1)),
            (names::HOST_MEM_USED_PERCENT, nodes(&scaled(45.0), 30, 0.01)),
            (names::HOST_LOAD1, nodes(&scaled(0.4), 30, 0.2)),
            // Not configured: never judged.
            ("app:queue_depth", nodes(&scaled(1000.0), 30, 0.1)),
            (names::HOST_DISK_USED_PERCENT, nodes(&scaled(90.0), 30, 0.0)),
        ])
    }

    #[test]
    fn a_canary_like_its_baseline_passes_with_the_defaults() {
        let judgment = judge(
            &CanaryConfig::default(),
            &healthy(&[1.0]),
            &healthy(&[0.98, 1.0, 1.03]),
            None,
        );
        assert_eq!(judgment.verdict, Verdict::Pass, "{}", judgment.summary);
        assert_eq!(judgment.score, 100.0);
        assert_eq!(judgment.metrics.len(), 8);
        assert!(judgment.metrics.iter().all(|m| m.counted));
        assert!(!judgment
            .metrics
            .iter()
            .any(|m| m.name.starts_with("app:") || m.name == names::HOST_DISK_USED_PERCENT));
        assert!(
            judgment
                .summary
                .starts_with("pass: score 100.0, all 8 judged metrics within bounds; closest: "),
            "{}",
            judgment.summary
        );
    }

    #[test]
    fn a_raised_error_rate_fails_the_canary_and_the_summary_names_it() {
        let baseline = healthy(&[0.98, 1.0, 1.03]);
        let mut canary = healthy(&[1.0]);
        canary.insert(
            names::APP_ERROR_RATE.into(),
            nodes(&[0.0075], 30, 0.3), // +50 %
        );
        let judgment = judge(&CanaryConfig::default(), &canary, &baseline, None);
        assert_eq!(judgment.verdict, Verdict::Fail);
        let errors = &judgment.metrics[0];
        assert_eq!(errors.name, names::APP_ERROR_RATE, "hottest first");
        assert_eq!(errors.classification, Classification::High);
        assert!(errors.critical && errors.counted);
        let ratio = errors.ratio.expect("ratio");
        assert!((ratio - 1.5 / 1.0033).abs() < 0.02, "{ratio}");
        assert!(errors.p_value.expect("p") < 0.02);
        assert!(ratio > errors.upper_bound.expect("upper"));
        assert_eq!(errors.lower_bound, None, "decreases are not bad");
        assert_eq!((errors.canary_samples, errors.baseline_samples), (30, 90));
        assert_eq!((errors.canary_nodes, errors.baseline_nodes), (1, 3));
        // Errors weigh 4 of 9: the other groups all pass.
        assert!(
            (judgment.score - 500.0 / 9.0).abs() < 1e-9,
            "{}",
            judgment.score
        );
        assert_eq!(
            judgment.summary,
            "fail: critical app_error_rate high: canary 0.007671 vs baseline 0.005145 (×1.491, bound ≤ ×1.341, p = 5.5e-10); score 55.6"
        );
    }

    #[test]
    fn a_zero_baseline_gives_an_infinite_ratio_not_no_data() {
        // Errors in 10 of 30 intervals on the canary, none on three baseline nodes.
        let canary_errors: Vec<f64> = (0..30)
            .map(|i| if i % 3 == 0 { 0.01 } else { 0.0 })
            .collect();
        let config = only(&[names::APP_ERROR_RATE]);
        let judgment = judge(
            &config,
            &samples(&[(names::APP_ERROR_RATE, vec![canary_errors])]),
            &samples(&[(names::APP_ERROR_RATE, vec![vec![0.0; 30]; 3])]),
            None,
        );
        let errors = metric(&judgment, names::APP_ERROR_RATE);
        assert_eq!(errors.classification, Classification::High);
        assert_eq!(errors.ratio, Some(f64::INFINITY));
        assert_eq!(judgment.verdict, Verdict::Fail);
        assert!(
            judgment.summary.contains("vs baseline 0 (×inf, bound ≤ ×"),
            "{}",
            judgment.summary
        );
        // The report's JSON carries the infinity and reads back.
        let json = serde_json::to_string(&judgment).expect("json");
        assert!(json.contains(r#""ratio":"inf""#), "{json}");
        let back: Judgment = serde_json::from_str(&json).expect("reads");
        assert_eq!(back, judgment);

        // Both zero: identical, pass, ratio 1.
        let judgment = judge(
            &config,
            &samples(&[(names::APP_ERROR_RATE, vec![vec![0.0; 30]])]),
            &samples(&[(names::APP_ERROR_RATE, vec![vec![0.0; 30]; 3])]),
            None,
        );
        let errors = metric(&judgment, names::APP_ERROR_RATE);
        assert_eq!(
            (errors.classification, errors.ratio),
            (Classification::Pass, Some(1.0))
        );
        assert_eq!(errors.p_value, Some(1.0));
    }

    #[test]
    fn sparse_spikes_kayenta_passes_are_caught_and_a_single_blip_is_not() {
        // spinnaker/spinnaker#6278: 7 of 10 points at 100 against all 1.
        let config = only(&["app:x"]);
        let mut canary = vec![100.0; 7];
        canary.extend([1.0; 3]);
        let judgment = judge(
            &config,
            &samples(&[("app:x", vec![canary])]),
            &samples(&[("app:x", vec![vec![1.0; 10]])]),
            None,
        );
        let x = metric(&judgment, "app:x");
        assert_eq!(x.classification, Classification::High);
        // U = 85 of 100, heavily tied: p ≈ 0.0016 by the normal approximation.
        assert!(x.p_value.expect("p") < 0.002);
        // One error in one interval of 30 against a clean baseline: not significant.
        let mut blip = vec![0.0; 30];
        blip[17] = 0.02;
        let judgment = judge(
            &only(&[names::APP_ERROR_RATE]),
            &samples(&[(names::APP_ERROR_RATE, vec![blip])]),
            &samples(&[(names::APP_ERROR_RATE, vec![vec![0.0; 30]; 3])]),
            None,
        );
        let errors = metric(&judgment, names::APP_ERROR_RATE);
        assert_eq!(errors.ratio, Some(f64::INFINITY));
        assert_eq!(errors.classification, Classification::Pass);
        assert_eq!(judgment.verdict, Verdict::Pass);
    }

    #[test]
    fn a_canary_node_that_differs_only_like_baseline_nodes_do_passes() {
        // p99 of baseline nodes at 80, 88, 96 ms; the canary node at 100 ms, +10 % over
        // the baseline mean, beyond the allowed ×1.1 but within the nodes' own spread.
        // Every node's samples are tight, so the U test is highly significant anyway.
        let config = only(&[names::APP_LATENCY_P99_MS]);
        let canary = samples(&[(names::APP_LATENCY_P99_MS, nodes(&[100.0], 30, 0.02))]);
        let baseline = samples(&[(
            names::APP_LATENCY_P99_MS,
            nodes(&[80.0, 88.0, 96.0], 30, 0.02),
        )]);
        let judgment = judge(&config, &canary, &baseline, None);
        let p99 = metric(&judgment, names::APP_LATENCY_P99_MS);
        assert!(p99.p_value.expect("p") < 1e-6);
        assert!(p99.ratio.expect("ratio") > 1.13);
        let spread = p99.node_spread.expect("three baseline nodes");
        assert!((spread - 0.091).abs() < 0.005, "{spread}");
        assert_eq!(
            p99.classification,
            Classification::Pass,
            "{}",
            judgment.summary
        );
        assert_eq!(judgment.verdict, Verdict::Pass);
        // Without the node-spread bound the same canary fails: that rule is what saves it.
        let mut strict = config.clone();
        strict.node_spread_factor = 0.0;
        let judgment = judge(&strict, &canary, &baseline, None);
        assert_eq!(
            metric(&judgment, names::APP_LATENCY_P99_MS).classification,
            Classification::High
        );
        // And a canary well outside the baseline nodes' spread still fails.
        let slow = samples(&[(names::APP_LATENCY_P99_MS, nodes(&[130.0], 30, 0.02))]);
        let judgment = judge(&config, &slow, &baseline, None);
        assert_eq!(judgment.verdict, Verdict::Fail, "{}", judgment.summary);
    }

    /// The same samples in another order: an anchor window with the same level per node.
    fn rotated(group: &GroupSamples, by: usize) -> GroupSamples {
        group
            .iter()
            .map(|(name, nodes)| {
                let nodes = nodes
                    .iter()
                    .map(|values| {
                        let mut values = values.clone();
                        let by = by % values.len().max(1);
                        values.rotate_left(by);
                        values
                    })
                    .collect();
                (name.clone(), nodes)
            })
            .collect()
    }

    #[test]
    fn an_anchored_canary_node_that_is_inherently_worse_but_unchanged_passes() {
        // The canary node runs 20 % worse on every metric, before and after its switch.
        let canary = healthy(&[1.2]);
        let baseline = healthy(&[0.98, 1.0, 1.03]);
        let anchors = Anchors {
            canary: rotated(&canary, 11),
            baseline: rotated(&baseline, 5),
        };
        let config = CanaryConfig::default();
        let judgment = judge(&config, &canary, &baseline, Some(&anchors));
        assert_eq!(judgment.verdict, Verdict::Pass, "{}", judgment.summary);
        assert!(judgment.metrics.iter().all(|m| m.anchored), "{judgment:?}");
        let p99 = metric(&judgment, names::APP_LATENCY_P99_MS);
        assert!((p99.ratio.expect("ratio") - 1.0).abs() < 1e-9);
        // The raw means still say what the nodes run at.
        let raw = p99.canary_mean.expect("mean") / p99.baseline_mean.expect("mean");
        assert!(raw > 1.19, "{raw}");
        assert!(
            judgment.summary.contains("(anchored ×"),
            "{}",
            judgment.summary
        );
        // Unanchored, the same canary fails on its p99 latency: it is an unusual node.
        let judgment = judge(&config, &canary, &baseline, None);
        assert_eq!(judgment.verdict, Verdict::Fail, "{}", judgment.summary);
        assert_eq!(judgment.metrics[0].name, names::APP_LATENCY_P99_MS);
        assert!(!judgment.metrics[0].anchored);
    }

    #[test]
    fn an_anchored_error_rate_fifty_percent_up_on_an_inherently_better_node_fails() {
        // The canary node has 20 % fewer errors than the others; the new version raises them
        // by half, to 1.2 × the baseline level: within node-to-node spread, so unanchored
        // it passes.
        let baseline = healthy(&[0.98, 1.0, 1.03]);
        let anchor_canary = healthy(&[0.8]);
        let mut canary = rotated(&anchor_canary, 11);
        canary.insert(
            names::APP_ERROR_RATE.into(),
            nodes(&[0.8 * 1.5 * 0.005], 30, 0.3),
        );
        let anchors = Anchors {
            canary: anchor_canary,
            baseline: rotated(&baseline, 5),
        };
        let unanchored = judge(&CanaryConfig::default(), &canary, &baseline, None);
        let errors = metric(&unanchored, names::APP_ERROR_RATE);
        assert_eq!(errors.classification, Classification::Pass);
        assert!(errors.ratio.expect("ratio") < 1.25);

        let judgment = judge(&CanaryConfig::default(), &canary, &baseline, Some(&anchors));
        let errors = metric(&judgment, names::APP_ERROR_RATE);
        assert!(errors.anchored);
        assert_eq!(errors.classification, Classification::High, "{errors:?}");
        let ratio = errors.ratio.expect("ratio");
        assert!((ratio - 1.5).abs() < 0.01, "{ratio}");
        assert!(ratio > errors.upper_bound.expect("upper"));
        assert_eq!(judgment.verdict, Verdict::Fail);
        assert!(
            judgment
                .summary
                .starts_with("fail: critical app_error_rate high: canary 0.006137 vs baseline 0.005145 (anchored ×1.5, bound ≤ ×"),
            "{}",
            judgment.summary
        );
    }

    #[test]
    fn a_node_without_an_anchor_or_with_a_zero_level_is_judged_unanchored() {
        let config = only(&[names::APP_ERROR_RATE, names::APP_LATENCY_P50_MS]);
        let canary = samples(&[
            (names::APP_ERROR_RATE, nodes(&[0.005], 30, 0.3)),
            (names::APP_LATENCY_P50_MS, nodes(&[20.0], 30, 0.05)),
        ]);
        let baseline = samples(&[
            (names::APP_ERROR_RATE, nodes(&[0.005, 0.005], 30, 0.3)),
            (names::APP_LATENCY_P50_MS, nodes(&[20.0, 21.0], 30, 0.05)),
        ]);
        let unanchored = judge(&config, &canary, &baseline, None);

        // The second baseline node has p50 samples before the switch but too few; the canary
        // node had no errors at all before (a zero level): both metrics fall back, whole.
        let mut anchors = Anchors {
            canary: rotated(&canary, 3),
            baseline: rotated(&baseline, 3),
        };
        anchors
            .canary
            .insert(names::APP_ERROR_RATE.into(), vec![vec![0.0; 30]]);
        let p50 = anchors
            .baseline
            .get_mut(names::APP_LATENCY_P50_MS)
            .expect("p50");
        p50[1].truncate(config.min_samples - 1);
        let judgment = judge(&config, &canary, &baseline, Some(&anchors));
        assert!(judgment.metrics.iter().all(|m| !m.anchored));
        assert_eq!(judgment, unanchored);

        // A node missing from the anchors altogether (shorter list) falls back too.
        let mut anchors = Anchors {
            canary: rotated(&canary, 3),
            baseline: rotated(&baseline, 3),
        };
        for nodes in anchors.baseline.values_mut() {
            nodes.truncate(1);
        }
        assert_eq!(
            judge(&config, &canary, &baseline, Some(&anchors)),
            unanchored
        );
        // With every level usable, both are anchored.
        let anchors = Anchors {
            canary: rotated(&canary, 3),
            baseline: rotated(&baseline, 3),
        };
        let judgment = judge(&config, &canary, &baseline, Some(&anchors));
        assert!(judgment.metrics.iter().all(|m| m.anchored));

        // A judgment stored before anchoring existed reads as unanchored.
        let mut json = serde_json::to_value(&unanchored).expect("json");
        for metric in json["metrics"].as_array_mut().expect("metrics") {
            metric.as_object_mut().expect("object").remove("anchored");
        }
        let back: Judgment = serde_json::from_value(json).expect("reads");
        assert_eq!(back, unanchored);
    }

    #[test]
    fn too_few_samples_is_no_data_and_the_policy_decides_what_it_counts_for() {
        let mut config = only(&[names::APP_ERROR_RATE, names::APP_LATENCY_P50_MS]);
        let canary = samples(&[
            (names::APP_ERROR_RATE, nodes(&[0.01], 5, 0.1)),
            (names::APP_LATENCY_P50_MS, nodes(&[20.0], 30, 0.05)),
        ]);
        let baseline = samples(&[
            (names::APP_ERROR_RATE, nodes(&[0.01, 0.01], 30, 0.1)),
            (names::APP_LATENCY_P50_MS, nodes(&[20.0, 20.0], 30, 0.05)),
        ]);
        let judgment = judge(&config, &canary, &baseline, None);
        let errors = metric(&judgment, names::APP_ERROR_RATE);
        assert_eq!(errors.classification, Classification::NoData);
        assert!(!errors.counted);
        assert_eq!(
            (errors.canary_samples, errors.ratio, errors.p_value),
            (5, None, None)
        );
        assert_eq!(judgment.verdict, Verdict::Pass);
        assert_eq!(
            judgment.metrics.last().map(|m| m.name.as_str()),
            Some(names::APP_ERROR_RATE)
        );
        assert!(
            judgment.summary.ends_with("; 1 without data (ignored)"),
            "{}",
            judgment.summary
        );

        // `no_data = "fail"` on a critical metric fails the canary.
        config
            .metrics
            .get_mut(names::APP_ERROR_RATE)
            .expect("configured")
            .no_data = NoDataPolicy::Fail;
        let judgment = judge(&config, &canary, &baseline, None);
        assert_eq!(judgment.verdict, Verdict::Fail);
        assert_eq!(
            judgment.summary,
            "fail: critical app_error_rate has no data: canary 5 samples, baseline 60 (need 10 each); score 42.9"
        );

        // Nothing to judge at all: marginal, for a human to decide.
        let judgment = judge(
            &CanaryConfig::default(),
            &GroupSamples::new(),
            &GroupSamples::new(),
            None,
        );
        assert_eq!((judgment.verdict, judgment.score), (Verdict::Marginal, 0.0));
        assert!(
            judgment
                .summary
                .starts_with("marginal: nothing to judge, no metric has 10 samples in each group"),
            "{}",
            judgment.summary
        );
    }

    #[test]
    fn only_the_bad_direction_fails() {
        let config = only(&[names::APP_LATENCY_P50_MS, names::APP_REQUEST_RATE, "app:x"]);
        // Faster and more traffic: good news for these directions; app:x (either) is low.
        let canary = samples(&[
            (names::APP_LATENCY_P50_MS, nodes(&[10.0], 30, 0.05)),
            (names::APP_REQUEST_RATE, nodes(&[100.0], 30, 0.05)),
            ("app:x", nodes(&[5.0], 30, 0.05)),
        ]);
        let baseline = samples(&[
            (names::APP_LATENCY_P50_MS, nodes(&[20.0, 20.0], 30, 0.05)),
            (names::APP_REQUEST_RATE, nodes(&[50.0, 50.0], 30, 0.05)),
            ("app:x", nodes(&[10.0, 10.0], 30, 0.05)),
        ]);
        let judgment = judge(&config, &canary, &baseline, None);
        assert_eq!(
            metric(&judgment, names::APP_LATENCY_P50_MS).classification,
            Classification::Pass
        );
        assert_eq!(
            metric(&judgment, names::APP_REQUEST_RATE).classification,
            Classification::Pass
        );
        let x = metric(&judgment, "app:x");
        assert_eq!(x.classification, Classification::Low);
        assert!(x.lower_bound.is_some() && x.upper_bound.is_some());
        // The opposite changes fail: slower and less traffic.
        let judgment = judge(&config, &baseline, &canary, None);
        assert_eq!(
            metric(&judgment, names::APP_LATENCY_P50_MS).classification,
            Classification::High
        );
        assert_eq!(
            metric(&judgment, names::APP_REQUEST_RATE).classification,
            Classification::Low
        );
    }

    #[test]
    fn the_score_is_the_weighted_share_of_passing_metrics_and_thresholds_decide() {
        let mut config = only(&[
            names::APP_LATENCY_P50_MS,
            names::APP_LATENCY_P90_MS,
            names::HOST_CPU_PERCENT,
        ]);
        config.groups.insert("latency".into(), 3.0);
        config.groups.insert("host".into(), 1.0);
        let baseline = samples(&[
            (names::APP_LATENCY_P50_MS, nodes(&[20.0, 20.0], 30, 0.05)),
            (names::APP_LATENCY_P90_MS, nodes(&[40.0, 40.0], 30, 0.05)),
            (names::HOST_CPU_PERCENT, nodes(&[20.0, 20.0], 30, 0.05)),
        ]);
        let mut canary = samples(&[
            (names::APP_LATENCY_P50_MS, nodes(&[30.0], 30, 0.05)),
            (names::APP_LATENCY_P90_MS, nodes(&[40.0], 30, 0.05)),
            (names::HOST_CPU_PERCENT, nodes(&[20.0], 30, 0.05)),
        ]);
        // Latency: 1 of 2 pass (weight 3); host: 1 of 1 (weight 1) → (3·½ + 1)/4 = 62.5.
        let judgment = judge(&config, &canary, &baseline, None);
        assert_eq!(judgment.score, 62.5);
        assert_eq!(judgment.verdict, Verdict::Marginal);
        assert!(
            judgment
                .summary
                .starts_with("marginal: score 62.5 < 75 (pass); worst: app_latency_p50_ms high: canary 30.11 vs baseline 20.08 (×1.499, bound ≤ ×1.15, p = 1.4e-14)"),
            "{}",
            judgment.summary
        );
        // CPU fails too: (3·½ + 0)/4 = 37.5 → fail.
        canary.insert(names::HOST_CPU_PERCENT.into(), nodes(&[40.0], 30, 0.05));
        let judgment = judge(&config, &canary, &baseline, None);
        assert_eq!((judgment.score, judgment.verdict), (37.5, Verdict::Fail));
        assert!(judgment
            .summary
            .starts_with("fail: score 37.5 < 50 (marginal); worst: "));
        // Hottest first, measured against each bound: p50 at ×1.5 of a ×1.15 bound is
        // further out than CPU at ×2 of a bound near ×1.6 (CPU's nodes usually differ more).
        let order: Vec<&str> = judgment.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            order,
            [
                names::APP_LATENCY_P50_MS,
                names::HOST_CPU_PERCENT,
                names::APP_LATENCY_P90_MS
            ]
        );
        let cpu = metric(&judgment, names::HOST_CPU_PERCENT);
        let bound = cpu.upper_bound.expect("upper");
        assert!((1.5..1.7).contains(&bound), "{bound}");
    }

    #[test]
    fn values_that_are_not_finite_are_dropped() {
        let config = only(&[names::APP_LATENCY_P50_MS]);
        let mut canary_values = nodes(&[20.0], 30, 0.05);
        canary_values[0].extend([f64::NAN, f64::INFINITY]);
        let judgment = judge(
            &config,
            &samples(&[(names::APP_LATENCY_P50_MS, canary_values)]),
            &samples(&[(names::APP_LATENCY_P50_MS, nodes(&[20.0, 20.0], 30, 0.05))]),
            None,
        );
        let p50 = metric(&judgment, names::APP_LATENCY_P50_MS);
        assert_eq!(p50.canary_samples, 30);
        assert_eq!(p50.classification, Classification::Pass);
    }

    #[test]
    fn numbers_read_well_in_the_summary() {
        assert_eq!(number(0.0075), "0.0075");
        assert_eq!(number(1.4953), "1.495");
        assert_eq!(number(20.0), "20");
        assert_eq!(number(123_456.0), "123456");
        assert_eq!(number(2.5e-7), "2.500e-7");
        assert_eq!(number(f64::INFINITY), "inf");
        assert_eq!(p_value(3.21e-6), "3.2e-6");
        assert_eq!(p_value(0.0123), "0.0123");
    }
}
