//! What a canary judgment is configured by: the `[canary]` section of `release.toml`,
//! stored with the release and sent in the publish request as JSON.
//!
//! ```toml
//! [canary]
//! confidence = 0.98            # the Mann–Whitney test's level
//! pass_score = 75.0            # score ≥ this: pass; ≥ marginal_score: marginal; else fail
//! marginal_score = 50.0
//! min_samples = 10             # per group and metric, else "no data"
//! window_secs = 1800           # how long the rollout observes a canary before judging
//! warmup_secs = 60             # skipped after the switch
//! anchor_secs = 1800           # each node's own level before the first canary switch; 0: off
//! node_spread_factor = 2.75    # a ratio must also exceed this many node-to-node std. errors
//! node_spread_prior_df = 4.0   # weight of each metric's expected_node_spread (deg. of freedom)
//! [canary.groups]              # weights; merged over the defaults
//! errors = 4.0
//! [canary.metrics.app_latency_p99_ms]  # merged field by field over the default entry
//! allowed_increase = 1.5
//! [canary.metrics."app:queue_depth"]   # an app-defined series: judged once configured
//! direction = "increase"       # the direction that is bad: increase | decrease | either
//! allowed_increase = 1.3       # canary/baseline mean ratio tolerated upwards
//! allowed_decrease = 0.8       # ... and downwards
//! expected_node_spread = 0.1   # usual relative spread of per-node means over the window
//! expected_node_drift = 0.1    # ... of per-node changes against their own anchor level
//! critical = false             # a critical metric that fails fails the whole canary
//! no_data = "ignore"           # too few samples: ignore | fail
//! group = "app"
//! enabled = true               # false drops a default metric
//! ```
//!
//! Invariants: a key this build does not know is refused (`deny_unknown_fields`), never
//! ignored. Omitted keys take the defaults (an omitted `anchor_secs` the `window_secs` given),
//! *merged* rather than replaced: a table under
//! `metrics` changes only the fields it names of that metric's default entry (or of
//! [`MetricSpec::generic`] for a metric without one), and the other default metrics stay.
//! So the serialized form (every field explicit) reads back into the same configuration.
//! A configuration is used only after [`CanaryConfig::validate`] passed; its errors name the
//! dotted field (`canary.metrics.app_error_rate.allowed_increase`).

use std::collections::BTreeMap;

use protocol::telemetry::{names, valid_metric_name};
use serde::{Deserialize, Serialize};

/// The group a metric without one belongs to (app-defined series, typically).
pub const DEFAULT_GROUP: &str = "app";

/// How a canary is judged against its baseline. `Default` works for the sample app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawCanaryConfig")]
pub struct CanaryConfig {
    /// Level of the two-sided Mann–Whitney test: a metric is high or low only if the test
    /// rejects "same distribution" at `p < 1 − confidence`.
    pub confidence: f64,
    /// Score (0–100) at or above which the canary passes.
    pub pass_score: f64,
    /// Score at or above which a canary that does not pass is marginal rather than failed.
    pub marginal_score: f64,
    /// Fewest samples the canary group and the baseline group must each have of a metric
    /// for it to be judged; fewer is "no data".
    pub min_samples: usize,
    /// Length of the judgment window the rollout observes after the warm-up.
    pub window_secs: u64,
    /// Time after a switch whose samples are not judged (start-up noise, cold caches).
    pub warmup_secs: u64,
    /// Length of the anchor window, just before the first canary node switched, whose
    /// samples (every node still on the old version) give each node its own level, so that
    /// each node's change is judged rather than its level (see the judge's module doc).
    /// Defaults to `window_secs` (the window a node's level is judged over anyway); 0
    /// turns anchoring off.
    pub anchor_secs: u64,
    /// How many standard errors of the node-to-node spread of per-node means a ratio must
    /// go beyond (see the judge's module doc); 0 turns this guard off.
    pub node_spread_factor: f64,
    /// How much each metric's `expected_node_spread` weighs against the spread measured
    /// among the judged nodes, in degrees of freedom (nodes beyond the first of a group).
    pub node_spread_prior_df: f64,
    /// Group name → weight in the score.
    pub groups: BTreeMap<String, f64>,
    /// Metric name (as the agent reports it) → how it is judged. Metrics the samples carry
    /// but this map does not name (app-defined `app:*` series, say) are not judged.
    pub metrics: BTreeMap<String, MetricSpec>,
}

