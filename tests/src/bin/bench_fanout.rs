//! `bench-fanout`: the MQTT fan-out figure of issue 3: how many chunk bytes the coordinator
//! sends when many nodes fetch the same release at once, against the release's new chunk
//! bytes measured in the same run.
//!
//! ```text
//! cargo build --release --bins && cargo run --release -p system-tests --bin bench-fanout
//! cargo run --release -p system-tests --bin bench-fanout -- --agents 10,50 --broker embedded
//! ```
//!
//! Per run: a real coordinator, its broker (by default one run with the embedded broker and
//! one with Mosquitto, which must be installed) and N real agent processes (default 50), each with its own data directory and `--no-http`, so every
//! chunk travels as an MQTT frame on the release's shared chunk topic. One seeded ~24 MB
//! release (`bench_data`, `Shape::SMALL`) is published and rolled out to all; the bench waits
//! until every node reports it as current. Coordinator egress is the growth of
//! `coordinator stats --json`'s `mqtt_frame_bytes` over the rollout; the baseline is the sum
//! of the compressed sizes of the release's unique chunks, from building the same image
//! locally. Ideal fan-out sends each chunk once: ratio 1.0.
//!
//! Prints a markdown table on stdout, progress on stderr.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use images::{build_image, missing_chunks, ChunkStore};
use protocol::messages::{SlotReport, UpdateReport};
use protocol::{AppName, NodeTopic, ReleaseKind, Version};
use serde::de::DeserializeOwned;
use system_tests::bench_data::{mb, proc_status_kib, write_v1, Shape};
use system_tests::fleet::node_entry;
use system_tests::{release, Agent, AgentOptions, Bins, Broker, Fleet};

const SHAPE: Shape = Shape::SMALL;
/// Not the delta bench's seed: other bytes, same mix.
const SEED: u64 = 4711;
const APP: &str = "stream";
const VERSION: &str = "1";
/// Agents started per `agents_with` call (it takes a fixed-size array).
const BATCH: usize = 10;
/// Generous: 50 nodes staging at once on a loaded 2-core machine.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the deploy commands may take to reach a subscriber after `rollout start`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    match parse_args().and_then(|args| bench(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str =
    "usage: bench-fanout [--agents N,N…] [--broker embedded,mosquitto] [--repeat N]";

struct Args {
    agents: Vec<usize>,
    brokers: Vec<Broker>,
    /// Runs per (broker, agents): the egress varies from run to run with request timing.
    repeat: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        agents: vec![50],
        brokers: vec![Broker::Embedded, Broker::Mosquitto],
        repeat: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--agents" => {
                args.agents = value
                    .split(',')
                    .map(|n| match n.parse::<usize>() {
                        Ok(n) if n > 0 => Ok(n),
                        _ => bail!("--agents {value}: want positive numbers separated by commas"),
                    })
                    .collect::<Result<_>>()?
            }
            "--broker" => {
                args.brokers = value
                    .split(',')
                    .map(|b| match b {
                        "embedded" => Ok(Broker::Embedded),
                        "mosquitto" => Ok(Broker::Mosquitto),
                        _ => bail!("--broker {b}: want embedded or mosquitto"),
                    })
                    .collect::<Result<_>>()?
            }
            "--repeat" => {
                args.repeat = match value.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => bail!("--repeat {value}: want a positive number"),
                }
            }
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    Ok(args)
}

/// What the release costs at best: each unique chunk sent once.
struct Release {
    bytes: u64,
    chunks: usize,
    chunk_bytes: u64,
}

fn bench(args: &Args) -> Result<()> {
    let bins = Bins::of_this_build().clone();
    if !bins.agent.parent().is_some_and(|d| d.ends_with("release")) {
        eprintln!(
            "warning: not a release build; run with `cargo run --release …` for real figures"
        );
    }
    let work = tempfile::Builder::new().prefix("bench-fanout-").tempdir()?;
    let src = work.path().join("release");
    let bytes = write_v1(&src, SEED, &SHAPE)?;
    let store = ChunkStore::open(work.path().join("store"))?;
    let manifest = build_image(
        &src,
        AppName::new(APP)?,
        Version::new(VERSION)?,
        ReleaseKind::App,
        &store,
    )
    .context("building the release image locally")?;
    let unique = missing_chunks(&manifest, |_| false);
    let release_cost = Release {
        bytes,
        chunks: unique.len(),
        chunk_bytes: unique.iter().map(|c| u64::from(c.zsize)).sum(),
    };
    eprintln!(
        "release: {} in {} files, {} unique chunks, {} compressed",
        mb(bytes),
        manifest.entries.len(),
        release_cost.chunks,
        mb(release_cost.chunk_bytes)
    );

    let mut rows = Vec::new();
    for &broker in &args.brokers {
        for &agents in &args.agents {
            for run in 1..=args.repeat {
                rows.push(fanout_run(&bins, broker, agents, run, &src)?);
            }
        }
    }
    print_table(&release_cost, &rows);
    Ok(())
}

