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
//! - Anchors (each node's own level, unless `anchor_secs` is 0): every node's samples over
//!   the `anchor_secs` before the first canary node switched, on the old version: a baseline
//!   node's on the version it runs now, a canary node's on a version a baseline node runs
//!   (not on the rollout's release, nor on a third version the baseline cannot speak for).
//!   The judge uses a metric's anchors only if every node has enough of them.
//!
//! The group choice is pure ([`groups`]); [`judge`] reads the metric store (blocking sled
//! reads: call it on the blocking pool) and calls the judge, which does no I/O.

use std::collections::{HashMap, HashSet};

use protocol::{NodeId, ReleaseId, UnixSeconds};

use super::engine::{CanaryResult, GateOutcome, NodePhase, Rollout};
use super::fleet::Observed;
use super::plan::{plural, wave_rank};
use crate::canary::{self, Anchors, CanaryConfig, GroupSamples, Verdict};
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
    /// When the first canary node switched (the end of the anchor window); `None` before
    /// any did.
    pub first_switch: Option<UnixSeconds>,
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
    // A node's own switch time is when its report said so; the wave's is when its last node
    // switched, later than the first, so it only stands in for nodes without one.
    let first_switch = rollout
        .wave_nodes(0)
        .iter()
        .filter_map(|n| n.switched_at)
        .min()
        .or_else(|| rollout.head().waves.first()?.switched_at);
    Groups {
        canary,
        baseline: inside,
        first_switch,
    }
}

/// One `Vec` of values per node of `nodes`, in that order (empty for a node without values
/// of the metric, so that the judge can pair each node with its anchors), per metric; from
/// samples already filtered to the group.
fn group_samples(nodes: &[NodeId], samples: &[StoredSample]) -> GroupSamples {
    let position: HashMap<&NodeId, usize> = nodes.iter().enumerate().map(|(i, n)| (n, i)).collect();
    let mut grouped = GroupSamples::new();
    for sample in samples {
        let Some(&index) = position.get(&sample.node) else {
            continue;
        };
        for (metric, value) in &sample.values {
            let series = grouped
                .entry(metric.clone())
                .or_insert_with(|| vec![Vec::new(); nodes.len()]);
            series[index].push(*value);
        }
    }
    grouped
}

