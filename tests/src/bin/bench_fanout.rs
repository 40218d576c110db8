//! `bench-fanout`: the MQTT fan-out figure of issue 3: how many chunk bytes the coordinator
//! sends when many nodes fetch the same release at once, against the release's new chunk
//! bytes measured in the same run.
//!
//! ```text
//! cargo build --release --bins && cargo run --release -p system-tests --bin bench-fanout
//! cargo run --release -p system-tests --bin bench-fanout -- --agents 10,50 --broker embedded --repeat 1
//! ```
//!
//! Per configuration (broker × agent count): a real coordinator, its broker (by default the
//! embedded one, then Mosquitto, which must be installed) and N real agent processes
//! (default 50), each with its own data directory and `--no-http`, so every chunk travels as
//! an MQTT frame on the release's shared chunk topic. Then, `--repeat` times (default 3), a
//! fresh seeded ~24 MB release (`bench_data`, `Shape::SMALL`, another seed each time) is
//! published and rolled out to all, and the bench waits until every node reports it as
//! current. Coordinator egress is the growth of `coordinator stats --json`'s
//! `mqtt_frame_bytes` over the rollout; the baseline is the sum of the compressed sizes of the
//! release's chunks that no earlier release had (practically all), from building the same
//! images locally. Ideal fan-out sends each chunk once: ratio 1.0. The egress depends on how
//! the nodes' requests fall into the coordinator's fan-out windows, so it varies from run to
//! run: the first table gives the median and each run.
//!
//! Prints markdown tables on stdout, progress on stderr.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use images::{build_image, missing_chunks, ChunkStore};
use protocol::messages::{Command as NodeCommand, SlotReport, UpdateReport};
use protocol::{AppName, Envelope, NodeTopic, ReleaseKind, Version};
use serde::de::DeserializeOwned;
use system_tests::bench_data::{mb, median, proc_status_kib, write_v1, Shape};
use system_tests::fleet::node_entry;
use system_tests::{release, Agent, AgentOptions, Bins, Broker, Fleet};

const SHAPE: Shape = Shape::SMALL;
/// Not the delta bench's seed: other bytes, same mix.
const SEED: u64 = 4711;
const APP: &str = "stream";
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

/// One release of the series each fleet installs in order, and what it costs at best: its
/// chunks that no earlier release of the series has, each sent once.
struct Release {
    version: String,
    src: PathBuf,
    bytes: u64,
    new_chunks: usize,
    new_chunk_bytes: u64,
}

/// `count` releases, each a fresh seeded tree, built locally to count their new chunks.
fn releases(work: &Path, count: usize) -> Result<Vec<Release>> {
    let store = ChunkStore::open(work.join("store"))?;
    let mut seen = HashSet::new();
    let mut releases = Vec::with_capacity(count);
    for i in 1..=count {
        let version = i.to_string();
        let src = work.join(format!("release-{i}"));
        let bytes = write_v1(&src, SEED + i as u64, &SHAPE)?;
        let manifest = build_image(
            &src,
            AppName::new(APP)?,
            Version::new(&version)?,
            ReleaseKind::App,
            &store,
        )
        .with_context(|| format!("building release {i} locally"))?;
        let new: Vec<_> = missing_chunks(&manifest, |d| seen.contains(d));
        seen.extend(new.iter().map(|c| c.digest));
        let release = Release {
            version,
            src,
            bytes,
            new_chunks: new.len(),
            new_chunk_bytes: new.iter().map(|c| u64::from(c.zsize)).sum(),
        };
        eprintln!(
            "release {i}: {} in {} entries, {} new chunks, {} compressed",
            mb(release.bytes),
            manifest.entries.len(),
            release.new_chunks,
            mb(release.new_chunk_bytes)
        );
        releases.push(release);
    }
    Ok(releases)
}

fn bench(args: &Args) -> Result<()> {
    let bins = Bins::of_this_build().clone();
    if !bins.agent.parent().is_some_and(|d| d.ends_with("release")) {
        eprintln!(
            "warning: not a release build; run with `cargo run --release …` for real figures"
        );
    }
    let work = tempfile::Builder::new().prefix("bench-fanout-").tempdir()?;
    let releases = releases(work.path(), args.repeat)?;
    let mut rows = Vec::new();
    for &broker in &args.brokers {
        for &agents in &args.agents {
            rows.extend(fanout_runs(&bins, broker, agents, &releases)?);
        }
    }
    print_tables(&releases, &rows);
    Ok(())
}

