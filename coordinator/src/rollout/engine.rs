//! The rollout state machine. Methods only change the [`Rollout`] value: no I/O, no clock
//! (`now` is a parameter), no seqs (the driver numbers the commands an [`Order`] asks for and
//! reports them back with [`Rollout::sent`]). So every rule below is tested without a broker,
//! a database or a clock.
//!
//! A rollout runs its waves in order. Each wave: `Stage` to every node of the wave → when no
//! node is still staging, `Deploy` (the same manifest, so no download) to staged, online
//! nodes, at most `max_parallel` switching at a time and only inside the switch windows →
//! when no node is staged or switching, bake → gates (failure thresholds; after the first
//! wave, the canary judgment) → the next wave. Failure thresholds are also checked at every
//! step, so a wave that fails badly halts at once rather than after its bake.
//!
//! What a node's reports mean (`Observed`): staged when it reports the release `staged` and has
//! accepted our `Stage` seq; switched when `current` is the release and it has accepted our
//! `Deploy` seq; failed when a *new* last-update report (not the one it had when we sent the
//! command) says the update failed or rolled back. A node that accepted a seq above every seq
//! this rollout sent it was given a command by someone else (an operator's `node rollback`,
//! a newer rollout): it is left alone from then on (`Overridden`), never switched again.
//!
//! Invariants:
//! - At most one `Deploy` per node per rollout: an order for one is made only while the
//!   node's `deploy_seq` is unset, and the driver records the seq (durably, before publishing)
//!   in the same save point as the command.
//! - A rollback sends `Rollback` only to nodes this rollout switched (not to nodes that
//!   already ran the release) and that still run it and have a previous version.
//! - Status moves forward only: Running ⇄ Paused, then one of Succeeded, Halted, Aborted,
//!   RolledBack (and Succeeded/Halted/Aborted → RolledBack by an operator).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;

use protocol::{NodeId, ReleaseId, UnixSeconds};
use serde::{Deserialize, Serialize};

use super::fleet::{FleetView, LastUpdate, Observed, UpdateOutcome};
use super::plan::{self, plural, OfflinePolicy, Plan, Selector, WaveSize};

/// Where a rollout stands as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    /// No new command is sent; in-flight switches finish. By an operator, or by a marginal
    /// canary waiting for a human.
    Paused,
    /// Every wave passed its gates.
    Succeeded,
    /// A gate failed and automatic rollback is off: nodes keep what they run.
    Halted,
    /// Stopped by an operator: nodes keep what they run.
    Aborted,
    /// Every node this rollout switched is sent back to its previous version (a failed gate,
    /// or an operator).
    RolledBack,
    /// Written before staged rollouts existed: a deploy was sent to every node at once.
    Legacy,
}

impl Status {
    /// Running or paused: holds its nodes against other rollouts.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Running | Status::Paused)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Succeeded => "succeeded",
            Status::Halted => "halted",
            Status::Aborted => "aborted",
            Status::RolledBack => "rolled_back",
            Status::Legacy => "legacy",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WavePhase {
    /// Not reached yet.
    Pending,
    /// `Stage` sent to the wave's nodes; waiting for them to hold the release.
    Staging,
    /// `Deploy` going out, `max_parallel` at a time, inside the switch windows.
    Switching,
    Baking,
    /// Waiting for the gates (the canary's judgment window may outlast the bake).
    Gating,
    Passed,
    /// The wave adds no node on this selection (a small percentage of a small fleet).
    Empty,
    /// The rollout ended while this wave was under way.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    Failures,
    Canary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Pass,
    Marginal,
    Fail,
    /// Not applicable (e.g. no baseline nodes to compare the canary with); counts as a pass.
    Skipped,
}

impl GateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            GateOutcome::Pass => "pass",
            GateOutcome::Marginal => "marginal",
            GateOutcome::Fail => "fail",
            GateOutcome::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    pub gate: Gate,
    pub outcome: GateOutcome,
    /// One line.
    pub detail: String,
    pub at: UnixSeconds,
}

/// How many nodes are in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    pub pending: u32,
    pub staging: u32,
    pub staged: u32,
    pub switching: u32,
    pub switched: u32,
    pub already_current: u32,
    pub failed: u32,
    pub skipped: u32,
    pub overridden: u32,
    pub rolling_back: u32,
    pub rolled_back: u32,
    pub rollback_failed: u32,
}

impl Counts {
    pub fn of<'a>(nodes: impl IntoIterator<Item = &'a NodeProgress>) -> Counts {
        let mut counts = Counts::default();
        for node in nodes {
            *counts.slot(node.phase) += 1;
        }
        counts
    }

    fn slot(&mut self, phase: NodePhase) -> &mut u32 {
        match phase {
            NodePhase::Pending => &mut self.pending,
            NodePhase::Staging => &mut self.staging,
            NodePhase::Staged => &mut self.staged,
            NodePhase::Switching => &mut self.switching,
            NodePhase::Switched => &mut self.switched,
            NodePhase::AlreadyCurrent => &mut self.already_current,
            NodePhase::Failed => &mut self.failed,
            NodePhase::Skipped => &mut self.skipped,
            NodePhase::Overridden => &mut self.overridden,
            NodePhase::RollingBack => &mut self.rolling_back,
            NodePhase::RolledBack => &mut self.rolled_back,
            NodePhase::RollbackFailed => &mut self.rollback_failed,
        }
    }

    pub fn total(&self) -> u32 {
        self.pending
            + self.staging
            + self.staged
            + self.switching
            + self.switched
            + self.already_current
            + self.failed
            + self.skipped
            + self.overridden
            + self.rolling_back
            + self.rolled_back
            + self.rollback_failed
    }

    /// Nodes that hold the release staged or run it (for a progress bar of staging).
    pub fn staged_or_beyond(&self) -> u32 {
        self.staged + self.switching + self.switched + self.already_current
    }

    /// Nodes on the release.
    pub fn on_release(&self) -> u32 {
        self.switched + self.already_current
    }

    /// Nodes whose part is over, one way or another (for a progress bar of switching).
    pub fn settled(&self) -> u32 {
        self.total()
            - self.pending
            - self.staging
            - self.staged
            - self.switching
            - self.rolling_back
    }

    pub fn add(&mut self, other: &Counts) {
        let mut other = *other;
        for phase in ALL_PHASES {
            *self.slot(phase) += *other.slot(phase);
        }
    }
}