/// Every node's samples over the anchor window on the old version (see the module doc);
/// `None` when anchoring is off or no canary node has switched yet.
fn anchors(
    metrics: &MetricStore,
    config: &CanaryConfig,
    groups: &Groups,
    baseline_nodes: &[NodeId],
) -> Result<Option<Anchors>, DbError> {
    let Some(switch) = groups.first_switch.filter(|_| config.anchor_secs > 0) else {
        return Ok(None);
    };
    // [switch − anchor_secs, switch): the query's bounds are inclusive.
    let Some(to) = switch.checked_sub(1) else {
        return Ok(None);
    };
    let nodes: Vec<NodeId> = groups
        .canary
        .iter()
        .chain(baseline_nodes)
        .cloned()
        .collect();
    let samples = metrics.query(&MetricQuery {
        nodes: Some(nodes),
        version: None,
        from: switch.saturating_sub(config.anchor_secs),
        to,
    })?;
    let own: HashMap<&NodeId, &ReleaseId> = groups.baseline.iter().map(|(n, v)| (n, v)).collect();
    let old: HashSet<&ReleaseId> = own.values().copied().collect();
    let (mut canary, mut baseline) = (Vec::new(), Vec::new());
    for sample in samples {
        let Some(version) = sample.version.as_ref() else {
            continue;
        };
        match own.get(&sample.node) {
            Some(&runs) if version == runs => baseline.push(sample),
            Some(_) => {}
            None if old.contains(version) => canary.push(sample),
            None => {}
        }
    }
    Ok(Some(Anchors {
        canary: group_samples(&groups.canary, &canary),
        baseline: group_samples(baseline_nodes, &baseline),
    }))
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
    let anchors = anchors(metrics, config, groups, &baseline_nodes)?;
    let judgment = canary::judge(
        config,
        &group_samples(&groups.canary, &canary_samples),
        &group_samples(&baseline_nodes, &baseline_samples),
        anchors.as_ref(),
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
    use std::collections::BTreeMap;

    use super::*;
    use crate::rollout::engine::Head;
    use crate::rollout::plan::{Plan, PlanOptions};
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
        let plan = Plan::merge(&PlanOptions::default(), None).expect("plan");
        let head = Head::new(1, release("web", "2"), plan, &waves, "t".into(), 0);
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
        let grouped = group_samples(
            &[node("b"), node("a"), node("c")],
            &[
                sample("a", 1, 0.1),
                sample("b", 1, 0.3),
                sample("a", 2, 0.2),
                sample("x", 1, 9.0),
            ],
        );
        // In the nodes' order, a node without samples kept in its place, others left out.
        assert_eq!(
            grouped["app_error_rate"],
            vec![vec![0.3], vec![0.1, 0.2], vec![]]
        );
    }

    #[test]
    fn anchors_are_each_nodes_samples_on_the_old_version_just_before_the_first_switch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::db::Db::open(&dir.path().join("db")).expect("db");
        let store = MetricStore::open(&db, 0).expect("store");
        // Every sample its own, increasing seq: a node's seqs are stored once each.
        let seq = std::cell::Cell::new(0);
        let put = |n: &str, version: &str, at: UnixSeconds, value: f64| {
            seq.set(seq.get() + 1);
            let sample = protocol::telemetry::Sample {
                seq: seq.get(),
                at,
                version: Some(release("web", version)),
                values: [("app_error_rate".to_owned(), value)].into(),
            };
            store
                .append(&node(n), &BTreeMap::new(), &[sample], 0)
                .expect("append");
        };
        // The canary c1 switched at 1000; the anchor window is [400, 1000).
        put("c1", "1", 399, 9.0); // too early
        put("c1", "1", 400, 1.0);
        put("c1", "0", 500, 9.0); // a version no baseline node runs
        put("c1", "1", 999, 2.0);
        put("c1", "2", 999, 9.0); // the new release (mid-switch)
        put("c1", "2", 1000, 9.0); // after the switch
        put("b1", "1", 700, 3.0);
        put("b1", "0", 710, 9.0); // not the version b1 runs now
        let groups = Groups {
            canary: vec![node("c1")],
            baseline: vec![
                (node("b1"), release("web", "1")),
                (node("b2"), release("web", "1")),
            ],
            first_switch: Some(1000),
        };
        let baseline_nodes = [node("b1"), node("b2")];
        let config = CanaryConfig {
            anchor_secs: 600,
            ..CanaryConfig::default()
        };
        let found = anchors(&store, &config, &groups, &baseline_nodes)
            .expect("query")
            .expect("anchoring on");
        assert_eq!(found.canary["app_error_rate"], vec![vec![1.0, 2.0]]);
        assert_eq!(found.baseline["app_error_rate"], vec![vec![3.0], vec![]]);

        // Off, or before any canary switched: none.
        let off = CanaryConfig {
            anchor_secs: 0,
            ..config.clone()
        };
        let none = |config: &CanaryConfig, groups: &Groups| {
            anchors(&store, config, groups, &baseline_nodes)
                .expect("query")
                .is_none()
        };
        assert!(none(&off, &groups));
        let unswitched = Groups {
            first_switch: None,
            ..groups
        };
        assert!(none(&config, &unswitched));
    }

    #[test]
    fn the_first_switch_is_the_earliest_canary_nodes_switch() {
        let r = rollout(&[&["c1", "c2"], &["b1"]]);
        let fleet: HashMap<NodeId, Observed> = HashMap::new();
        assert_eq!(groups(&r, None, &fleet).first_switch, None);
        let mut nodes = r.nodes().to_vec();
        for (progress, at) in nodes.iter_mut().zip([520, 500, 900]) {
            progress.switched_at = Some(at);
        }
        let r = Rollout::from_parts(r.head().clone(), nodes);
        // c1 and c2 are the first wave (b1 switched later, in the second).
        assert_eq!(groups(&r, None, &fleet).first_switch, Some(500));
    }
}