/// How one metric is judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSpec {
    /// The group whose weight the metric's result carries in the score.
    pub group: String,
    /// Which change is bad.
    pub direction: Direction,
    /// Largest canary/baseline mean ratio that is acceptable (≥ 1); the bound used may be
    /// higher where node-to-node variation demands (see the judge).
    pub allowed_increase: f64,
    /// Smallest acceptable ratio (in (0, 1]); likewise.
    pub allowed_decrease: f64,
    /// The relative standard deviation of per-node means over a judgment window that
    /// comparable nodes on the same version usually show (node differences plus sampling
    /// noise): the prior the measured spread is pooled with.
    pub expected_node_spread: f64,
    /// The relative standard deviation of per-node *changes* between the anchor window and
    /// the judgment window on an unchanged version (the sampling noise of both windows plus
    /// how far a node's level drifts in between): the prior of an anchored judgment.
    pub expected_node_drift: f64,
    /// A critical metric that is high, low, or without data under `no_data = "fail"` fails
    /// the canary whatever the score.
    pub critical: bool,
    /// What too few samples mean.
    pub no_data: NoDataPolicy,
    /// `false` leaves the metric out (to drop one of the defaults).
    pub enabled: bool,
}

/// The direction of change that is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Higher is worse (errors, latency); a decrease passes.
    Increase,
    /// Lower is worse (throughput); an increase passes.
    Decrease,
    /// Any change beyond the allowed ratios is bad.
    Either,
}

/// What a metric without enough samples counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoDataPolicy {
    /// Left out of the score: an app that does not report the metric is not penalised
    /// (Flagger counts missing values as failures and so rolls back idle canaries).
    Ignore,
    /// Counted as a failing metric.
    Fail,
}

impl MetricSpec {
    /// The spec of a metric that has no default entry: group [`DEFAULT_GROUP`], either
    /// direction, ±25 % allowed, 10 % expected node spread and drift (nothing is known of
    /// an app's own series, so the drift is not assumed smaller than the spread), not
    /// critical, ignored without data.
    pub fn generic() -> Self {
        MetricSpec {
            group: DEFAULT_GROUP.to_owned(),
            direction: Direction::Either,
            allowed_increase: 1.25,
            allowed_decrease: 0.8,
            expected_node_spread: 0.1,
            expected_node_drift: 0.1,
            critical: false,
            no_data: NoDataPolicy::Ignore,
            enabled: true,
        }
    }
}

/// The default metrics. The allowed ratios are the smallest changes worth a rollback. The
/// expected node spreads are what `bench-canary`'s fleet shows over the default window
/// (50 requests/s and 0.5 % errors per node, nodes differing by 5–20 %); with them,
/// `node_spread_factor` and `node_spread_prior_df` were chosen there as the most sensitive
/// setting that keeps A/A false alarms of a one-node canary within 2 % (README, Figures).
/// A fleet whose nodes differ more, or with less traffic, should raise its spreads.
///
/// The expected node drifts are the spread of per-node changes the same fleet shows between
/// a default anchor window and the judgment window (the RMS `bench-canary --seed 2` prints
/// at the default 1800 s windows, rounded up; not the seed the README reports): the
/// sampling noise of both windows, plus a 3 % drift of each node's own level in between.
/// The error rate's is the largest (sampling noise: ~450 errors per node and window); the
/// others are far below their spreads, since node differences dominate those.
/// `node_spread_factor` and `node_spread_prior_df` were not re-tuned.
///
/// The windows are 30 minutes: at 50 requests/s and 0.5 % errors a 10-minute window holds
/// ~150 errors per node, too few to tell a one-node canary's +50 % from noise 95 % of the
/// time (68 % at 600 s, README, Figures).
///
/// - Errors and p99 latency are what users feel first: critical.
/// - p50/p90 latency and the request rate feed the score only. A request rate that drops
///   (clients giving up) is bad; one that rises is the load balancer's business.
/// - Host CPU, memory and load: a new version that burns more is worth a look, not a
///   rollback on its own; their node-to-node spread is large, so they weigh little.
/// - Disk usage is not judged: it says what a node stores (the canary holds one more
///   slot), not how the version behaves.
fn default_metrics() -> BTreeMap<String, MetricSpec> {
    use Direction::{Decrease, Increase};
    // (name, group, bad direction, allowed ratio, expected node spread, expected node
    // drift, critical)
    let table = [
        (
            names::APP_ERROR_RATE,
            "errors",
            Increase,
            1.2,
            0.13,
            0.085,
            true,
        ),
        (
            names::APP_LATENCY_P99_MS,
            "latency",
            Increase,
            1.1,
            0.04,
            0.02,
            true,
        ),
        (
            names::APP_LATENCY_P90_MS,
            "latency",
            Increase,
            1.15,
            0.04,
            0.02,
            false,
        ),
        (
            names::APP_LATENCY_P50_MS,
            "latency",
            Increase,
            1.15,
            0.04,
            0.025,
            false,
        ),
        (
            names::APP_REQUEST_RATE,
            "traffic",
            Decrease,
            0.8,
            0.2,
            0.035,
            false,
        ),
        (
            names::HOST_CPU_PERCENT,
            "host",
            Increase,
            1.25,
            0.2,
            0.045,
            false,
        ),
        (
            names::HOST_MEM_USED_PERCENT,
            "host",
            Increase,
            1.25,
            0.1,
            0.03,
            false,
        ),
        (names::HOST_LOAD1, "host", Increase, 1.5, 0.2, 0.06, false),
    ];
    table
        .into_iter()
        .map(
            |(name, group, direction, allowed, spread, drift, critical)| {
                let mut spec = MetricSpec {
                    group: group.to_owned(),
                    direction,
                    expected_node_spread: spread,
                    expected_node_drift: drift,
                    critical,
                    ..MetricSpec::generic()
                };
                match direction {
                    Decrease => spec.allowed_decrease = allowed,
                    _ => spec.allowed_increase = allowed,
                }
                (name.to_owned(), spec)
            },
        )
        .collect()
}

