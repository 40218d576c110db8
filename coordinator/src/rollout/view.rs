//! The JSON bodies of the rollout endpoints, shared by the handlers and the CLI client so the
//! two cannot drift apart (the start request and response are `api::RolloutRequest` and
//! `api::RolloutResponse`).
//!
//! ```text
//! GET  /api/rollouts                    → [RolloutView] running and paused, then the latest others
//! GET  /api/rollouts/{id}               → RolloutView, with `nodes`
//! POST /api/rollouts/{id}/pause         → RolloutView    (also resume, abort, rollback)
//! GET  /api/rollouts/{id}/canary        → CanaryReport
//! ```

use protocol::{NodeId, UnixSeconds};
use serde::{Deserialize, Serialize};

use super::engine::{
    Counts, GateOutcome, GateResult, Head, NodePhase, NodeProgress, Status, WavePhase,
};
use super::plan::{self, Plan, Selector, WaveSize};
use crate::canary::Judgment;

/// A rollout as an operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: u64,
    /// `app@version`.
    pub release: String,
    pub app: String,
    pub version: String,
    pub status: Status,
    /// Why it is paused, stopped or done: one line.
    pub reason: Option<String>,
    pub started_at: UnixSeconds,
    /// The identity of the token that started it.
    pub started_by: String,
    pub finished_at: Option<UnixSeconds>,
    pub selector: Selector,
    pub plan: Plan,
    pub waves: Vec<WaveView>,
    /// Every node of the waves, by phase.
    pub total: Counts,
    /// Nodes that got the release after success (they appeared later or came back).
    pub late: Counts,
    pub canary: Option<CanarySummary>,
    /// The coordinator's clock when it answered (the `*_secs` fields count from it).
    pub now: UnixSeconds,
    /// Each node's progress (only for a single rollout's view).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaveView {
    /// 1-based.
    pub wave: u32,
    pub target: WaveSize,
    pub nodes: u32,
    pub phase: WavePhase,
    pub counts: Counts,
    pub started_at: Option<UnixSeconds>,
    pub staged_at: Option<UnixSeconds>,
    pub switched_at: Option<UnixSeconds>,
    pub bake_until: Option<UnixSeconds>,
    /// Seconds of bake left, while baking.
    pub bake_left_secs: Option<u64>,
    /// Seconds until a switch window opens, while switching is held outside them.
    pub window_opens_in_secs: Option<u64>,
    /// Seconds until the canary judgment, while the gate waits for its window.
    pub canary_in_secs: Option<u64>,
    pub gates: Vec<GateResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CanarySummary {
    pub outcome: GateOutcome,
    pub score: Option<f64>,
    pub summary: String,
    pub from: UnixSeconds,
    pub to: UnixSeconds,
    pub judged_at: UnixSeconds,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub node: NodeId,
    /// 1-based; `None` for a node that got the release after success.
    pub wave: Option<u32>,
    pub phase: NodePhase,
    pub since: UnixSeconds,
    pub switched_at: Option<UnixSeconds>,
    pub note: Option<String>,
}

impl RolloutView {
    /// The view of a rollout's head at `now`, with its nodes if given.
    pub fn new(head: &Head, nodes: Option<&[NodeProgress]>, now: UnixSeconds) -> RolloutView {
        let running = head.status == Status::Running;
        let window = canary_window(head);
        let mut total = Counts::default();
        let waves = head
            .waves
            .iter()
            .enumerate()
            .map(|(i, wave)| {
                total.add(&wave.counts);
                WaveView {
                    wave: i as u32 + 1,
                    target: wave.target,
                    nodes: wave.nodes,
                    phase: wave.phase,
                    counts: wave.counts,
                    started_at: wave.started_at,
                    staged_at: wave.staged_at,
                    switched_at: wave.switched_at,
                    bake_until: wave.bake_until,
                    bake_left_secs: (wave.phase == WavePhase::Baking)
                        .then(|| wave.bake_until.map(|t| t.saturating_sub(now)))
                        .flatten(),
                    window_opens_in_secs: (running
                        && wave.phase == WavePhase::Switching
                        && !plan::switch_allowed(&head.plan.windows, now))
                    .then(|| plan::next_switch_in(&head.plan.windows, now)),
                    canary_in_secs: (i == 0
                        && wave.phase == WavePhase::Gating
                        && head.canary.is_none())
                    .then(|| window.map(|(_, due)| due.saturating_sub(now)))
                    .flatten(),
                    gates: wave.gates.clone(),
                }
            })
            .collect();
        RolloutView {
            id: head.id,
            release: head.release.to_string(),
            app: head.release.app.to_string(),
            version: head.release.version.to_string(),
            status: head.status,
            reason: head.reason.clone(),
            started_at: head.started_at,
            started_by: head.started_by.clone(),
            finished_at: head.finished_at,
            selector: head.selector.clone(),
            plan: head.plan.clone(),
            waves,
            total,
            late: head.late,
            canary: head.canary.as_ref().map(|c| CanarySummary {
                outcome: c.outcome,
                score: c.score,
                summary: c.summary.clone(),
                from: c.from,
                to: c.to,
                judged_at: c.judged_at,
            }),
            now,
            nodes: nodes
                .unwrap_or_default()
                .iter()
                .map(|n| NodeView {
                    node: n.node.clone(),
                    wave: n.wave.map(|w| w + 1),
                    phase: n.phase,
                    since: n.since,
                    switched_at: n.switched_at,
                    note: n.note.clone(),
                })
                .collect(),
        }
    }

    /// Still running or paused.
    pub fn is_active(&self) -> bool {
        self.status.is_active()
    }
}

/// The first wave's canary judgment window: from its switch plus the warm-up, and when the
/// gate judges (the bake's end, or later if the window would be shorter than the minimum).
pub fn canary_window(head: &Head) -> Option<(UnixSeconds, UnixSeconds)> {
    let wave = head.waves.first()?;
    let (switched, bake_until) = (wave.switched_at?, wave.bake_until?);
    let timing = head.canary_timing;
    let from = switched + timing.warmup_secs;
    Some((from, bake_until.max(from + timing.min_window_secs)))
}

/// `GET /api/rollouts/{id}/canary`: the canary judgment, metric by metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CanaryReport {
    pub rollout: u64,
    /// `app@version`.
    pub release: String,
    pub status: Status,
    /// Computed now over the window so far (the gate has not judged yet), rather than the
    /// judgment the gate stored.
    pub live: bool,
    pub outcome: GateOutcome,
    pub score: Option<f64>,
    pub summary: String,
    pub from: UnixSeconds,
    pub to: UnixSeconds,
    pub canary_nodes: Vec<NodeId>,
    pub baseline_nodes: Vec<NodeId>,
    /// The judge's result, hottest metric first; `None` when the gate was skipped (no
    /// baseline, no metrics) and so nothing was judged.
    pub judgment: Option<Judgment>,
}
