//! The engine against a simulated fleet: each node keeps only its newest command (as the
//! broker's retained message does) and acts on it when "delivered", like an agent.

use std::collections::HashMap;

use protocol::{AppName, Version};

use super::*;
use crate::rollout::fleet::{LastUpdate, Observed, UpdateOutcome};
use crate::rollout::plan::{self, PlanOptions, Secs};

const T0: UnixSeconds = 1_000_000;

fn web(version: &str) -> ReleaseId {
    ReleaseId::new(
        AppName::new("web").expect("app"),
        Version::new(version).expect("version"),
    )
}

fn id(name: &str) -> NodeId {
    NodeId::new(name).expect("node")
}

/// A fleet of agents, the commands waiting for each, and every command ever sent.
struct Sim {
    fleet: HashMap<NodeId, Observed>,
    inbox: HashMap<NodeId, (CommandKind, u64)>,
    sent: Vec<(NodeId, CommandKind, u64)>,
    seq: u64,
    now: UnixSeconds,
    log: Vec<LogLine>,
    /// Nodes whose switch fails (the agent rolls back by itself).
    bad: Vec<NodeId>,
}

impl Sim {
    fn new(nodes: usize) -> Sim {
        let fleet = (0..nodes)
            .map(|i| {
                let node = id(&format!("n{i}"));
                let observed = Observed {
                    online: true,
                    last_seen: Some(T0),
                    labels: [("region".to_owned(), "eu".to_owned())].into(),
                    current: Some(web("1")),
                    previous: None,
                    staged: None,
                    last_seq: 0,
                    last_update: None,
                };
                (node, observed)
            })
            .collect();
        Sim {
            fleet,
            inbox: HashMap::new(),
            sent: Vec::new(),
            seq: 100,
            now: T0,
            log: Vec::new(),
            bad: Vec::new(),
        }
    }

    fn nodes(&self) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self.fleet.keys().cloned().collect();
        nodes.sort();
        nodes
    }

    /// Numbers a step's orders and queues them for the nodes.
    fn apply(&mut self, rollout: &mut Rollout, step: Step) {
        for order in step.orders {
            self.seq += 1;
            rollout.sent(&order.node, order.kind, self.seq);
            self.inbox
                .insert(order.node.clone(), (order.kind, self.seq));
            self.sent.push((order.node, order.kind, self.seq));
        }
        self.log.extend(step.log);
    }

    fn step(&mut self, rollout: &mut Rollout) {
        let step = rollout.step(self.now, &self.fleet);
        self.apply(rollout, step);
    }

    /// Online nodes act on their waiting command.
    fn deliver(&mut self, release: &ReleaseId) {
        let waiting: Vec<NodeId> = self.inbox.keys().cloned().collect();
        for node in waiting {
            if !self.fleet[&node].online {
                continue;
            }
            let (kind, seq) = self.inbox.remove(&node).expect("waiting");
            let bad = self.bad.contains(&node);
            let now = self.now;
            let o = self.fleet.get_mut(&node).expect("known");
            o.last_seq = seq;
            match kind {
                CommandKind::Stage => o.staged = Some(release.clone()),
                CommandKind::Deploy if bad => {
                    o.staged = None;
                    o.last_update = Some(LastUpdate {
                        release: o.current.clone().expect("runs something"),
                        outcome: UpdateOutcome::RolledBack("health check failed".into()),
                        finished_at: now,
                    });
                }
                CommandKind::Deploy => {
                    o.previous = o.current.replace(release.clone());
                    o.staged = None;
                    o.last_update = Some(LastUpdate {
                        release: release.clone(),
                        outcome: UpdateOutcome::Switched,
                        finished_at: now,
                    });
                }
                CommandKind::Rollback => {
                    let back = o.previous.take().expect("a previous version");
                    o.previous = o.current.replace(back.clone());
                    o.last_update = Some(LastUpdate {
                        release: back,
                        outcome: UpdateOutcome::RolledBack("asked by the operator".into()),
                        finished_at: now,
                    });
                }
            }
        }
    }

    /// Steps, delivers and advances the clock a second, `n` times.
    fn run(&mut self, rollout: &mut Rollout, n: usize) {
        let release = rollout.head().release.clone();
        for _ in 0..n {
            self.step(rollout);
            self.deliver(&release);
            self.now += 1;
        }
    }

    fn count(&self, node: &NodeId, kind: CommandKind) -> usize {
        self.sent
            .iter()
            .filter(|(n, k, _)| n == node && *k == kind)
            .count()
    }

    fn actions(&self) -> Vec<&'static str> {
        self.log.iter().map(|l| l.action).collect()
    }
}

