//! `bench-fleet`: the fleet-scale figure of issue 6: a staged rollout of a 10 MB release that
//! differs by 1 MB from the installed one, to 1,000 real agents, in waves.
//!
//! ```text
//! cargo run --release -p system-tests --bin bench-fleet -- [--nodes 1000] [--broker embedded|mosquitto|both]
//! ```
//!
//! Per broker (the coordinator's embedded one, then Mosquitto): a release-build coordinator,
//! and `--nodes` agents in `agent-swarm` processes (250 per process by default; each agent is
//! `agent::daemon::run` with its own id, data directory, journal and MQTT connection, see
//! `src/bin/agent_swarm.rs`), all on this machine. Two seeded releases are generated at run
//! time (`bench_data`, a ~10 MB tree: media segments, metadata, a binary): v2 rewrites 200 KB
//! of the binary, edits a config file and adds an 800 KB segment. v1 is installed on every
//! node by a `rollout start` in waves of `--install-wave` nodes (not measured), then the
//! measured rollout:
//! `rollout start --version 2 --waves 1,10%,50%,100% --bake 2s`, polled through
//! `rollout status ID --json` until it is done.
//!
//! Figures, each over the measured rollout only:
//! - time: from `rollout start` to the status saying done, and per wave from the first poll
//!   showing it under way to the first showing it finished (polls every 200 ms);
//! - coordinator peak resident memory: `VmHWM`, restarted just before the rollout
//!   (`/proc/PID/clear_refs`), so the v1 install does not count; the peak over the whole run
//!   is printed too;
//! - coordinator CPU seconds: user + system from `/proc/PID/stat`, across the rollout;
//! - broker egress: the bytes the broker's accepted connections sent, from the kernel's
//!   per-socket `bytes_acked` (`ss -ti` on the broker's port: MQTT bytes, no TCP/IP headers),
//!   the same method for both brokers; for Mosquitto also its own `$SYS/broker/bytes/sent`;
//! - chunk bytes the coordinator served over HTTP and as MQTT frames (`coordinator stats`),
//!   against the ideal: each node fetches the compressed size of v2's new chunks once.
//!
//! Needs root for `/proc/PID/clear_refs` of the coordinator only if the bench runs as
//! another user than it (it does not: the coordinator is its child). Prints Markdown tables
//! on stdout, progress on stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use images::{build_image, missing_chunks, ChunkStore};
use protocol::messages::{SlotReport, UpdateReport};
use protocol::{AppName, ReleaseKind, Version};
use serde::Deserialize;
use system_tests::bench_data::{make_v2, mb, proc_status_kib, write_v1, Shape, V2Changes};
use system_tests::swarm::swarm_binary;
use system_tests::usage::{
    cpu_seconds, reset_peak_rss, thread_names, MachineCpu, SentBetween, SocketBytes,
};
use system_tests::wait::{wait_for, Fatal};
use system_tests::{release, Bins, Broker, Fleet, Swarm, SwarmOptions, TestClient, Tmpfs};

