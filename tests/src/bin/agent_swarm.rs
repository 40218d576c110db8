//! `agent-swarm`: many real agents in one process, for the fleet-scale bench (issue 6).
//!
//! ```text
//! agent-swarm --count 250 --first 0 --data DIR --broker mqtt://127.0.0.1:1883 \
//!             --trust keys/trust.json [--label ring=sim] [--start-rate 100] [--workers 4] \
//!             [-- AGENT RUN FLAGS, e.g. --no-http]
//! ```
//!
//! Each agent is `agent::daemon::run`, the code `agent run` runs, with its own node id
//! (`PREFIX` + the zero-padded index), its own data directory (`DATA/<node id>`: journal,
//! slots, fetch store, status.json) and its own MQTT connection and HTTP client. Its
//! [`agent::daemon::Config`] comes from `agent run`'s own argument parser and validation
//! ([`agent::cli::RunArgs`]), fed the flags above plus whatever follows `--`, so a flag the
//! agent gains is available here without a change, and every configuration is validated
//! before the first agent starts.
//!
//! What differs from N `agent run` processes, and why it is fair for a fleet figure:
//! - The agents share one multi-threaded tokio runtime (`--workers` threads and one blocking
//!   pool) instead of one single-threaded runtime each. The agent's journal flush and
//!   status.json fsync block the thread they run on: alone on its node that stalls only the
//!   agent, here it stalls one of the shared workers, so the swarm can only be slower than a
//!   real fleet, not faster.
//! - Agents are started `--start-rate` per second, as a fleet's nodes do not all boot in the
//!   same millisecond; this spreads the broker connection storm and the journal opens.
//! - The process raises its soft open-file limit to the hard one: each agent holds its broker
//!   socket, its journal's files and HTTP connections, and up to a few dozen files while it
//!   assembles a slot.
//!
//! An agent whose run loop ends on its own (an error, a panic) stops the whole swarm with that
//! agent's error, exit status 1: a bench must not quietly measure a smaller fleet. SIGTERM or
//! ctrl-c shut every agent down as `agent run` does (offline presence, disconnect).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent::daemon::Config;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use protocol::NodeId;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;

/// How long the agents get to say goodbye after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Open files one agent may hold at its busiest: broker socket, journal, a few HTTP
/// connections, and up to `images`' 32 written files waiting for fsync during assembly.
const FILES_PER_AGENT: u64 = 48;
/// Digits of the index in a node id: room for 100,000 agents, and ids of one fleet sort.
const ID_DIGITS: usize = 5;

#[derive(Parser)]
#[command(
    name = "agent-swarm",
    about = "Run many real agents (agent::daemon::run) in one process, for fleet-scale benches."
)]
struct Cli {
    /// Agents to run in this process.
    #[arg(long)]
    count: usize,
    /// Index of the first agent; the agents are FIRST..FIRST+COUNT.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Node ids are PREFIX followed by the index, zero-padded to five digits.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Parent of the agents' data directories (DATA/<node id>, created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Broker URL, mqtt://HOST:PORT.
    #[arg(long)]
    broker: String,
    /// The trust.json written by `coordinator keygen`.
    #[arg(long)]
    trust: PathBuf,
    /// A label for every agent, KEY=VALUE; repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Agents started per second.
    #[arg(long, default_value_t = 100)]
    start_rate: u32,
    /// Runtime worker threads shared by all the agents.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Flags added to every agent's `agent run` arguments.
    #[arg(last = true, value_name = "AGENT RUN FLAGS")]
    agent_args: Vec<OsString>,
}

/// `agent run`'s own arguments, parsed the way the agent binary parses them.
#[derive(Parser)]
#[command(name = "agent run", no_binary_name = true)]
struct AgentRun {
    #[command(flatten)]
    args: agent::cli::RunArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // The log goes to a file that benches search.
        .with_ansi(false)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent-swarm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.count == 0 {
        bail!("--count 0: nothing to run; give the number of agents");
    }
    if cli.start_rate == 0 || cli.workers == 0 {
        bail!("--start-rate and --workers must be at least 1");
    }
    raise_open_file_limit(cli.count as u64)?;
    // Every agent's configuration is validated before the first one starts.
    let configs = (cli.first..cli.first + cli.count)
        .map(|index| agent_config(&cli, index))
        .collect::<Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.workers)
        .thread_name("swarm-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(swarm(configs, cli.start_rate))
}