const ALL_PHASES: [NodePhase; 12] = [
    NodePhase::Pending,
    NodePhase::Staging,
    NodePhase::Staged,
    NodePhase::Switching,
    NodePhase::Switched,
    NodePhase::AlreadyCurrent,
    NodePhase::Failed,
    NodePhase::Skipped,
    NodePhase::Overridden,
    NodePhase::RollingBack,
    NodePhase::RolledBack,
    NodePhase::RollbackFailed,
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub target: WaveSize,
    /// Nodes assigned to the wave.
    pub nodes: u32,
    pub phase: WavePhase,
    pub started_at: Option<UnixSeconds>,
    pub staged_at: Option<UnixSeconds>,
    pub switched_at: Option<UnixSeconds>,
    pub bake_until: Option<UnixSeconds>,
    #[serde(default)]
    pub gates: Vec<GateResult>,
    /// Its nodes by phase, as of the last step.
    #[serde(default)]
    pub counts: Counts,
}

/// Where one node stands in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodePhase {
    /// Its wave has not started.
    Pending,
    /// `Stage` sent.
    Staging,
    /// Holds the release, waiting for its turn to switch.
    Staged,
    /// `Deploy` sent.
    Switching,
    /// Runs the release, switched by this rollout.
    Switched,
    /// Ran the release before this rollout reached it: not switched, never rolled back by it.
    AlreadyCurrent,
    Failed,
    /// Offline past the node deadline with `--offline skip`.
    Skipped,
    /// Given a command by someone else (an operator's rollback, a newer rollout): left alone.
    Overridden,
    /// `Rollback` sent.
    RollingBack,
    RolledBack,
    /// Still runs the release after the rollback, or had no previous version to go back to.
    RollbackFailed,
}

impl NodePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            NodePhase::Pending => "pending",
            NodePhase::Staging => "staging",
            NodePhase::Staged => "staged",
            NodePhase::Switching => "switching",
            NodePhase::Switched => "switched",
            NodePhase::AlreadyCurrent => "already_current",
            NodePhase::Failed => "failed",
            NodePhase::Skipped => "skipped",
            NodePhase::Overridden => "overridden",
            NodePhase::RollingBack => "rolling_back",
            NodePhase::RolledBack => "rolled_back",
            NodePhase::RollbackFailed => "rollback_failed",
        }
    }

    /// Runs the release because of (or regardless of) this rollout.
    pub fn is_on_release(self) -> bool {
        matches!(self, NodePhase::Switched | NodePhase::AlreadyCurrent)
    }
}

/// A node's last update as it stood when a command was sent, so that only a *new* report is
/// read as the command's outcome (a stale failure of an earlier attempt is not). Compared by
/// value, never by clock: the node's clock may differ from ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateMark {
    pub release: ReleaseId,
    pub finished_at: UnixSeconds,
    pub outcome: String,
}

impl UpdateMark {
    fn of(update: &LastUpdate) -> UpdateMark {
        UpdateMark {
            release: update.release.clone(),
            finished_at: update.finished_at,
            outcome: match update.outcome {
                UpdateOutcome::Switched => "switched",
                UpdateOutcome::Failed(_) => "failed",
                UpdateOutcome::RolledBack(_) => "rolled_back",
            }
            .to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProgress {
    pub node: NodeId,
    /// 0-based; `None` for a node that got the release after the rollout succeeded (it
    /// appeared later or came back: the fleet target).
    pub wave: Option<u32>,
    pub phase: NodePhase,
    /// When the phase began.
    pub since: UnixSeconds,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<UnixSeconds>,
    /// Why it failed, was skipped or left alone: one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Given up because it stayed offline (so it may get the release when it comes back).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gave_up_offline: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior: Option<UpdateMark>,
}

impl NodeProgress {
    pub fn new(node: NodeId, wave: Option<u32>, now: UnixSeconds) -> NodeProgress {
        NodeProgress {
            node,
            wave,
            phase: NodePhase::Pending,
            since: now,
            stage_seq: None,
            deploy_seq: None,
            rollback_seq: None,
            switched_at: None,
            note: None,
            gave_up_offline: false,
            prior: None,
        }
    }

    /// The highest seq this rollout sent the node.
    pub fn max_seq(&self) -> Option<u64> {
        [self.stage_seq, self.deploy_seq, self.rollback_seq]
            .into_iter()
            .flatten()
            .max()
    }
}

/// The canary knobs the engine needs: from the release's `[canary]` (or the default), copied
/// into the rollout when it starts so a restart judges the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryTiming {
    /// Samples this soon after the last canary switch are left out of the judgment.
    pub warmup_secs: u64,
    /// The judgment waits until its window is at least this long.
    pub min_window_secs: u64,
}

/// The canary gate's judgment as stored with the rollout (the report shows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryResult {
    pub outcome: GateOutcome,
    pub score: Option<f64>,
    /// One line naming the worst metric (or why the gate was skipped).
    pub summary: String,
    pub from: UnixSeconds,
    pub to: UnixSeconds,
    pub canary_nodes: Vec<NodeId>,
    pub baseline_nodes: Vec<NodeId>,
    pub judged_at: UnixSeconds,
    /// The judge's whole judgment (`canary::Judgment` as JSON), when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judgment: Option<serde_json::Value>,
}

/// Everything about a rollout except its per-node progress (stored apart, so a step that
/// changes three nodes of a thousand writes three records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub id: u64,
    pub release: ReleaseId,
    pub selector: Selector,
    pub plan: Plan,
    pub canary_timing: CanaryTiming,
    /// The chunk sources its commands list (the release's mirrors when it started, then the
    /// coordinator).
    pub http_sources: Vec<String>,
    pub started_at: UnixSeconds,
    pub started_by: String,
    pub status: Status,
    /// Why it is paused, stopped or done: one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<UnixSeconds>,
    /// The pause is a marginal canary's, waiting for a human.
    #[serde(default)]
    pub paused_for_canary: bool,
    /// An operator resumed after a marginal canary: the gate passes.
    #[serde(default)]
    pub canary_accepted: bool,
    pub waves: Vec<Wave>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryResult>,
    /// Nodes that got the release as the fleet target after success, by phase.
    #[serde(default)]
    pub late: Counts,
    /// Nodes switching, rolling back or still to be rolled back (a stopped rollout keeps
    /// watching them).
    #[serde(default)]
    pub in_flight: u32,
}