const APP: &str = "fleet-bench";
/// About 10 MB: 9 × 800 KB incompressible segments, 1 MB of JSON, a 1.8 MB binary; v2
/// rewrites 200 KB of the binary and adds one segment, so about 1 MB differs.
const SHAPE: Shape = Shape {
    segments: 9,
    segment_bytes: 800_000,
    meta_bytes: 1_000_000,
    binary_bytes: 1_800_000,
    binary_rewrite: 200_000,
};
/// Agents per `agent-swarm` process when `--swarms` is not given.
const AGENTS_PER_PROCESS: usize = 250;
/// How long the agents may take to connect.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(300);
/// The v1 install: every node fetches 10 MB.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(1200);
/// The measured rollout; the target is 60 s.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Parser)]
#[command(
    name = "bench-fleet",
    about = "Staged rollout of a 10 MB release (1 MB changed) to many real agents: time, coordinator memory and CPU, broker egress."
)]
struct Args {
    /// Agents in the fleet.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// embedded, mosquitto, or both (one after the other).
    #[arg(long, default_value = "both")]
    broker: String,
    /// `agent-swarm` processes the agents are split over (default: one per 250 agents).
    #[arg(long)]
    swarms: Option<usize>,
    /// The measured rollout's waves.
    #[arg(long, default_value = "1,10%,50%,100%")]
    waves: String,
    /// The measured rollout's bake after each wave.
    #[arg(long, default_value = "2s")]
    bake: String,
    /// Extra `rollout start` flags for the measured rollout (e.g. `--max-parallel=100`).
    #[arg(long = "rollout-arg", allow_hyphen_values = true)]
    rollout_args: Vec<String>,
    /// The canary gate's judgment window after the first wave switches (`[canary]
    /// window_secs` in the releases' release.toml, with no warm-up and the judge's minimum of
    /// three samples per group). Keep it at least three `--metrics-interval`s plus one for
    /// the last sample's delivery: the gate judges what has arrived when the window closes.
    #[arg(long, default_value = "20s")]
    canary_window: String,
    /// Every agent's `--metrics-interval`: how often it samples and reports host metrics.
    #[arg(long, default_value = "5s")]
    metrics_interval: String,
    /// Nodes per wave of the (unmeasured) v1 install. A thousand agents fetching 10 MB
    /// each at the same moment from one coordinator on this machine time out their HTTP
    /// connections and fall back to MQTT, where Mosquitto queues every frame for every
    /// subscriber without bound; a fleet's first install is staged for the same reason.
    #[arg(long, default_value_t = 100)]
    install_wave: usize,
    /// Seed of the generated releases.
    #[arg(long, default_value_t = 6)]
    seed: u64,
    /// Agents each swarm process starts per second.
    #[arg(long, default_value_t = 100)]
    start_rate: u32,
    /// Runtime worker threads per swarm process.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// A flag for every agent's `agent run` (e.g. `--agent-arg=--no-http`); repeatable.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Put the agents' data directories on a tmpfs of this many MB (needs root) instead of
    /// the disk: every agent then has a disk of its own speed, as nodes do.
    #[arg(long)]
    tmpfs_mb: Option<u64>,
    /// Record the measured rollout with `perf record -g` (coordinator, Mosquitto and swarm
    /// processes) into DIR/perf-<broker>.data. Release binaries are stripped: for symbols,
    /// run with CARGO_PROFILE_RELEASE_STRIP=false (and a CARGO_TARGET_DIR of its own).
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-fleet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let brokers = match args.broker.as_str() {
        "embedded" => vec![Broker::Embedded],
        "mosquitto" => vec![Broker::Mosquitto],
        "both" => vec![Broker::Embedded, Broker::Mosquitto],
        other => bail!("--broker {other}: want embedded, mosquitto or both"),
    };
    ensure!(args.nodes > 0, "--nodes 0: give the number of agents");
    let processes = args
        .swarms
        .unwrap_or_else(|| args.nodes.div_ceil(AGENTS_PER_PROCESS));
    ensure!(
        (1..=args.nodes).contains(&processes),
        "--swarms {processes}: want 1 to {} processes for {} agents",
        args.nodes,
        args.nodes
    );
    let bins = Bins::of_this_build().clone();
    if !bins.agent.parent().is_some_and(|d| d.ends_with("release")) {
        eprintln!(
            "warning: not a release build; run with `cargo run --release …` for real figures"
        );
    }
    // Built now rather than when the first fleet is already running.
    swarm_binary(&bins)?;
    let work = tempfile::Builder::new().prefix("bench-fleet-").tempdir()?;
    let canary_window = protocol::parse_duration(&args.canary_window)
        .with_context(|| format!("--canary-window {}", args.canary_window))?;
    let releases = Releases::generate(work.path(), args.seed, canary_window)?;
    let mut runs = Vec::new();
    for broker in brokers {
        runs.push(measure(args, &bins, &releases, broker, processes)?);
    }
    print_tables(args, &releases, &runs);
    Ok(())
}

/// `--waves` for the v1 install: `step` more nodes a wave (`100,200,…,100%`).
fn install_waves(nodes: usize, step: usize) -> String {
    let step = step.max(1);
    let mut waves: Vec<String> = (1..)
        .map(|i| i * step)
        .take_while(|&n| n < nodes)
        .map(|n| n.to_string())
        .collect();
    waves.push("100%".to_owned());
    waves.join(",")
}

/// The two releases, and what the measured one costs at best.
struct Releases {
    v1: PathBuf,
    v2: PathBuf,
    v1_bytes: u64,
    changes: V2Changes,
    /// v2's chunks that v1 lacks: what each node must fetch.
    new_chunks: usize,
    new_chunk_bytes: u64,
}