struct Row {
    broker: Broker,
    agents: usize,
    run: usize,
    start_agents: Duration,
    switched: Duration,
    egress: u64,
    frames: u64,
    deduped: u64,
    http_bytes: u64,
    /// Sum over the agents of the MQTT chunk bytes each used.
    received: u64,
    /// Sum of the deploy commands' sizes, one per node.
    commands: u64,
    coordinator_peak_kib: u64,
}

fn fanout_run(
    bins: &Bins,
    broker: Broker,
    n: usize,
    run: usize,
    src: &std::path::Path,
) -> Result<Row> {
    let label = format!("{} broker, {n} agents, run {run}", broker_name(broker));
    let fleet = Fleet::start_with(broker, bins.clone())?;
    let options = AgentOptions {
        no_http: true,
        ..AgentOptions::default()
    };
    let started = Instant::now();
    let agents = start_agents(&fleet, n, &options)?;
    let start_agents = started.elapsed();
    eprintln!("{label}: all online after {start_agents:.1?}");

    fleet.publish(src, APP, VERSION)?;
    // Every node's command topic, to size the deploy commands the rollout sends.
    let mut client = fleet.mqtt_client()?;
    let topics: Vec<String> = agents
        .iter()
        .map(|a| fleet.topics().node(a.node(), NodeTopic::Command))
        .collect();
    for topic in &topics {
        client.subscribe(topic)?;
    }
    let before = stats(&fleet)?;
    let started = Instant::now();
    fleet.rollout(APP, VERSION)?;
    let want = release(APP, VERSION)?;
    // One `nodes --json` per poll rather than one `agent status` per node: 50 processes
    // every 200 ms would slow the machine being measured.
    let mut last_count = 0;
    fleet.wait_until(
        ROLLOUT_TIMEOUT,
        format_args!("all {n} agents to run {want} (per `coordinator nodes --json`)"),
        || {
            let nodes = fleet.nodes()?;
            let mut on = 0;
            for agent in &agents {
                let current: Option<SlotReport> = node_field(&nodes, agent, "current")?;
                if current.is_some_and(|c| c.release == want) {
                    on += 1;
                }
            }
            if on != last_count {
                eprintln!("{label}: {on}/{n} switched at {:.1?}", started.elapsed());
                last_count = on;
            }
            Ok(on == n)
        },
    )?;
    let switched = started.elapsed();
    let after = stats(&fleet)?;
    let coordinator_peak_kib = fleet
        .coordinator_pid()
        .map(|pid| proc_status_kib(pid, "VmHWM"))
        .transpose()?
        .unwrap_or(0);

    let mut commands = 0;
    let mut seen = HashSet::new();
    while seen.len() < topics.len() {
        let message = client
            .next_message(COMMAND_TIMEOUT, |m| !seen.contains(&m.topic))?
            .with_context(|| {
                format!(
                    "only {} of {n} deploy commands seen within {COMMAND_TIMEOUT:?}",
                    seen.len()
                )
            })?;
        commands += message.payload.len() as u64;
        seen.insert(message.topic);
    }

    let nodes = fleet.nodes()?;
    let mut received = 0;
    for agent in &agents {
        let report: UpdateReport = node_field(&nodes, agent, "last_update")?
            .with_context(|| format!("{} reports no last update", agent.node()))?;
        ensure!(
            report.release == want,
            "{}'s last update is {}, not {want}",
            agent.node(),
            report.release
        );
        received += report.bytes_fetched_mqtt;
    }

    let delta = |field: &str| -> Result<u64> {
        let get = |v: &serde_json::Value| {
            v.get(field)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("`coordinator stats --json` has no numeric {field}"))
        };
        Ok(get(&after)?.saturating_sub(get(&before)?))
    };
    let row = Row {
        broker,
        agents: n,
        run,
        start_agents,
        switched,
        egress: delta("mqtt_frame_bytes")?,
        frames: delta("mqtt_frames_published")?,
        deduped: delta("digests_deduped")?,
        http_bytes: delta("http_chunk_bytes")?,
        received,
        commands,
        coordinator_peak_kib,
    };
    eprintln!(
        "{label}: all switched after {switched:.1?}; egress {} in {} frames",
        mb(row.egress),
        row.frames
    );
    Ok(row)
}