impl Head {
    /// The head of a rollout `started_by` someone at `now`: running, one pending wave per
    /// wave of `plan` holding `waves[i]` nodes; any selection, no mirrors, judged as soon as
    /// a canary switched (set `selector`, `http_sources` and `canary_timing` after).
    pub fn new(
        id: u64,
        release: ReleaseId,
        plan: Plan,
        waves: &[Vec<NodeId>],
        started_by: String,
        now: UnixSeconds,
    ) -> Head {
        let waves = plan
            .waves
            .iter()
            .zip(waves)
            .map(|(target, nodes)| Wave {
                target: *target,
                nodes: nodes.len() as u32,
                phase: WavePhase::Pending,
                started_at: None,
                staged_at: None,
                switched_at: None,
                bake_until: None,
                gates: Vec::new(),
                counts: Counts::default(),
            })
            .collect();
        Head {
            id,
            release,
            selector: Selector::default(),
            plan,
            canary_timing: CanaryTiming {
                warmup_secs: 0,
                min_window_secs: 0,
            },
            http_sources: Vec::new(),
            started_at: now,
            started_by,
            status: Status::Running,
            reason: None,
            finished_at: None,
            paused_for_canary: false,
            canary_accepted: false,
            waves,
            canary: None,
            late: Counts::default(),
            in_flight: 0,
        }
    }
}

/// A command the driver must send (numbered, sealed, stored, flushed, then published).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Stage,
    Deploy,
    Rollback,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Stage => "stage",
            CommandKind::Deploy => "deploy",
            CommandKind::Rollback => "rollback",
        }
    }
}

/// A node's newest stored command as [`Rollout::reconcile`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// A command this rollout would send: stage or deploy of its release, or a rollback.
    Ours(CommandKind, u64),
    /// Anything else (another release), with its seq.
    Other(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub node: NodeId,
    pub kind: CommandKind,
}

/// A deploy-log entry a step or a control produced: `who` is `None` for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub who: Option<String>,
    pub action: &'static str,
    pub nodes: Vec<NodeId>,
    pub outcome: String,
}

/// What a step decided.
#[derive(Debug, Default)]
pub struct Step {
    pub orders: Vec<Order>,
    pub log: Vec<LogLine>,
}

impl Step {
    fn log(&mut self, action: &'static str, nodes: Vec<NodeId>, outcome: String) {
        self.log.push(LogLine {
            who: None,
            action,
            nodes,
            outcome,
        });
    }
}

/// The canary judgment the gate waits for: judge `canary` nodes (on the release) over
/// `[from, to]` against a baseline the driver picks from the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryDue {
    pub from: UnixSeconds,
    pub to: UnixSeconds,
    pub canary: Vec<NodeId>,
}

/// Why an operator's control was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("rollout {id} is {status}; only a running rollout can be paused")]
    NotRunning { id: u64, status: Status },
    #[error("rollout {id} is {status}; only a paused rollout can be resumed")]
    NotPaused { id: u64, status: Status },
    #[error("rollout {id} is already {status}; nothing to abort")]
    NotActive { id: u64, status: Status },
    #[error("rollout {id} is {status}; there is nothing it switched to roll back")]
    NothingToRollBack { id: u64, status: Status },
}

/// One rollout: its head and every node's progress.
#[derive(Debug, Clone)]
pub struct Rollout {
    head: Head,
    /// Ordered by wave (late nodes last), so each wave is a contiguous range.
    nodes: Vec<NodeProgress>,
    index: HashMap<NodeId, usize>,
    waves: Vec<Range<usize>>,
    /// Nodes changed since [`Rollout::take_dirty`].
    dirty: BTreeSet<usize>,
}

impl Rollout {
    /// A new rollout in `Running`; `waves` are the nodes of each wave, in order.
    pub fn new(head: Head, waves: &[Vec<NodeId>], now: UnixSeconds) -> Rollout {
        let nodes = waves
            .iter()
            .enumerate()
            .flat_map(|(w, nodes)| {
                nodes
                    .iter()
                    .map(move |n| NodeProgress::new(n.clone(), Some(w as u32), now))
            })
            .collect();
        let mut rollout = Rollout::from_parts(head, nodes);
        rollout.dirty = (0..rollout.nodes.len()).collect();
        rollout
    }