fn default_groups() -> BTreeMap<String, f64> {
    [
        ("errors", 4.0),
        ("latency", 3.0),
        ("traffic", 1.0),
        ("host", 1.0),
        (DEFAULT_GROUP, 1.0),
    ]
    .into_iter()
    .map(|(name, weight)| (name.to_owned(), weight))
    .collect()
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            // Kayenta's fixed level.
            confidence: 0.98,
            // Spinnaker's defaults.
            pass_score: 75.0,
            marginal_score: 50.0,
            min_samples: 10,
            window_secs: 1800,
            warmup_secs: 60,
            anchor_secs: 1800,
            node_spread_factor: 2.75,
            node_spread_prior_df: 4.0,
            groups: default_groups(),
            metrics: default_metrics(),
        }
    }
}

/// Longest window or warm-up accepted: a week.
const MAX_WINDOW_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CanaryConfigError {
    /// A number outside its range; `field` is the dotted key.
    #[error("{field} is {value}; expected {expected}")]
    OutOfRange {
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("canary.marginal_score ({marginal}) is above canary.pass_score ({pass}); lower it to at most the pass score")]
    Thresholds { marginal: f64, pass: f64 },
    #[error("canary.metrics.{metric}.group: no group named {group:?} in canary.groups (known: {known}); add it with a weight or use a known one")]
    UnknownGroup {
        metric: String,
        group: String,
        known: String,
    },
    #[error("canary.metrics: {name:?} is not a metric name (1 to 64 characters of a-z A-Z 0-9 _ :, not starting with a digit)")]
    MetricName { name: String },
    #[error("canary.metrics: every metric is disabled; enable one, or leave out the [canary] section to use the defaults")]
    NothingToJudge,
}

fn out_of_range(
    field: impl Into<String>,
    value: impl ToString,
    expected: &'static str,
) -> CanaryConfigError {
    CanaryConfigError::OutOfRange {
        field: field.into(),
        value: value.to_string(),
        expected,
    }
}

