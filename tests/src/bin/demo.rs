//! The quick-start demo: a coordinator with its embedded broker and four local agents
//! running the sample app under steady traffic, walked through what an operator does: a
//! first release everywhere, a staged rollout in waves gated by the canary judgment, a bad
//! release whose canary fails and is rolled back by the rollout, a per-node rollback, and
//! the deploy log.
//!
//! `cargo run --release -p system-tests --bin demo`

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use system_tests::traffic::NodeTraffic;
use system_tests::{AgentOptions, AppRelease, Broker, Fleet};

/// Long enough for any step on a loaded machine.
const STEP: Duration = Duration::from_secs(180);
/// A short canary judgment so the demo takes about two minutes: the agents report every
/// second, judged over 15 s after a 3 s warm-up; every other setting is the judge's default.
const CANARY: &str = "[canary]\nwindow_secs = 15\nwarmup_secs = 3\nmin_samples = 8\n";

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(fleet: &Fleet, args: &[&str]) -> Result<()> {
    println!("$ coordinator {}", args.join(" "));
    let out = fleet.cli(args)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// `web@VERSION` of the sample app erring on `errors` of its requests (every request takes
/// 15 ms more, as a real service would). A switch hook moves each node's traffic, since
/// four nodes on one machine cannot share a front-door port.
fn web(version: &str, errors: &str) -> AppRelease {
    let unused = "127.0.0.1:9".parse().expect("an address");
    AppRelease::new(version, unused)
        .env("APP_ERROR_RATE", errors)
        .env("APP_ADDED_LATENCY_MS", "15")
        .serving_port_hook()
        .sections(CANARY)
}

/// `rollout start … --json`'s id, then `rollout status ID --watch` until it ends.
fn roll_out(fleet: &Fleet, version: &str, flags: &[&str]) -> Result<u64> {
    let mut args = vec!["rollout", "start", "--app", "web", "--version", version];
    args.extend_from_slice(flags);
    println!("$ coordinator {}", args.join(" "));
    let (id, _) = fleet.rollout_with("web", version, flags)?;
    println!("rollout {id} started");
    // Piped, --watch prints a line per change and returns when the rollout ends: with an
    // error (and exit status 1) unless it succeeded.
    let id_arg = id.to_string();
    let watch = ["rollout", "status", &id_arg, "--watch"];
    println!("$ coordinator {}", watch.join(" "));
    let out = fleet.try_cli(&watch)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    print!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(id)
}

fn demo() -> Result<()> {
    step("a coordinator (keys, embedded MQTT broker, HTTP API) and four agents, reporting metrics every second");
    let fleet = Fleet::start(Broker::Embedded)?;
    let options = AgentOptions {
        metrics_interval: Some("1s".into()),
        ..AgentOptions::default()
    };
    let nodes = fleet.agents_with(["edge-1", "edge-2", "edge-3", "edge-4"], &options)?;
    show(&fleet, &["nodes"])?;

    step("web 1.0 (the sample app, 1 % errors) published and rolled out to every node at once");
    fleet.publish_app("web", &web("1.0", "0.01"))?;
    roll_out(&fleet, "1.0", &[])?;
    fleet.wait_all_on("web", "1.0", STEP)?;
    let _traffic: Vec<NodeTraffic> = nodes
        .iter()
        .map(|n| NodeTraffic::start(n.data_dir()))
        .collect();
    println!("(steady traffic on every node from now on)");

    step("web 1.1, a clean release, in waves 1, 50 %, 100 %: each wave stages, then switches; the first is judged as a canary");
    fleet.publish_app("web", &web("1.1", "0.01"))?;
    let good = roll_out(&fleet, "1.1", &["--waves", "1,50%,100%", "--bake", "2s"])?;
    show(&fleet, &["canary", "report", &good.to_string()])?;
    show(&fleet, &["nodes"])?;

    step("web 1.2 raises the error rate to 8 %: its canary fails, the rollout halts and rolls the canary back");
    fleet.publish_app("web", &web("1.2", "0.08"))?;
    let bad = roll_out(&fleet, "1.2", &["--waves", "1,100%"])?;
    show(&fleet, &["canary", "report", &bad.to_string()])?;
    fleet.wait_all_on("web", "1.1", STEP)?;
    show(&fleet, &["nodes"])?;

    // A node the bad rollout did not touch: on 1.1, with 1.0 before it.
    let mut by_hand = None;
    for agent in &nodes {
        let state = agent.status()?;
        if state
            .previous
            .as_ref()
            .map(|p| p.release.version.to_string())
            == Some("1.0".into())
        {
            by_hand = Some(agent);
            break;
        }
    }
    let agent = by_hand.context("no node has web 1.0 as its previous version")?;
    let node = agent.node().to_string();
    step(&format!(
        "{node} rolled back by hand: a flip back to 1.0, no download"
    ));
    show(&fleet, &["node", "rollback", &node])?;
    fleet.wait_until(STEP, "the node to run web 1.0", || {
        Ok(agent.current_version()?.as_deref() == Some("1.0"))
    })?;
    show(&fleet, &["nodes"])?;

    step("the deploy log: who did what, to which nodes, with what outcome");
    show(&fleet, &["log"])?;

    step(&format!("what {node} says about itself (agent status)"));
    let status = agent.status()?;
    println!(
        "{}",
        serde_json::to_string_pretty(&status).context("printing the status")?
    );
    step("done; stopping everything");
    Ok(())
}
