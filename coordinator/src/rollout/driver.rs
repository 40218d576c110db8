//! The rollout driver: the one task that owns every loaded rollout. It starts rollouts,
//! applies operator controls, steps rollouts on node reports (through the
//! [`NodeObserver`] mailbox) and on a timer, runs the canary judgment when a gate asks for
//! it, and carries out what the engine decided.
//!
//! Save point of every step, in this order (the order is what makes a kill at any instant
//! safe): under the command lock, seqs reserved → each command sealed and written as its
//! node's desired command → each changed node record and rollout head written → deploy-log
//! entries appended → flush → the main loop is asked to publish. Nothing leaves the process
//! before the records that say it was sent are durable, so after a restart no node is sent a
//! second `Deploy`; and a command whose record did not survive the crash is found again in
//! the node's desired command (`Rollout::reconcile`), so none is forgotten either. A step
//! whose writes fail is dropped from memory and its rollouts are read back from the store:
//! the next tick decides again.
//!
//! Scale: per tick the work is linear in the nodes of running rollouts (and of stopped ones
//! with switches in flight); node reports arrive already parsed (the main loop's), and only
//! changed node records are written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use protocol::messages::{Action, Command};
use protocol::{Envelope, NodeId, ReleaseId, UnixSeconds};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::engine::{
    CanaryTiming, CommandKind, Desired, Head, LogLine, Order, Rollout, Status, Step,
};
use super::fleet::{NodeObserver, Observed};
use super::plan::{self, plural, Plan, PlanError, PlanOptions, Selector};
use super::report;
use super::store::RolloutStore;
use super::view::RolloutView;
use crate::db::{DbError, LogEntry, ReleaseInfo};
use crate::main_loop::ApiRequest;
use crate::release;
use crate::server::AppState;
use crate::token::Identity;
use crate::unix_now;

/// How often running rollouts are stepped when no node reports (bakes, deadlines, windows).
pub const TICK: Duration = Duration::from_millis(250);
/// Node reports wake the driver at once, but it steps at most this often: a thousand nodes
/// reporting within a second cost a few steps, not a thousand.
const MIN_GAP: Duration = Duration::from_millis(50);
/// Most nodes named in a refusal message.
const NAMED: usize = 10;
/// Latest succeeded rollouts kept loaded as fleet targets (one per distinct selection).
const MAX_TARGETS: usize = 32;

/// What the start handler hands the driver (release found, names and options checked).
#[derive(Debug)]
pub struct StartRequest {
    pub release: ReleaseId,
    pub info: ReleaseInfo,
    pub selector: Selector,
    pub options: PlanOptions,
    /// The deploy commands' chunk sources.
    pub http_sources: Vec<String>,
}

/// A started rollout: its view and the nodes of each wave.
#[derive(Debug)]
pub struct Started {
    pub view: RolloutView,
    pub waves: Vec<Vec<NodeId>>,
}

/// Why a rollout was not started. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("no nodes have reported yet: start agents against this coordinator's MQTT broker, check `coordinator nodes`, then retry")]
    NoNodes,
    #[error("no node matches the selection {selector}: {why}; `coordinator nodes --json` lists each node's labels")]
    EmptySelection { selector: Selector, why: String },
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
}