impl Releases {
    /// Writes v1 and v2, with a release.toml whose `[canary]` judges over `canary_window`
    /// right after the switch (files only: no `[run]`, nothing to warm up).
    fn generate(work: &Path, seed: u64, canary_window: Duration) -> Result<Releases> {
        let (v1, v2) = (work.join("v1"), work.join("v2"));
        let v1_bytes = write_v1(&v1, seed, &SHAPE)?;
        let release_toml = v1.join("release.toml");
        std::fs::write(
            &release_toml,
            format!(
                "[canary]\nwarmup_secs = 0\nwindow_secs = {}\nmin_samples = 3\n",
                canary_window.as_secs().max(1)
            ),
        )
        .with_context(|| format!("writing {}", release_toml.display()))?;
        // v2 is a copy of v1 (release.toml included) with the changes.
        let changes = make_v2(&v1, &v2, &SHAPE, seed)?;
        // Built locally as the coordinator will, to count v2's new chunks.
        let store = ChunkStore::open(work.join("store"))?;
        let build = |src: &Path, version: &str| {
            build_image(
                src,
                AppName::new(APP)?,
                Version::new(version)?,
                ReleaseKind::App,
                &store,
            )
            .with_context(|| format!("building {} locally", src.display()))
        };
        let (m1, m2) = (build(&v1, "1")?, build(&v2, "2")?);
        let old: std::collections::HashSet<_> = m1.chunks().map(|c| c.digest).collect();
        let new = missing_chunks(&m2, |d| old.contains(d));
        let releases = Releases {
            v1,
            v2,
            v1_bytes,
            changes,
            new_chunks: new.len(),
            new_chunk_bytes: new.iter().map(|c| u64::from(c.zsize)).sum(),
        };
        eprintln!(
            "v1: {}; v2: {}; {} new chunks, {} compressed",
            mb(releases.v1_bytes),
            releases.changes,
            releases.new_chunks,
            mb(releases.new_chunk_bytes)
        );
        Ok(releases)
    }
}

/// The figures of one broker's run.
struct Run {
    broker: Broker,
    nodes: usize,
    processes: usize,
    online_after: Duration,
    install: Duration,
    rollout: Timeline,
    coordinator_peak_kib: u64,
    coordinator_run_peak_kib: u64,
    /// Mosquitto's peak memory (the embedded broker's is the coordinator's).
    mosquitto_peak_kib: Option<u64>,
    /// The agents' own reports of the measured update.
    updates: UpdateFigures,
    egress: SentBetween,
    mosquitto_sys_bytes: Option<u64>,
    http_chunk_bytes: u64,
    mqtt_frame_bytes: u64,
    swarm_peak_kib: u64,
    swarm_threads: u64,
    swarm_files: usize,
    /// The first swarm process's most common thread names, with counts.
    swarm_thread_names: String,
    reconnects: usize,
}

fn broker_name(broker: Broker) -> &'static str {
    match broker {
        Broker::Embedded => "embedded",
        Broker::Mosquitto => "Mosquitto",
    }
}