fn options(waves: &str) -> PlanOptions {
    PlanOptions {
        waves: Some(plan::parse_waves(waves).expect("waves")),
        ..PlanOptions::default()
    }
}

/// A rollout of web@2 over every node of `sim` with `options`.
fn rollout(sim: &Sim, options: PlanOptions) -> Rollout {
    let plan = Plan::merge(&options, None).expect("plan");
    let nodes = sim.nodes();
    let reached = plan::resolve_waves(&plan.waves, nodes.len()).expect("resolves");
    let app = AppName::new("web").expect("app");
    let waves = plan::assign_waves(&app, &nodes, &reached);
    let head = Head::new(7, web("2"), plan, &waves, "alice".into(), sim.now);
    Rollout::new(head, &waves, sim.now)
}

fn canary(outcome: GateOutcome, summary: &str) -> CanaryResult {
    CanaryResult {
        outcome,
        score: Some(match outcome {
            GateOutcome::Pass => 100.0,
            GateOutcome::Marginal => 60.0,
            _ => 10.0,
        }),
        summary: summary.to_owned(),
        from: T0,
        to: T0 + 10,
        canary_nodes: Vec::new(),
        baseline_nodes: Vec::new(),
        judged_at: T0 + 10,
        judgment: None,
    }
}

#[test]
fn waves_stage_then_switch_in_order_and_every_node_switches_once() {
    let mut sim = Sim::new(10);
    let mut r = rollout(&sim, options("1,30%,100%"));
    // The canary gate passes as soon as it is asked.
    for _ in 0..30 {
        sim.run(&mut r, 1);
        if r.canary_due(sim.now).is_some() {
            r.record_canary(canary(GateOutcome::Pass, "all metrics pass"));
        }
    }
    assert_eq!(r.status(), Status::Succeeded, "{:?}", r.head().reason);
    for node in sim.nodes() {
        assert_eq!(sim.count(&node, CommandKind::Stage), 1, "{node}");
        assert_eq!(sim.count(&node, CommandKind::Deploy), 1, "{node}");
        assert_eq!(r.node(&node).map(|n| n.phase), Some(NodePhase::Switched));
    }
    // Every wave stages before it switches, and a wave starts only after the one before it
    // passed its gates.
    let wave_of = |node: &NodeId| r.node(node).and_then(|n| n.wave).expect("in a wave");
    let mut last = (0u32, CommandKind::Stage);
    for (node, kind, _) in &sim.sent {
        let here = (wave_of(node), *kind);
        let rank = |(w, k): (u32, CommandKind)| (w, k == CommandKind::Deploy);
        assert!(
            rank(here) >= rank(last),
            "{node} got {kind:?} after {last:?}"
        );
        last = here;
    }
    assert_eq!(
        sim.actions(),
        [
            "wave staged",
            "wave switched",
            "gate passed",
            "wave staged",
            "wave switched",
            "gate passed",
            "wave staged",
            "wave switched",
            "gate passed",
            "rollout done"
        ]
    );
    assert_eq!(r.wave_nodes(0).len(), 1);
    assert_eq!(r.wave_nodes(1).len(), 2);
    assert_eq!(r.wave_nodes(2).len(), 7);
    let gates = &r.head().waves[0].gates;
    assert!(gates
        .iter()
        .any(|g| g.gate == Gate::Canary && g.outcome == GateOutcome::Pass));
    assert!(
        !r.head().waves[1]
            .gates
            .iter()
            .any(|g| g.gate == Gate::Canary),
        "the canary gate follows the first wave only"
    );
}

