//! The canary gate's evidence: which nodes are the canary and which the baseline, their
//! samples over the judgment window from the metric store, and the judge's verdict.
//!
//! - Canary: the first wave's nodes that run the new release (switched by the rollout).
//! - Baseline: the selected nodes outside the first wave that still run another version of
//!   the app; if there are none, nodes outside the selection that run the app on another
//!   version. At most [`MAX_BASELINE_NODES`], the first by the rollout's stable node order,
//!   so the baseline is comparable in size and the query stays small.
//! - Samples: a canary node's samples tagged with the new release; a baseline node's samples
//!   tagged with the version it runs (so a baseline node caught mid-update is not mixed in).
//!
//! The group choice is pure ([`groups`]); [`judge`] reads the metric store (blocking sled
//! reads: call it on the blocking pool) and calls the judge, which does no I/O.

use std::collections::{BTreeMap, HashMap};

use protocol::{NodeId, ReleaseId, UnixSeconds};

use super::engine::{CanaryResult, GateOutcome, NodePhase, Rollout};
use super::fleet::Observed;
use super::plan::{plural, wave_rank};
use crate::canary::{self, CanaryConfig, GroupSamples, Verdict};
use crate::db::{DbError, ReleaseInfo};
use crate::metrics::{MetricQuery, MetricStore, StoredSample};

/// Most baseline nodes one judgment compares against.
pub const MAX_BASELINE_NODES: usize = 20;

/// The canary configuration of a release: its `[canary]` section, or the default.
pub fn canary_config(info: &ReleaseInfo) -> CanaryConfig {
    info.canary.clone().unwrap_or_default()
}

/// The two groups of a judgment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    pub canary: Vec<NodeId>,
    /// Each baseline node with the version it runs.
    pub baseline: Vec<(NodeId, ReleaseId)>,
}

/// The canary nodes (given, or the first wave's switched nodes) and the baseline picked from
/// `fleet` (see the module doc).
pub fn groups(
    rollout: &Rollout,
    canary: Option<Vec<NodeId>>,
    fleet: &HashMap<NodeId, Observed>,
) -> Groups {
    let release = &rollout.head().release;
    let canary = canary.unwrap_or_else(|| {
        rollout
            .wave_nodes(0)
            .iter()
            .filter(|n| n.phase == NodePhase::Switched)
            .map(|n| n.node.clone())
            .collect()
    });
    let on_old = |node: &NodeId| -> Option<ReleaseId> {
        let current = fleet.get(node)?.current.clone()?;
        (current.app == release.app && current != *release).then_some(current)
    };
    let mut inside: Vec<(NodeId, ReleaseId)> = rollout
        .nodes()
        .iter()
        .filter(|n| n.wave != Some(0))
        .filter_map(|n| on_old(&n.node).map(|v| (n.node.clone(), v)))
        .collect();
    if inside.is_empty() {
        inside = fleet
            .keys()
            .filter(|node| !rollout.contains(node))
            .filter_map(|node| on_old(node).map(|v| (node.clone(), v)))
            .collect();
    }
    inside.sort_by_key(|(node, _)| (wave_rank(&release.app, node), node.clone()));
    inside.truncate(MAX_BASELINE_NODES);
    Groups {
        canary,
        baseline: inside,
    }
}

/// One `Vec` of values per node and metric, from samples already filtered to the group.
fn group_samples(samples: &[StoredSample]) -> GroupSamples {
    let mut per_node: BTreeMap<&str, BTreeMap<&NodeId, Vec<f64>>> = BTreeMap::new();
    for sample in samples {
        for (metric, value) in &sample.values {
            per_node
                .entry(metric.as_str())
                .or_default()
                .entry(&sample.node)
                .or_default()
                .push(*value);
        }
    }
    per_node
        .into_iter()
        .map(|(metric, nodes)| (metric.to_owned(), nodes.into_values().collect()))
        .collect()
}