/// An operator's control of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
    Rollback,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Abort => "abort",
            Control::Rollback => "rollback",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlFailure {
    #[error("there is no rollout {0}; `coordinator rollout status` lists them")]
    NotFound(u64),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

enum Request {
    Start {
        start: Box<StartRequest>,
        who: Identity,
        reply: oneshot::Sender<Result<Started, StartError>>,
    },
    Control {
        id: u64,
        control: Control,
        who: Identity,
        reply: oneshot::Sender<Result<RolloutView, ControlFailure>>,
    },
}

/// The handle on the driver that handlers hold (`AppState::rollouts`).
#[derive(Clone)]
pub struct Rollouts {
    requests: mpsc::Sender<Request>,
    observer: NodeObserver,
    store: RolloutStore,
}

/// The driver's end of [`Rollouts`], to [`Driver::new`].
pub struct Inbox {
    requests: mpsc::Receiver<Request>,
    observer: NodeObserver,
    store: RolloutStore,
}

const GONE: &str = "the coordinator is shutting down; retry when it is back";

impl Rollouts {
    pub fn new(store: RolloutStore) -> (Rollouts, Inbox) {
        let (tx, rx) = mpsc::channel(32);
        let observer = NodeObserver::new();
        (
            Rollouts {
                requests: tx,
                observer: observer.clone(),
                store: store.clone(),
            },
            Inbox {
                requests: rx,
                observer,
                store,
            },
        )
    }

    /// For the main loop: every inventory change goes through it.
    pub fn observer(&self) -> NodeObserver {
        self.observer.clone()
    }

    /// The stored rollouts (status reads go to the store, not through the driver).
    pub fn store(&self) -> &RolloutStore {
        &self.store
    }

    pub async fn start(&self, start: StartRequest, who: Identity) -> Result<Started, StartError> {
        self.ask(
            |reply| Request::Start {
                start: Box::new(start),
                who,
                reply,
            },
            || StartError::Failed(GONE.to_owned()),
        )
        .await
    }

    pub async fn control(
        &self,
        id: u64,
        control: Control,
        who: Identity,
    ) -> Result<RolloutView, ControlFailure> {
        self.ask(
            |reply| Request::Control {
                id,
                control,
                who,
                reply,
            },
            || ControlFailure::Failed(GONE.to_owned()),
        )
        .await
    }

    /// Sends the driver task a request carrying its reply channel and waits for the answer;
    /// `gone` is the error when the task has stopped.
    async fn ask<T, E>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, E>>) -> Request,
        gone: impl Fn() -> E,
    ) -> Result<T, E> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// What one pass decided, to be carried out at one save point.
#[derive(Default)]
struct Work {
    /// Per rollout, the orders of its steps, in order.
    orders: Vec<(u64, Order)>,
    log: Vec<(u64, LogLine)>,
    /// Rollouts stepped, controlled or created (their dirty nodes and head get written).
    touched: BTreeSet<u64>,
}

impl Work {
    fn add(&mut self, id: u64, step: Step) {
        self.touched.insert(id);
        self.orders
            .extend(step.orders.into_iter().map(|order| (id, order)));
        self.log.extend(step.log.into_iter().map(|line| (id, line)));
    }
}

/// A rollout in memory with its head as last stored (to write the head only when it
/// changed).
struct Loaded {
    rollout: Rollout,
    stored_head: Vec<u8>,
}

pub struct Driver {
    state: Arc<AppState>,
    requests: mpsc::Receiver<Request>,
    observer: NodeObserver,
    store: RolloutStore,
    /// Every node that has sent a state report.
    fleet: HashMap<NodeId, Observed>,
    loaded: BTreeMap<u64, Loaded>,
    /// Signed manifests by release, for stage and deploy commands.
    manifests: HashMap<ReleaseId, Envelope>,
    /// The fleet targets: the latest succeeded rollout of each selection (all loaded).
    targets: BTreeSet<u64>,
}

impl Driver {
    /// Reads the fleet and the rollouts that need the driver: running or paused ones, stopped
    /// ones with switches in flight, and the latest succeeded ones (the fleet targets).
    pub fn new(state: Arc<AppState>, inbox: Inbox) -> Result<Driver, DbError> {
        let fleet = state
            .db
            .nodes()?
            .into_iter()
            .filter_map(|(node, record)| Observed::of(&record).map(|o| (node, o)))
            .collect();
        let mut driver = Driver {
            state,
            requests: inbox.requests,
            observer: inbox.observer,
            store: inbox.store,
            fleet,
            loaded: BTreeMap::new(),
            manifests: HashMap::new(),
            targets: BTreeSet::new(),
        };
        // Reports the main loop observed before the driver ran are in the mailbox too.
        driver.merge();
        for head in driver.store.heads()? {
            if head.status.is_active() || head.in_flight > 0 {
                driver.load(head.id)?;
            }
        }
        driver.retarget()?;
        driver.reconcile()?;
        Ok(driver)
    }