    /// A rollout read back from storage.
    pub fn from_parts(head: Head, mut nodes: Vec<NodeProgress>) -> Rollout {
        nodes.sort_by_key(|n| n.wave.unwrap_or(u32::MAX));
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.node.clone(), i))
            .collect();
        let waves = (0..head.waves.len() as u32)
            .map(|w| {
                let start = nodes.partition_point(|n| n.wave.unwrap_or(u32::MAX) < w);
                let end = nodes.partition_point(|n| n.wave.unwrap_or(u32::MAX) <= w);
                start..end
            })
            .collect();
        let mut rollout = Rollout {
            head,
            nodes,
            index,
            waves,
            dirty: BTreeSet::new(),
        };
        rollout.recount();
        rollout
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    pub fn id(&self) -> u64 {
        self.head.id
    }

    pub fn status(&self) -> Status {
        self.head.status
    }

    pub fn nodes(&self) -> &[NodeProgress] {
        &self.nodes
    }

    pub fn node(&self, node: &NodeId) -> Option<&NodeProgress> {
        self.index.get(node).map(|&i| &self.nodes[i])
    }

    pub fn contains(&self, node: &NodeId) -> bool {
        self.index.contains_key(node)
    }

    /// The nodes of wave `w` (0-based).
    pub fn wave_nodes(&self, w: usize) -> &[NodeProgress] {
        self.waves.get(w).map_or(&[], |r| &self.nodes[r.clone()])
    }

    /// Nodes that got the release as the fleet target after the rollout succeeded.
    pub fn late_nodes(&self) -> &[NodeProgress] {
        let start = self.waves.last().map_or(0, |r| r.end);
        &self.nodes[start..]
    }

    /// Whether the driver must step it on its timer: active, or watching switches and
    /// rollbacks still in flight.
    pub fn needs_tick(&self) -> bool {
        // A legacy record is history: never stepped (it would be rewritten).
        self.head.status != Status::Legacy
            && (self.head.status.is_active() || self.head.in_flight > 0)
    }

    /// No node changed since [`Rollout::take_dirty`].
    pub fn dirty_free(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Nodes changed since the last call, for the driver to store.
    pub fn take_dirty(&mut self) -> Vec<&NodeProgress> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.into_iter().map(|i| &self.nodes[i]).collect()
    }

    fn set(&mut self, i: usize, phase: NodePhase, now: UnixSeconds, note: Option<String>) {
        let p = &mut self.nodes[i];
        p.phase = phase;
        p.since = now;
        if note.is_some() {
            p.note = note;
        }
        if phase == NodePhase::Switched {
            p.switched_at = Some(now);
        }
        self.dirty.insert(i);
    }

    fn recount(&mut self) {
        for (w, range) in self.waves.iter().enumerate() {
            self.head.waves[w].counts = Counts::of(&self.nodes[range.clone()]);
        }
        self.head.late = Counts::of(self.late_nodes());
        let mut all = self.head.late;
        for wave in &self.head.waves {
            all.add(&wave.counts);
        }
        // A rolled-back rollout still has to send back the nodes it switched.
        let to_roll_back = if self.head.status == Status::RolledBack {
            all.switched
        } else {
            0
        };
        self.head.in_flight = all.switching + all.rolling_back + to_roll_back;
    }

    /// Records the seq the driver gave an order's command.
    pub fn sent(&mut self, node: &NodeId, kind: CommandKind, seq: u64) {
        let Some(&i) = self.index.get(node) else {
            return;
        };
        let p = &mut self.nodes[i];
        match kind {
            CommandKind::Stage => p.stage_seq = Some(seq),
            CommandKind::Deploy => p.deploy_seq = Some(seq),
            CommandKind::Rollback => p.rollback_seq = Some(seq),
        }
        self.dirty.insert(i);
    }

    /// Brings a node's record in line with its stored desired command after a restart (the
    /// driver calls it for running rollouts, and for rolled-back ones whose rollbacks may be
    /// under way). A command of ours with a seq above what the record says was stored but the
    /// record's own write was lost: adopt it (it may already be out). A seq the record has but
    /// the desired command is older: our command never left the process, so forget it and
    /// decide again. Returns whether anything changed.
    pub fn reconcile(
        &mut self,
        node: &NodeId,
        desired: Option<Desired>,
        observed: Option<&Observed>,
        now: UnixSeconds,
    ) -> bool {
        let Some(&i) = self.index.get(node) else {
            return false;
        };
        let p = &self.nodes[i];
        let (phase, ours) = (p.phase, p.max_seq());
        let newer = |seq: u64| ours.is_none_or(|o| seq > o);
        let changed = match desired {
            Some(Desired::Ours(kind, seq)) if newer(seq) => {
                let adopted = match (kind, phase, self.head.status) {
                    (CommandKind::Stage, NodePhase::Pending, s) if s.is_active() => {
                        Some(NodePhase::Staging)
                    }
                    (CommandKind::Deploy, NodePhase::Staged, s) if s.is_active() => {
                        Some(NodePhase::Switching)
                    }
                    (CommandKind::Rollback, NodePhase::Switched, Status::RolledBack) => {
                        Some(NodePhase::RollingBack)
                    }
                    _ => None,
                };
                if let Some(next) = adopted {
                    self.sent(node, kind, seq);
                    // Only a report newer than this one is the adopted command's outcome.
                    self.nodes[i].prior = observed
                        .and_then(|o| o.last_update.as_ref())
                        .map(UpdateMark::of);
                    self.set(i, next, now, None);
                }
                adopted.is_some()
            }
            Some(Desired::Ours(_, seq) | Desired::Other(seq))
                if !newer(seq) && Some(seq) == ours =>
            {
                false
            }
            Some(Desired::Other(seq)) if newer(seq) => false,
            _ if ours.is_some() => {
                // The node's newest stored command is older than ours: ours never left.
                let p = &mut self.nodes[i];
                let back = match phase {
                    NodePhase::Staging if p.stage_seq == ours => {
                        p.stage_seq = None;
                        Some(NodePhase::Pending)
                    }
                    NodePhase::Switching if p.deploy_seq == ours => {
                        p.deploy_seq = None;
                        Some(NodePhase::Staged)
                    }
                    NodePhase::RollingBack if p.rollback_seq == ours => {
                        p.rollback_seq = None;
                        Some(NodePhase::Switched)
                    }
                    _ => None,
                };
                if let Some(back) = back {
                    self.set(i, back, now, None);
                }
                back.is_some()
            }
            _ => false,
        };
        self.recount();
        changed
    }

    /// Runs the rollout forward from what the fleet reports: updates every node, checks the
    /// failure thresholds, moves the current wave on, and sends the rollback's commands.
    pub fn step(&mut self, now: UnixSeconds, fleet: &impl FleetView) -> Step {
        let mut out = Step::default();
        for i in 0..self.nodes.len() {
            self.observe(i, now, fleet);
        }
        if self.head.status.is_active() {
            self.check_failures(now, &mut out);
        }
        if self.head.status == Status::Running {
            self.advance(now, fleet, &mut out);
        }
        if self.head.status == Status::RolledBack {
            self.send_rollbacks(now, fleet, &mut out);
        }
        self.recount();
        out
    }

    /// Updates only these nodes from their reports; whether any changed (then a full
    /// [`Rollout::step`] is due). For a stopped rollout, on node reports between timer ticks.
    pub fn observe_nodes<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = &'a NodeId>,
        now: UnixSeconds,
        fleet: &impl FleetView,
    ) -> bool {
        let before = self.dirty.len();
        for node in nodes {
            if let Some(&i) = self.index.get(node) {
                self.observe(i, now, fleet);
            }
        }
        self.recount();
        self.dirty.len() != before
    }

    fn observe(&mut self, i: usize, now: UnixSeconds, fleet: &impl FleetView) {
        let p = &self.nodes[i];
        // A finished rollout's switched nodes are history: later rollouts move them on. (A
        // rollback of it observes them again first, as a rolled-back rollout.)
        let finished = matches!(
            self.head.status,
            Status::Succeeded | Status::Halted | Status::Aborted
        );
        if finished && p.phase == NodePhase::Switched {
            return;
        }
        let next = transition(
            p,
            fleet.get(&p.node),
            &self.head.release,
            &self.head.plan,
            now,
        );
        if let Some(Transition {
            phase,
            note,
            gave_up_offline,
        }) = next
        {
            self.nodes[i].gave_up_offline = gave_up_offline;
            self.set(i, phase, now, note);
        }
    }

    /// Nodes of every wave reached so far, and how many of them failed.
    fn failures(&self) -> (usize, usize) {
        let mut reached = 0;
        let mut failed = 0;
        for (w, wave) in self.head.waves.iter().enumerate() {
            if wave.phase == WavePhase::Pending {
                continue;
            }
            let nodes = self.wave_nodes(w);
            reached += nodes.len();
            failed += nodes
                .iter()
                .filter(|n| n.phase == NodePhase::Failed)
                .count();
        }
        (failed, reached)
    }

    fn check_failures(&mut self, now: UnixSeconds, out: &mut Step) {
        let (failed, reached) = self.failures();
        let Some(reason) = self.head.plan.failures_exceeded(failed, reached) else {
            return;
        };
        let failed_nodes: Vec<&NodeProgress> = self
            .nodes
            .iter()
            .filter(|n| n.phase == NodePhase::Failed)
            .collect();
        let first = failed_nodes
            .first()
            .map(|n| {
                format!(
                    " (first: {}: {})",
                    n.node,
                    n.note.as_deref().unwrap_or("failed")
                )
            })
            .unwrap_or_default();
        let reason = format!("failure threshold: {reason}{first}");
        if let Some(w) = self.current_wave() {
            self.head.waves[w].gates.push(GateResult {
                gate: Gate::Failures,
                outcome: GateOutcome::Fail,
                detail: reason.clone(),
                at: now,
            });
        }
        self.halt(now, reason, out);
    }

    /// The first wave not yet passed (or empty).
    pub fn current_wave(&self) -> Option<usize> {
        self.head
            .waves
            .iter()
            .position(|w| !matches!(w.phase, WavePhase::Passed | WavePhase::Empty))
    }

    fn advance(&mut self, now: UnixSeconds, fleet: &impl FleetView, out: &mut Step) {
        // Each pass moves a wave one phase on; the bound only guards against a bug looping.
        for _ in 0..(self.head.waves.len() * 8 + 8) {
            let Some(w) = self.current_wave() else {
                self.succeed(now, out);
                return;
            };
            let range = self.waves[w].clone();
            let total = self.head.waves.len();
            match self.head.waves[w].phase {
                WavePhase::Pending => self.start_wave(w, now, fleet, out),
                WavePhase::Staging => {
                    if self.nodes[range.clone()]
                        .iter()
                        .any(|n| n.phase == NodePhase::Staging)
                    {
                        return;
                    }
                    let wave = &mut self.head.waves[w];
                    wave.phase = WavePhase::Switching;
                    wave.staged_at = Some(now);
                    let nodes = &self.nodes[range];
                    let staged: Vec<NodeId> = nodes
                        .iter()
                        .filter(|n| n.phase == NodePhase::Staged)
                        .map(|n| n.node.clone())
                        .collect();
                    let outcome = format!(
                        "ok: wave {}/{total}: {} of {} staged {}{}",
                        w + 1,
                        staged.len(),
                        nodes.len(),
                        self.head.release,
                        others(nodes, &[NodePhase::Staged])
                    );
                    out.log("wave staged", staged, outcome);
                }
                WavePhase::Switching => {
                    let nodes = &self.nodes[range.clone()];
                    if !nodes
                        .iter()
                        .any(|n| matches!(n.phase, NodePhase::Staged | NodePhase::Switching))
                    {
                        let switched: Vec<NodeId> = nodes
                            .iter()
                            .filter(|n| n.phase == NodePhase::Switched)
                            .map(|n| n.node.clone())
                            .collect();
                        let outcome = format!(
                            "ok: wave {}/{total}: {} of {} switched to {}{}",
                            w + 1,
                            switched.len(),
                            nodes.len(),
                            self.head.release,
                            others(nodes, &[NodePhase::Switched])
                        );
                        let bake = self.head.plan.bake.0;
                        let wave = &mut self.head.waves[w];
                        wave.phase = WavePhase::Baking;
                        wave.switched_at = Some(now);
                        wave.bake_until = Some(now + bake);
                        out.log("wave switched", switched, outcome);
                        continue;
                    }
                    if plan::switch_allowed(&self.head.plan.windows, now) {
                        self.send_deploys(range, now, fleet, out);
                    }
                    return;
                }
                WavePhase::Baking => {
                    if self.head.waves[w].bake_until.is_some_and(|t| now < t) {
                        return;
                    }
                    self.head.waves[w].phase = WavePhase::Gating;
                }
                WavePhase::Gating => {
                    if !self.gate(w, now, out) {
                        return;
                    }
                }
                WavePhase::Passed | WavePhase::Empty | WavePhase::Stopped => return,
            }
        }
    }

    fn start_wave(&mut self, w: usize, now: UnixSeconds, fleet: &impl FleetView, out: &mut Step) {
        let range = self.waves[w].clone();
        let wave = &mut self.head.waves[w];
        wave.started_at = Some(now);
        if range.is_empty() {
            wave.phase = WavePhase::Empty;
            return;
        }
        wave.phase = WavePhase::Staging;
        for i in range {
            let observed = fleet.get(&self.nodes[i].node);
            if observed.is_some_and(|o| o.current.as_ref() == Some(&self.head.release)) {
                let note = format!("already ran {}", self.head.release);
                self.set(i, NodePhase::AlreadyCurrent, now, Some(note));
                continue;
            }
            self.nodes[i].prior = observed
                .and_then(|o| o.last_update.as_ref())
                .map(UpdateMark::of);
            self.set(i, NodePhase::Staging, now, None);
            out.orders.push(Order {
                node: self.nodes[i].node.clone(),
                kind: CommandKind::Stage,
            });
        }
    }

    fn send_deploys(
        &mut self,
        range: Range<usize>,
        now: UnixSeconds,
        fleet: &impl FleetView,
        out: &mut Step,
    ) {
        let limit = self
            .head
            .plan
            .max_parallel
            .map_or(usize::MAX, |m| m as usize);
        let switching = self.nodes[range.clone()]
            .iter()
            .filter(|n| n.phase == NodePhase::Switching)
            .count();
        let mut room = limit.saturating_sub(switching);
        for i in range {
            if room == 0 {
                break;
            }
            let p = &self.nodes[i];
            if p.phase != NodePhase::Staged || p.deploy_seq.is_some() {
                continue;
            }
            let Some(o) = fleet.get(&p.node).filter(|o| o.online) else {
                continue;
            };
            self.nodes[i].prior = o.last_update.as_ref().map(UpdateMark::of);
            self.set(i, NodePhase::Switching, now, None);
            out.orders.push(Order {
                node: self.nodes[i].node.clone(),
                kind: CommandKind::Deploy,
            });
            room -= 1;
        }
    }

    /// Whether the canary gate follows wave `w`: after the first wave, when a later wave has
    /// nodes to protect.
    fn canary_gate_applies(&self, w: usize) -> bool {
        w == 0 && self.waves.iter().skip(1).any(|r| !r.is_empty())
    }

    /// The canary judgment window of the first wave ([`super::view::canary_window`]).
    pub fn canary_window(&self) -> Option<(UnixSeconds, UnixSeconds)> {
        super::view::canary_window(&self.head)
    }

    /// The judgment the canary gate is waiting for, once its window is long enough.
    pub fn canary_due(&self, now: UnixSeconds) -> Option<CanaryDue> {
        if self.head.status != Status::Running
            || self.head.canary.is_some()
            || self.head.waves.first()?.phase != WavePhase::Gating
            || !self.canary_gate_applies(0)
        {
            return None;
        }
        let (from, due) = self.canary_window()?;
        if now < due {
            return None;
        }
        let canary = self
            .wave_nodes(0)
            .iter()
            .filter(|n| n.phase == NodePhase::Switched)
            .map(|n| n.node.clone())
            .collect();
        Some(CanaryDue {
            from,
            to: now,
            canary,
        })
    }

    /// Stores the canary judgment; the next step acts on it.
    pub fn record_canary(&mut self, result: CanaryResult) {
        self.head.canary = Some(result);
    }

    /// The gates after wave `w`'s bake; whether the wave passed (false: waiting, paused or
    /// halted).
    fn gate(&mut self, w: usize, now: UnixSeconds, out: &mut Step) -> bool {
        let mut results = Vec::new();
        let (failed, reached) = self.failures();
        results.push(GateResult {
            gate: Gate::Failures,
            outcome: GateOutcome::Pass,
            detail: format!(
                "{failed} of {reached} node{} failed ({})",
                plural(reached),
                self.head.plan.failure_limit()
            ),
            at: now,
        });
        if self.canary_gate_applies(w) {
            let Some(canary) = &self.head.canary else {
                return false;
            };
            let score = canary
                .score
                .map(|s| format!(" (score {s:.0})"))
                .unwrap_or_default();
            let detail = format!(
                "canary {}{score}: {}",
                canary.outcome.as_str(),
                canary.summary
            );
            match canary.outcome {
                GateOutcome::Pass | GateOutcome::Skipped => results.push(GateResult {
                    gate: Gate::Canary,
                    outcome: canary.outcome,
                    detail,
                    at: now,
                }),
                GateOutcome::Marginal if self.head.canary_accepted => results.push(GateResult {
                    gate: Gate::Canary,
                    outcome: GateOutcome::Marginal,
                    detail: format!("{detail}; accepted by the operator who resumed"),
                    at: now,
                }),
                GateOutcome::Marginal => {
                    let reason = format!(
                        "{detail}; waiting for a human: `rollout resume {id}` to go on, `rollout rollback {id}` to undo",
                        id = self.head.id
                    );
                    self.head.waves[w].gates.push(GateResult {
                        gate: Gate::Canary,
                        outcome: GateOutcome::Marginal,
                        detail: detail.clone(),
                        at: now,
                    });
                    self.head.status = Status::Paused;
                    self.head.paused_for_canary = true;
                    self.head.reason = Some(reason.clone());
                    out.log("gate marginal", Vec::new(), format!("paused: {reason}"));
                    return false;
                }
                GateOutcome::Fail => {
                    self.head.waves[w].gates.push(GateResult {
                        gate: Gate::Canary,
                        outcome: GateOutcome::Fail,
                        detail: detail.clone(),
                        at: now,
                    });
                    self.halt(now, detail, out);
                    return false;
                }
            }
        }
        let summary: Vec<&str> = results.iter().map(|r| r.detail.as_str()).collect();
        let outcome = format!(
            "ok: wave {}/{}: {}",
            w + 1,
            self.head.waves.len(),
            summary.join("; ")
        );
        let wave = &mut self.head.waves[w];
        wave.gates.extend(results);
        wave.phase = WavePhase::Passed;
        out.log("gate passed", Vec::new(), outcome);
        true
    }

    fn succeed(&mut self, now: UnixSeconds, out: &mut Step) {
        let on: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.phase.is_on_release())
            .map(|n| n.node.clone())
            .collect();
        let count = |phase: NodePhase| self.nodes.iter().filter(|n| n.phase == phase).count();
        let reason = format!(
            "{} on {} of {} node{} ({} failed, {} skipped, {} left alone)",
            self.head.release,
            on.len(),
            self.nodes.len(),
            plural(self.nodes.len()),
            count(NodePhase::Failed),
            count(NodePhase::Skipped),
            count(NodePhase::Overridden),
        );
        self.finish(now, Status::Succeeded, reason.clone());
        out.log("rollout done", on, format!("ok: {reason}"));
    }

    fn finish(&mut self, now: UnixSeconds, status: Status, reason: String) {
        self.head.status = status;
        self.head.reason = Some(reason);
        self.head.finished_at = Some(now);
        self.head.paused_for_canary = false;
        self.recount();
        for wave in &mut self.head.waves {
            if matches!(
                wave.phase,
                WavePhase::Staging | WavePhase::Switching | WavePhase::Baking | WavePhase::Gating
            ) {
                wave.phase = WavePhase::Stopped;
            }
        }
    }

    /// A gate failed: stop, and roll back unless the plan says not to.
    fn halt(&mut self, now: UnixSeconds, reason: String, out: &mut Step) {
        out.log("gate failed", Vec::new(), format!("failed: {reason}"));
        if self.head.plan.auto_rollback {
            self.finish(
                now,
                Status::RolledBack,
                format!("{reason}; rolled back automatically"),
            );
        } else {
            let id = self.head.id;
            self.finish(
                now,
                Status::Halted,
                format!("{reason}; halted, nodes keep what they run (automatic rollback is off: `rollout rollback {id}` to undo)"),
            );
        }
    }

    fn send_rollbacks(&mut self, now: UnixSeconds, fleet: &impl FleetView, out: &mut Step) {
        let mut sent = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].phase != NodePhase::Switched {
                continue;
            }
            let node = self.nodes[i].node.clone();
            if fleet.get(&node).is_some_and(|o| o.previous.is_none()) {
                let note = "no previous version to go back to; it keeps the release".to_owned();
                self.set(i, NodePhase::RollbackFailed, now, Some(note));
                continue;
            }
            self.set(i, NodePhase::RollingBack, now, None);
            out.orders.push(Order {
                node: node.clone(),
                kind: CommandKind::Rollback,
            });
            sent.push(node);
        }
        if !sent.is_empty() {
            let outcome = format!(
                "ok: {} node{} sent back from {} to their previous version: {}",
                sent.len(),
                plural(sent.len()),
                self.head.release,
                self.head.reason.as_deref().unwrap_or("rolled back")
            );
            out.log("rollback sent", sent, outcome);
        }
    }

    /// `rollout pause`: no new command is sent; in-flight switches finish.
    pub fn pause(&mut self, who: &str) -> Result<LogLine, ControlError> {
        if self.head.status != Status::Running {
            return Err(ControlError::NotRunning {
                id: self.head.id,
                status: self.head.status,
            });
        }
        self.head.status = Status::Paused;
        self.head.paused_for_canary = false;
        self.head.reason = Some(format!(
            "paused by {who}: no new commands; in-flight switches finish (`rollout resume {}`)",
            self.head.id
        ));
        Ok(self.control_line(who, "rollout pause", Vec::new(), "paused".to_owned()))
    }

    /// `rollout resume`; after a marginal canary, the operator accepts the judgment.
    pub fn resume(&mut self, who: &str) -> Result<LogLine, ControlError> {
        if self.head.status != Status::Paused {
            return Err(ControlError::NotPaused {
                id: self.head.id,
                status: self.head.status,
            });
        }
        let detail = if self.head.paused_for_canary {
            self.head.canary_accepted = true;
            "resumed, accepting the marginal canary"
        } else {
            "resumed"
        };
        self.head.status = Status::Running;
        self.head.paused_for_canary = false;
        self.head.reason = None;
        Ok(self.control_line(who, "rollout resume", Vec::new(), detail.to_owned()))
    }

    /// `rollout abort`: stop where it is; nodes keep what they run.
    pub fn abort(&mut self, who: &str, now: UnixSeconds) -> Result<LogLine, ControlError> {
        if !self.head.status.is_active() {
            return Err(ControlError::NotActive {
                id: self.head.id,
                status: self.head.status,
            });
        }
        self.finish(
            now,
            Status::Aborted,
            format!("aborted by {who}; nodes keep what they run"),
        );
        Ok(self.control_line(who, "rollout abort", Vec::new(), "aborted".to_owned()))
    }

    /// `rollout rollback`: abort, and send back every node this rollout switched that still
    /// runs the release (the next step sends the commands; nodes still switching are sent
    /// back once they have switched).
    pub fn rollback(&mut self, who: &str, now: UnixSeconds) -> Result<LogLine, ControlError> {
        if matches!(self.head.status, Status::RolledBack | Status::Legacy) {
            return Err(ControlError::NothingToRollBack {
                id: self.head.id,
                status: self.head.status,
            });
        }
        let switched: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| matches!(n.phase, NodePhase::Switched | NodePhase::Switching))
            .map(|n| n.node.clone())
            .collect();
        self.finish(now, Status::RolledBack, format!("rolled back by {who}"));
        let detail = format!(
            "rolling back {} node{} this rollout switched",
            switched.len(),
            plural(switched.len())
        );
        Ok(self.control_line(who, "rollout rollback", switched, detail))
    }

    fn control_line(
        &self,
        who: &str,
        action: &'static str,
        nodes: Vec<NodeId>,
        detail: String,
    ) -> LogLine {
        LogLine {
            who: Some(who.to_owned()),
            action,
            nodes,
            outcome: format!("ok: {detail}"),
        }
    }

    /// A newer rollout takes `node` over: this one leaves it alone from now on.
    pub fn release_node(&mut self, node: &NodeId, by: u64, now: UnixSeconds) {
        let Some(&i) = self.index.get(node) else {
            return;
        };
        if matches!(
            self.nodes[i].phase,
            NodePhase::Pending
                | NodePhase::Staging
                | NodePhase::Staged
                | NodePhase::Switching
                | NodePhase::RollingBack
        ) {
            self.set(
                i,
                NodePhase::Overridden,
                now,
                Some(format!("taken over by rollout {by}")),
            );
            self.recount();
        }
    }

    /// A node that appeared or came back after this rollout succeeded and matches its
    /// selection: the fleet target. A `Deploy` order unless it already runs the release, was
    /// already sent one, or was left alone or rolled back on purpose.
    pub fn add_late(
        &mut self,
        node: &NodeId,
        observed: &Observed,
        now: UnixSeconds,
    ) -> Option<Order> {
        if self.head.status != Status::Succeeded
            || observed.current.as_ref() == Some(&self.head.release)
            || !self.head.selector.matches(&observed.labels)
        {
            return None;
        }
        let i = match self.index.get(node) {
            Some(&i) => {
                let p = &self.nodes[i];
                let retry = matches!(p.phase, NodePhase::Skipped | NodePhase::Failed)
                    && p.gave_up_offline
                    && p.deploy_seq.is_none();
                if !retry {
                    return None;
                }
                i
            }
            None => {
                self.nodes.push(NodeProgress::new(node.clone(), None, now));
                let i = self.nodes.len() - 1;
                self.index.insert(node.clone(), i);
                i
            }
        };
        self.nodes[i].prior = observed.last_update.as_ref().map(UpdateMark::of);
        self.nodes[i].gave_up_offline = false;
        let note = format!(
            "{} is the fleet target for {} since rollout {} succeeded",
            self.head.release, self.head.selector, self.head.id
        );
        self.set(i, NodePhase::Switching, now, Some(note));
        self.recount();
        Some(Order {
            node: node.clone(),
            kind: CommandKind::Deploy,
        })
    }
}

