//! `bench-release`: the release-path figures quoted in the README.
//!
//! ```text
//! cargo run --release -p system-tests --bin bench-release
//! ```
//!
//! Runs the release builds of `coordinator` (embedded broker) and three agents on this
//! machine, publishes three fresh, seeded 50 MB releases (mostly incompressible media-like
//! files, some text) one after the other, and prints markdown tables: publish time, time
//! from `rollout start` until all three nodes report the release as current, bytes fetched,
//! the agents' idle resident memory and the binaries' sizes.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use system_tests::{write_tree, Agent, Bins, Broker, Fleet};

const RELEASE_BYTES: u64 = 50_000_000;
const VERSIONS: [&str; 3] = ["1", "2", "3"];
const IDLE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-release: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Row {
    version: &'static str,
    publish: Duration,
    switched: Duration,
    fetched_mqtt: Vec<u64>,
}

fn bench() -> Result<()> {
    let bins = Bins::of_this_build().clone();
    if !bins.agent.parent().is_some_and(|d| d.ends_with("release")) {
        eprintln!(
            "warning: not a release build; run with `cargo run --release …` for real figures"
        );
    }
    let fleet = Fleet::start_with(Broker::Embedded, bins.clone())?;
    let nodes = fleet.agents(["n1", "n2", "n3"])?;
    std::thread::sleep(IDLE);
    let rss_fresh = rss_of(&nodes)?;

    let mut rows = Vec::new();
    for (i, version) in VERSIONS.into_iter().enumerate() {
        let src = fleet.scratch(&format!("v{version}"))?;
        write_tree(&src, 1000 + i as u64, RELEASE_BYTES)?;
        let started = Instant::now();
        fleet.publish(&src, "bench", version)?;
        let publish = started.elapsed();
        let started = Instant::now();
        fleet.rollout("bench", version)?;
        fleet.wait_all_on("bench", version, Duration::from_secs(600))?;
        let switched = started.elapsed();
        let mut fetched_mqtt = Vec::new();
        for node in &nodes {
            let report = node.status()?.last_update;
            fetched_mqtt.push(report.map_or(0, |u| u.bytes_fetched_mqtt));
        }
        eprintln!("v{version}: publish {publish:.1?}, all switched {switched:.1?}");
        rows.push(Row {
            version,
            publish,
            switched,
            fetched_mqtt,
        });
    }
    std::thread::sleep(IDLE);
    let rss_after = rss_of(&nodes)?;

    println!(
        "Release path, {} MB releases ({}% incompressible), coordinator with embedded broker, 3 agents on one machine ({} cores):\n",
        RELEASE_BYTES / 1_000_000,
        (system_tests::tree::INCOMPRESSIBLE_SHARE * 100.0) as u32,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| release | publish (CLI wall time) | rollout start → all 3 switched | MQTT bytes fetched per node |");
    println!("|---|---|---|---|");
    for row in &rows {
        println!(
            "| v{} | {:.2} s | {:.2} s | {} |",
            row.version,
            row.publish.as_secs_f64(),
            row.switched.as_secs_f64(),
            row.fetched_mqtt
                .iter()
                .map(|b| format!("{:.1} MB", *b as f64 / 1e6))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    println!("\n(switch times are polled every 200 ms via `agent status`)\n");
    println!("| agent | idle RSS, fresh | idle RSS, after 3 releases |");
    println!("|---|---|---|");
    for (i, node) in nodes.iter().enumerate() {
        println!(
            "| {} | {:.1} MiB | {:.1} MiB |",
            node.node(),
            rss_fresh[i] as f64 / 1024.0,
            rss_after[i] as f64 / 1024.0
        );
    }
    println!("\n| binary | size |\n|---|---|");
    for bin in [&bins.coordinator, &bins.agent] {
        let size = std::fs::metadata(bin)?.len();
        println!(
            "| {} | {:.1} MiB |",
            bin.display(),
            size as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

/// VmRSS in KiB of each agent process.
fn rss_of(nodes: &[Agent]) -> Result<Vec<u64>> {
    nodes
        .iter()
        .map(|node| {
            let pid = node.pid().context("agent is not running")?;
            system_tests::bench_data::proc_status_kib(pid, "VmRSS")
        })
        .collect()
}
