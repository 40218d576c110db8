//! Red/black on the node: a release with a `[run]` section is started beside the version
//! that serves, takes the traffic through the agent's front door only once healthy, is
//! watched through a probation, and the old version is kept warm for a grace period. Seen
//! from outside, with the real agent, coordinator and `sample-app`:
//!
//! - a switch and an operator rollback (of a warm or of a stopped version) fail no request
//!   of clients hammering the front door, and each client sees the versions change once;
//! - a release that crashes at start or never becomes healthy fails the update and the old
//!   version keeps serving; one that crashes in probation is rolled back by the node;
//! - a rollback with no previous version is refused, by the coordinator and by the node;
//! - an agent killed at any step of a switch or a rollback (`FLEET_AGENT_CRASH_AT`) ends,
//!   once restarted, serving a complete version, with no app process of its former life
//!   left running.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use protocol::messages::{EventKind, NodeState, Outcome, UpdateReport};
use protocol::{Envelope, NodeTopic};
use system_tests::fleet::node_entry;
use system_tests::process::{free_addr, pids_with_cmdline_containing};
use system_tests::sign::rollback_command;
use system_tests::{release, version_at, wait_until, Agent, AppRelease, Broker, Fleet, Traffic};

const APP: &str = "web";
/// A first deploy moves the whole sample-app binary (tens of MB in a debug build).
const DEPLOY: Duration = Duration::from_secs(120);
/// A switch, a rollback or a restart of an agent, once the bytes are on the node.
const SWITCH: Duration = Duration::from_secs(60);
/// Concurrent clients of the front door while a switch or a rollback happens.
const CLIENTS: usize = 4;
/// Requests each client completes before and after a change, so each saw both sides.
const SETTLE_REQUESTS: u64 = 20;

/// A fleet with one agent, `n1`, and the front-door address its app releases listen on.
struct OneNode {
    fleet: Fleet,
    agent: Agent,
    door: SocketAddr,
}

impl OneNode {
    fn start() -> Result<OneNode> {
        let fleet = Fleet::start(Broker::Embedded)?;
        let [agent] = fleet.agents(["n1"])?;
        Ok(OneNode {
            fleet,
            agent,
            door: free_addr()?,
        })
    }

    /// Version `version` of the app, behind this node's front door.
    fn release(&self, version: &str) -> AppRelease {
        AppRelease::new(version, self.door)
    }

    /// Publishes and rolls out `release`, and waits until the node has finished updating to
    /// it, whatever the outcome.
    fn deploy(&self, release: &AppRelease) -> Result<UpdateReport> {
        self.fleet.deploy_app(APP, release)?;
        self.fleet
            .wait_update(&self.agent, APP, release.version(), DEPLOY)
    }

    /// Deploys `release` and checks it switched and answers through the front door.
    fn deploy_ok(&self, release: &AppRelease) -> Result<()> {
        let report = self.deploy(release)?;
        ensure!(
            report.outcome == Outcome::Switched,
            "deploying {APP}@{} ended {:?}\n{}",
            release.version(),
            report.outcome,
            self.fleet.report()
        );
        self.wait_serving(release.version())
    }

    /// Waits until `GET /version` through the front door answers `version`.
    fn wait_serving(&self, version: &str) -> Result<()> {
        self.fleet.wait_until(
            SWITCH,
            format_args!("the front door {} to answer version {version}", self.door),
            || Ok(version_at(self.door)? == version),
        )
    }

    /// Waits until the node's last update satisfies `done`, and returns it.
    fn wait_last_update(
        &self,
        what: &str,
        done: impl Fn(&UpdateReport) -> bool,
    ) -> Result<UpdateReport> {
        self.fleet.wait_for(SWITCH, what, || {
            Ok(self.agent.status()?.last_update.filter(|u| done(u)))
        })
    }

    /// `coordinator node rollback n1`.
    fn operator_rollback(&self) -> Result<()> {
        self.fleet
            .cli(&["node", "rollback", self.agent.node().as_str()])
            .map(drop)
    }