    fn load(&mut self, id: u64) -> Result<bool, DbError> {
        if self.loaded.contains_key(&id) {
            return Ok(true);
        }
        let Some(rollout) = self.store.load(id)? else {
            return Ok(false);
        };
        let stored_head = serde_json::to_vec(rollout.head()).unwrap_or_default();
        self.loaded.insert(
            id,
            Loaded {
                rollout,
                stored_head,
            },
        );
        Ok(true)
    }

    /// Loads the latest succeeded rollout of each selection (newest first, at most
    /// [`MAX_TARGETS`]): the fleet targets. A loaded rollout's status is newer than its
    /// stored head's.
    fn retarget(&mut self) -> Result<(), DbError> {
        let mut seen: Vec<Selector> = Vec::new();
        let mut targets = BTreeSet::new();
        for head in self.store.heads()? {
            if seen.len() >= MAX_TARGETS {
                break;
            }
            let status = self
                .loaded
                .get(&head.id)
                .map_or(head.status, |l| l.rollout.status());
            if status == Status::Succeeded && !seen.contains(&head.selector) {
                seen.push(head.selector.clone());
                targets.insert(head.id);
            }
        }
        for &id in &targets {
            self.load(id)?;
        }
        self.targets = targets;
        Ok(())
    }

    /// Drops rollouts that no longer need the driver (not running, nothing in flight, not a
    /// fleet target, everything stored). Only after a save point.
    fn unload_idle(&mut self) {
        let targets = &self.targets;
        self.loaded.retain(|id, l| {
            targets.contains(id)
                || l.rollout.needs_tick()
                || !l.rollout.dirty_free()
                || head_bytes(&l.rollout) != l.stored_head
        });
    }

    /// After a restart: each running (or rolling-back) rollout's node records against the
    /// nodes' stored desired commands.
    fn reconcile(&mut self) -> Result<(), DbError> {
        let now = unix_now();
        let mut changed = Vec::new();
        for (id, l) in &mut self.loaded {
            let r = &mut l.rollout;
            if !(r.status().is_active() || r.status() == Status::RolledBack) {
                continue;
            }
            let release = r.head().release.clone();
            let nodes: Vec<NodeId> = r.nodes().iter().map(|n| n.node.clone()).collect();
            let mut any = false;
            for node in nodes {
                let desired = match self.state.db.desired(&node)? {
                    Some(bytes) => stored_command(&bytes, &release),
                    None => None,
                };
                any |= r.reconcile(&node, desired, self.fleet.get(&node), now);
            }
            if any {
                tracing::warn!(
                    rollout = id,
                    "rollout records brought in line with the stored commands after a restart"
                );
                changed.push(*id);
            }
        }
        for id in changed {
            if let Some(l) = self.loaded.get_mut(&id) {
                for node in l.rollout.take_dirty() {
                    self.store.put_node(id, node)?;
                }
            }
        }
        Ok(())
    }

