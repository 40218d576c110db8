//! Canary judgment end to end: four agents run the sample app under steady traffic, report
//! its metrics, and a rollout in waves `1,100%` judges its one canary against the three
//! baseline nodes. A release that raises the error rate is judged *fail*, the report names
//! `app_error_rate` first, the rollout halts and the coordinator sends the canary back to the
//! old version; a clean release is judged *pass* and rolls out to every node.
//!
//! Every agent runs the same release on one machine, so no front-door port can be shared: a
//! switch hook writes the active version's private port to the agent's data directory, and
//! each node's traffic follows it there (`NodeTraffic`).

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use system_tests::traffic::NodeTraffic;
use system_tests::{AgentOptions, AppRelease, Broker, Fleet};

const NODES: [&str; 4] = ["n0", "n1", "n2", "n3"];
/// A whole rollout: staging, switch, warm-up and window, with room for a loaded machine.
const ROLLOUT: Duration = Duration::from_secs(120);
/// The error rate of the good versions, and of the bad one.
const GOOD_ERRORS: &str = "0.01";
const BAD_ERRORS: &str = "0.08";
/// The sample app adds this latency to every request, so its p99 lands in one histogram
/// bucket on every node however busy the shared machine is, and the latency metrics compare
/// like with like.
const ADDED_LATENCY_MS: &str = "15";
/// A short judgment, so the test takes seconds: one sample a second per node, judged over
/// 15 s after a 3 s warm-up. Everything else is the judge's defaults.
const CANARY: &str = "[canary]\nwindow_secs = 15\nwarmup_secs = 3\nmin_samples = 8\n";

/// `web@VERSION` of the sample app, erring on `errors` of its requests; its switch hook
/// publishes the new version's port for the node's traffic.
fn app(version: &str, errors: &str) -> AppRelease {
    let unused = "127.0.0.1:9".parse().expect("an address");
    AppRelease::new(version, unused)
        .env("APP_ERROR_RATE", errors)
        .env("APP_ADDED_LATENCY_MS", ADDED_LATENCY_MS)
        .serving_port_hook()
        .sections(CANARY)
}

fn canary_report(fleet: &Fleet, id: u64) -> Result<(Value, String)> {
    let id = id.to_string();
    let json = fleet.cli(&["canary", "report", &id, "--json"])?;
    let report: Value = serde_json::from_slice(&json.stdout).with_context(|| {
        format!(
            "`canary report --json` printed no JSON: {}",
            String::from_utf8_lossy(&json.stdout)
        )
    })?;
    let text = fleet.cli(&["canary", "report", &id])?;
    Ok((report, String::from_utf8_lossy(&text.stdout).into_owned()))
}

#[test]
fn a_release_that_raises_the_error_rate_fails_its_canary_and_a_clean_one_passes() -> Result<()> {
    let fleet = Fleet::start(Broker::Embedded)?;
    let options = AgentOptions {
        metrics_interval: Some("1s".into()),
        ..AgentOptions::default()
    };
    let agents = fleet.agents_with(NODES, &options)?.to_vec();
    fleet.publish_app("web", &app("1", GOOD_ERRORS))?;
    fleet.rollout("web", "1")?;
    fleet.wait_all_on("web", "1", ROLLOUT)?;
    fleet.wait_rollout_ended(1, ROLLOUT)?;
    let traffic: Vec<NodeTraffic> = agents
        .iter()
        .map(|a| NodeTraffic::start(a.data_dir()))
        .collect();

    // The bad release: healthy, so it switches, but one request in twelve fails.
    fleet.publish_app("web", &app("2", BAD_ERRORS))?;
    let (id, started) = fleet.rollout_with("web", "2", &["--waves", "1,100%"])?;
    let canary = started["waves"][0][0]
        .as_str()
        .context("a canary node")?
        .to_owned();
    let status = fleet.wait_rollout_ended(id, ROLLOUT)?;
    let (report, text) = canary_report(&fleet, id)?;
    assert_eq!(status["status"], "rolled_back", "{status:#}\n{text}");
    let reason = status["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("canary"), "{reason}");
    assert!(reason.contains("app_error_rate"), "{reason}");
    assert_eq!(report["judgment"]["verdict"], "fail", "{text}");
    let hottest = &report["judgment"]["metrics"][0];
    assert_eq!(hottest["name"], "app_error_rate", "{text}");
    assert_eq!(hottest["classification"], "high", "{text}");
    assert!(hottest["ratio"].as_f64().is_some_and(|r| r > 2.0), "{text}");
    assert_eq!(
        report["canary_nodes"],
        serde_json::json!([canary]),
        "{text}"
    );
    assert_eq!(report["baseline_nodes"].as_array().map(Vec::len), Some(3));
    assert!(text.contains("app_error_rate"), "{text}");
    // The canary is sent back to web@1; no other node was ever sent web@2.
    let canary_agent = agents
        .iter()
        .find(|a| a.node().as_str() == canary)
        .context("the canary's agent")?;
    fleet.wait_until(ROLLOUT, "the canary to run web@1 again", || {
        Ok(canary_agent.current_version()?.as_deref() == Some("1"))
    })?;
    for agent in agents.iter().filter(|a| a.node().as_str() != canary) {
        let state = agent.status()?;
        ensure!(
            agent.current_version()?.as_deref() == Some("1") && state.staged.is_none(),
            "{} left web@1: {state:?}",
            agent.node()
        );
    }

    // A clean release passes its canary and reaches every node.
    fleet.publish_app("web", &app("3", GOOD_ERRORS))?;
    let (id, _) = fleet.rollout_with("web", "3", &["--waves", "1,100%"])?;
    let status = fleet.wait_rollout_ended(id, ROLLOUT)?;
    let (report, text) = canary_report(&fleet, id)?;
    assert_eq!(status["status"], "succeeded", "{status:#}\n{text}");
    assert_eq!(report["judgment"]["verdict"], "pass", "{text}");
    let error_rate = report["judgment"]["metrics"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "app_error_rate"))
        .context("the error rate judged")?;
    assert!(
        error_rate["canary_samples"].as_u64() >= Some(8),
        "{error_rate:#}"
    );
    fleet.wait_all_on("web", "3", ROLLOUT)?;

    // The app was really under load the whole time, on every node.
    for (agent, traffic) in agents.iter().zip(&traffic) {
        let answered = traffic.answered();
        assert!(answered > 100, "{}: {answered} answers", agent.node());
    }
    Ok(())
}