    /// The app processes of this node: those running from any of its slots.
    fn app_pids(&self) -> Result<Vec<u32>> {
        let slots = self.agent.data_dir().join("slots");
        pids_with_cmdline_containing(&format!("{}/", slots.display()))
    }
}

/// The app processes running from the slot directory `slot`.
fn pids_in(slot: &Path) -> Result<Vec<u32>> {
    pids_with_cmdline_containing(&format!("{}/", slot.display()))
}

fn current_version(state: &NodeState) -> Option<String> {
    state
        .current
        .as_ref()
        .map(|s| s.release.version.to_string())
}

fn previous_version(state: &NodeState) -> Option<String> {
    state
        .previous
        .as_ref()
        .map(|s| s.release.version.to_string())
}

#[test]
fn a_new_version_takes_the_traffic_without_a_failed_request_and_the_old_one_stops_after_its_grace(
) -> Result<()> {
    let n = OneNode::start()?;
    n.deploy_ok(&n.release("1"))?;
    let v1_slot = n.agent.current_slot()?;
    ensure!(
        pids_in(&v1_slot)?.len() == 1,
        "version 1 should run as one process"
    );

    let traffic = Traffic::start(n.door, "/version", CLIENTS);
    traffic.wait_for_requests(SETTLE_REQUESTS, SWITCH)?;
    let (probation, grace) = (2, 2);
    let v2 = n.release("2").probation_secs(probation).grace_secs(grace);
    n.fleet.deploy_app(APP, &v2)?;
    let report = n.fleet.wait_update(&n.agent, APP, "2", DEPLOY)?;
    let switched_seen = Instant::now();
    ensure!(
        report.outcome == Outcome::Switched,
        "the switch to version 2 ended {:?}",
        report.outcome
    );
    // Probation and grace have just begun: the old version is still there, warm.
    ensure!(
        !pids_in(&v1_slot)?.is_empty(),
        "version 1 stopped at the switch instead of being kept warm through probation and \
         grace{}",
        n.fleet.report()
    );
    n.wait_serving("2")?;
    traffic.wait_for_requests(SETTLE_REQUESTS, SWITCH)?;

    n.fleet.wait_until(
        SWITCH,
        "the old version's process to stop after probation and grace",
        || Ok(pids_in(&v1_slot)?.is_empty()),
    )?;
    let kept_warm = switched_seen.elapsed();
    // Traffic goes on after the old version stopped.
    traffic.wait_for_requests(SETTLE_REQUESTS, SWITCH)?;
    let traffic = traffic.stop()?;
    eprintln!(
        "switch 1 → 2: {} requests ok, {} failed; old version stopped {kept_warm:.1?} after the \
         switch was seen; switch_ms {}",
        traffic.ok(),
        traffic.failed(),
        report.switch_ms
    );
    traffic.assert_clean(&["1", "2"])?;
    // Seen late by up to a poll, so allow a second less than probation + grace.
    ensure!(
        kept_warm + Duration::from_secs(1) >= Duration::from_secs(u64::from(probation + grace)),
        "the old version stopped {kept_warm:.1?} after the switch, before probation \
         ({probation} s) and grace ({grace} s) were over"
    );

    let state = n.agent.status()?;
    ensure!(
        current_version(&state).as_deref() == Some("2")
            && previous_version(&state).as_deref() == Some("1"),
        "after the switch: current {:?}, previous {:?}",
        current_version(&state),
        previous_version(&state)
    );
    ensure!(
        n.agent.previous_slot()? == v1_slot && v1_slot.join("bin/sample-app").is_file(),
        "the previous slot {} was not kept",
        v1_slot.display()
    );
    let v2_slot = n.agent.current_slot()?;
    let running = n.app_pids()?;
    ensure!(
        running.len() == 1 && running == pids_in(&v2_slot)?,
        "after the grace only version 2 should run, one process; running: {running:?}"
    );
    Ok(())
}