fn measure(
    args: &Args,
    bins: &Bins,
    releases: &Releases,
    broker: Broker,
    processes: usize,
) -> Result<Run> {
    let label = format!("{} broker, {} agents", broker_name(broker), args.nodes);
    let fleet = Fleet::start_with(broker, bins.clone())?;
    let coordinator = fleet
        .coordinator_pid()
        .context("the coordinator is not running")?;
    let data = fleet.scratch("swarm")?;
    let _disk = match args.tmpfs_mb {
        Some(size) => Some(Tmpfs::mount(&data, size * 1_000_000)?),
        None => None,
    };
    let options = SwarmOptions {
        nodes: args.nodes,
        processes,
        labels: vec![("bench".to_owned(), "fleet".to_owned())],
        agent_args: [
            vec![
                "--metrics-interval".to_owned(),
                args.metrics_interval.clone(),
            ],
            args.agent_args.clone(),
        ]
        .concat(),
        start_rate: args.start_rate,
        workers: args.workers,
        ..SwarmOptions::default()
    };
    let started = Instant::now();
    let mut swarm = Swarm::start(&fleet, &data, &options)?;
    swarm.wait_online(&fleet, ONLINE_TIMEOUT)?;
    let online_after = started.elapsed();
    eprintln!("{label}: all online after {online_after:.1?}");

    for (src, version) in [(&releases.v1, "1"), (&releases.v2, "2")] {
        let src = src.to_str().context("release path is not UTF-8")?;
        fleet.cli(&[
            "release",
            "publish",
            src,
            "--app",
            APP,
            "--version",
            version,
        ])?;
    }
    let started = Instant::now();
    let install_waves = install_waves(args.nodes, args.install_wave);
    fleet.cli(&[
        "rollout",
        "start",
        "--app",
        APP,
        "--version",
        "1",
        "--waves",
        &install_waves,
    ])?;
    wait_all_on(&fleet, &mut swarm, "1", INSTALL_TIMEOUT, &label)?;
    let install = started.elapsed();
    eprintln!("{label}: v1 installed on every node after {install:.1?}");
    // Its last wave may still be baking or gating: the measured rollout would be refused.
    let installed = fleet.wait_rollout_ended(1, INSTALL_TIMEOUT)?;
    ensure!(
        installed["status"] == "succeeded",
        "the v1 install did not succeed: {installed:#}"
    );

    // Before: counters of everything the rollout will cost.
    let coordinator_run_peak_before = proc_status_kib(coordinator, "VmHWM")?;
    reset_peak_rss(coordinator)?;
    let mut sys = match fleet.mosquitto_pid() {
        Some(pid) => {
            reset_peak_rss(pid)?;
            let mut client = TestClient::connect(fleet.mqtt_addr())?;
            client.subscribe(SYS_BYTES_SENT)?;
            Some((pid, client))
        }
        None => None,
    };
    let port = fleet.mqtt_addr().port();
    for pid in swarm.pids() {
        reset_peak_rss(pid)?;
    }
    let meter = Meter {
        coordinator,
        mosquitto: fleet.mosquitto_pid(),
        swarm: swarm.pids(),
    };
    let sys_before = sys.as_mut().map(|(_, c)| sys_bytes_sent(c)).transpose()?;
    let sockets_before = SocketBytes::on_port(port)?;
    let stats_before = stats(&fleet)?;
    let reconnects_before = reconnects(&swarm)?;

    let perf = match &args.perf {
        Some(dir) => Some(Perf::record(dir, broker, &meter)?),
        None => None,
    };
    let rollout = run_rollout(args, &fleet, &mut swarm, &meter, &label)?;
    if let Some(perf) = perf {
        perf.stop()?;
    }
    let updates = wait_all_on(&fleet, &mut swarm, "2", Duration::from_secs(30), &label)?;

    // After.
    let egress = SocketBytes::on_port(port)?.since(&sockets_before);
    let stats_after = stats(&fleet)?;
    let mosquitto = match &sys {
        Some((pid, _)) => Some(proc_status_kib(*pid, "VmHWM")?),
        None => None,
    };
    let mosquitto_sys_bytes = match (&mut sys, sys_before) {
        (Some((_, client)), Some(before)) => Some(sys_bytes_sent(client)?.saturating_sub(before)),
        _ => None,
    };
    let coordinator_peak_kib = proc_status_kib(coordinator, "VmHWM")?;
    let mut swarm_peak_kib = 0;
    let mut swarm_threads = 0;
    let mut swarm_files = 0;
    for pid in swarm.pids() {
        swarm_peak_kib += proc_status_kib(pid, "VmHWM")?;
        swarm_threads += proc_status_kib(pid, "Threads")?;
        swarm_files += std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    }
    let swarm_thread_names = match swarm.pids().first() {
        Some(&pid) => {
            let mut names: Vec<(String, usize)> = thread_names(pid)?.into_iter().collect();
            names.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            names
                .iter()
                .take(4)
                .map(|(name, n)| format!("{n} × `{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
        None => String::new(),
    };
    // The agents' data is gigabytes in tens of thousands of files: removed by several
    // threads, since each removal waits on the disk (discards), before the fleet's own
    // cleanup.
    let reconnects = reconnects(&swarm)? - reconnects_before;
    drop(swarm);
    remove_agent_dirs(&data)?;
    let delta = |field: &str| -> Result<u64> {
        let get = |v: &serde_json::Value| {
            v.get(field)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("`coordinator stats --json` has no numeric {field}"))
        };
        Ok(get(&stats_after)?.saturating_sub(get(&stats_before)?))
    };
    Ok(Run {
        broker,
        nodes: args.nodes,
        processes,
        online_after,
        install,
        rollout,
        coordinator_peak_kib,
        coordinator_run_peak_kib: coordinator_run_peak_before.max(coordinator_peak_kib),
        mosquitto_peak_kib: mosquitto,
        updates,
        egress,
        mosquitto_sys_bytes,
        http_chunk_bytes: delta("http_chunk_bytes")?,
        mqtt_frame_bytes: delta("mqtt_frame_bytes")?,
        swarm_peak_kib,
        swarm_threads,
        swarm_files,
        swarm_thread_names,
        reconnects,
    })
}

/// The processes whose CPU time the bench follows.
struct Meter {
    coordinator: u32,
    mosquitto: Option<u32>,
    swarm: Vec<u32>,
}

/// CPU seconds each measured process has used so far, and the machine's CPU time.
#[derive(Debug, Clone, Copy)]
struct CpuReading {
    coordinator: f64,
    swarm: f64,
    mosquitto: f64,
    machine: MachineCpu,
}

impl Meter {
    fn read(&self) -> Result<CpuReading> {
        Ok(CpuReading {
            coordinator: cpu_seconds(self.coordinator)?,
            swarm: self
                .swarm
                .iter()
                .map(|&pid| cpu_seconds(pid))
                .sum::<Result<f64>>()?,
            mosquitto: self.mosquitto.map(cpu_seconds).transpose()?.unwrap_or(0.0),
            machine: MachineCpu::read()?,
        })
    }
}

/// What one span of the rollout cost in CPU.
#[derive(Debug, Clone, Copy)]
struct SpanCpu {
    coordinator: f64,
    swarm: f64,
    mosquitto: f64,
    /// Share of the machine's cores busy, and waiting on the disk.
    busy: f64,
    iowait: f64,
}

impl SpanCpu {
    fn between(earlier: &CpuReading, later: &CpuReading) -> SpanCpu {
        let (busy, iowait) = later.machine.shares_since(&earlier.machine);
        SpanCpu {
            coordinator: later.coordinator - earlier.coordinator,
            swarm: later.swarm - earlier.swarm,
            mosquitto: later.mosquitto - earlier.mosquitto,
            busy,
            iowait,
        }
    }
}

/// A `perf record` of the measured processes, stopped with SIGINT so it writes its data.
struct Perf {
    child: std::process::Child,
    output: PathBuf,
}

impl Perf {
    fn record(dir: &Path, broker: Broker, meter: &Meter) -> Result<Perf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let output = dir.join(format!("perf-{}.data", broker_name(broker)));
        let pids: Vec<String> = std::iter::once(meter.coordinator)
            .chain(meter.mosquitto)
            .chain(meter.swarm.iter().copied())
            .map(|pid| pid.to_string())
            .collect();
        let log = std::fs::File::create(output.with_extension("log"))?;
        let child = std::process::Command::new("perf")
            .args(["record", "-F", "99", "-g", "-p", &pids.join(","), "-o"])
            .arg(&output)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting `perf record` (apt-get install linux-perf)")?;
        Ok(Perf { child, output })
    }

    fn stop(mut self) -> Result<()> {
        // The workspace forbids `unsafe`, so no `libc::kill`; kill(1) is everywhere.
        let status = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "could not stop `perf record`");
        self.child.wait()?;
        eprintln!("perf data: {}", self.output.display());
        Ok(())
    }
}