#[test]
fn at_most_max_parallel_nodes_switch_at_once() {
    let mut sim = Sim::new(6);
    let mut r = rollout(
        &sim,
        PlanOptions {
            max_parallel: Some(2),
            ..options("100%")
        },
    );
    sim.step(&mut r); // stage everything
    assert_eq!(sim.sent.len(), 6);
    sim.deliver(&web("2"));
    sim.step(&mut r); // all staged: the first two deploys
    let deploys = |sim: &Sim| {
        sim.sent
            .iter()
            .filter(|s| s.1 == CommandKind::Deploy)
            .count()
    };
    assert_eq!(deploys(&sim), 2);
    sim.step(&mut r); // nothing switched yet: nothing more
    assert_eq!(deploys(&sim), 2);
    sim.deliver(&web("2"));
    sim.step(&mut r);
    assert_eq!(deploys(&sim), 4);
    sim.run(&mut r, 4);
    assert_eq!(deploys(&sim), 6);
    assert_eq!(r.status(), Status::Succeeded);
}

#[test]
fn the_bake_holds_the_next_wave_until_it_ends() {
    let mut sim = Sim::new(4);
    let mut r = rollout(
        &sim,
        PlanOptions {
            bake: Some(Secs(30)),
            ..options("1,100%")
        },
    );
    sim.run(&mut r, 3);
    assert_eq!(r.head().waves[0].phase, WavePhase::Baking);
    let baked_from = r.head().waves[0].switched_at.expect("switched");
    while sim.now < baked_from + 30 {
        r.record_canary(canary(GateOutcome::Pass, "fine"));
        sim.run(&mut r, 1);
        if sim.now < baked_from + 30 {
            assert!(r
                .wave_nodes(1)
                .iter()
                .all(|n| n.phase == NodePhase::Pending));
        }
    }
    sim.run(&mut r, 1);
    assert!(r
        .wave_nodes(1)
        .iter()
        .all(|n| n.phase != NodePhase::Pending));
}

#[test]
fn a_failed_switch_over_the_threshold_halts_and_rolls_back_only_switched_nodes() {
    let mut sim = Sim::new(10);
    let mut r = rollout(
        &sim,
        PlanOptions {
            max_failures: Some(1),
            ..options("1,100%")
        },
    );
    for _ in 0..10 {
        sim.run(&mut r, 1);
        if r.canary_due(sim.now).is_some() {
            r.record_canary(canary(GateOutcome::Pass, "fine"));
        }
        if r.head().waves[1].phase == WavePhase::Staging {
            break;
        }
    }
    // Two nodes of wave 2 roll back by themselves after their switch.
    let wave2: Vec<NodeId> = r.wave_nodes(1).iter().map(|n| n.node.clone()).collect();
    sim.bad = wave2[..2].to_vec();
    sim.run(&mut r, 4);
    assert_eq!(r.status(), Status::RolledBack);
    let reason = r.head().reason.clone().expect("a reason");
    assert!(
        reason.starts_with("failure threshold: 2 nodes failed, over the limit of 1 (first: "),
        "{reason}"
    );
    assert!(
        reason.contains("rolled back by itself: health check failed"),
        "{reason}"
    );
    assert!(!reason.contains('\n'));
    sim.run(&mut r, 3);
    for node in sim.nodes() {
        let rolled_back = sim.count(&node, CommandKind::Rollback);
        let phase = r.node(&node).expect("in the rollout").phase;
        if sim.bad.contains(&node) {
            assert_eq!((phase, rolled_back), (NodePhase::Failed, 0), "{node}");
        } else {
            assert_eq!((phase, rolled_back), (NodePhase::RolledBack, 1), "{node}");
            assert_eq!(sim.fleet[&node].current, Some(web("1")));
        }
    }
    assert!(sim.actions().contains(&"gate failed"));
    assert!(sim.actions().contains(&"rollback sent"));
    // Stopped: nothing more is ever sent.
    let before = sim.sent.len();
    sim.run(&mut r, 5);
    assert_eq!(sim.sent.len(), before);
}