/// A node's next phase, if its report (or its absence) moves it.
struct Transition {
    phase: NodePhase,
    note: Option<String>,
    gave_up_offline: bool,
}

impl Transition {
    fn to(phase: NodePhase, note: Option<String>) -> Option<Transition> {
        Some(Transition {
            phase,
            note,
            gave_up_offline: false,
        })
    }

    fn give_up(plan: &Plan, online: bool, from: NodePhase) -> Option<Transition> {
        let (phase, note) = give_up(plan.offline, plan.node_deadline.0, online, from);
        Some(Transition {
            phase,
            note: Some(note),
            gave_up_offline: !online,
        })
    }
}

/// What `p`'s phase becomes given the node's report `observed` at `now` (the rules in the
/// module doc).
fn transition(
    p: &NodeProgress,
    observed: Option<&Observed>,
    release: &ReleaseId,
    plan: &Plan,
    now: UnixSeconds,
) -> Option<Transition> {
    let deadline = plan.node_deadline.0;
    let waiting = matches!(
        p.phase,
        NodePhase::Staging | NodePhase::Staged | NodePhase::Switching
    );
    let Some(o) = observed else {
        // Gone from the inventory: as good as offline, with nothing to compare.
        return (waiting && now >= p.since.saturating_add(deadline))
            .then(|| Transition::give_up(plan, false, p.phase))
            .flatten();
    };
    let taken = p.max_seq().is_some_and(|ours| o.last_seq > ours);
    let on_release = o.current.as_ref() == Some(release);
    // The node's last update, if it is new since the command `seq` was sent and accepted.
    let fresh = |seq: Option<u64>| -> Option<&LastUpdate> {
        let update = o.last_update.as_ref()?;
        let accepted = seq.is_some_and(|s| o.last_seq >= s);
        (accepted && Some(UpdateMark::of(update)) != p.prior).then_some(update)
    };
    let overdue = |online_too: bool| {
        if o.online {
            online_too && now >= p.since.saturating_add(deadline)
        } else {
            now >= p
                .since
                .max(o.last_seen.unwrap_or(0))
                .saturating_add(deadline)
        }
    };
    match p.phase {
        _ if waiting && taken => Transition::to(NodePhase::Overridden, Some(taken_note(o))),
        NodePhase::Staging | NodePhase::Staged if on_release => Transition::to(
            NodePhase::AlreadyCurrent,
            Some(format!("runs {release} without this rollout switching it")),
        ),
        NodePhase::Staging => {
            let staged =
                o.staged.as_ref() == Some(release) && p.stage_seq.is_some_and(|s| o.last_seq >= s);
            let failed = fresh(p.stage_seq).and_then(|u| match &u.outcome {
                UpdateOutcome::Failed(reason) if &u.release == release => Some(reason),
                _ => None,
            });
            if staged {
                Transition::to(NodePhase::Staged, None)
            } else if let Some(reason) = failed {
                Transition::to(NodePhase::Failed, Some(format!("staging failed: {reason}")))
            } else if overdue(true) {
                Transition::give_up(plan, o.online, p.phase)
            } else {
                None
            }
        }
        NodePhase::Staged if overdue(false) => Transition::give_up(plan, false, p.phase),
        NodePhase::Switching => {
            let switched = on_release && p.deploy_seq.is_some_and(|s| o.last_seq >= s);
            let failed = fresh(p.deploy_seq).and_then(|u| match &u.outcome {
                UpdateOutcome::Failed(reason) if &u.release == release => {
                    Some(format!("switch failed: {reason}"))
                }
                UpdateOutcome::RolledBack(reason) if !on_release => {
                    Some(format!("rolled back by itself: {reason}"))
                }
                _ => None,
            });
            if switched {
                Transition::to(NodePhase::Switched, None)
            } else if let Some(reason) = failed {
                Transition::to(NodePhase::Failed, Some(reason))
            } else if overdue(true) {
                Transition::give_up(plan, o.online, p.phase)
            } else {
                None
            }
        }
        NodePhase::Switched if !on_release && taken => {
            Transition::to(NodePhase::Overridden, Some(taken_note(o)))
        }
        NodePhase::Switched if !on_release => {
            let reason = match &o.last_update {
                Some(LastUpdate {
                    outcome: UpdateOutcome::RolledBack(reason),
                    ..
                }) => format!("rolled back by itself after the switch: {reason}"),
                _ => format!(
                    "no longer runs {release} (runs {})",
                    o.current
                        .as_ref()
                        .map_or_else(|| "nothing".to_owned(), ToString::to_string)
                ),
            };
            Transition::to(NodePhase::Failed, Some(reason))
        }
        NodePhase::Failed | NodePhase::Skipped
            if !taken && on_release && p.deploy_seq.is_some_and(|s| o.last_seq >= s) =>
        {
            Transition::to(
                NodePhase::Switched,
                Some("switched after it was given up".to_owned()),
            )
        }
        NodePhase::RollingBack if taken => {
            Transition::to(NodePhase::Overridden, Some(taken_note(o)))
        }
        NodePhase::RollingBack if p.rollback_seq.is_some_and(|s| o.last_seq >= s) => {
            if on_release {
                Transition::to(
                    NodePhase::RollbackFailed,
                    Some(format!("still runs {release} after the rollback command")),
                )
            } else {
                Transition::to(NodePhase::RolledBack, None)
            }
        }
        _ => None,
    }
}