/// Removes every agent's data directory under `data` (`swarm-K/<node>`), several at a time.
fn remove_agent_dirs(data: &Path) -> Result<()> {
    const THREADS: usize = 8;
    let mut dirs = Vec::new();
    for swarm in std::fs::read_dir(data)? {
        let swarm = swarm?.path();
        if swarm.is_dir() {
            for agent in std::fs::read_dir(&swarm)? {
                dirs.push(agent?.path());
            }
        }
    }
    let chunk = dirs.len().div_ceil(THREADS).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = dirs
            .chunks(chunk)
            .map(|share| {
                scope.spawn(move || -> Result<()> {
                    for dir in share {
                        std::fs::remove_dir_all(dir)
                            .with_context(|| format!("removing {}", dir.display()))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a removal thread panicked")))
        })
    })
}

const SYS_BYTES_SENT: &str = "$SYS/broker/bytes/sent";

/// Mosquitto's count of bytes sent, at most about a second old: the next value it publishes
/// (every `sys_interval`, 1 s in the harness's config) after the ones already received.
fn sys_bytes_sent(client: &mut TestClient) -> Result<u64> {
    while client
        .next_message(Duration::ZERO, |m| m.topic == SYS_BYTES_SENT)?
        .is_some()
    {}
    let message = client
        .next_message(Duration::from_secs(5), |m| m.topic == SYS_BYTES_SENT)?
        .with_context(|| format!("Mosquitto published no {SYS_BYTES_SENT} within 5 s"))?;
    let text = String::from_utf8_lossy(&message.payload);
    text.trim()
        .parse()
        .with_context(|| format!("{SYS_BYTES_SENT} is {text:?}, not a number"))
}

/// Broker reconnections the agents logged so far (each agent logs one line per connection
/// after a failure: `connected to broker after_failures=N` with N > 0).
fn reconnects(swarm: &Swarm) -> Result<usize> {
    let mut count = 0;
    for path in swarm.log_paths() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        count += text
            .lines()
            .filter(|l| l.contains("connected to broker") && !l.contains("after_failures=0"))
            .count();
    }
    Ok(count)
}

/// `coordinator stats --json`, parsed.
fn stats(fleet: &Fleet) -> Result<serde_json::Value> {
    let out = fleet.cli(&["stats", "--json"])?;
    serde_json::from_slice(&out.stdout).context("`coordinator stats --json` printed no JSON")
}

/// The fields of `nodes --json` this bench reads.
#[derive(Deserialize)]
struct NodeRow {
    node: String,
    current: Option<SlotReport>,
    last_update: Option<UpdateReport>,
}

/// What the agents reported of one update: how long staging and the switch took each of
/// them (from its own clock), and what they fetched and reused.
#[derive(Debug, Clone, Default)]
struct UpdateFigures {
    /// Sorted, one per node.
    staging_ms: Vec<u64>,
    switch_ms: Vec<u64>,
    http_bytes: u64,
    mqtt_bytes: u64,
    reused_bytes: u64,
}