#[test]
fn an_operator_rollback_returns_to_a_warm_or_a_stopped_previous_version_without_a_failed_request(
) -> Result<()> {
    let n = OneNode::start()?;
    // A short grace for version 1: once traffic is back on it, the healthy version 2 it
    // left stays warm only a second, so the second rollback has to start it again.
    n.deploy_ok(&n.release("1").grace_secs(1))?;
    // A long grace: version 1 is still warm when the operator rolls back.
    n.deploy_ok(&n.release("2").grace_secs(300))?;
    let v2_slot = n.agent.current_slot()?;

    // Back to the warm version 1: a flip of the front door.
    let traffic = Traffic::start(n.door, "/version", CLIENTS);
    traffic.wait_for_requests(SETTLE_REQUESTS, SWITCH)?;
    let asked = Instant::now();
    n.operator_rollback()?;
    n.wait_serving("1")?;
    let took = asked.elapsed();
    let report = n.wait_last_update("the rollback to version 1 to be reported", |u| {
        matches!(u.outcome, Outcome::RolledBack { .. }) && u.release.version.as_str() == "1"
    })?;
    traffic.wait_for_requests(SETTLE_REQUESTS, SWITCH)?;
    let traffic = traffic.stop()?;
    eprintln!(
        "rollback 2 → 1 (warm): version 1 answered {took:.1?} after the CLI was called; \
         switch_ms {}; {} requests ok, {} failed",
        report.switch_ms,
        traffic.ok(),
        traffic.failed()
    );
    traffic.assert_clean(&["2", "1"])?;
    ensure!(
        took < Duration::from_secs(10),
        "version 1 answered only {took:.1?} after the rollback was asked"
    );
    let state = n.agent.status()?;
    ensure!(
        current_version(&state).as_deref() == Some("1")
            && previous_version(&state).as_deref() == Some("2"),
        "after the rollback: current {:?}, previous {:?}",
        current_version(&state),
        previous_version(&state)
    );
    n.fleet.wait_until(
        SWITCH,
        "the version rolled back from to stop after its grace",
        || Ok(pids_in(&v2_slot)?.is_empty()),
    )?;
    check_coordinator_sees_rollback(&n, "1")?;

    // Back to version 2, which no longer runs: started from its slot, then the flip.
    let traffic = Traffic::start(n.door, "/version", CLIENTS);
    traffic.wait_for_requests(SETTLE_REQUESTS, SWITCH)?;
    n.operator_rollback()?;
    n.wait_serving("2")?;
    let report = n.wait_last_update("the rollback to version 2 to be reported", |u| {
        matches!(u.outcome, Outcome::RolledBack { .. }) && u.release.version.as_str() == "2"
    })?;
    traffic.wait_for_requests(SETTLE_REQUESTS, SWITCH)?;
    let traffic = traffic.stop()?;
    eprintln!(
        "rollback 1 → 2 (cold start): switch_ms {}; {} requests ok, {} failed",
        report.switch_ms,
        traffic.ok(),
        traffic.failed()
    );
    traffic.assert_clean(&["1", "2"])?;
    ensure!(
        report.switch_ms > 0,
        "a rollback that starts the version reports switch_ms 0"
    );
    check_coordinator_sees_rollback(&n, "2")?;
    Ok(())
}

/// `coordinator nodes --json` shows n1's last update as a rollback to `version`, timed.
fn check_coordinator_sees_rollback(n: &OneNode, version: &str) -> Result<()> {
    let want = release(APP, version)?;
    let want_json = serde_json::to_value(&want)?;
    n.fleet.wait_until(
        SWITCH,
        format_args!("`coordinator nodes --json` to show the rollback to {want}"),
        || {
            let nodes = n.fleet.nodes()?;
            let update = node_entry(&nodes, "n1")
                .and_then(|e| e.get("last_update"))
                .context("n1 has no last_update in `nodes --json`")?;
            let rolled_back = update["outcome"]["result"] == "rolled_back"
                && update["outcome"]["reason"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty());
            let timed = update["switch_ms"].is_u64();
            Ok(rolled_back && timed && update["release"] == want_json)
        },
    )
}