/// What happens to a node given up at the deadline.
fn give_up(
    policy: OfflinePolicy,
    deadline: u64,
    online: bool,
    phase: NodePhase,
) -> (NodePhase, String) {
    let limit = plan::Secs(deadline);
    if !online {
        let phase = match policy {
            OfflinePolicy::Skip => NodePhase::Skipped,
            OfflinePolicy::Fail => NodePhase::Failed,
        };
        return (
            phase,
            format!("offline for over {limit} (--offline {policy})"),
        );
    }
    let what = match phase {
        NodePhase::Staging => "stage",
        _ => "switch",
    };
    (NodePhase::Failed, format!("did not {what} within {limit}"))
}

/// Why a node that accepted someone else's command is left alone.
fn taken_note(o: &Observed) -> String {
    match &o.last_update {
        Some(LastUpdate {
            outcome: UpdateOutcome::RolledBack(reason),
            ..
        }) => format!("rolled back outside this rollout ({reason}); not switched again"),
        _ => format!(
            "accepted a newer command (seq {}) from outside this rollout; left alone",
            o.last_seq
        ),
    }
}

/// ", 1 failed, 2 skipped" for the nodes not in `done`.
fn others(nodes: &[NodeProgress], done: &[NodePhase]) -> String {
    let mut counts: Vec<(NodePhase, usize)> = Vec::new();
    for n in nodes.iter().filter(|n| !done.contains(&n.phase)) {
        match counts.iter_mut().find(|(p, _)| *p == n.phase) {
            Some((_, c)) => *c += 1,
            None => counts.push((n.phase, 1)),
        }
    }
    counts
        .into_iter()
        .map(|(p, c)| format!(", {c} {}", p.as_str().replace('_', " ")))
        .collect()
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