#[test]
fn a_failing_canary_halts_after_the_first_wave_and_rolls_the_canary_back() {
    let mut sim = Sim::new(5);
    let mut r = rollout(&sim, options("1,100%"));
    sim.run(&mut r, 4);
    let due = r
        .canary_due(sim.now)
        .expect("the gate waits for the canary");
    assert_eq!(due.canary.len(), 1);
    let canary_node = due.canary[0].clone();
    r.record_canary(canary(
        GateOutcome::Fail,
        "app_error_rate is 4.0× the baseline (allowed 1.2×)",
    ));
    sim.run(&mut r, 3);
    assert_eq!(r.status(), Status::RolledBack);
    assert_eq!(
        r.head().reason.as_deref(),
        Some("canary fail (score 10): app_error_rate is 4.0× the baseline (allowed 1.2×); rolled back automatically")
    );
    assert_eq!(sim.count(&canary_node, CommandKind::Rollback), 1);
    assert_eq!(sim.fleet[&canary_node].current, Some(web("1")));
    for node in r.wave_nodes(1) {
        assert_eq!(node.phase, NodePhase::Pending);
        assert_eq!(sim.count(&node.node, CommandKind::Stage), 0);
    }
}

#[test]
fn a_marginal_canary_pauses_for_a_human_and_resume_accepts_it() {
    let mut sim = Sim::new(5);
    let mut r = rollout(&sim, options("1,100%"));
    sim.run(&mut r, 4);
    assert!(r.canary_due(sim.now).is_some());
    r.record_canary(canary(
        GateOutcome::Marginal,
        "latency p99 1.1× (inconclusive)",
    ));
    sim.run(&mut r, 2);
    assert_eq!(r.status(), Status::Paused);
    assert!(r.head().paused_for_canary);
    let reason = r.head().reason.clone().expect("why");
    assert!(reason.contains("canary marginal (score 60)"), "{reason}");
    assert!(reason.contains("rollout resume 7"), "{reason}");
    let before = sim.sent.len();
    sim.run(&mut r, 3);
    assert_eq!(sim.sent.len(), before, "a paused rollout sends nothing");
    let line = r.resume("bob").expect("resumes");
    assert_eq!(line.who.as_deref(), Some("bob"));
    assert_eq!(line.outcome, "ok: resumed, accepting the marginal canary");
    sim.run(&mut r, 6);
    assert_eq!(r.status(), Status::Succeeded);
    assert!(r.head().waves[0]
        .gates
        .iter()
        .any(|g| g.detail.contains("accepted by the operator")));
}

#[test]
fn a_passing_canary_opens_the_next_wave_only_after_its_window_is_long_enough() {
    let mut sim = Sim::new(5);
    let mut r = rollout(&sim, options("1,100%"));
    r.head.canary_timing = CanaryTiming {
        warmup_secs: 5,
        min_window_secs: 20,
    };
    sim.run(&mut r, 3);
    assert_eq!(r.head().waves[0].phase, WavePhase::Gating);
    let (from, due) = r.canary_window().expect("a window");
    let switched = r.wave_nodes(0)[0].switched_at.expect("switched");
    assert_eq!((from, due), (switched + 5, switched + 25));
    while sim.now < due {
        assert!(r.canary_due(sim.now).is_none());
        sim.run(&mut r, 1);
    }
    let asked = r.canary_due(sim.now).expect("due");
    assert_eq!(asked.from, from);
    r.record_canary(canary(GateOutcome::Pass, "all metrics pass"));
    sim.run(&mut r, 5);
    assert_eq!(r.status(), Status::Succeeded);
}