impl UpdateFigures {
    fn of<'a>(reports: impl Iterator<Item = &'a UpdateReport>) -> UpdateFigures {
        let mut figures = UpdateFigures::default();
        for report in reports {
            figures.staging_ms.push(report.staging_ms);
            figures.switch_ms.push(report.switch_ms);
            figures.http_bytes += report.bytes_fetched_http;
            figures.mqtt_bytes += report.bytes_fetched_mqtt;
            figures.reused_bytes += report.bytes_reused;
        }
        figures.staging_ms.sort_unstable();
        figures.switch_ms.sort_unstable();
        figures
    }
}

/// "p50 / p90 / max" of sorted milliseconds, in seconds.
fn spread(sorted_ms: &[u64]) -> String {
    let at = |q: f64| {
        let i = ((sorted_ms.len() as f64 * q).ceil() as usize).clamp(1, sorted_ms.len().max(1));
        sorted_ms.get(i - 1).map_or(0.0, |&ms| ms as f64 / 1000.0)
    };
    format!("{:.2} / {:.2} / {:.2} s", at(0.5), at(0.9), at(1.0))
}

/// Waits until every agent of the swarm reports `version` as current, per `nodes --json`
/// (one call per poll: 1,000 `agent status` processes would load the machine measured),
/// and returns what they reported of the update that brought it.
fn wait_all_on(
    fleet: &Fleet,
    swarm: &mut Swarm,
    version: &str,
    timeout: Duration,
    label: &str,
) -> Result<UpdateFigures> {
    let want = release(APP, version)?;
    let total = swarm.nodes().len();
    let started = Instant::now();
    let mut last = usize::MAX;
    let nodes: std::collections::HashSet<String> = swarm.nodes().iter().cloned().collect();
    wait_for(
        timeout,
        format_args!("all {total} agents to run {want}"),
        || {
            swarm.check_alive()?;
            let out = fleet.cli(&["nodes", "--json"])?;
            let rows: Vec<NodeRow> =
                serde_json::from_slice(&out.stdout).context("`nodes --json` is not a node list")?;
            let on: Vec<&NodeRow> = rows
                .iter()
                .filter(|r| nodes.contains(&r.node))
                .filter(|r| r.current.as_ref().is_some_and(|c| c.release == want))
                .collect();
            if on.len() != last {
                eprintln!(
                    "{label}: {}/{total} on {want} after {:.1?}",
                    on.len(),
                    started.elapsed()
                );
                last = on.len();
            }
            Ok((on.len() == total).then(|| {
                UpdateFigures::of(
                    on.iter()
                        .filter_map(|r| r.last_update.as_ref())
                        .filter(|u| u.release == want),
                )
            }))
        },
    )
}

/// The measured rollout as it ran: offsets from `rollout start`, as first seen by a poll.
struct Timeline {
    total: Duration,
    waves: Vec<WaveTime>,
    /// CPU over the whole rollout.
    cpu: SpanCpu,
    /// The canary gate's outcome and one-line summary, as the rollout stored them.
    canary: Option<(String, String)>,
}

/// The wave phases of `rollout status`, in order.
const PHASES: [&str; 5] = ["staging", "switching", "baking", "gating", "passed"];

/// One wave as the polls saw it.
struct WaveTime {
    /// Nodes the wave adds.
    nodes: u32,
    /// When each of [`PHASES`] was first seen (`None`: it began and ended between two polls).
    seen: [Option<Duration>; 5],
    /// CPU from the wave's start to its end.
    cpu: Option<SpanCpu>,
}

impl WaveTime {
    /// When phase `i` began: when it was first seen, or else the next phase was.
    fn began(&self, i: usize) -> Option<Duration> {
        self.seen[i..].iter().flatten().next().copied()
    }

    /// From the beginning of phase `from` to the beginning of phase `to`.
    fn span(&self, from: usize, to: usize) -> Option<Duration> {
        Some(self.began(to)?.saturating_sub(self.began(from)?))
    }

    /// Start to passed.
    fn total(&self) -> Option<Duration> {
        self.span(0, PHASES.len() - 1)
    }
}

/// The fields of `rollout status ID --json` (the coordinator's `RolloutView`) read here.
#[derive(Deserialize)]
struct StatusView {
    status: String,
    reason: Option<String>,
    waves: Vec<WaveView>,
    canary: Option<CanaryView>,
}

#[derive(Deserialize)]
struct WaveView {
    nodes: u32,
    phase: String,
}

#[derive(Deserialize)]
struct CanaryView {
    outcome: String,
    summary: String,
}