    /// Runs until `shutdown` completes. Errors are logged and the work retried at the next
    /// tick; the driver itself never stops the coordinator.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut timer = tokio::time::interval(TICK);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let observer = self.observer.clone();
        let mut last = Instant::now();
        loop {
            tokio::select! {
                // Ctrl-C or SIGTERM: what is stored is complete; a step in progress is not.
                () = &mut shutdown => return,
                // Start and control requests from the HTTP handlers.
                Some(request) = self.requests.recv() => self.on_request(request).await,
                // A node reported: step soon, at most every MIN_GAP.
                () = observer.changed() => {
                    let wait = MIN_GAP.saturating_sub(last.elapsed());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    self.pass(Work::default()).await;
                }
                // Bakes end, deadlines pass and windows open without any report.
                _ = timer.tick() => self.pass(Work::default()).await,
            }
            last = Instant::now();
        }
    }

    /// Takes the mailbox into the fleet map; returns the nodes that changed and those that
    /// appeared (first report) or came back online.
    fn merge(&mut self) -> (Vec<NodeId>, Vec<NodeId>) {
        let mut changed = Vec::new();
        let mut arrived = Vec::new();
        for (node, observed) in self.observer.take() {
            let Some(observed) = observed else {
                continue;
            };
            let came = match self.fleet.get(&node) {
                None => true,
                Some(before) => !before.online && observed.online,
            };
            if came {
                arrived.push(node.clone());
            }
            self.fleet.insert(node.clone(), observed);
            changed.push(node);
        }
        (changed, arrived)
    }

    /// One pass: observe, step, judge canaries, catch up late nodes, then the save point.
    async fn pass(&mut self, mut work: Work) {
        if let Err(error) = self.decide(&mut work).await {
            tracing::error!(%error, "rollout step failed; retrying at the next tick");
            self.forget(&work);
            return;
        }
        if let Err(error) = self.carry_out(work).await {
            tracing::error!(%error, "cannot store a rollout step; retrying at the next tick");
            return;
        }
        self.unload_idle();
    }

    async fn decide(&mut self, work: &mut Work) -> Result<(), DbError> {
        let now = unix_now();
        let (changed, arrived) = self.merge();
        let mut succeeded = Vec::new();
        for (&id, l) in &mut self.loaded {
            let r = &mut l.rollout;
            let before = r.status();
            let due = r.needs_tick()
                || (!changed.is_empty() && r.observe_nodes(&changed, now, &self.fleet));
            if due {
                work.add(id, r.step(now, &self.fleet));
            }
            if before != Status::Succeeded && r.status() == Status::Succeeded {
                succeeded.push(id);
            }
        }
        self.judge_canaries(now, work).await?;
        if !succeeded.is_empty() {
            self.retarget()?;
            for id in &succeeded {
                self.sweep(*id, now, work);
            }
        }
        for node in arrived {
            self.catch_up(&node, now, work);
        }
        Ok(())
    }

    /// Runs the canary judgment of every gate waiting for one, then steps its rollout.
    async fn judge_canaries(&mut self, now: UnixSeconds, work: &mut Work) -> Result<(), DbError> {
        let due: Vec<(u64, super::engine::CanaryDue)> = self
            .loaded
            .iter()
            .filter_map(|(&id, l)| l.rollout.canary_due(now).map(|d| (id, d)))
            .collect();
        for (id, due) in due {
            let Some(l) = self.loaded.get(&id) else {
                continue;
            };
            let release = l.rollout.head().release.clone();
            let groups = report::groups(&l.rollout, Some(due.canary.clone()), &self.fleet);
            let config = match self.state.db.release_info(&release)? {
                Some(info) => report::canary_config(&info),
                None => Default::default(),
            };
            let metrics = self.state.metrics.clone();
            let judged = tokio::task::spawn_blocking(move || {
                report::judge(&metrics, &config, &release, &groups, due.from, due.to, now)
            })
            .await
            .map_err(|e| DbError::Corrupt {
                what: "canary judgment",
                key: id.to_string(),
                reason: e.to_string(),
            })??;
            let (result, _) = judged;
            tracing::info!(rollout = id, outcome = result.outcome.as_str(), score = ?result.score, summary = %result.summary, "canary judged");
            if let Some(l) = self.loaded.get_mut(&id) {
                l.rollout.record_canary(result);
                work.add(id, l.rollout.step(now, &self.fleet));
            }
        }
        Ok(())
    }

    /// The rollout that is `node`'s fleet target: the newest succeeded one whose selection
    /// matches it, unless a running rollout covers the node (it decides).
    fn target_of(&self, node: &NodeId, observed: &Observed) -> Option<u64> {
        let active = self.loaded.values().any(|l| {
            l.rollout.status().is_active()
                && (l.rollout.contains(node) || l.rollout.head().selector.matches(&observed.labels))
        });
        if active {
            return None;
        }
        self.targets.iter().rev().copied().find(|id| {
            self.loaded.get(id).is_some_and(|l| {
                l.rollout.status() == Status::Succeeded
                    && l.rollout.head().selector.matches(&observed.labels)
            })
        })
    }

    /// A node appeared or came back: it gets its fleet target if it does not run it.
    fn catch_up(&mut self, node: &NodeId, now: UnixSeconds, work: &mut Work) {
        let Some(observed) = self.fleet.get(node) else {
            return;
        };
        let Some(id) = self.target_of(node, observed) else {
            return;
        };
        let Some(l) = self.loaded.get_mut(&id) else {
            return;
        };
        if let Some(order) = l.rollout.add_late(node, observed, now) {
            let head = l.rollout.head();
            let line = LogLine {
                who: None,
                action: "fleet target",
                nodes: vec![node.clone()],
                outcome: format!(
                    "ok: {node} appeared or came back; deploy of {} sent, the target of {} since rollout {id}",
                    head.release, head.selector
                ),
            };
            work.add(
                id,
                Step {
                    orders: vec![order],
                    log: vec![line],
                },
            );
        }
    }

    /// A rollout just succeeded: nodes that match its selection but appeared while it ran
    /// get the release now.
    fn sweep(&mut self, id: u64, now: UnixSeconds, work: &mut Work) {
        let Some(l) = self.loaded.get(&id) else {
            return;
        };
        let candidates: Vec<NodeId> = self
            .fleet
            .iter()
            .filter(|(node, o)| {
                !l.rollout.contains(node) && l.rollout.head().selector.matches(&o.labels)
            })
            .map(|(node, _)| node.clone())
            .collect();
        for node in candidates {
            if self.fleet.get(&node).and_then(|o| self.target_of(&node, o)) == Some(id) {
                self.catch_up(&node, now, work);
            }
        }
    }

    async fn on_request(&mut self, request: Request) {
        match request {
            Request::Start { start, who, reply } => {
                // Step first, so a rollout that has just finished no longer holds its nodes.
                self.pass(Work::default()).await;
                let result = self.start(*start, &who).await;
                let _ = reply.send(result);
            }
            Request::Control {
                id,
                control,
                who,
                reply,
            } => {
                let result = self.control(id, control, &who).await;
                let _ = reply.send(result);
            }
        }
    }

    async fn start(&mut self, start: StartRequest, who: &Identity) -> Result<Started, StartError> {
        let StartRequest {
            release,
            info,
            selector,
            options,
            http_sources,
        } = start;
        if self.fleet.is_empty() {
            return Err(StartError::NoNodes);
        }
        let mut selected: Vec<NodeId> = self
            .fleet
            .iter()
            .filter(|(_, o)| selector.matches(&o.labels))
            .map(|(node, _)| node.clone())
            .collect();
        selected.sort();
        if selected.is_empty() {
            let why = selector.explain_empty(self.fleet.values().map(|o| &o.labels));
            return Err(StartError::EmptySelection { selector, why });
        }
        let plan = Plan::merge(&options, info.rollout.as_ref())?;
        let reached = plan::resolve_waves(&plan.waves, selected.len())?;
        self.check_conflicts(&selected)?;

        let failed = |e: DbError| StartError::Failed(e.to_string());
        let id = self.state.db.next_rollout_id().map_err(failed)?;
        let waves = plan::assign_waves(&release.app, &selected, &reached);
        let config = report::canary_config(&info);
        let now = unix_now();
        let head = Head {
            selector: selector.clone(),
            canary_timing: CanaryTiming {
                warmup_secs: config.warmup_secs,
                min_window_secs: config.window_secs,
            },
            http_sources,
            ..Head::new(id, release.clone(), plan, &waves, who.0.clone(), now)
        };
        let rollout = Rollout::new(head, &waves, now);
        let sizes: Vec<String> = waves.iter().map(|w| w.len().to_string()).collect();
        let targets: Vec<String> = rollout
            .head()
            .plan
            .waves
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut work = Work::default();
        work.touched.insert(id);
        work.log.push((
            id,
            LogLine {
                who: Some(who.0.clone()),
                action: "rollout start",
                nodes: selected.clone(),
                outcome: format!(
                    "ok: {release} to {} node{} ({selector}) in {} wave{} ({}: {} nodes)",
                    selected.len(),
                    plural(selected.len()),
                    waves.len(),
                    plural(waves.len()),
                    targets.join(", "),
                    sizes.join(", ")
                ),
            },
        ));
        // Older stopped rollouts still watching these nodes leave them to this one.
        for (&other, l) in &mut self.loaded {
            let mut released = false;
            for node in &selected {
                if l.rollout.contains(node) {
                    l.rollout.release_node(node, id, now);
                    released = true;
                }
            }
            if released {
                work.touched.insert(other);
            }
        }
        self.loaded.insert(
            id,
            Loaded {
                rollout,
                stored_head: Vec::new(),
            },
        );
        // The first step (wave 1's stage commands) shares the start's save point.
        if let Err(error) = self.decide(&mut work).await {
            self.forget(&work);
            self.loaded.remove(&id);
            return Err(StartError::Failed(error.to_string()));
        }
        if let Err(error) = self.carry_out(work).await {
            self.loaded.remove(&id);
            return Err(StartError::Failed(error.to_string()));
        }
        tracing::info!(rollout = id, release = %release, nodes = selected.len(), waves = waves.len(), by = %who, "rollout started");
        let view = self
            .loaded
            .get(&id)
            .map(|l| RolloutView::new(l.rollout.head(), None, now))
            .ok_or_else(|| StartError::Failed(format!("rollout {id} vanished after it started")))?;
        Ok(Started { view, waves })
    }

    /// Refuses a start whose selection overlaps a running rollout's nodes.
    fn check_conflicts(&self, selected: &[NodeId]) -> Result<(), StartError> {
        let wanted: BTreeSet<&NodeId> = selected.iter().collect();
        let mut conflicts = Vec::new();
        for (id, l) in &self.loaded {
            if !l.rollout.status().is_active() {
                continue;
            }
            let held: Vec<&NodeId> = l
                .rollout
                .nodes()
                .iter()
                .map(|n| &n.node)
                .filter(|n| wanted.contains(n))
                .collect();
            if held.is_empty() {
                continue;
            }
            conflicts.push(format!(
                "rollout {id} ({}, {}) holds {}",
                l.rollout.head().release,
                l.rollout.status(),
                name_nodes(&held)
            ));
        }
        if conflicts.is_empty() {
            return Ok(());
        }
        Err(StartError::Conflict(format!(
            "{}; a node is in one running rollout at a time: wait for it to finish, or `coordinator rollout abort ID` first",
            conflicts.join("; ")
        )))
    }

    async fn control(
        &mut self,
        id: u64,
        control: Control,
        who: &Identity,
    ) -> Result<RolloutView, ControlFailure> {
        let failed = |e: DbError| ControlFailure::Failed(e.to_string());
        if !self.load(id).map_err(failed)? {
            return Err(ControlFailure::NotFound(id));
        }
        // Up to date first: a control acts on what the nodes report now.
        self.pass(Work::default()).await;
        if control == Control::Rollback {
            self.check_rollback(id)?;
        }
        let now = unix_now();
        let Some(l) = self.loaded.get_mut(&id) else {
            return Err(ControlFailure::NotFound(id));
        };
        let r = &mut l.rollout;
        let line = match control {
            Control::Pause => r.pause(&who.0),
            Control::Resume => r.resume(&who.0),
            Control::Abort => r.abort(&who.0, now),
            Control::Rollback => r.rollback(&who.0, now),
        }
        .map_err(|e| ControlFailure::Refused(e.to_string()))?;
        let mut work = Work::default();
        work.touched.insert(id);
        work.log.push((id, line));
        if let Err(error) = self.decide(&mut work).await {
            self.forget(&work);
            return Err(ControlFailure::Failed(error.to_string()));
        }
        self.carry_out(work)
            .await
            .map_err(|e| ControlFailure::Failed(e.to_string()))?;
        tracing::info!(rollout = id, control = control.as_str(), by = %who, "rollout control");
        let view = self
            .loaded
            .get(&id)
            .map(|l| RolloutView::new(l.rollout.head(), Some(l.rollout.nodes()), now));
        if control == Control::Rollback {
            // A rolled-back rollout is no fleet target; the one before it may be again.
            self.retarget().map_err(failed)?;
        }
        view.ok_or(ControlFailure::NotFound(id))
    }

    /// A rollback must not fight a running rollout over the same nodes.
    fn check_rollback(&self, id: u64) -> Result<(), ControlFailure> {
        let Some(target) = self.loaded.get(&id) else {
            return Ok(());
        };
        let switched: BTreeSet<&NodeId> = target
            .rollout
            .nodes()
            .iter()
            .filter(|n| n.phase.is_on_release())
            .map(|n| &n.node)
            .collect();
        for (other, l) in &self.loaded {
            if *other == id || !l.rollout.status().is_active() {
                continue;
            }
            let held: Vec<&NodeId> = l
                .rollout
                .nodes()
                .iter()
                .map(|n| &n.node)
                .filter(|n| switched.contains(n))
                .collect();
            if !held.is_empty() {
                return Err(ControlFailure::Refused(format!(
                    "rollout {other} ({}) is running on {} that rollout {id} switched; abort or roll back rollout {other} first",
                    l.rollout.head().release,
                    name_nodes(&held)
                )));
            }
        }
        Ok(())
    }

    /// Drops what a failed pass changed in memory: its rollouts are read back from the store.
    fn forget(&mut self, work: &Work) {
        for id in &work.touched {
            self.loaded.remove(id);
            if let Err(error) = self.load(*id) {
                tracing::error!(rollout = id, %error, "cannot read the rollout back");
            }
        }
    }

    /// The save point (see the module doc), then the publish request.
    async fn carry_out(&mut self, work: Work) -> Result<(), DbError> {
        let any_dirty = work.touched.iter().any(|id| {
            self.loaded
                .get(id)
                .is_some_and(|l| !l.rollout.dirty_free() || head_bytes(&l.rollout) != l.stored_head)
        });
        if work.orders.is_empty() && work.log.is_empty() && !any_dirty {
            return Ok(());
        }
        let state = self.state.clone();
        let _serialized = state.command_lock.lock().await;
        let nodes = match self.write(&work) {
            Ok(nodes) => nodes,
            Err(error) => {
                self.forget(&work);
                return Err(error);
            }
        };
        if let Err(error) = state.db.flush().await {
            self.forget(&work);
            return Err(error);
        }
        for id in &work.touched {
            if let Some(l) = self.loaded.get_mut(id) {
                l.stored_head = head_bytes(&l.rollout);
            }
        }
        if !nodes.is_empty() {
            tracing::debug!(
                commands = nodes.len(),
                "rollout commands stored; publishing"
            );
            if state
                .to_loop
                .send(ApiRequest::PublishCommands(nodes))
                .await
                .is_err()
            {
                tracing::warn!(
                    "the main loop is gone; the stored commands go out at the next start"
                );
            }
        }
        Ok(())
    }

    /// Every write of a save point; returns the nodes whose desired command changed.
    fn write(&mut self, work: &Work) -> Result<Vec<NodeId>, DbError> {
        let state = self.state.clone();
        let db = &state.db;
        let mut published = Vec::with_capacity(work.orders.len());
        if !work.orders.is_empty() {
            let seqs = db.reserve_seqs(work.orders.len() as u64)?;
            let now = unix_now();
            for ((id, order), seq) in work.orders.iter().zip(seqs) {
                let Some(l) = self.loaded.get(id) else {
                    continue;
                };
                let (release, http_sources) = (
                    l.rollout.head().release.clone(),
                    l.rollout.head().http_sources.clone(),
                );
                let action = match order.kind {
                    CommandKind::Rollback => Action::Rollback {},
                    kind => {
                        let manifest = self.manifest(&release)?;
                        if kind == CommandKind::Stage {
                            Action::Stage {
                                manifest,
                                http_sources,
                            }
                        } else {
                            Action::Deploy {
                                manifest,
                                http_sources,
                            }
                        }
                    }
                };
                let command = release::command(order.node.clone(), seq, now, action);
                let sealed = release::seal_command(&command, &state.signing_key).map_err(|e| {
                    DbError::Corrupt {
                        what: "command",
                        key: order.node.to_string(),
                        reason: e.to_string(),
                    }
                })?;
                db.set_desired(&order.node, &sealed)?;
                if let Some(l) = self.loaded.get_mut(id) {
                    l.rollout.sent(&order.node, order.kind, seq);
                }
                tracing::info!(rollout = id, node = %order.node, seq, command = order.kind.as_str(), "rollout command");
                published.push(order.node.clone());
            }
        }
        for id in &work.touched {
            let Some(l) = self.loaded.get_mut(id) else {
                continue;
            };
            for node in l.rollout.take_dirty() {
                self.store.put_node(*id, node)?;
            }
            if head_bytes(&l.rollout) != l.stored_head {
                self.store.put_head(l.rollout.head())?;
            }
        }
        let now = unix_now();
        for (id, line) in &work.log {
            let entry = db.append_log(LogEntry {
                id: 0,
                at: now,
                who: line
                    .who
                    .clone()
                    .unwrap_or_else(|| Identity::coordinator().0),
                action: line.action.to_owned(),
                target: format!("rollout {id}"),
                nodes: line.nodes.clone(),
                outcome: line.outcome.clone(),
            })?;
            tracing::info!(rollout = id, log = entry.id, who = %entry.who, action = %entry.action, nodes = entry.nodes.len(), outcome = %entry.outcome, "deploy log");
        }
        Ok(published)
    }

    /// The signed manifest of a release, read once.
    fn manifest(&mut self, id: &ReleaseId) -> Result<Envelope, DbError> {
        if let Some(envelope) = self.manifests.get(id) {
            return Ok(envelope.clone());
        }
        let missing = || DbError::Corrupt {
            what: "release",
            key: id.to_string(),
            reason: "a rollout names it but it is not stored".to_owned(),
        };
        let stored = self.state.db.release_envelope(id)?.ok_or_else(missing)?;
        let (envelope, _) = release::stored_manifest(&stored).map_err(|e| DbError::Corrupt {
            what: "release",
            key: id.to_string(),
            reason: e.to_string(),
        })?;
        if self.manifests.len() >= 16 {
            self.manifests.clear();
        }
        self.manifests.insert(id.clone(), envelope.clone());
        Ok(envelope)
    }
}