/// Starts `n` agents named `n01`, `n02`, …, [`BATCH`] per call, each waited on until online.
fn start_agents(fleet: &Fleet, n: usize, options: &AgentOptions) -> Result<Vec<Agent>> {
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i:02}")).collect();
    let mut agents = Vec::with_capacity(n);
    for batch in ids.chunks(BATCH) {
        match <&[String; BATCH]>::try_from(batch) {
            Ok(batch) => {
                let ids: [&str; BATCH] = std::array::from_fn(|i| batch[i].as_str());
                agents.extend(fleet.agents_with(ids, options)?);
            }
            Err(_) => {
                for id in batch {
                    let [agent] = fleet.agents_with([id.as_str()], options)?;
                    agents.push(agent);
                }
            }
        }
    }
    Ok(agents)
}

/// `field` of `agent`'s entry in the output of `coordinator nodes --json` (`None` if null).
fn node_field<T: DeserializeOwned>(
    nodes: &serde_json::Value,
    agent: &Agent,
    field: &str,
) -> Result<Option<T>> {
    let entry = node_entry(nodes, agent.node().as_str())
        .with_context(|| format!("{} missing from `coordinator nodes --json`", agent.node()))?;
    let value = entry.get(field).cloned().unwrap_or_default();
    serde_json::from_value(value).with_context(|| {
        format!(
            "{}'s {field} in `coordinator nodes --json` is malformed",
            agent.node()
        )
    })
}

/// `coordinator stats --json`, parsed.
fn stats(fleet: &Fleet) -> Result<serde_json::Value> {
    let out = fleet.cli(&["stats", "--json"])?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "`coordinator stats --json` printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn broker_name(broker: Broker) -> &'static str {
    match broker {
        Broker::Embedded => "embedded",
        Broker::Mosquitto => "Mosquitto",
    }
}

fn print_table(release: &Release, rows: &[Row]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("### MQTT fan-out (issue 3)\n");
    println!(
        "`cargo build --release --bins && cargo run --release -p system-tests --bin bench-fanout`: \
         one coordinator and N agents (`--no-http`, so every chunk is an MQTT frame on the \
         release's shared topic) on one {cores}-core machine, all fetching one seeded {} release \
         ({} unique chunks, {} compressed) at once. MB = 10⁶ bytes.\n",
        mb(release.bytes),
        release.chunks,
        mb(release.chunk_bytes)
    );
    println!(
        "| broker | agents | coordinator chunk egress | new chunk bytes | ratio (target ≤ 1.5) | frames (deduped requests) | rollout start → all switched | delivered to agents (sum) | deploy commands (sum) | coordinator peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {} ({}) | {:.1} s | {} | {} | {} |",
            broker_name(row.broker),
            row.agents,
            mb(row.egress),
            mb(release.chunk_bytes),
            row.egress as f64 / release.chunk_bytes as f64,
            row.frames,
            row.deduped,
            row.switched.as_secs_f64(),
            mb(row.received),
            mb(row.commands),
            mb(row.coordinator_peak_kib * 1024),
        );
    }
    println!(
        "\nEgress is the growth of `coordinator stats --json` `mqtt_frame_bytes` (frame header + \
         zstd frame, MQTT framing excluded) over the rollout; the broker then delivers each frame \
         to every subscribed node. Deploy commands (one per node, each carrying the signed \
         manifest) are not in the egress figure."
    );
    for row in rows {
        if row.http_bytes != 0 {
            println!(
                "\nWarning: {} bytes went over HTTP in the {}-agent run despite `--no-http`.",
                row.http_bytes, row.agents
            );
        }
        eprintln!(
            "{} broker, {} agents: started in {:.1} s",
            broker_name(row.broker),
            row.agents,
            row.start_agents.as_secs_f64()
        );
    }
}