#[test]
fn a_rollback_with_no_previous_version_is_refused_by_the_coordinator_and_by_the_node() -> Result<()>
{
    let n = OneNode::start()?;
    n.deploy_ok(&n.release("1"))?;
    let before = n.agent.status()?;
    let pids = n.app_pids()?;

    let out = n.fleet.try_cli(&["node", "rollback", "n1"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("no previous version"),
        "`coordinator node rollback n1` with no previous version: {} {stderr}",
        out.status
    );

    // Sent anyway, signed (as by a coordinator whose inventory is out of date).
    let mut client = n.fleet.mqtt_client()?;
    client.subscribe(&n.fleet.topics().node(n.agent.node(), NodeTopic::Events))?;
    let seq = before.last_seq + 1;
    let command = Envelope::seal(
        &rollback_command(n.agent.node(), seq),
        &n.fleet.signing_key()?,
    );
    let topic = n.fleet.topics().node(n.agent.node(), NodeTopic::Command);
    client.publish(&topic, command.to_bytes(), true)?;
    let event = client
        .expect_event(
            SWITCH,
            "a rejected rollback",
            |e| matches!(&e.kind, EventKind::Rejected { what, .. } if what == "rollback"),
        )
        .with_context(|| n.fleet.report())?;
    let EventKind::Rejected { reason, .. } = &event.kind else {
        unreachable!("filtered above")
    };
    ensure!(
        reason.contains("no previous version"),
        "the node's refusal does not say why: {reason}"
    );

    n.fleet
        .wait_until(SWITCH, "the node to report the rollback's seq", || {
            Ok(n.agent.status()?.last_seq == seq)
        })?;
    let after = n.agent.status()?;
    ensure!(
        after.current == before.current && after.previous.is_none(),
        "the refused rollback changed the node: current {:?}, previous {:?}",
        after.current,
        after.previous
    );
    ensure!(
        after.last_update == before.last_update,
        "the refused rollback changed the last update to {:?}",
        after.last_update
    );
    ensure!(version_at(n.door)? == "1", "version 1 no longer answers");
    ensure!(
        n.app_pids()? == pids,
        "the app was restarted by a refused rollback"
    );
    n.fleet.wait_until(
        SWITCH,
        "`coordinator nodes --json` to show the rejected rollback as n1's last event",
        || {
            let nodes = n.fleet.nodes()?;
            let event = node_entry(&nodes, "n1").and_then(|e| e.get("last_event"));
            Ok(event.is_some_and(|e| e["event"] == "rejected" && e["what"] == "rollback"))
        },
    )
}

#[test]
fn a_release_that_does_not_start_or_stay_healthy_leaves_the_node_on_the_version_that_works(
) -> Result<()> {
    let n = OneNode::start()?;
    n.deploy_ok(&n.release("1"))?;
    let v1_pids = n.app_pids()?;
    ensure!(v1_pids.len() == 1, "version 1 runs as {v1_pids:?}");

    // Crashes at start.
    let report = n.deploy(&n.release("2").env("APP_CRASH_AT_START", "true"))?;
    expect_failed(&n, &report, "2", &v1_pids)?;

    // Never healthy; a short start timeout keeps the test short.
    let report = n.deploy(
        &n.release("3")
            .env("APP_FAIL_HEALTH", "true")
            .start_timeout_secs(3),
    )?;
    expect_failed(&n, &report, "3", &v1_pids)?;

    // Healthy at the switch, crashes one second into a three-second probation.
    let v4 = n
        .release("4")
        .env("APP_CRASH_AFTER_SECS", "1")
        .probation_secs(3)
        .grace_secs(2);
    n.fleet.deploy_app(APP, &v4)?;
    let report = n.wait_last_update("the node to roll back from version 4", |u| {
        matches!(u.outcome, Outcome::RolledBack { .. })
    })?;
    eprintln!(
        "crash in probation: {:?}, switch_ms {}, app output:\n  {}",
        report.outcome,
        report.switch_ms,
        report.app_output.join("\n  ")
    );
    let Outcome::RolledBack { reason } = &report.outcome else {
        unreachable!("filtered above")
    };
    ensure!(
        reason.contains("web@4"),
        "the rollback's reason does not name the failed version: {reason}"
    );
    ensure!(
        report.release == release(APP, "1")?,
        "rolled back to {}, not to version 1",
        report.release
    );
    ensure!(
        !report.app_output.is_empty(),
        "the rollback carries none of the app's output"
    );
    n.wait_serving("1")?;
    let state = n.agent.status()?;
    ensure!(
        current_version(&state).as_deref() == Some("1")
            && previous_version(&state).as_deref() == Some("4"),
        "after the automatic rollback: current {:?}, previous {:?}",
        current_version(&state),
        previous_version(&state)
    );
    // The old version was kept warm through the probation: the same process serves again.
    n.fleet.wait_until(
        SWITCH,
        "version 4's process to be stopped, leaving version 1's",
        || Ok(n.app_pids()? == v1_pids),
    )?;
    Ok(())
}

/// `report` says the update to `version` failed with a reason and the app's output; the
/// node still runs version 1, as the same process `v1_pids`, and nothing else.
fn expect_failed(n: &OneNode, report: &UpdateReport, version: &str, v1_pids: &[u32]) -> Result<()> {
    eprintln!(
        "version {version}: {:?}, app output:\n  {}",
        report.outcome,
        report.app_output.join("\n  ")
    );
    let Outcome::Failed { reason } = &report.outcome else {
        bail!(
            "the update to version {version} ended {:?}, not failed{}",
            report.outcome,
            n.fleet.report()
        );
    };
    ensure!(
        !reason.is_empty(),
        "version {version} failed with no reason"
    );
    ensure!(
        !report.app_output.is_empty(),
        "the failure of version {version} carries none of the app's output"
    );
    ensure!(
        version_at(n.door)? == "1",
        "version 1 does not answer after version {version} failed"
    );
    let state = n.agent.status()?;
    ensure!(
        current_version(&state).as_deref() == Some("1") && state.staged.is_none(),
        "after version {version} failed: current {:?}, staged {:?}",
        current_version(&state),
        state.staged
    );
    n.fleet.wait_until(
        SWITCH,
        format_args!("only version 1's process to run after version {version} failed"),
        || Ok(n.app_pids()? == v1_pids),
    )
}

/// The environment variable of the agent's fault injection (`agent/src/fault.rs`).
const CRASH_AT: &str = "FLEET_AGENT_CRASH_AT";
/// How long a restarted agent that already serves may take to have stopped the app
/// processes its killed predecessor left (it does so before it starts anything).
const LEFTOVERS: Duration = Duration::from_secs(10);

#[test]
fn an_agent_killed_at_any_step_of_a_switch_or_a_rollback_converges_when_restarted() -> Result<()> {
    let n = OneNode::start()?;
    let started = Instant::now();
    let quick = |version: &str| n.release(version).probation_secs(1).grace_secs(1);
    n.deploy_ok(&quick("1"))?;
    wait_one_process(&n)?;

    let mut version = 1;
    for point in ["accepted", "staged", "started", "flipped", "switched"] {
        version += 1;
        let want = version.to_string();
        let previous = n.agent.current_slot()?;
        crash_at(&n, point, &want, || {
            n.fleet.deploy_app(APP, &quick(&want)).map(drop)
        })?;
        converged(&n, &want, &previous)?;
        let last = n.agent.status()?.last_update;
        eprintln!(
            "{point}: converged on version {want} ({:.1?} in); last update: {:?}",
            started.elapsed(),
            last.map(|u| (u.release.to_string(), u.outcome))
        );
    }
    for point in ["rollback-saved", "rolled-back"] {
        let state = n.agent.status()?;
        let want = previous_version(&state).context("no previous version to roll back to")?;
        let previous = n.agent.current_slot()?;
        crash_at(&n, point, &want, || n.operator_rollback())?;
        converged(&n, &want, &previous)?;
        let last = n.agent.status()?.last_update;
        eprintln!(
            "{point}: converged on version {want} ({:.1?} in); last update: {:?}",
            started.elapsed(),
            last.map(|u| (u.release.to_string(), u.outcome))
        );
    }
    // A last outright kill: whatever runs now must be known to, and stopped by, the next
    // agent.
    let current = current_version(&n.agent.status()?).context("no current version")?;
    restart_agent(&n, &[], &current)?;
    wait_one_process(&n)
}

/// Restarts the agent with `FLEET_AGENT_CRASH_AT=point`, runs `trigger` (a deploy or a
/// rollback that leads to version `want`), waits for the agent to kill itself there, and
/// starts it again without the variable.
fn crash_at(
    n: &OneNode,
    point: &str,
    want: &str,
    trigger: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let current = current_version(&n.agent.status()?).context("no current version")?;
    restart_agent(n, &[(CRASH_AT, point)], &current)?;
    trigger()?;
    wait_until(
        SWITCH,
        format_args!("the agent to kill itself at {point}"),
        || Ok(!n.agent.is_running()),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}{}", n.fleet.report()))?;
    let status = n
        .agent
        .exit_status()
        .context("the agent exited with no status")?;
    ensure!(
        status.signal() == Some(9),
        "the agent asked to crash at {point} ended {status}, not by SIGKILL{}",
        n.fleet.report()
    );
    ensure!(
        n.agent
            .log_tail(50)
            .lines()
            .any(|l| l.contains("fault injection") && l.contains(point)),
        "the agent died, but its log does not show the fault point {point}{}",
        n.fleet.report()
    );
    restart_agent(n, &[], want)
}

/// SIGKILLs the agent if it runs and starts it with `env`; once it answers version
/// `serving` through the front door, no app process that ran before the restart may be left.
fn restart_agent(n: &OneNode, env: &[(&str, &str)], serving: &str) -> Result<()> {
    let left = n.app_pids()?;
    let pid_files = pid_files(n)?;
    n.agent.set_env(env);
    n.agent.restart()?;
    n.wait_serving(serving)?;
    n.fleet.wait_until(
        LEFTOVERS,
        format_args!(
            "the restarted agent to stop the app processes {left:?} that ran before it; \
             the pid files it found: {pid_files}"
        ),
        || {
            let running = n.app_pids()?;
            let survivors: Vec<&u32> = left.iter().filter(|pid| running.contains(pid)).collect();
            ensure!(survivors.is_empty(), "still running: {survivors:?}");
            Ok(true)
        },
    )
}

/// The agent's app pid files (`DATA/run/*.pid`) and what each says, for messages.
fn pid_files(n: &OneNode) -> Result<String> {
    let dir = n.agent.data_dir().join("run");
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries {
            let path = entry?.path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            found.push(format!(
                "{} ({})",
                path.file_name().unwrap_or_default().to_string_lossy(),
                text.trim()
            ));
        }
    }
    found.sort();
    Ok(if found.is_empty() {
        "none".to_owned()
    } else {
        found.join(", ")
    })
}