struct Row {
    broker: Broker,
    agents: usize,
    /// 1-based index into the release series.
    run: usize,
    new_chunk_bytes: u64,
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

/// One fleet of `n` agents installing each release in turn. One fleet for all runs: removing
/// 50 agents' data directories takes about half a minute on this machine's disk.
fn fanout_runs(bins: &Bins, broker: Broker, n: usize, releases: &[Release]) -> Result<Vec<Row>> {
    let label = format!("{} broker, {n} agents", broker_name(broker));
    let fleet = Fleet::start_with(broker, bins.clone())?;
    let options = AgentOptions {
        no_http: true,
        ..AgentOptions::default()
    };
    let started = Instant::now();
    let agents = start_agents(&fleet, n, &options)?;
    eprintln!("{label}: all online after {:.1?}", started.elapsed());
    // Every node's command topic, to size the deploy commands each rollout sends.
    let mut client = fleet.mqtt_client()?;
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for agent in &agents {
        let topic = fleet.topics().node(agent.node(), NodeTopic::Command);
        client.subscribe(&topic)?;
        last_seq.insert(topic, 0);
    }
    let trust = fleet.trusted_keys()?;

    let mut rows = Vec::new();
    for (i, rel) in releases.iter().enumerate() {
        let run = i + 1;
        let label = format!("{label}, run {run}");
        fleet.publish(&rel.src, APP, &rel.version)?;
        let before = stats(&fleet)?;
        let started = Instant::now();
        fleet.rollout(APP, &rel.version)?;
        let want = release(APP, &rel.version)?;
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

        // This rollout's command for each node: the first with a seq above its last one.
        let mut commands = 0;
        let mut pending = n;
        while pending > 0 {
            let message = client
                .next_message(COMMAND_TIMEOUT, |m| {
                    last_seq.get(&m.topic).is_some_and(|&last| {
                        Envelope::open_bytes::<NodeCommand>(&m.payload, &trust)
                            .is_ok_and(|c| c.seq > last)
                    })
                })?
                .with_context(|| {
                    format!(
                        "{} of {n} deploy commands not seen within {COMMAND_TIMEOUT:?}",
                        pending
                    )
                })?;
            let seq = Envelope::open_bytes::<NodeCommand>(&message.payload, &trust)?.seq;
            last_seq.insert(message.topic, seq);
            commands += message.payload.len() as u64;
            pending -= 1;
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
            new_chunk_bytes: rel.new_chunk_bytes,
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
        rows.push(row);
    }
    Ok(rows)
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

fn print_tables(releases: &[Release], rows: &[Row]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ratio = |row: &Row| row.egress as f64 / row.new_chunk_bytes as f64;
    println!("### MQTT fan-out (issue 3)\n");
    println!(
        "`cargo build --release --bins && cargo run --release -p system-tests --bin bench-fanout`: \
         one coordinator and N agents (`--no-http`, so every chunk is an MQTT frame on the \
         release's shared topic) on one {cores}-core machine. Each run rolls out a fresh seeded \
         release of {} (new chunks per run: {}) to all agents at once; runs follow each other \
         in one fleet. Ratio = coordinator chunk egress / the release's new chunk bytes (their \
         compressed sizes). MB = 10⁶ bytes.\n",
        mb(releases.first().map_or(0, |r| r.bytes)),
        releases
            .iter()
            .map(|r| format!("{} in {} chunks", mb(r.new_chunk_bytes), r.new_chunks))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("| broker | agents | runs | coordinator chunk egress / new chunk bytes, median (target ≤ 1.5) | each run | rollout start → all switched, median |");
    println!("|---|---|---|---|---|---|");
    let mut groups: Vec<(Broker, usize)> = rows.iter().map(|r| (r.broker, r.agents)).collect();
    groups.dedup();
    for (broker, agents) in groups {
        let group: Vec<&Row> = rows
            .iter()
            .filter(|r| r.broker == broker && r.agents == agents)
            .collect();
        let mut ratios: Vec<f64> = group.iter().map(|r| ratio(r)).collect();
        let each = ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        ratios.sort_by(f64::total_cmp);
        let times: Vec<Duration> = group.iter().map(|r| r.switched).collect();
        println!(
            "| {} | {agents} | {} | **{:.2}** | {each} | {:.1} s |",
            broker_name(broker),
            group.len(),
            ratios[ratios.len() / 2],
            median(&times).as_secs_f64()
        );
    }
    println!("\n| broker | agents | run | chunk egress | new chunk bytes | ratio | frames published | requests deduped | rollout start → all switched | delivered to agents (sum) | deploy commands (sum) | coordinator peak RSS since start |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} | {:.1} s | {} | {} | {} |",
            broker_name(row.broker),
            row.agents,
            row.run,
            mb(row.egress),
            mb(row.new_chunk_bytes),
            ratio(row),
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
         manifest) are not in the egress figure. Coordinator peak RSS includes the embedded \
         broker when there is one."
    );
    for row in rows.iter().filter(|r| r.http_bytes != 0) {
        println!(
            "\nWarning: {} went over HTTP in {} broker run {} with {} agents despite `--no-http`.",
            mb(row.http_bytes),
            broker_name(row.broker),
            row.run,
            row.agents
        );
    }
}