impl CanaryConfig {
    /// Checks every rule; the first one broken is returned, naming its field.
    pub fn validate(&self) -> Result<(), CanaryConfigError> {
        if !(0.5..1.0).contains(&self.confidence) {
            return Err(out_of_range(
                "canary.confidence",
                self.confidence,
                "at least 0.5 and below 1 (0.98 is usual)",
            ));
        }
        for (field, score) in [
            ("canary.pass_score", self.pass_score),
            ("canary.marginal_score", self.marginal_score),
        ] {
            if !(0.0..=100.0).contains(&score) {
                return Err(out_of_range(field, score, "a score from 0 to 100"));
            }
        }
        if self.marginal_score > self.pass_score {
            return Err(CanaryConfigError::Thresholds {
                marginal: self.marginal_score,
                pass: self.pass_score,
            });
        }
        if self.min_samples < 3 {
            return Err(out_of_range(
                "canary.min_samples",
                self.min_samples,
                "at least 3 (fewer can never be significant)",
            ));
        }
        if !(1..=MAX_WINDOW_SECS).contains(&self.window_secs) {
            return Err(out_of_range(
                "canary.window_secs",
                self.window_secs,
                "from 1 second to a week (604800)",
            ));
        }
        if self.warmup_secs > MAX_WINDOW_SECS {
            return Err(out_of_range(
                "canary.warmup_secs",
                self.warmup_secs,
                "at most a week (604800)",
            ));
        }
        if self.anchor_secs > MAX_WINDOW_SECS {
            return Err(out_of_range(
                "canary.anchor_secs",
                self.anchor_secs,
                "at most a week (604800); 0 turns anchoring off",
            ));
        }
        if !(0.0..=10.0).contains(&self.node_spread_factor) {
            return Err(out_of_range(
                "canary.node_spread_factor",
                self.node_spread_factor,
                "from 0 to 10",
            ));
        }
        if !(0.0..=1000.0).contains(&self.node_spread_prior_df) {
            return Err(out_of_range(
                "canary.node_spread_prior_df",
                self.node_spread_prior_df,
                "from 0 to 1000",
            ));
        }
        for (name, &weight) in &self.groups {
            if !(weight.is_finite() && weight > 0.0) {
                return Err(out_of_range(
                    format!("canary.groups.{name}"),
                    weight,
                    "a positive weight",
                ));
            }
        }
        for (name, spec) in &self.metrics {
            if !valid_metric_name(name) {
                return Err(CanaryConfigError::MetricName { name: name.clone() });
            }
            if !self.groups.contains_key(&spec.group) {
                return Err(CanaryConfigError::UnknownGroup {
                    metric: name.clone(),
                    group: spec.group.clone(),
                    known: self.groups.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
            if !(spec.allowed_increase.is_finite() && spec.allowed_increase >= 1.0) {
                return Err(out_of_range(
                    format!("canary.metrics.{name}.allowed_increase"),
                    spec.allowed_increase,
                    "a ratio of at least 1 (1.2 tolerates +20 %)",
                ));
            }
            if !(spec.allowed_decrease > 0.0 && spec.allowed_decrease <= 1.0) {
                return Err(out_of_range(
                    format!("canary.metrics.{name}.allowed_decrease"),
                    spec.allowed_decrease,
                    "a ratio above 0 and at most 1 (0.8 tolerates −20 %)",
                ));
            }
            if !(0.0..=10.0).contains(&spec.expected_node_spread) {
                return Err(out_of_range(
                    format!("canary.metrics.{name}.expected_node_spread"),
                    spec.expected_node_spread,
                    "a relative standard deviation from 0 to 10 (0.1 = 10 %)",
                ));
            }
            if !(0.0..=10.0).contains(&spec.expected_node_drift) {
                return Err(out_of_range(
                    format!("canary.metrics.{name}.expected_node_drift"),
                    spec.expected_node_drift,
                    "a relative standard deviation from 0 to 10 (0.1 = 10 %)",
                ));
            }
        }
        if !self.metrics.values().any(|spec| spec.enabled) {
            return Err(CanaryConfigError::NothingToJudge);
        }
        Ok(())
    }

    /// The enabled metrics, by name.
    pub fn enabled_metrics(&self) -> impl Iterator<Item = (&str, &MetricSpec)> {
        self.metrics
            .iter()
            .filter(|(_, spec)| spec.enabled)
            .map(|(name, spec)| (name.as_str(), spec))
    }
}

/// The configuration as written: every key optional, merged over the defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanaryConfig {
    confidence: Option<f64>,
    pass_score: Option<f64>,
    marginal_score: Option<f64>,
    min_samples: Option<usize>,
    window_secs: Option<u64>,
    warmup_secs: Option<u64>,
    anchor_secs: Option<u64>,
    node_spread_factor: Option<f64>,
    node_spread_prior_df: Option<f64>,
    #[serde(default)]
    groups: BTreeMap<String, f64>,
    #[serde(default)]
    metrics: BTreeMap<String, RawMetricSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetricSpec {
    group: Option<String>,
    direction: Option<Direction>,
    allowed_increase: Option<f64>,
    allowed_decrease: Option<f64>,
    expected_node_spread: Option<f64>,
    expected_node_drift: Option<f64>,
    critical: Option<bool>,
    no_data: Option<NoDataPolicy>,
    enabled: Option<bool>,
}

impl From<RawCanaryConfig> for CanaryConfig {
    fn from(raw: RawCanaryConfig) -> Self {
        let mut config = CanaryConfig::default();
        let defaults = config.clone();
        config.confidence = raw.confidence.unwrap_or(defaults.confidence);
        config.pass_score = raw.pass_score.unwrap_or(defaults.pass_score);
        config.marginal_score = raw.marginal_score.unwrap_or(defaults.marginal_score);
        config.min_samples = raw.min_samples.unwrap_or(defaults.min_samples);
        config.window_secs = raw.window_secs.unwrap_or(defaults.window_secs);
        config.warmup_secs = raw.warmup_secs.unwrap_or(defaults.warmup_secs);
        // A node's level is measured over as long a window as its change is.
        config.anchor_secs = raw.anchor_secs.unwrap_or(config.window_secs);
        config.node_spread_factor = raw
            .node_spread_factor
            .unwrap_or(defaults.node_spread_factor);
        config.node_spread_prior_df = raw
            .node_spread_prior_df
            .unwrap_or(defaults.node_spread_prior_df);
        config.groups.extend(raw.groups);
        for (name, raw_spec) in raw.metrics {
            let spec = config
                .metrics
                .entry(name)
                .or_insert_with(MetricSpec::generic);
            let RawMetricSpec {
                group,
                direction,
                allowed_increase,
                allowed_decrease,
                expected_node_spread,
                expected_node_drift,
                critical,
                no_data,
                enabled,
            } = raw_spec;
            if let Some(group) = group {
                spec.group = group;
            }
            if let Some(direction) = direction {
                spec.direction = direction;
            }
            if let Some(allowed) = allowed_increase {
                spec.allowed_increase = allowed;
            }
            if let Some(allowed) = allowed_decrease {
                spec.allowed_decrease = allowed;
            }
            if let Some(spread) = expected_node_spread {
                spec.expected_node_spread = spread;
            }
            if let Some(drift) = expected_node_drift {
                spec.expected_node_drift = drift;
            }
            if let Some(critical) = critical {
                spec.critical = critical;
            }
            if let Some(no_data) = no_data {
                spec.no_data = no_data;
            }
            if let Some(enabled) = enabled {
                spec.enabled = enabled;
            }
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<CanaryConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_defaults_are_valid_and_judge_the_sample_apps_metrics() {
        let config = CanaryConfig::default();
        config.validate().expect("valid defaults");
        let judged: Vec<&str> = config.enabled_metrics().map(|(name, _)| name).collect();
        for name in [
            names::APP_ERROR_RATE,
            names::APP_LATENCY_P50_MS,
            names::APP_LATENCY_P90_MS,
            names::APP_LATENCY_P99_MS,
            names::APP_REQUEST_RATE,
            names::HOST_CPU_PERCENT,
            names::HOST_MEM_USED_PERCENT,
            names::HOST_LOAD1,
        ] {
            assert!(judged.contains(&name), "{name} is judged by default");
        }
        assert!(!judged.contains(&names::HOST_DISK_USED_PERCENT));
        assert!(config.metrics[names::APP_ERROR_RATE].critical);
        assert!(config.metrics[names::APP_LATENCY_P99_MS].critical);
        assert_eq!(from_toml(""), Ok(CanaryConfig::default()));
    }

    #[test]
    fn a_section_is_merged_over_the_defaults_field_by_field() {
        let config = from_toml(
            r#"
confidence = 0.99
window_secs = 300
[groups]
queue = 2
[metrics.app_latency_p99_ms]
allowed_increase = 1.5
[metrics.host_load1]
enabled = false
[metrics."app:queue_depth"]
group = "queue"
direction = "increase"
no_data = "fail"
"#,
        )
        .expect("valid");
        config.validate().expect("valid");
        let defaults = CanaryConfig::default();
        assert_eq!((config.confidence, config.window_secs), (0.99, 300));
        // The anchor window follows the judgment window unless given.
        assert_eq!(config.anchor_secs, 300);
        assert_eq!(from_toml("anchor_secs = 0").map(|c| c.anchor_secs), Ok(0));
        assert_eq!(config.warmup_secs, defaults.warmup_secs);
        assert_eq!(config.groups["queue"], 2.0);
        assert_eq!(config.groups["errors"], defaults.groups["errors"]);
        let p99 = &config.metrics[names::APP_LATENCY_P99_MS];
        assert_eq!(p99.allowed_increase, 1.5);
        // The other fields of the default entry stay.
        assert!(p99.critical);
        assert_eq!(p99.group, "latency");
        assert!(!config.metrics[names::HOST_LOAD1].enabled);
        let queue = &config.metrics["app:queue_depth"];
        assert_eq!(
            (queue.group.as_str(), queue.direction, queue.no_data),
            ("queue", Direction::Increase, NoDataPolicy::Fail)
        );
        assert_eq!(
            queue.allowed_increase,
            MetricSpec::generic().allowed_increase
        );
        assert_eq!(
            config.metrics[names::APP_ERROR_RATE],
            defaults.metrics[names::APP_ERROR_RATE]
        );
    }

    #[test]
    fn the_serialized_form_reads_back_unchanged() {
        let mut config = CanaryConfig::default();
        config
            .metrics
            .get_mut(names::HOST_LOAD1)
            .expect("default")
            .enabled = false;
        config.metrics.insert("app:x".into(), MetricSpec::generic());
        config.min_samples = 20;
        let json = serde_json::to_string(&config).expect("json");
        assert_eq!(
            serde_json::from_str::<CanaryConfig>(&json).expect("reads"),
            config
        );
        let toml_text = toml::to_string(&config).expect("toml");
        assert_eq!(from_toml(&toml_text), Ok(config));
    }

    #[test]
    fn unknown_keys_and_wrong_values_are_refused() {
        let error = from_toml("confidnce = 0.9\n").expect_err("unknown key");
        assert!(error.contains("unknown field `confidnce`"), "{error}");
        let error =
            from_toml("[metrics.app_error_rate]\nallowed_increse = 2\n").expect_err("unknown key");
        assert!(error.contains("unknown field `allowed_increse`"), "{error}");
        let error =
            from_toml("[metrics.app_error_rate]\ndirection = \"up\"\n").expect_err("bad direction");
        assert!(error.contains("unknown variant `up`"), "{error}");
    }

    #[test]
    fn validation_names_the_field_and_the_fix() {
        let check = |text: &str| -> String {
            from_toml(text)
                .expect("parses")
                .validate()
                .expect_err("invalid")
                .to_string()
        };
        assert_eq!(
            check("confidence = 1.0"),
            "canary.confidence is 1; expected at least 0.5 and below 1 (0.98 is usual)"
        );
        assert!(check("marginal_score = 80.0")
            .starts_with("canary.marginal_score (80) is above canary.pass_score (75)"));
        assert!(check("pass_score = 101").starts_with("canary.pass_score is 101"));
        assert!(check("min_samples = 2").starts_with("canary.min_samples is 2"));
        assert!(check("window_secs = 0").starts_with("canary.window_secs is 0"));
        assert!(check("anchor_secs = 604801").starts_with("canary.anchor_secs is 604801"));
        assert!(check("node_spread_factor = -1").starts_with("canary.node_spread_factor"));
        assert!(check("node_spread_prior_df = -1").starts_with("canary.node_spread_prior_df"));
        assert!(
            check("[metrics.app_error_rate]\nexpected_node_spread = -0.1")
                .starts_with("canary.metrics.app_error_rate.expected_node_spread is -0.1")
        );
        assert!(check("[metrics.app_error_rate]\nexpected_node_drift = 11")
            .starts_with("canary.metrics.app_error_rate.expected_node_drift is 11"));
        assert!(check("[groups]\nerrors = 0").starts_with("canary.groups.errors is 0"));
        assert!(check("[metrics.app_error_rate]\nallowed_increase = 0.9")
            .starts_with("canary.metrics.app_error_rate.allowed_increase is 0.9"));
        assert!(check("[metrics.app_error_rate]\nallowed_decrease = 0")
            .starts_with("canary.metrics.app_error_rate.allowed_decrease is 0"));
        assert_eq!(
            check("[metrics.app_error_rate]\ngroup = \"oops\""),
            "canary.metrics.app_error_rate.group: no group named \"oops\" in canary.groups (known: app, errors, host, latency, traffic); add it with a weight or use a known one"
        );
        assert!(check("[metrics.\"9lives\"]\n").contains("\"9lives\" is not a metric name"));
        let all_off: String = CanaryConfig::default()
            .metrics
            .keys()
            .map(|name| format!("[metrics.{name}]\nenabled = false\n"))
            .collect();
        assert!(check(&all_off).contains("every metric is disabled"));
    }
}
