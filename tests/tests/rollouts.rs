//! Staged rollouts across ten real agents: waves stage then switch in order and every node
//! switches once (the deploy log and the nodes' own events agree); a bad release stops after
//! its first wave with its canary back on the old version; a coordinator SIGKILLed mid-wave
//! finishes the rollout after a restart without switching any node twice; pause, resume,
//! abort and rollback each change the fleet as documented, and an operator's `node
//! rollback` during a rollout is not undone by it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use protocol::NodeId;
use serde_json::Value;
use system_tests::{release, write_tree, Agent, AgentOptions, AppRelease, Broker, Fleet};

const NODES: [&str; 10] = ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9"];
/// A whole rollout of a small release to ten local agents.
const ROLLOUT: Duration = Duration::from_secs(90);
/// Quiet time after which no more node events are expected.
const QUIET: Duration = Duration::from_secs(1);

/// The canary gate for files-only test releases. Only host metrics exist, and every agent
/// here shares one host, so the comparison says nothing: the gate judges them over a short
/// window and passes whatever the score, so these tests are about waves and controls (the
/// judgment itself has its own tests). One sample a second (`metrics_interval`) fills the
/// window past `min_samples`; an agent without telemetry makes the gate skip, which passes too.
const TEST_CANARY: &str = "[canary]\nwindow_secs = 5\nwarmup_secs = 0\nmin_samples = 3\npass_score = 0.0\nmarginal_score = 0.0\n";

fn fleet_of_ten(broker: Broker, options: AgentOptions) -> Result<(Fleet, Vec<Agent>)> {
    let fleet = Fleet::start(broker)?;
    let options = AgentOptions {
        metrics_interval: Some("1s".into()),
        ..options
    };
    let agents = fleet.agents_with(NODES, &options)?.to_vec();
    Ok((fleet, agents))
}