#[test]
fn a_single_wave_has_no_canary_gate() {
    let mut sim = Sim::new(3);
    let mut r = rollout(&sim, options("100%"));
    sim.run(&mut r, 4);
    assert_eq!(r.status(), Status::Succeeded);
    assert!(r.canary_due(sim.now).is_none());
}

#[test]
fn an_offline_node_is_waited_for_until_the_deadline_then_skipped_or_failed() {
    for (policy, phase, status) in [
        (OfflinePolicy::Skip, NodePhase::Skipped, Status::Succeeded),
        (OfflinePolicy::Fail, NodePhase::Failed, Status::RolledBack),
    ] {
        let mut sim = Sim::new(3);
        let away = id("n1");
        sim.fleet.get_mut(&away).expect("n1").online = false;
        let mut r = rollout(
            &sim,
            PlanOptions {
                node_deadline: Some(Secs(60)),
                offline: Some(policy),
                ..options("100%")
            },
        );
        sim.run(&mut r, 30);
        assert_eq!(r.node(&away).map(|n| n.phase), Some(NodePhase::Staging));
        assert_eq!(r.status(), Status::Running, "waits for the node");
        sim.run(&mut r, 40);
        let node = r.node(&away).expect("in the rollout");
        assert_eq!(node.phase, phase, "{policy}");
        assert_eq!(
            node.note.as_deref(),
            Some(format!("offline for over 1m 00s (--offline {policy})").as_str())
        );
        assert_eq!(r.status(), status, "{policy}: {:?}", r.head().reason);
        assert_eq!(sim.count(&away, CommandKind::Deploy), 0);
    }
}

#[test]
fn an_online_node_that_does_not_stage_in_time_fails() {
    let mut sim = Sim::new(2);
    let mut r = rollout(
        &sim,
        PlanOptions {
            node_deadline: Some(Secs(10)),
            max_failures: Some(5),
            ..options("100%")
        },
    );
    sim.step(&mut r);
    sim.inbox.remove(&id("n0")); // n0 never acts on its stage
    sim.run(&mut r, 12);
    let node = r.node(&id("n0")).expect("n0");
    assert_eq!(node.phase, NodePhase::Failed);
    assert_eq!(node.note.as_deref(), Some("did not stage within 10s"));
    assert_eq!(r.status(), Status::Succeeded);
}

#[test]
fn pause_sends_nothing_new_resume_goes_on_and_abort_leaves_nodes_as_they_are() {
    let mut sim = Sim::new(4);
    let mut r = rollout(&sim, options("1,100%"));
    sim.step(&mut r);
    let line = r.pause("alice").expect("pauses");
    assert_eq!(
        (line.action, line.outcome.as_str()),
        ("rollout pause", "ok: paused")
    );
    assert!(r.pause("alice").is_err());
    sim.deliver(&web("2"));
    let before = sim.sent.len();
    for _ in 0..5 {
        sim.step(&mut r);
        sim.now += 1;
    }
    assert_eq!(sim.sent.len(), before, "paused: no deploy");
    assert_eq!(
        r.wave_nodes(0)[0].phase,
        NodePhase::Staged,
        "observed while paused"
    );
    r.resume("alice").expect("resumes");
    sim.step(&mut r);
    assert_eq!(
        sim.sent.len(),
        before + 1,
        "the deploy goes out after resume"
    );
    sim.deliver(&web("2"));
    let line = r.abort("carol", sim.now).expect("aborts");
    assert_eq!(line.action, "rollout abort");
    assert_eq!(r.status(), Status::Aborted);
    let before = sim.sent.len();
    sim.run(&mut r, 5);
    assert_eq!(sim.sent.len(), before);
    assert_eq!(
        r.wave_nodes(0)[0].phase,
        NodePhase::Switched,
        "it keeps the release"
    );
    assert!(matches!(
        r.abort("carol", sim.now),
        Err(ControlError::NotActive { .. })
    ));
}

