//! The quick-start demo: a coordinator with its embedded broker, three local agents, and two
//! releases walked through the release path, printing each step and the fleet's state.
//!
//! `cargo run --release -p system-tests --bin demo`

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use system_tests::{change_tree, copy_tree, write_tree, Broker, Fleet};

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
    let out = fleet.cli(args)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

fn demo() -> Result<()> {
    step("starting a coordinator (keys, embedded MQTT broker, HTTP API) and three agents");
    let fleet = Fleet::start(Broker::Embedded)?;
    let nodes = fleet.agents(["edge-1", "edge-2", "edge-3"])?;
    show(&fleet, &["nodes"])?;

    let v1 = fleet.scratch("web-1.0")?;
    write_tree(&v1, 1, 20_000_000)?;
    step("publishing web 1.0 (20 MB): built locally, chunks uploaded, manifest signed");
    show(
        &fleet,
        &[
            "release",
            "publish",
            path(&v1)?,
            "--app",
            "web",
            "--version",
            "1.0",
        ],
    )?;
    step("rolling out web 1.0 to every node");
    show(
        &fleet,
        &["rollout", "start", "--app", "web", "--version", "1.0"],
    )?;
    fleet.wait_all_on("web", "1.0", Duration::from_secs(120))?;
    show(&fleet, &["nodes"])?;

    let v2 = fleet.scratch("web-1.1")?;
    copy_tree(&v1, &v2)?;
    change_tree(&v2, 2)?;
    step("publishing web 1.1 (a few files changed): only new chunks are uploaded");
    show(
        &fleet,
        &[
            "release",
            "publish",
            path(&v2)?,
            "--app",
            "web",
            "--version",
            "1.1",
        ],
    )?;
    step("rolling out web 1.1; each node keeps 1.0 as its previous version");
    show(
        &fleet,
        &["rollout", "start", "--app", "web", "--version", "1.1"],
    )?;
    fleet.wait_all_on("web", "1.1", Duration::from_secs(120))?;
    show(&fleet, &["nodes"])?;

    step(&format!(
        "what {} says about itself (agent status)",
        nodes[0].node()
    ));
    let status = nodes[0].status()?;
    println!("{}", serde_json::to_string_pretty(&status)?);
    step("done; stopping everything");
    Ok(())
}

fn path(p: &std::path::Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", p.display()))
}