/// Runs the measured rollout of v2 and times its waves from `rollout status` polls (every
/// [`system_tests::wait::POLL`]), reading the CPU counters at each poll.
fn run_rollout(
    args: &Args,
    fleet: &Fleet,
    swarm: &mut Swarm,
    meter: &Meter,
    label: &str,
) -> Result<Timeline> {
    let mut start: Vec<&str> = vec![
        "rollout",
        "start",
        "--app",
        APP,
        "--version",
        "2",
        "--waves",
        &args.waves,
        "--bake",
        &args.bake,
        "--json",
    ];
    start.extend(args.rollout_args.iter().map(String::as_str));
    let first = meter.read()?;
    let started = Instant::now();
    let out = fleet.cli(&start)?;
    let response: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`rollout start --json` printed no JSON")?;
    let id = response
        .get("rollout")
        .and_then(serde_json::Value::as_u64)
        .context("`rollout start --json` names no rollout")?
        .to_string();
    let mut waves: Vec<WaveTime> = Vec::new();
    let mut readings = vec![(Duration::ZERO, first)];
    let mut last_line = String::new();
    let view = wait_for(
        ROLLOUT_TIMEOUT,
        format_args!("rollout {id} to finish"),
        || {
            swarm.check_alive()?;
            let out = fleet.cli(&["rollout", "status", &id, "--json"])?;
            let at = started.elapsed();
            readings.push((at, meter.read()?));
            let view: StatusView = serde_json::from_slice(&out.stdout)
                .context("`rollout status --json` is not a rollout")?;
            if waves.is_empty() {
                waves = view
                    .waves
                    .iter()
                    .map(|w| WaveTime {
                        nodes: w.nodes,
                        seen: [None; 5],
                        cpu: None,
                    })
                    .collect();
            }
            for (time, wave) in waves.iter_mut().zip(&view.waves) {
                let phase = if wave.phase == "empty" {
                    "passed"
                } else {
                    wave.phase.as_str()
                };
                if let Some(i) = PHASES.iter().position(|p| *p == phase) {
                    time.seen[i].get_or_insert(at);
                }
            }
            let line = view
                .waves
                .iter()
                .map(|w| format!("{} {}", w.nodes, w.phase))
                .collect::<Vec<_>>()
                .join(", ");
            if line != last_line {
                eprintln!("{label}: {:.1?} {} [{line}]", at, view.status);
                last_line = line;
            }
            match view.status.as_str() {
                "running" => Ok(None),
                "succeeded" => Ok(Some(view)),
                other => Err(Fatal(format!(
                    "rollout {id} {other}: {}",
                    view.reason.as_deref().unwrap_or("no reason given")
                ))
                .into()),
            }
        },
    )?;
    let total = started.elapsed();
    let last = meter.read()?;
    // The reading of the poll that first saw a moment (readings are in time order).
    let reading_at = |t: Duration| {
        readings
            .iter()
            .find(|(at, _)| *at >= t)
            .map_or(&last, |(_, r)| r)
    };
    for wave in &mut waves {
        if let (Some(from), Some(to)) = (wave.began(0), wave.began(PHASES.len() - 1)) {
            wave.cpu = Some(SpanCpu::between(reading_at(from), reading_at(to)));
        }
    }
    Ok(Timeline {
        total,
        waves,
        cpu: SpanCpu::between(&first, &last),
        canary: view.canary.map(|c| (c.outcome, c.summary)),
    })
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map_or("-".to_owned(), secs)
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

fn print_tables(args: &Args, releases: &Releases, runs: &[Run]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("### Issue 6: fleet scale\n");
    println!(
        "`cargo run --release -p system-tests --bin bench-fleet -- --nodes {} --broker {}`: \
         {} agents (`agent::daemon::run` each, in `agent-swarm` processes) and the coordinator \
         on one {cores}-core machine. v1 ({}) installed first (not measured); measured: \
         `rollout start --waves {} --bake {}` of v2 ({}; {} new chunks, {} compressed per node), \
         canary window {}, metrics every {}.\n",
        args.nodes,
        args.broker,
        args.nodes,
        mb(releases.v1_bytes),
        args.waves,
        args.bake,
        releases.changes,
        releases.new_chunks,
        mb(releases.new_chunk_bytes),
        args.canary_window,
        args.metrics_interval,
    );
    let waves = runs
        .iter()
        .map(|r| r.rollout.waves.len())
        .max()
        .unwrap_or(0);
    let mut header = "| broker | total".to_owned();
    for i in 1..=waves {
        header += &format!(" | wave {i}");
    }
    header += " | coordinator peak RSS | coordinator CPU | broker egress |";
    println!("{header}");
    println!("{}", "|---".repeat(waves + 5) + "|");
    for run in runs {
        let mut row = format!(
            "| {} | **{}**",
            broker_name(run.broker),
            secs(run.rollout.total)
        );
        for i in 0..waves {
            match run.rollout.waves.get(i) {
                Some(w) => row += &format!(" | {} nodes: {}", w.nodes, opt_secs(w.total())),
                None => row += " | -",
            }
        }
        row += &format!(
            " | **{}** | {:.1} s | {} |",
            mib(run.coordinator_peak_kib),
            run.rollout.cpu.coordinator,
            mb(run.egress.bytes)
        );
        println!("{row}");
    }
    println!();
    println!(
        "| broker | wave | nodes | staging | switching | bake + gates | CPU s: coordinator / agents{} | machine busy / iowait |",
        if runs.iter().any(|r| r.broker == Broker::Mosquitto) { " / Mosquitto" } else { "" }
    );
    println!("|---|---|---|---|---|---|---|---|");
    for run in runs {
        for (i, w) in run.rollout.waves.iter().enumerate() {
            let cpu = w.cpu.map_or("- | -".to_owned(), |c| {
                let mosquitto = match run.broker {
                    Broker::Mosquitto => format!(" / {:.1}", c.mosquitto),
                    Broker::Embedded => String::new(),
                };
                format!(
                    "{:.1} / {:.1}{mosquitto} | {:.0} % / {:.0} %",
                    c.coordinator,
                    c.swarm,
                    c.busy * 100.0,
                    c.iowait * 100.0
                )
            });
            println!(
                "| {} | {} | {} | {} | {} | {} | {cpu} |",
                broker_name(run.broker),
                i + 1,
                w.nodes,
                opt_secs(w.span(0, 1)),
                opt_secs(w.span(1, 2)),
                opt_secs(w.span(2, 4)),
            );
        }
    }
    println!();
    println!(
        "| detail | {} |",
        runs.iter()
            .map(|r| broker_name(r.broker))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("{}", "|---".repeat(runs.len() + 1) + "|");
    let line = |what: &str, cell: &dyn Fn(&Run) -> String| {
        println!(
            "| {what} | {} |",
            runs.iter().map(cell).collect::<Vec<_>>().join(" | ")
        );
    };
    line("agents / swarm processes", &|r| {
        format!("{} / {}", r.nodes, r.processes)
    });
    line("canary gate", &|r| {
        r.rollout
            .canary
            .as_ref()
            .map_or("-".to_owned(), |(outcome, summary)| {
                format!("{outcome}: {summary}")
            })
    });
    line(
        "agents' own staging time, p50 / p90 / max (the update report's `staging_ms`)",
        &|r| spread(&r.updates.staging_ms),
    );
    line("agents' own switch time, p50 / p90 / max", &|r| {
        spread(&r.updates.switch_ms)
    });
    line(
        "agents' bytes fetched over HTTP / MQTT / reused locally",
        &|r| {
            format!(
                "{} / {} / {}",
                mb(r.updates.http_bytes),
                mb(r.updates.mqtt_bytes),
                mb(r.updates.reused_bytes)
            )
        },
    );
    line("whole rollout: machine busy / iowait", &|r| {
        format!(
            "{:.0} % / {:.0} %",
            r.rollout.cpu.busy * 100.0,
            r.rollout.cpu.iowait * 100.0
        )
    });
    line("whole rollout: agents' CPU (all swarm processes)", &|r| {
        format!("{:.1} s", r.rollout.cpu.swarm)
    });
    line("all online after start (not measured)", &|r| {
        secs(r.online_after)
    });
    line(
        "v1 install, waves of `--install-wave` nodes (not measured)",
        &|r| secs(r.install),
    );
    line(
        "coordinator peak RSS over the whole run, v1 install included",
        &|r| mib(r.coordinator_run_peak_kib),
    );
    line(
        "broker egress connections at the end / closed during the rollout",
        &|r| format!("{} / {}", r.egress.connections, r.egress.closed),
    );
    line("Mosquitto `$SYS/broker/bytes/sent` growth", &|r| {
        r.mosquitto_sys_bytes.map_or("-".to_owned(), mb)
    });
    line("Mosquitto CPU / peak RSS", &|r| {
        r.mosquitto_peak_kib.map_or("-".to_owned(), |kib| {
            format!("{:.1} s / {}", r.rollout.cpu.mosquitto, mib(kib))
        })
    });
    line("chunk bytes served over HTTP / as MQTT frames", &|r| {
        format!("{} / {}", mb(r.http_chunk_bytes), mb(r.mqtt_frame_bytes))
    });
    line("ideal chunk bytes (new chunks × nodes)", &|r| {
        mb(releases.new_chunk_bytes * r.nodes as u64)
    });
    line("swarm peak RSS, sum / per agent", &|r| {
        format!(
            "{} / {:.1} MiB",
            mib(r.swarm_peak_kib),
            r.swarm_peak_kib as f64 / 1024.0 / r.nodes as f64
        )
    });
    line("swarm threads / open files at the end", &|r| {
        format!("{} / {}", r.swarm_threads, r.swarm_files)
    });
    line("threads of the first swarm process, by name", &|r| {
        r.swarm_thread_names.clone()
    });
    line("agent reconnections during the rollout", &|r| {
        r.reconnects.to_string()
    });
}