#[test]
fn an_operator_rollback_sends_back_only_what_the_rollout_switched() {
    let mut sim = Sim::new(4);
    // n3 already runs the release: not switched by the rollout, never rolled back by it.
    sim.fleet.get_mut(&id("n3")).expect("n3").current = Some(web("2"));
    let mut r = rollout(&sim, options("100%"));
    sim.run(&mut r, 4);
    assert_eq!(r.status(), Status::Succeeded);
    assert_eq!(
        r.node(&id("n3")).map(|n| n.phase),
        Some(NodePhase::AlreadyCurrent)
    );
    let line = r.rollback("alice", sim.now).expect("rolls back");
    assert_eq!(line.nodes.len(), 3);
    assert!(r.needs_tick(), "the rollbacks are still to be sent");
    sim.run(&mut r, 3);
    assert!(!r.needs_tick(), "everything sent back and reported");
    for n in ["n0", "n1", "n2"] {
        assert_eq!(r.node(&id(n)).map(|p| p.phase), Some(NodePhase::RolledBack));
        assert_eq!(sim.fleet[&id(n)].current, Some(web("1")));
    }
    assert_eq!(sim.count(&id("n3"), CommandKind::Rollback), 0);
    assert!(r.rollback("alice", sim.now).is_err());
}

#[test]
fn a_node_an_operator_rolled_back_during_the_rollout_is_not_switched_again() {
    let mut sim = Sim::new(3);
    let mut r = rollout(
        &sim,
        PlanOptions {
            max_parallel: Some(1),
            ..options("100%")
        },
    );
    sim.run(&mut r, 3);
    let first = sim
        .sent
        .iter()
        .find(|s| s.1 == CommandKind::Deploy)
        .map(|s| s.0.clone())
        .expect("a deploy");
    assert_eq!(r.node(&first).map(|n| n.phase), Some(NodePhase::Switched));
    // `node rollback` from outside: a newer seq, the node goes back.
    sim.seq += 1;
    sim.inbox
        .insert(first.clone(), (CommandKind::Rollback, sim.seq));
    sim.run(&mut r, 8);
    let node = r.node(&first).expect("in the rollout");
    assert_eq!(node.phase, NodePhase::Overridden);
    assert!(node
        .note
        .as_deref()
        .is_some_and(|n| n.contains("not switched again")));
    assert_eq!(sim.count(&first, CommandKind::Deploy), 1);
    assert_eq!(sim.fleet[&first].current, Some(web("1")));
    assert_eq!(r.status(), Status::Succeeded, "{:?}", r.head().reason);
}

#[test]
fn a_rollout_read_back_from_storage_sends_nothing_twice() {
    let mut sim = Sim::new(6);
    let mut r = rollout(
        &sim,
        PlanOptions {
            max_parallel: Some(2),
            ..options("100%")
        },
    );
    sim.run(&mut r, 1);
    sim.step(&mut r);
    let deploys_before = sim
        .sent
        .iter()
        .filter(|s| s.1 == CommandKind::Deploy)
        .count();
    assert_eq!(deploys_before, 2, "two switching when the coordinator dies");
    // Restart: the head and node records as stored, read back.
    let head: Head =
        serde_json::from_slice(&serde_json::to_vec(r.head()).expect("json")).expect("head");
    let nodes: Vec<NodeProgress> = r
        .nodes()
        .iter()
        .map(|n| serde_json::from_slice(&serde_json::to_vec(n).expect("json")).expect("node"))
        .collect();
    let mut restarted = Rollout::from_parts(head, nodes);
    sim.step(&mut restarted);
    assert_eq!(
        sim.sent
            .iter()
            .filter(|s| s.1 == CommandKind::Deploy)
            .count(),
        deploys_before,
        "no new deploy while two are in flight"
    );
    sim.run(&mut restarted, 10);
    assert_eq!(restarted.status(), Status::Succeeded);
    for node in sim.nodes() {
        assert_eq!(sim.count(&node, CommandKind::Deploy), 1, "{node}");
        assert_eq!(sim.count(&node, CommandKind::Stage), 1, "{node}");
    }
}