/// The [`Config`] `agent run` would build for agent `index`.
fn agent_config(cli: &Cli, index: usize) -> Result<Config> {
    let node = format!("{}{index:0ID_DIGITS$}", cli.prefix);
    let mut args: Vec<OsString> = vec![
        "--data".into(),
        cli.data.join(&node).into(),
        "--node-id".into(),
        node.clone().into(),
        "--broker".into(),
        cli.broker.clone().into(),
        "--trust".into(),
        cli.trust.clone().into(),
    ];
    for label in &cli.labels {
        args.extend(["--label".into(), label.into()]);
    }
    args.extend(cli.agent_args.iter().cloned());
    let parsed = AgentRun::try_parse_from(&args)
        .map_err(|e| anyhow!("{}", e.render()))
        .with_context(|| format!("agent {node}: `agent run` refuses these flags"))?;
    parsed
        .args
        .validate()
        .with_context(|| format!("agent {node}: invalid configuration"))
}

/// Starts the agents `start_rate` per second and runs them until a signal, or until one of
/// them stops on its own.
async fn swarm(configs: Vec<Config>, start_rate: u32) -> Result<()> {
    let total = configs.len();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents: JoinSet<(NodeId, Result<()>)> = JoinSet::new();
    let mut pending = configs.into_iter();
    let mut start = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(start_rate)));
    // Late ticks are not made up in a burst: the point is the spread.
    start.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let began = Instant::now();
    let mut started = 0usize;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let outcome = loop {
        tokio::select! {
            // The next agent's turn to start.
            _ = start.tick(), if started < total => {
                let Some(config) = pending.next() else { continue };
                let node = config.node.clone();
                let span = tracing::info_span!("agent", node = %node);
                let mut stop = stop_rx.clone();
                agents.spawn(async move {
                    let shutdown = async move {
                        // A dropped sender also means stop.
                        let _ = stop.wait_for(|stop| *stop).await;
                    };
                    let result = agent::daemon::run(config, shutdown).instrument(span).await;
                    (node, result)
                });
                started += 1;
                if started == total {
                    tracing::info!(
                        agents = total,
                        after_ms = began.elapsed().as_millis() as u64,
                        resources = %own_resources(),
                        "every agent started"
                    );
                }
            }
            // An agent's run loop ended before the swarm was told to stop.
            Some(ended) = agents.join_next() => {
                break Err(match ended {
                    Ok((node, Ok(()))) => anyhow!("agent {node} stopped on its own"),
                    Ok((node, Err(e))) => e.context(format!("agent {node} failed")),
                    Err(e) => anyhow!("an agent task panicked or was cancelled: {e}"),
                }
                .context("stopping the swarm: a bench must not go on with fewer agents"));
            }
            () = &mut signal => {
                tracing::info!(agents = started, "shutting down");
                break Ok(());
            }
        }
    };
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(ended) = agents.join_next().await {
            match ended {
                Ok((_, Ok(()))) => {}
                Ok((node, Err(e))) => {
                    tracing::warn!(%node, error = %format!("{e:#}"), "agent failed while stopping")
                }
                Err(e) => tracing::warn!(error = %e, "agent task failed while stopping"),
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = agents.len(),
            "agents still stopping after {SHUTDOWN_GRACE:?}; leaving"
        );
    }
    outcome
}

/// Raises the soft open-file limit to the hard one; fails if even that cannot hold `agents`.
fn raise_open_file_limit(agents: u64) -> Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = agents * FILES_PER_AGENT + 64;
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).context("raising the open-file limit (RLIMIT_NOFILE)")?;
    match limit.maximum {
        Some(max) if max < want => bail!(
            "{agents} agents may need {want} open files and the hard limit is {max}: run fewer \
             agents per process, or raise the hard limit (`ulimit -Hn`, LimitNOFILE=)"
        ),
        _ => Ok(()),
    }
}

/// This process's resident memory, threads and open files, for the log.
fn own_resources() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_owned(), |v| v.trim().to_owned())
    };
    let files = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    format!(
        "rss {}, threads {}, open files {files}",
        field("VmRSS:"),
        field("Threads:")
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
