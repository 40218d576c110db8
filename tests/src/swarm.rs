//! Hundreds of real agents for a [`Fleet`]: `agent-swarm` processes (see
//! `src/bin/agent_swarm.rs`), each running a share of the agents in one process, all killed
//! when the [`Swarm`] is dropped.
//!
//! Node ids are `{prefix}{index:05}` for index 0..N, split into contiguous ranges, one per
//! process; every agent's data directory is `DATA/swarm-K/<node id>`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::bins::{tail, Bins};
use crate::fleet::Fleet;
use crate::process::Proc;
use crate::wait::{wait_until, Fatal};

/// Options for [`Swarm::start`].
#[derive(Debug, Clone)]
pub struct SwarmOptions {
    /// Agents in all.
    pub nodes: usize,
    /// `agent-swarm` processes sharing them (as evenly as possible).
    pub processes: usize,
    /// Node ids are this followed by a zero-padded index.
    pub prefix: String,
    /// `--label k=v` for every agent.
    pub labels: Vec<(String, String)>,
    /// Added to every agent's `agent run` flags (e.g. `--no-http`).
    pub agent_args: Vec<String>,
    /// Agents each process starts per second.
    pub start_rate: u32,
    /// Runtime worker threads per process.
    pub workers: usize,
}

impl Default for SwarmOptions {
    fn default() -> Self {
        SwarmOptions {
            nodes: 100,
            processes: 1,
            prefix: "sim-".to_owned(),
            labels: Vec::new(),
            agent_args: Vec::new(),
            start_rate: 100,
            workers: 4,
        }
    }
}

/// Running `agent-swarm` processes.
pub struct Swarm {
    procs: Vec<Proc>,
    nodes: Vec<String>,
}

impl Swarm {
    /// Starts the processes against `fleet`'s broker with the agents' data under `data`
    /// (created if needed). Returns at once; the agents come up at `start_rate` per second
    /// per process (wait with [`Swarm::wait_online`]).
    pub fn start(fleet: &Fleet, data: &Path, options: &SwarmOptions) -> Result<Swarm> {
        if options.nodes == 0 || options.processes == 0 || options.processes > options.nodes {
            bail!(
                "a swarm of {} agents in {} processes: want at least one agent per process",
                options.nodes,
                options.processes
            );
        }
        let binary = swarm_binary(fleet.bins())?;
        std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
        let trust = data.join("trust.json");
        std::fs::write(&trust, fleet.trusted_keys()?.to_json())
            .with_context(|| format!("writing {}", trust.display()))?;
        let mut procs = Vec::with_capacity(options.processes);
        let mut first = 0;
        for k in 0..options.processes {
            // The first `nodes % processes` processes take one agent more.
            let count = options.nodes / options.processes
                + usize::from(k < options.nodes % options.processes);
            let dir = data.join(format!("swarm-{k}"));
            std::fs::create_dir_all(&dir)?;
            let mut args: Vec<OsString> = vec![
                "--count".into(),
                count.to_string().into(),
                "--first".into(),
                first.to_string().into(),
                "--prefix".into(),
                options.prefix.clone().into(),
                "--data".into(),
                dir.clone().into(),
                "--broker".into(),
                fleet.broker_url().into(),
                "--trust".into(),
                trust.clone().into(),
                "--start-rate".into(),
                options.start_rate.to_string().into(),
                "--workers".into(),
                options.workers.to_string().into(),
            ];
            for (key, value) in &options.labels {
                args.extend(["--label".into(), format!("{key}={value}").into()]);
            }
            args.push("--".into());
            args.extend(options.agent_args.iter().map(OsString::from));
            procs.push(Proc::spawn(
                &format!("agent-swarm {k}"),
                &binary,
                args,
                data.join(format!("swarm-{k}.log")),
            )?);
            first += count;
        }
        let nodes = (0..options.nodes)
            .map(|i| format!("{}{i:05}", options.prefix))
            .collect();
        Ok(Swarm { procs, nodes })
    }

    /// Every agent's node id, in index order.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The processes' pids, while they run.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(Proc::pid).collect()
    }

    /// Fails with [`Fatal`] (ending any wait at once) and the log's tail if a process exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for proc in &mut self.procs {
            if let Some(status) = proc.exit_status() {
                return Err(Fatal(format!(
                    "{} exited ({status})\n{}",
                    proc.name(),
                    proc.log_tail(30)
                ))
                .into());
            }
        }
        Ok(())
    }

    /// Waits until `coordinator nodes --json` lists every agent of the swarm as online. On
    /// timeout the error says how many were; the fleet's whole node list would be too long.
    pub fn wait_online(&mut self, fleet: &Fleet, timeout: Duration) -> Result<()> {
        let total = self.nodes.len();
        let mut online = 0;
        let waited = wait_until(
            timeout,
            format_args!("all {total} swarm agents to be online in `nodes --json`"),
            || {
                self.check_alive()?;
                let listed = fleet.nodes()?;
                let ids = online_ids(&listed);
                online = self
                    .nodes
                    .iter()
                    .filter(|n| ids.contains(&n.as_str()))
                    .count();
                Ok(online == total)
            },
        );
        waited.with_context(|| {
            format!(
                "{online} of {total} agents online
{}",
                self.log_tails(20)
            )
        })
    }

    /// The last `lines` lines of every process's log.
    pub fn log_tails(&self, lines: usize) -> String {
        self.procs.iter().map(|p| p.log_tail(lines)).collect()
    }

    /// Every process's log file.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.procs.iter().map(|p| p.log_path().to_owned()).collect()
    }
}

/// The ids of the nodes `nodes --json` lists as online.
fn online_ids(nodes: &serde_json::Value) -> Vec<&str> {
    nodes
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|n| n.get("online").and_then(serde_json::Value::as_bool) == Some(true))
                .filter_map(|n| n.get("node").and_then(serde_json::Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

/// The `agent-swarm` executable beside `bins`' agent. Run by cargo, it is built first (once
/// per process), as [`Bins::of_this_build`] builds the others: `cargo run --bin X` builds X
/// alone.
pub fn swarm_binary(bins: &Bins) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let binary = bins.agent.with_file_name("agent-swarm");
    let release = binary
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "release");
    let built = BUILT.get_or_init(|| {
        let Ok(cargo) = std::env::var("CARGO") else {
            return Ok(());
        };
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["--bin", "agent-swarm"]);
        if release {
            cmd.arg("--release");
        }
        match cmd.output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "`cargo build --bin agent-swarm` failed ({}):\n{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 40)
            )),
            Err(e) => Err(format!("running cargo build: {e}")),
        }
    });
    if let Err(e) = built {
        bail!("{e}");
    }
    if !binary.is_file() {
        bail!(
            "{} is missing: build it with `cargo build{} -p system-tests --bin agent-swarm`",
            binary.display(),
            if release { " --release" } else { "" }
        );
    }
    Ok(binary)
}