/// Judges `groups` over `[from, to]`: queries the metric store and calls the judge. A gate
/// with nothing to compare is decided here, saying why: no canary node runs the release
/// (marginal: a human decides), no baseline node or no sample from either group (skipped).
pub fn judge(
    metrics: &MetricStore,
    config: &CanaryConfig,
    release: &ReleaseId,
    groups: &Groups,
    from: UnixSeconds,
    to: UnixSeconds,
    now: UnixSeconds,
) -> Result<(CanaryResult, Option<canary::Judgment>), DbError> {
    let baseline_nodes: Vec<NodeId> = groups.baseline.iter().map(|(n, _)| n.clone()).collect();
    let result = |outcome, score, summary: String| CanaryResult {
        outcome,
        score,
        summary,
        from,
        to,
        canary_nodes: groups.canary.clone(),
        baseline_nodes: baseline_nodes.clone(),
        judged_at: now,
        judgment: None,
    };
    if groups.canary.is_empty() {
        let summary = format!(
            "no first-wave node runs {release}, so there is no canary to judge; a human decides"
        );
        return Ok((result(GateOutcome::Marginal, None, summary), None));
    }
    if groups.baseline.is_empty() {
        let summary = format!(
            "no baseline: no other node runs another version of {}, so there is nothing to compare the canary with",
            release.app
        );
        return Ok((result(GateOutcome::Skipped, None, summary), None));
    }
    let canary_samples = metrics.query(&MetricQuery {
        nodes: Some(groups.canary.clone()),
        version: Some(release.clone()),
        from,
        to,
    })?;
    let versions: HashMap<&NodeId, &ReleaseId> =
        groups.baseline.iter().map(|(n, v)| (n, v)).collect();
    let mut baseline_samples = metrics.query(&MetricQuery {
        nodes: Some(baseline_nodes.clone()),
        version: None,
        from,
        to,
    })?;
    baseline_samples.retain(|s| s.version.as_ref() == versions.get(&s.node).copied());
    if canary_samples.is_empty() && baseline_samples.is_empty() {
        let summary = format!(
            "no metrics from the {} canary and {} baseline node{} between {from} and {to} (agents without telemetry?); the canary gate is skipped",
            groups.canary.len(),
            groups.baseline.len(),
            plural(groups.baseline.len())
        );
        return Ok((result(GateOutcome::Skipped, None, summary), None));
    }
    let judgment = canary::judge(
        config,
        &group_samples(&canary_samples),
        &group_samples(&baseline_samples),
    );
    let outcome = match judgment.verdict {
        Verdict::Pass => GateOutcome::Pass,
        Verdict::Marginal => GateOutcome::Marginal,
        Verdict::Fail => GateOutcome::Fail,
    };
    let mut stored = result(outcome, Some(judgment.score), judgment.summary.clone());
    stored.judgment = serde_json::to_value(&judgment).ok();
    Ok((stored, Some(judgment)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::engine::{CanaryTiming, Counts, Head, Status, Wave, WavePhase};
    use crate::rollout::plan::{Plan, PlanOptions, Selector, WaveSize};
    use protocol::{AppName, Version};

    fn release(app: &str, version: &str) -> ReleaseId {
        ReleaseId::new(
            AppName::new(app).expect("app"),
            Version::new(version).expect("version"),
        )
    }

    fn node(name: &str) -> NodeId {
        NodeId::new(name).expect("node")
    }

    fn observed(current: Option<ReleaseId>) -> Observed {
        Observed {
            online: true,
            last_seen: None,
            labels: BTreeMap::new(),
            current,
            previous: None,
            staged: None,
            last_seq: 0,
            last_update: None,
        }
    }

    fn rollout(waves: &[&[&str]]) -> Rollout {
        let waves: Vec<Vec<NodeId>> = waves
            .iter()
            .map(|w| w.iter().map(|n| node(n)).collect())
            .collect();
        let head = Head {
            id: 1,
            release: release("web", "2"),
            selector: Selector::default(),
            plan: Plan::merge(&PlanOptions::default(), None).expect("plan"),
            canary_timing: CanaryTiming {
                warmup_secs: 0,
                min_window_secs: 0,
            },
            http_sources: Vec::new(),
            started_at: 0,
            started_by: "t".into(),
            status: Status::Running,
            reason: None,
            finished_at: None,
            paused_for_canary: false,
            canary_accepted: false,
            waves: waves
                .iter()
                .map(|w| Wave {
                    target: WaveSize::ALL,
                    nodes: w.len() as u32,
                    phase: WavePhase::Pending,
                    started_at: None,
                    staged_at: None,
                    switched_at: None,
                    bake_until: None,
                    gates: Vec::new(),
                    counts: Counts::default(),
                })
                .collect(),
            canary: None,
            late: Counts::default(),
            in_flight: 0,
        };
        Rollout::new(head, &waves, 0)
    }

    #[test]
    fn the_baseline_is_the_selection_still_on_the_old_version_else_the_rest_of_the_app() {
        let r = rollout(&[&["c1"], &["b1", "b2", "b3"]]);
        let fleet: HashMap<NodeId, Observed> = [
            ("c1", Some(release("web", "2"))),
            ("b1", Some(release("web", "1"))),
            ("b2", Some(release("web", "2"))),
            ("b3", Some(release("cache", "1"))),
            ("x1", Some(release("web", "1"))),
        ]
        .into_iter()
        .map(|(n, c)| (node(n), observed(c)))
        .collect();
        let groups = groups(&r, Some(vec![node("c1")]), &fleet);
        assert_eq!(groups.canary, [node("c1")]);
        assert_eq!(groups.baseline, [(node("b1"), release("web", "1"))]);

        // One wave: nobody in the selection is left on the old version, so nodes outside.
        let single = rollout(&[&["c1", "b1"]]);
        let groups = super::groups(&single, None, &fleet);
        assert_eq!(groups.baseline, [(node("x1"), release("web", "1"))]);
    }

    #[test]
    fn samples_become_one_series_per_node_and_metric() {
        let sample = |n: &str, seq: u64, v: f64| StoredSample {
            node: node(n),
            seq,
            at: seq,
            version: Some(release("web", "2")),
            labels: BTreeMap::new(),
            values: [("app_error_rate".to_owned(), v)].into(),
        };
        let grouped = group_samples(&[
            sample("a", 1, 0.1),
            sample("b", 1, 0.3),
            sample("a", 2, 0.2),
        ]);
        let mut series = grouped["app_error_rate"].clone();
        series.sort_by_key(Vec::len);
        assert_eq!(series, vec![vec![0.3], vec![0.1, 0.2]]);
    }
}