/// After a crash and a restart: the node runs version `want` from a complete slot, through
/// the front door, with nothing left half done, and keeps `previous` as its previous slot.
fn converged(n: &OneNode, want: &str, previous: &Path) -> Result<()> {
    n.fleet.wait_until(
        SWITCH,
        format_args!("the node to run version {want} with no deploy under way"),
        || {
            let state = n.agent.status()?;
            Ok(current_version(&state).as_deref() == Some(want)
                && state.staged.is_none()
                && state.staging.is_none())
        },
    )?;
    let current = n.agent.current_slot()?;
    ensure!(
        n.agent.current_link()? == current.canonicalize()?,
        "DATA/current does not name the current slot {}",
        current.display()
    );
    ensure!(
        current.join("bin/sample-app").is_file() && current.join("release.toml").is_file(),
        "the current slot {} is not complete",
        current.display()
    );
    ensure!(
        n.agent.previous_slot()? == previous && previous.join("bin/sample-app").is_file(),
        "the previous slot is not {} (kept)",
        previous.display()
    );
    ensure!(
        n.agent.partial_dirs()?.is_empty(),
        "partial slot directories left: {:?}",
        n.agent.partial_dirs()?
    );
    wait_one_process(n)
}

/// Waits until exactly one app process runs, from the current slot (after probation and
/// grace the previous version is stopped).
fn wait_one_process(n: &OneNode) -> Result<()> {
    let slot = n.agent.current_slot()?;
    n.fleet.wait_until(
        SWITCH,
        format_args!("one app process, from {}", slot.display()),
        || {
            let running = n.app_pids()?;
            Ok(running.len() == 1 && running == pids_in(&slot)?)
        },
    )
}