#[test]
fn reconcile_adopts_a_stored_command_whose_record_was_lost_and_forgets_one_that_never_left() {
    let mut sim = Sim::new(2);
    let mut r = rollout(&sim, options("100%"));
    sim.run(&mut r, 1);
    r.pause("alice").expect("pauses");
    sim.step(&mut r);
    let (a, b) = (id("n0"), id("n1"));
    assert_eq!(r.node(&a).map(|n| n.phase), Some(NodePhase::Staged));
    // n0's deploy (seq 500) was stored but the record's write was lost.
    assert!(r.reconcile(
        &a,
        Some(Desired::Ours(CommandKind::Deploy, 500)),
        sim.fleet.get(&a),
        sim.now
    ));
    assert_eq!(
        r.node(&a).map(|n| (n.phase, n.deploy_seq)),
        Some((NodePhase::Switching, Some(500)))
    );
    // n1's record says stage seq N, the stored command is older: the stage never left.
    let stage = r.node(&b).and_then(|n| n.stage_seq).expect("staged");
    let mut fresh = rollout(&sim, options("100%"));
    fresh.head.waves[0].phase = WavePhase::Staging;
    fresh.sent(&b, CommandKind::Stage, stage);
    let i = fresh.index[&b];
    fresh.set(i, NodePhase::Staging, sim.now, None);
    assert!(fresh.reconcile(&b, Some(Desired::Other(3)), sim.fleet.get(&b), sim.now));
    assert_eq!(
        fresh.node(&b).map(|n| (n.phase, n.stage_seq)),
        Some((NodePhase::Pending, None))
    );
    // In agreement: nothing to do.
    assert!(!r.reconcile(
        &b,
        Some(Desired::Ours(CommandKind::Stage, stage)),
        sim.fleet.get(&b),
        sim.now
    ));
}

#[test]
fn no_deploy_goes_out_outside_the_switch_windows() {
    let mut sim = Sim::new(2);
    // T0 is 13:46 UTC; the window opens at 14:00.
    sim.now = 1_000_000 - 1_000_000 % 86_400 + 13 * 3600 + 46 * 60;
    let mut r = rollout(
        &sim,
        PlanOptions {
            windows: Some(vec!["14:00-15:00".parse().expect("window")]),
            ..options("100%")
        },
    );
    sim.run(&mut r, 5);
    assert!(
        sim.sent.iter().all(|s| s.1 == CommandKind::Stage),
        "staging is fine outside"
    );
    assert_eq!(r.head().waves[0].phase, WavePhase::Switching);
    sim.now += 14 * 60;
    sim.run(&mut r, 3);
    assert_eq!(r.status(), Status::Succeeded);
}

#[test]
fn a_node_that_appears_after_success_gets_the_fleet_target_once() {
    let mut sim = Sim::new(2);
    let mut r = rollout(&sim, options("100%"));
    sim.run(&mut r, 4);
    assert_eq!(r.status(), Status::Succeeded);
    let late = id("n9");
    let observed = Observed {
        online: true,
        last_seen: Some(sim.now),
        labels: [("region".to_owned(), "eu".to_owned())].into(),
        current: Some(web("1")),
        previous: None,
        staged: None,
        last_seq: 0,
        last_update: None,
    };
    sim.fleet.insert(late.clone(), observed.clone());
    let order = r.add_late(&late, &observed, sim.now).expect("a deploy");
    assert_eq!(order.kind, CommandKind::Deploy);
    sim.apply(
        &mut r,
        Step {
            orders: vec![order],
            log: Vec::new(),
        },
    );
    assert!(r.needs_tick(), "watches the late switch");
    assert!(
        r.add_late(&late, &observed, sim.now).is_none(),
        "never twice"
    );
    sim.run(&mut r, 2);
    assert_eq!(
        r.node(&late).map(|n| (n.phase, n.wave)),
        Some((NodePhase::Switched, None))
    );
    assert_eq!(r.late_nodes().len(), 1);
    assert!(!r.needs_tick());
}