/// A files-only release `web@VERSION` of `bytes` bytes, different from every other version.
fn publish_files(fleet: &Fleet, version: &str, bytes: u64) -> Result<PathBuf> {
    let src = fleet.scratch(&format!("web-{version}"))?;
    let seed: u64 = version.parse()?;
    write_tree(&src, seed, bytes)?;
    std::fs::write(src.join("release.toml"), TEST_CANARY)?;
    fleet.publish(&src, "web", version)?;
    Ok(src)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn actions(log: &[Value]) -> Vec<String> {
    log.iter()
        .map(|e| e["action"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The nodes of each wave as `rollout start --json` assigned them.
fn waves(started: &Value) -> Vec<BTreeSet<String>> {
    started["waves"]
        .as_array()
        .map(|w| w.iter().map(|n| strings(n).into_iter().collect()).collect())
        .unwrap_or_default()
}

fn agent<'a>(agents: &'a [Agent], node: &str) -> Result<&'a Agent> {
    agents
        .iter()
        .find(|a| a.node().as_str() == node)
        .with_context(|| format!("no agent {node}"))
}

/// Rolls `web@1` out to every node with the default plan (one wave of 100 %).
fn everyone_on_v1(fleet: &Fleet, bytes: u64) -> Result<()> {
    publish_files(fleet, "1", bytes)?;
    fleet.rollout("web", "1")?;
    fleet.wait_all_on("web", "1", ROLLOUT)?;
    let first = fleet.wait_rollout_ended(1, ROLLOUT)?;
    ensure!(
        first["status"] == "succeeded",
        "the first rollout: {first:#}"
    );
    ensure!(first["waves"].as_array().map(Vec::len) == Some(1));
    Ok(())
}

#[test]
fn ten_nodes_in_waves_of_1_30pct_and_100pct_stage_then_switch_in_order_each_node_once() -> Result<()>
{
    let (fleet, _agents) = fleet_of_ten(Broker::Embedded, AgentOptions::default())?;
    everyone_on_v1(&fleet, 200_000)?;
    publish_files(&fleet, "2", 200_000)?;
    let web2 = release("web", "2")?;

    let mut events = fleet.watch_events()?;
    let (id, started) =
        fleet.rollout_with("web", "2", &["--waves", "1,30%,100%", "--bake", "2s"])?;
    let waves = waves(&started);
    let sizes: Vec<usize> = waves.iter().map(BTreeSet::len).collect();
    assert_eq!(sizes, [1, 2, 7], "{started:#}");

    // Piped, --watch prints one line per change and exits 0 once the rollout succeeded.
    let watched = fleet.cli(&["rollout", "status", &id.to_string(), "--watch"])?;
    let text = String::from_utf8_lossy(&watched.stdout);
    let last = text.lines().last().unwrap_or_default();
    assert!(last.contains(&format!("rollout {id} succeeded")), "{text}");
    for wave in 1..=3 {
        assert!(
            text.contains(&format!("wave {wave}/3 ")),
            "no progress line for wave {wave}:\n{text}"
        );
    }
    fleet.wait_all_on("web", "2", ROLLOUT)?;

    // The deploy log: who started it, then each wave staged, switched and gated in order.
    let log = fleet.rollout_log(id)?;
    let per_wave = ["wave staged", "wave switched", "gate passed"];
    let mut expected = vec!["rollout start".to_owned()];
    for _ in 0..3 {
        expected.extend(per_wave.iter().map(|a| (*a).to_owned()));
    }
    expected.push("rollout done".to_owned());
    assert_eq!(actions(&log), expected, "{log:#?}");
    assert_eq!(log[0]["who"], "admin");
    assert!(
        log[1..].iter().all(|e| e["who"] == "coordinator"),
        "{log:#?}"
    );
    let switched: Vec<BTreeSet<String>> = log
        .iter()
        .filter(|e| e["action"] == "wave switched")
        .map(|e| strings(&e["nodes"]).into_iter().collect())
        .collect();
    assert_eq!(switched, waves, "each wave switched exactly its nodes");
    assert!(
        log[3]["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("canary")),
        "the first wave's gates include the canary: {:#}",
        log[3]
    );

    // The canary report shows the gate's stored judgment: the canary against the rest.
    let out = fleet.cli(&["canary", "report", &id.to_string(), "--json"])?;
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["live"], false, "{report:#}");
    // Skipped only if the agents sent no metrics at all (see TEST_CANARY).
    let outcome = report["outcome"].as_str().unwrap_or_default().to_owned();
    assert!(matches!(outcome.as_str(), "pass" | "skipped"), "{report:#}");
    let canary: BTreeSet<String> = strings(&report["canary_nodes"]).into_iter().collect();
    assert_eq!(canary, waves[0], "{report:#}");
    assert_eq!(
        strings(&report["baseline_nodes"]).len(),
        9,
        "the nodes still on web@1: {report:#}"
    );
    let text = fleet.cli(&["canary", "report", &id.to_string()])?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with(&format!(
            "rollout {id} web@2 canary: {}",
            outcome.to_uppercase()
        )),
        "{text}"
    );

    // The nodes' own events: each switched to web@2 once, staged before it switched, and no
    // wave began staging before the wave before it had switched.
    events.drain(QUIET)?;
    let switches = events.switches_to(&web2);
    assert_eq!(switches.len(), 10, "{switches:?}");
    assert!(switches.values().all(|&n| n == 1), "{switches:?}");
    let staging = events.first(&web2, "staging");
    let switched_at = events.first(&web2, "switched");
    for node in NODES {
        let key = NodeId::new(node)?;
        ensure!(
            staging.contains_key(&key) && staging.get(&key) < switched_at.get(&key),
            "{node} did not stage before it switched: {staging:?} {switched_at:?}"
        );
    }
    for pair in waves.windows(2) {
        let last_switch = pair[0]
            .iter()
            .filter_map(|n| switched_at.get(&NodeId::new(n.as_str()).ok()?))
            .max();
        let first_stage = pair[1]
            .iter()
            .filter_map(|n| staging.get(&NodeId::new(n.as_str()).ok()?))
            .min();
        assert!(
            last_switch < first_stage,
            "a wave began staging (event {first_stage:?}) before the one before it had switched (event {last_switch:?})"
        );
    }
    Ok(())
}

#[test]
fn a_release_whose_canary_fails_stops_after_the_first_wave_and_the_canary_goes_back() -> Result<()>
{
    let (fleet, agents) = fleet_of_ten(Broker::Embedded, AgentOptions::default())?;
    // The sample app on every node, traffic moved by a hook (no shared front-door port).
    let door = "127.0.0.1:9".parse()?;
    let app = |version: &str| {
        AppRelease::new(version, door)
            .switch_hook(&["/bin/sh", "-c", "exit 0"])
            // Wide enough that web@2's crash 2 s after it starts falls inside it even on a
            // loaded machine (a full CI run once timed out with the canary still switched;
            // likeliest, its 4 s probation ended before the crash).
            .probation_secs(8)
    };
    fleet.publish_app("web", &app("1"))?;
    fleet.rollout("web", "1")?;
    fleet.wait_all_on("web", "1", ROLLOUT)?;
    fleet.wait_rollout_ended(1, ROLLOUT)?;

    // web@2 passes its health check, switches, then dies in its probation: the agent goes
    // back by itself, the rollout counts the canary failed and stops.
    fleet.publish_app("web", &app("2").env("APP_CRASH_AFTER_SECS", "2"))?;
    let (id, started) =
        fleet.rollout_with("web", "2", &["--waves", "1,30%,100%", "--bake", "10s"])?;
    let waves = waves(&started);
    let canary = waves[0].iter().next().context("a canary")?.clone();
    let status = fleet.wait_rollout_ended(id, ROLLOUT)?;
    assert_eq!(status["status"], "rolled_back", "{status:#}");
    let reason = status["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("failure threshold: 1 node failed, over the limit of 0"),
        "{reason}"
    );
    assert!(reason.contains(&canary), "{reason}");
    assert!(!reason.contains('\n'), "one line: {reason}");
    let node = status["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node"] == canary.as_str()))
        .context("the canary's progress")?;
    assert_eq!(node["phase"], "failed", "{node:#}");

    // The canary is back on web@1; no later wave was ever sent anything.
    let canary_agent = agent(&agents, &canary)?;
    fleet.wait_until(ROLLOUT, "the canary to run web@1 again", || {
        Ok(canary_agent.current_version()?.as_deref() == Some("1"))
    })?;
    for wave in &status["waves"].as_array().context("waves")?[1..] {
        assert_eq!(wave["phase"], "pending", "{wave:#}");
        assert_eq!(wave["counts"]["pending"], wave["nodes"], "{wave:#}");
    }
    for a in &agents {
        if a.node().as_str() != canary {
            let state = a.status()?;
            assert_eq!(a.current_version()?.as_deref(), Some("1"), "{}", a.node());
            assert!(
                state.staged.is_none(),
                "{} staged {:?}",
                a.node(),
                state.staged
            );
        }
    }
    let log = fleet.rollout_log(id)?;
    let failed = log
        .iter()
        .find(|e| e["action"] == "gate failed")
        .context("a gate-failed entry")?;
    assert!(
        failed["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("failed: failure threshold")),
        "{failed:#}"
    );
    let actions = actions(&log);
    assert_eq!(
        actions.iter().filter(|a| *a == "wave staged").count(),
        1,
        "only the first wave staged: {actions:?}"
    );
    assert_eq!(
        actions.last().map(String::as_str),
        Some("gate failed"),
        "{actions:?}"
    );
    Ok(())
}