fn head_bytes(rollout: &Rollout) -> Vec<u8> {
    serde_json::to_vec(rollout.head()).unwrap_or_default()
}

/// "n1, n2 and 3 more".
fn name_nodes(nodes: &[&NodeId]) -> String {
    let named: Vec<&str> = nodes.iter().take(NAMED).map(|n| n.as_str()).collect();
    let mut text = named.join(", ");
    if nodes.len() > NAMED {
        text.push_str(&format!(" and {} more", nodes.len() - NAMED));
    }
    text
}

/// What a node's stored desired command is, for [`Rollout::reconcile`]: ours (a stage or
/// deploy of `release`, or a rollback) or another's. The envelope is our own, read back
/// without checking its signature.
fn stored_command(bytes: &[u8], release: &ReleaseId) -> Option<Desired> {
    let command: Command = release::stored_command(bytes).ok()?;
    let seq = command.seq;
    let ours = |manifest: &Envelope| {
        release::stored_manifest(&manifest.to_bytes())
            .map(|(_, m)| m.release_id() == *release)
            .unwrap_or(false)
    };
    Some(match &command.action {
        Action::Stage { manifest, .. } if ours(manifest) => Desired::Ours(CommandKind::Stage, seq),
        Action::Deploy { manifest, .. } if ours(manifest) => {
            Desired::Ours(CommandKind::Deploy, seq)
        }
        Action::Rollback {} => Desired::Ours(CommandKind::Rollback, seq),
        _ => Desired::Other(seq),
    })
}