#[test]
fn a_coordinator_killed_mid_wave_finishes_the_rollout_after_a_restart_switching_no_node_twice(
) -> Result<()> {
    // Mosquitto outlives the coordinator, so the nodes' events are all seen.
    let (fleet, _agents) = fleet_of_ten(Broker::Mosquitto, AgentOptions::default())?;
    everyone_on_v1(&fleet, 200_000)?;
    publish_files(&fleet, "2", 200_000)?;
    let web2 = release("web", "2")?;
    let mut events = fleet.watch_events()?;
    let (id, started) = fleet.rollout_with(
        "web",
        "2",
        &["--waves", "2,100%", "--bake", "1s", "--max-parallel", "1"],
    )?;
    let waves = waves(&started);
    fleet.wait_rollout(id, ROLLOUT, "wave 2 to be half switched", |s| {
        s["waves"][1]["counts"]["switched"]
            .as_u64()
            .is_some_and(|n| (2..8).contains(&n))
    })?;
    fleet.kill_coordinator();
    fleet.restart_coordinator()?;

    let status = fleet.wait_rollout_ended(id, ROLLOUT)?;
    assert_eq!(status["status"], "succeeded", "{status:#}");
    fleet.wait_all_on("web", "2", ROLLOUT)?;
    events.drain(QUIET)?;
    let switches = events.switches_to(&web2);
    assert_eq!(switches.len(), 10, "{switches:?}");
    assert!(
        switches.values().all(|&n| n == 1),
        "a node switched twice: {switches:?}"
    );
    let log = fleet.rollout_log(id)?;
    let switched: Vec<BTreeSet<String>> = log
        .iter()
        .filter(|e| e["action"] == "wave switched")
        .map(|e| strings(&e["nodes"]).into_iter().collect())
        .collect();
    assert_eq!(switched, waves, "{log:#?}");
    assert_eq!(
        actions(&log).last().map(String::as_str),
        Some("rollout done")
    );
    Ok(())
}

#[test]
fn pause_resume_abort_and_rollback_each_change_the_fleet_as_documented() -> Result<()> {
    // Staging takes a couple of seconds (1 MB/s), time enough to pause before it ends.
    let (fleet, agents) = fleet_of_ten(
        Broker::Embedded,
        AgentOptions {
            max_fetch_rate: Some(1_000_000),
            ..AgentOptions::default()
        },
    )?;
    everyone_on_v1(&fleet, 100_000)?;

    // Pause: the canary stages, but no deploy goes out while paused.
    publish_files(&fleet, "2", 2_500_000)?;
    let (id, started) = fleet.rollout_with("web", "2", &["--waves", "1,100%", "--bake", "1s"])?;
    fleet.cli(&["rollout", "pause", &id.to_string()])?;
    let canary = waves(&started)[0]
        .iter()
        .next()
        .context("a canary")?
        .clone();
    let paused = fleet.wait_rollout(id, ROLLOUT, "the paused canary to be staged", |s| {
        s["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == canary.as_str()))
            .is_some_and(|n| n["phase"] == "staged")
    })?;
    // Observed staged by a step that sent nothing: running, the same step would have deployed.
    assert_eq!(paused["status"], "paused", "{paused:#}");
    assert_eq!(paused["waves"][0]["phase"], "staging", "{paused:#}");
    assert_eq!(
        agent(&agents, &canary)?.current_version()?.as_deref(),
        Some("1")
    );
    fleet.cli(&["rollout", "resume", &id.to_string()])?;
    let done = fleet.wait_rollout_ended(id, ROLLOUT)?;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    fleet.wait_all_on("web", "2", ROLLOUT)?;

    // Abort mid-bake: the canary keeps web@3, every other node keeps web@2, nothing more.
    publish_files(&fleet, "3", 100_000)?;
    let (id, started) = fleet.rollout_with("web", "3", &["--waves", "1,100%", "--bake", "1h"])?;
    let canary = waves(&started)[0]
        .iter()
        .next()
        .context("a canary")?
        .clone();
    fleet.wait_rollout(id, ROLLOUT, "the first wave to bake", |s| {
        s["waves"][0]["phase"] == "baking"
    })?;
    let aborted = fleet.cli(&["rollout", "abort", &id.to_string(), "--json"])?;
    let aborted: Value = serde_json::from_slice(&aborted.stdout)?;
    assert_eq!(aborted["status"], "aborted", "{aborted:#}");
    assert_eq!(aborted["waves"][1]["counts"]["pending"], 9, "{aborted:#}");
    for a in &agents {
        let want = if a.node().as_str() == canary {
            "3"
        } else {
            "2"
        };
        assert_eq!(a.current_version()?.as_deref(), Some(want), "{}", a.node());
    }
    let log = fleet.rollout_log(id)?;
    let abort = log.last().context("an entry")?;
    assert_eq!(
        (abort["action"].as_str(), abort["who"].as_str()),
        (Some("rollout abort"), Some("admin")),
        "{log:#?}"
    );

    // Rollback: an operator sends one first-wave node back by hand during the bake; the
    // rollout's rollback then sends back the other two, and leaves that one alone.
    publish_files(&fleet, "4", 100_000)?;
    let before: BTreeMap<String, Option<String>> = agents
        .iter()
        .map(|a| Ok((a.node().to_string(), a.current_version()?)))
        .collect::<Result<_>>()?;
    let (id, started) = fleet.rollout_with("web", "4", &["--waves", "3,100%", "--bake", "1h"])?;
    let first: Vec<String> = waves(&started)[0].iter().cloned().collect();
    fleet.wait_rollout(id, ROLLOUT, "the first wave to bake", |s| {
        s["waves"][0]["phase"] == "baking"
    })?;
    let by_hand = first[0].clone();
    fleet.cli(&["node", "rollback", &by_hand])?;
    let hand_agent = agent(&agents, &by_hand)?;
    fleet.wait_until(
        ROLLOUT,
        "the node rolled back by hand to leave web@4",
        || Ok(hand_agent.current_version()? == before[&by_hand]),
    )?;
    fleet.wait_rollout(id, ROLLOUT, "the rollout to leave that node alone", |s| {
        s["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == by_hand.as_str()))
            .is_some_and(|n| n["phase"] == "overridden")
    })?;
    let rolled = fleet.cli(&["rollout", "rollback", &id.to_string(), "--json"])?;
    let rolled: Value = serde_json::from_slice(&rolled.stdout)?;
    assert_eq!(rolled["status"], "rolled_back", "{rolled:#}");
    for node in &first {
        let a = agent(&agents, node)?;
        fleet.wait_until(
            ROLLOUT,
            format_args!("{node} to be back on its version"),
            || Ok(a.current_version()? == before[node]),
        )?;
    }
    let status = fleet.wait_rollout(id, ROLLOUT, "the rollbacks to be reported", |s| {
        s["total"]["rolled_back"] == 2
    })?;
    for a in &agents {
        assert_eq!(
            a.current_version()?,
            before[a.node().as_str()],
            "{}",
            a.node()
        );
    }
    let log = fleet.rollout_log(id)?;
    let sent = log
        .iter()
        .find(|e| e["action"] == "rollback sent")
        .context("a rollback-sent entry")?;
    let sent: BTreeSet<String> = strings(&sent["nodes"]).into_iter().collect();
    let expected: BTreeSet<String> = first[1..].iter().cloned().collect();
    assert_eq!(sent, expected, "{status:#}");
    assert!(
        actions(&log).contains(&"rollout rollback".to_owned()),
        "{log:#?}"
    );
    Ok(())
}
