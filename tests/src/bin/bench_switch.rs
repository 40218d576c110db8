//! `bench-switch`: the red/black figures of issue 4, each next to a baseline measured in
//! the same run.
//!
//! ```text
//! cargo build --release --bins && cargo run --release -p system-tests --bin bench-switch
//! ```
//!
//! A coordinator (embedded broker) and one agent run the `sample-app` behind the agent's
//! front door. Two releases, v1 and v2, differ only in `APP_VERSION`; both have
//! `probation_secs = 1` and `grace_secs = 600`, so the version traffic left stays warm.
//!
//! 1. **Switch and rollback latency**: after rolling out v1 then v2, 100 operator rollbacks
//!    (`coordinator node rollback n1`), each measured twice: the agent's own
//!    `last_update.switch_ms` (decision → serving) and the wall time from starting the CLI
//!    to the front door answering the other version on `/version` (a new connection every
//!    1 ms). Each flip is classed *warm* when the version rolled back to was running before
//!    the command (its pid file under `DATA/run/` existed), *cold* otherwise. Baseline: the
//!    CLI round trip of `coordinator nodes --json`, the floor under the wall time; the time
//!    until the rollback CLI exits is shown too, to tell the coordinator's share from the
//!    broker's and the agent's.
//! 2. **Failed requests under load**: 500 requests/s of `GET /` through the front door from
//!    4 client threads, each request on a new connection (keep-alive off), during 20
//!    rollbacks started 250 ms apart; then the same with one keep-alive connection per
//!    thread. Baseline: the keep-alive-off load for 5 s with no rollback. Every request
//!    that does not get a whole `200` response counts as failed, by cause, except that a
//!    request whose reused keep-alive connection the server closed before answering is sent
//!    once more on a new connection (as HTTP clients do) and counted as retried. Also
//!    counted: answers from the version traffic had left (a connection stays with the
//!    version it was opened to).
//! 3. **Front-door throughput**: a 1 GiB seeded file, kept outside the slot (the release's
//!    `--root` is an absolute path to a directory of the bench's temp dir, so publishing
//!    stays small), downloaded through the front door and, as the baseline, straight from
//!    the active version's private port (found from its pid file and `/proc`), alternately,
//!    11 timed rounds each after one untimed round.
//! 4. **Rollback of a 200 MB release**: a fresh fleet installs two seeded ~200 MB
//!    files-only releases (`bench_data`, `Shape::RELEASE` and its v2), then is rolled back
//!    10 times: the agent's `switch_ms` and the wall time from starting the CLI to
//!    `DATA/current` naming the other slot. Baseline: what Mender's `directory` update
//!    module runs on `ArtifactRollback` (`rm -rf DEST; mkdir -p DEST; tar -xf
//!    prev_files.tar -C DEST`) on the same tree, timed without and with a following `sync`
//!    (the agent makes its flip durable; the module leaves that to the page cache).
//!
//! Prints markdown tables on stdout, progress on stderr. Needs `tar` and `sync`.
//! `-- --downloads-only` runs figure 3 alone (setup, then the downloads).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, BufRead as _, BufReader, BufWriter, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use protocol::messages::{NodeState, Outcome, SlotReport};
use protocol::ReleaseId;
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use system_tests::bench_data::{self, make_v2, median, require_tool, write_v1, Shape};
use system_tests::process::{free_addr, run};
use system_tests::{Agent, Bins, Broker, Fleet};

const APP: &str = "web";
const NODE: &str = "n1";
/// Probation of the app releases: short, so the bench does not wait on it.
const PROBATION_SECS: u32 = 1;
/// Grace of the app releases: longer than the bench, so the other version stays warm.
const GRACE_SECS: u32 = 600;
/// Health probe interval while a version starts (the spec's minimum is 50).
const HEALTH_INTERVAL_MS: u32 = 50;

const FLIPS: usize = 100;
/// How often the wall-time pollers look (the door's `/version`, or `DATA/current`).
const POLL_EVERY: Duration = Duration::from_millis(1);
/// How often the agent's status file is read while a rollback completes.
const STATUS_POLL: Duration = Duration::from_millis(2);
/// Longest any one step may take before the bench gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How many `coordinator nodes --json` calls give the CLI-floor baseline.
const CLI_FLOOR_CALLS: usize = 10;

const LOAD_RATE: u32 = 500;
const LOAD_THREADS: u32 = 4;
const LOAD_ROLLBACKS: usize = 20;
/// The no-rollback baseline's length, and the load before and after the rollbacks.
const QUIET_LOAD: Duration = Duration::from_secs(5);
const LOAD_SETTLE: Duration = Duration::from_secs(1);
/// Rollbacks under load start this far apart (or back to back when one takes longer).
const ROLLBACK_EVERY: Duration = Duration::from_millis(250);
/// Per-request socket timeout of the load and download clients.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

const BIG_FILE: &str = "big.bin";
const BIG_FILE_BYTES: u64 = 1 << 30;
const DOWNLOAD_ROUNDS: usize = 11;
const DOWNLOAD_BUFFER: usize = 256 * 1024;

const FILES_APP: &str = "media";
const FILES_SEED: u64 = 2024;
const FILES_ROLLBACKS: usize = 10;
const TAR_ROUNDS: usize = 3;

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-switch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    require_tool("tar", "tar")?;
    let bins = Bins::of_this_build().clone();
    if !bins.agent.parent().is_some_and(|d| d.ends_with("release")) {
        eprintln!(
            "warning: not a release build; run with `cargo run --release …` for real figures"
        );
    }
    let downloads_only = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--downloads-only") => true,
        Some(other) => bail!("unknown argument {other:?}; the only option is --downloads-only"),
    };
    let sample_app = sample_app(&bins)?;
    let load_at_start = load_average();

    let (flips, cli_floor, loads, downloads) = {
        let fleet = Fleet::start_with(Broker::Embedded, bins.clone())?;
        let [agent] = fleet.agents([NODE])?;
        let door = free_addr()?;
        let root = fleet.scratch("served-root")?;
        eprintln!(
            "writing a {} MiB file to {}",
            BIG_FILE_BYTES >> 20,
            root.display()
        );
        write_big_file(&root.join(BIG_FILE), BIG_FILE_BYTES)?;
        for version in ["1", "2"] {
            let src = fleet.scratch(&format!("{APP}-{version}"))?;
            write_app_release(&src, &sample_app, version, &root, door)?;
            fleet.publish(&src, APP, version)?;
            fleet.rollout(APP, version)?;
            fleet.wait_all_on(APP, version, STEP_TIMEOUT)?;
        }
        wait_door_answers(&fleet, door, "2")?;
        if downloads_only {
            let downloads = bench_downloads(&agent, door)?;
            print_machine(&load_at_start);
            print_downloads(&downloads);
            return Ok(());
        }

        let flips = bench_flips(&fleet, &agent, door)?;
        let cli_floor = cli_floor(&fleet)?;
        let loads = bench_load(&fleet, &agent, door)?;
        let downloads = bench_downloads(&agent, door)?;
        (flips, cli_floor, loads, downloads)
    };
    let files = bench_files_rollback(&bins)?;

    print_machine(&load_at_start);
    print_flips(&flips, cli_floor);
    print_loads(&loads);
    print_downloads(&downloads);
    print_files(&files);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The release under test.

/// The `sample-app` of this build profile, built first when run by cargo (which builds
/// only this package's binaries for `cargo run -p system-tests`).
fn sample_app(bins: &Bins) -> Result<PathBuf> {
    let bin = bins.agent.with_file_name("sample-app");
    if let Ok(cargo) = std::env::var("CARGO") {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("tests/ lives in the workspace")?
            .join("Cargo.toml");
        let mut build = Command::new(cargo);
        build
            .arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["-p", "sample-app", "--bin", "sample-app"]);
        if bin.parent().is_some_and(|d| d.ends_with("release")) {
            build.arg("--release");
        }
        let out = run(&mut build, Duration::from_secs(900))?;
        ensure!(
            out.status.success(),
            "`cargo build -p sample-app` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --bins` first",
        bin.display()
    );
    Ok(bin)
}

/// A release of the sample app: the binary and a `release.toml` running it behind a front
/// door on `door`, serving the files of `root` (outside the slot) and saying `version`.
fn write_app_release(
    dir: &Path,
    sample_app: &Path,
    version: &str,
    root: &Path,
    door: SocketAddr,
) -> Result<()> {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    fs::copy(sample_app, bin.join("sample-app"))
        .with_context(|| format!("copying {} into the release", sample_app.display()))?;
    let root = root.to_str().context("the served root is not UTF-8")?;
    // `{:?}` of a plain path or version is a valid TOML basic string.
    let toml = format!(
        r#"[run]
command = "bin/sample-app"
args = ["--root", {root:?}]
probation_secs = {PROBATION_SECS}
grace_secs = {GRACE_SECS}

[run.env]
APP_VERSION = {version:?}

[run.health]
http = "/healthz"
interval_ms = {HEALTH_INTERVAL_MS}

[run.front_door]
listen = "{door}"
"#
    );
    fs::write(dir.join("release.toml"), toml).context("writing release.toml")
}

/// `bytes` of seeded random data (a 1 MiB block, stamped with its index so that no two
/// blocks are equal).
fn write_big_file(path: &Path, bytes: u64) -> Result<()> {
    let mut block = vec![0u8; 1 << 20];
    StdRng::seed_from_u64(4).fill_bytes(&mut block);
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for index in 0..bytes / block.len() as u64 {
        block[..8].copy_from_slice(&index.to_le_bytes());
        out.write_all(&block)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    out.flush()?;
    Ok(())
}

fn wait_door_answers(fleet: &Fleet, door: SocketAddr, version: &str) -> Result<()> {
    fleet.wait_until(
        STEP_TIMEOUT,
        format_args!("the front door on {door} to answer version {version}"),
        || Ok(door_version(door).as_deref() == Some(version)),
    )
}

// ---------------------------------------------------------------------------------------
// 1. Switch and rollback latency.

/// [`FLIPS`] operator rollbacks, each timed by the agent and by a poller of the door.
fn bench_flips(fleet: &Fleet, agent: &Agent, door: SocketAddr) -> Result<Vec<Flip>> {
    let poller = Poller::spawn(move || door_version(door));
    eprintln!("{FLIPS} operator rollbacks, timed");
    let mut flips = Vec::with_capacity(FLIPS);
    for i in 0..FLIPS {
        let flip = operator_rollback(fleet, agent, Some(&poller), |slot| {
            Ok(slot.release.version.to_string())
        })?;
        if (i + 1) % 20 == 0 {
            eprintln!("  {} flips done", i + 1);
        }
        flips.push(flip);
    }
    Ok(flips)
}

/// One operator rollback as measured.
struct Flip {
    /// The version rolled back to.
    to: String,
    /// The version rolled back to was running (warm) before the command.
    warm: bool,
    /// The agent's `last_update.switch_ms`.
    agent_ms: u64,
    /// CLI start → the poller saw the other version; `None` when not polled.
    wall: Option<Duration>,
    /// CLI start → the CLI exited (the coordinator had handed the command to the broker).
    cli: Duration,
    /// Just before the CLI started, and once the agent's status reported the rollback.
    sent: Instant,
    confirmed: Instant,
}

/// Times how long after a start instant a probe first sees a wanted value, on its own
/// thread so the main thread can run the command meanwhile.
struct Poller {
    jobs: Option<mpsc::Sender<(Instant, String)>>,
    seen: mpsc::Receiver<Result<Duration, String>>,
}

impl Poller {
    /// `probe` returns what is observed now (a version, a slot name), `None` if nothing.
    fn spawn(probe: impl Fn() -> Option<String> + Send + 'static) -> Poller {
        let (jobs, job_rx) = mpsc::channel::<(Instant, String)>();
        let (seen_tx, seen) = mpsc::channel();
        // Detached: it ends when `jobs` is dropped, after at most one job's deadline.
        thread::spawn(move || {
            for (started, want) in job_rx {
                let result = loop {
                    if probe().as_deref() == Some(want.as_str()) {
                        break Ok(started.elapsed());
                    }
                    if started.elapsed() > STEP_TIMEOUT {
                        break Err(format!("{want:?} not observed within {STEP_TIMEOUT:?}"));
                    }
                    thread::sleep(POLL_EVERY);
                };
                if seen_tx.send(result).is_err() {
                    return;
                }
            }
        });
        Poller {
            jobs: Some(jobs),
            seen,
        }
    }

    /// Runs `action` and returns how long after `started` the probe first saw `want`.
    fn time(
        &self,
        started: Instant,
        want: String,
        action: impl FnOnce() -> Result<()>,
    ) -> Result<Duration> {
        let jobs = self.jobs.as_ref().context("the poller is shut down")?;
        jobs.send((started, want))
            .map_err(|_| anyhow!("the poller thread is gone"))?;
        action()?;
        self.seen
            .recv_timeout(STEP_TIMEOUT + Duration::from_secs(5))
            .context("the poller did not answer")?
            .map_err(|e| anyhow!(e))
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.jobs.take();
    }
}

/// The version the front door answers on `/version` right now, over a new connection.
fn door_version(door: SocketAddr) -> Option<String> {
    match get(door, "/version") {
        Ok((200, body)) => Some(String::from_utf8_lossy(&body).trim().to_owned()),
        _ => None,
    }
}

/// Sends `coordinator node rollback NODE` and waits until the agent reports it done.
/// `want` says what `poller` (if any) must observe once the node serves `target`.
fn operator_rollback(
    fleet: &Fleet,
    agent: &Agent,
    poller: Option<&Poller>,
    want: impl Fn(&SlotReport) -> Result<String>,
) -> Result<Flip> {
    let before = read_status(agent)?;
    let target = before
        .previous
        .clone()
        .context("the node has no previous version to roll back to")?;
    let warm = pid_file(agent, &target)?.exists();
    let want = want(&target)?;
    let sent = Instant::now();
    let mut cli = Duration::ZERO;
    let mut send = || {
        fleet.cli(&["node", "rollback", NODE])?;
        cli = sent.elapsed();
        Ok(())
    };
    let wall = match poller {
        Some(poller) => Some(poller.time(sent, want, send)?),
        None => {
            send()?;
            None
        }
    };
    let after = wait_rolled_back(fleet, agent, before.last_seq, &target.release)?;
    let confirmed = Instant::now();
    let agent_ms = after
        .last_update
        .map(|u| u.switch_ms)
        .context("no last_update after a rollback")?;
    Ok(Flip {
        to: target.release.version.to_string(),
        warm,
        agent_ms,
        wall,
        cli,
        sent,
        confirmed,
    })
}

/// The agent's status as `agent status --json` prints it: the same file, read directly
/// because polling it every few milliseconds through a process per read would load the
/// two cores the agent runs on.
fn read_status(agent: &Agent) -> Result<NodeState> {
    let path = agent.data_dir().join("status.json");
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a status", path.display()))
}

/// Waits until the agent has acted on a command after `seq` and reports a finished
/// rollback to `target`.
fn wait_rolled_back(
    fleet: &Fleet,
    agent: &Agent,
    seq: u64,
    target: &ReleaseId,
) -> Result<NodeState> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        ensure!(
            agent.is_running(),
            "agent {} exited during a rollback{}",
            agent.node(),
            fleet.report()
        );
        let state = read_status(agent)?;
        if state.last_seq > seq {
            if let Some(update) = &state.last_update {
                match &update.outcome {
                    Outcome::RolledBack { .. } if &update.release == target => {
                        let current = state.current.as_ref().map(|c| &c.release);
                        ensure!(
                            current == Some(target),
                            "the agent reports a rollback to {target} but runs {current:?}"
                        );
                        return Ok(state);
                    }
                    Outcome::Failed { reason } => {
                        bail!(
                            "the rollback to {target} failed: {reason}{}",
                            fleet.report()
                        )
                    }
                    _ => {}
                }
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {STEP_TIMEOUT:?} waiting for a rollback to {target}{}",
                fleet.report()
            );
        }
        thread::sleep(STATUS_POLL);
    }
}

/// The pid file the agent keeps for a version of `slot` while it runs.
fn pid_file(agent: &Agent, slot: &SlotReport) -> Result<PathBuf> {
    Ok(agent
        .data_dir()
        .join("run")
        .join(format!("{}.pid", slot_name(slot)?)))
}

fn slot_name(slot: &SlotReport) -> Result<String> {
    Path::new(&slot.slot_dir)
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("slot dir {:?} has no name", slot.slot_dir))
}

/// The median wall time of `coordinator nodes --json`: what any CLI command costs here.
fn cli_floor(fleet: &Fleet) -> Result<Duration> {
    let mut samples = Vec::with_capacity(CLI_FLOOR_CALLS);
    for _ in 0..CLI_FLOOR_CALLS {
        let started = Instant::now();
        fleet.cli(&["nodes", "--json"])?;
        samples.push(started.elapsed());
    }
    Ok(median(&samples))
}

// ---------------------------------------------------------------------------------------
// 2. Failed requests under load.

struct LoadRun {
    label: &'static str,
    elapsed: Duration,
    requests: u64,
    /// Failed requests by cause.
    failed: BTreeMap<String, u64>,
    /// Requests whose reused keep-alive connection the server closed before answering,
    /// that then succeeded on a new connection (counted here, not as failed).
    retried: u64,
    /// Requests sent while no rollback was under way (see [`judge`]), and of those the
    /// ones answered by a version other than the one the node had settled on.
    judged: u64,
    stale: u64,
    max_latency: Duration,
    flips: Vec<Flip>,
}

#[derive(Default)]
struct LoadStats {
    requests: u64,
    failed: BTreeMap<String, u64>,
    retried: u64,
    max_latency: Duration,
    /// When each successful request was sent, and the version that answered it.
    answers: Vec<(Instant, String)>,
}

fn bench_load(fleet: &Fleet, agent: &Agent, door: SocketAddr) -> Result<Vec<LoadRun>> {
    let quiet = || {
        thread::sleep(QUIET_LOAD);
        Ok(Vec::new())
    };
    let rollbacks = || -> Result<Vec<Flip>> {
        thread::sleep(LOAD_SETTLE);
        let mut flips = Vec::with_capacity(LOAD_ROLLBACKS);
        for _ in 0..LOAD_ROLLBACKS {
            let started = Instant::now();
            flips.push(operator_rollback(
                fleet,
                agent,
                None,
                |_| Ok(String::new()),
            )?);
            // Spaced out, so that requests also arrive while the version traffic left is
            // stopping and before the next flip, not only during flips.
            thread::sleep(ROLLBACK_EVERY.saturating_sub(started.elapsed()));
        }
        thread::sleep(LOAD_SETTLE);
        Ok(flips)
    };
    let mut runs = Vec::new();
    eprintln!("load, keep-alive off, no rollback");
    runs.push(load_during(
        "keep-alive off, no rollback (baseline)",
        agent,
        door,
        false,
        quiet,
    )?);
    eprintln!("load, keep-alive off, {LOAD_ROLLBACKS} rollbacks");
    runs.push(load_during(
        "keep-alive off, during rollbacks",
        agent,
        door,
        false,
        rollbacks,
    )?);
    eprintln!("load, keep-alive on, {LOAD_ROLLBACKS} rollbacks");
    runs.push(load_during(
        "keep-alive on, during rollbacks",
        agent,
        door,
        true,
        rollbacks,
    )?);
    Ok(runs)
}

/// Runs the client load against `door` while `during` (which returns the rollbacks it
/// made) runs on this thread.
fn load_during(
    label: &'static str,
    agent: &Agent,
    door: SocketAddr,
    keep_alive: bool,
    during: impl FnOnce() -> Result<Vec<Flip>>,
) -> Result<LoadRun> {
    let initial = read_status(agent)?
        .current
        .context("the node runs nothing")?
        .release
        .version
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..LOAD_THREADS)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || load_client(door, keep_alive, &stop))
        })
        .collect();
    let flips = during();
    stop.store(true, Ordering::Relaxed);
    let mut total = LoadStats::default();
    for client in clients {
        let stats = client
            .join()
            .map_err(|_| anyhow!("a load client panicked"))?;
        total.requests += stats.requests;
        total.retried += stats.retried;
        total.max_latency = total.max_latency.max(stats.max_latency);
        for (cause, count) in stats.failed {
            *total.failed.entry(cause).or_default() += count;
        }
        total.answers.extend(stats.answers);
    }
    let elapsed = started.elapsed();
    let flips = flips?;
    let (judged, stale) = judge(&total.answers, &initial, &flips);
    Ok(LoadRun {
        label,
        elapsed,
        requests: total.requests,
        failed: total.failed,
        retried: total.retried,
        judged,
        stale,
        max_latency: total.max_latency,
        flips,
    })
}

/// Of the answers to requests sent while no rollback was under way (before the first one
/// was sent, or after one was reported done and before the next was sent), how many there
/// were and how many came from a version other than the one the node had settled on.
fn judge(answers: &[(Instant, String)], initial: &str, flips: &[Flip]) -> (u64, u64) {
    let (mut judged, mut stale) = (0, 0);
    for (at, version) in answers {
        let settled = match flips.iter().rposition(|f| f.sent <= *at) {
            None => Some(initial),
            Some(i) if flips[i].confirmed <= *at => Some(flips[i].to.as_str()),
            Some(_) => None,
        };
        if let Some(settled) = settled {
            judged += 1;
            if version != settled {
                stale += 1;
            }
        }
    }
    (judged, stale)
}

/// One client thread: `GET /` at its share of [`LOAD_RATE`] until `stop`.
fn load_client(door: SocketAddr, keep_alive: bool, stop: &AtomicBool) -> LoadStats {
    let period = Duration::from_secs_f64(f64::from(LOAD_THREADS) / f64::from(LOAD_RATE));
    let mut stats = LoadStats::default();
    let mut conn = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else if now - next > period * 10 {
            // After a stall (a slow request), carry on at the rate instead of bursting.
            next = now;
        }
        next += period;
        let started = Instant::now();
        let result = if keep_alive {
            match get_keep_alive(&mut conn, door, "/") {
                // What HTTP clients do with an idempotent request (RFC 9110, 9.2.2); the
                // connection is gone, so this goes on a new one.
                Err(Failure::ClosedIdle) => {
                    stats.retried += 1;
                    get_keep_alive(&mut conn, door, "/")
                }
                other => other,
            }
        } else {
            get(door, "/").map_err(Failure::Other)
        };
        stats.requests += 1;
        stats.max_latency = stats.max_latency.max(started.elapsed());
        let failure = match result {
            Ok((200, body)) => match body.strip_prefix(b"sample-app ") {
                Some(version) => {
                    let version = String::from_utf8_lossy(version).trim().to_owned();
                    stats.answers.push((started, version));
                    None
                }
                None => Some("200 with an unexpected body".to_owned()),
            },
            Ok((status, _)) => Some(format!("HTTP {status}")),
            // Only a reused connection is retried, and the retry opens a new one.
            Err(Failure::ClosedIdle) => Some(CLOSED_EARLY.to_owned()),
            Err(Failure::Other(cause)) => Some(cause),
        };
        if let Some(cause) = failure {
            *stats.failed.entry(cause).or_default() += 1;
        }
    }
    stats
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: exact enough to tell a whole response from a failed one.

/// `GET path` over a new connection with `Connection: close`: status and body, or why not.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let stream = connect(addr)?;
    let mut reader = BufReader::new(stream);
    send_get(reader.get_mut(), addr, path, false)?;
    let head = read_head(&mut reader)?;
    let body = read_body(&mut reader, &head)?;
    Ok((head.status, body))
}

/// Why a keep-alive request failed.
enum Failure {
    /// The server closed a reused keep-alive connection before sending any byte of the
    /// response: the race every HTTP/1.1 client meets when a server closes idle
    /// connections, which they answer by sending an idempotent request again.
    ClosedIdle,
    Other(String),
}

/// What [`read_head`] says when the connection ends before the response starts.
const CLOSED_EARLY: &str = "closed before a response";

/// `GET path` over the keep-alive connection in `conn` (opened if there is none, dropped
/// after a failure or when the server says it closes).
fn get_keep_alive(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, Vec<u8>), Failure> {
    let reused = conn.is_some();
    let reader = match conn {
        Some(reader) => reader,
        None => conn.insert(BufReader::new(connect(addr).map_err(Failure::Other)?)),
    };
    let result = send_get(reader.get_mut(), addr, path, true).and_then(|()| {
        let head = read_head(reader)?;
        let body = read_body(reader, &head)?;
        Ok((head, body))
    });
    match result {
        Ok((head, body)) => {
            if head.close {
                *conn = None;
            }
            Ok((head.status, body))
        }
        Err(cause) => {
            *conn = None;
            if reused && cause == CLOSED_EARLY {
                Err(Failure::ClosedIdle)
            } else {
                Err(Failure::Other(cause))
            }
        }
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream =
        TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).map_err(|e| io_cause("connect", &e))?;
    let setup = stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HTTP_TIMEOUT)))
        .and_then(|()| stream.set_nodelay(true));
    setup.map_err(|e| io_cause("socket setup", &e))?;
    Ok(stream)
}

fn send_get(
    stream: &mut TcpStream,
    addr: SocketAddr,
    path: &str,
    keep_alive: bool,
) -> Result<(), String> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| io_cause("send", &e))
}

/// A response's status line and the headers this client cares about.
struct Head {
    status: u16,
    content_length: Option<u64>,
    close: bool,
}

fn read_head(reader: &mut BufReader<TcpStream>) -> Result<Head, String> {
    let mut line = String::new();
    let read = reader
        .read_line(&mut line)
        .map_err(|e| io_cause("receive", &e))?;
    if read == 0 {
        return Err(CLOSED_EARLY.to_owned());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed status line {:?}", line.trim_end()))?;
    let mut head = Head {
        status,
        content_length: None,
        close: false,
    };
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|e| io_cause("receive", &e))?;
        if read == 0 {
            return Err("closed within the response headers".to_owned());
        }
        let header = line.trim_end();
        if header.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(format!("malformed header {header:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(
                value
                    .parse()
                    .map_err(|_| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        }
    }
}

fn read_body(reader: &mut BufReader<TcpStream>, head: &Head) -> Result<Vec<u8>, String> {
    let length = head
        .content_length
        .ok_or("a response without content-length")?;
    let mut body = vec![0u8; usize::try_from(length).map_err(|_| "a huge content-length")?];
    reader
        .read_exact(&mut body)
        .map_err(|e| io_cause("receive body", &e))?;
    Ok(body)
}

/// A failure cause for the load table: the step and the kind of I/O error.
fn io_cause(step: &str, error: &io::Error) -> String {
    let kind = match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        io::ErrorKind::BrokenPipe => "broken pipe".to_owned(),
        io::ErrorKind::UnexpectedEof => "closed mid-response".to_owned(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("timed out ({HTTP_TIMEOUT:?})")
        }
        other => format!("{other:?}"),
    };
    format!("{step}: {kind}")
}

// ---------------------------------------------------------------------------------------
// 3. Front-door throughput.

struct Downloads {
    direct: Vec<Duration>,
    door: Vec<Duration>,
}

fn bench_downloads(agent: &Agent, door: SocketAddr) -> Result<Downloads> {
    let state = read_status(agent)?;
    let current = state.current.context("the node runs nothing")?;
    let pid_path = pid_file(agent, &current)?;
    let pid_text = fs::read_to_string(&pid_path)
        .with_context(|| format!("reading the app's pid file {}", pid_path.display()))?;
    let pid: u32 = pid_text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("{} holds no pid: {pid_text:?}", pid_path.display()))?;
    let private = SocketAddr::from(([127, 0, 0, 1], listening_port(pid)?));
    // The same version answers on both paths, or the comparison means nothing.
    let via_door = door_version(door);
    let direct_version = match get(private, "/version") {
        Ok((200, body)) => Some(String::from_utf8_lossy(&body).trim().to_owned()),
        _ => None,
    };
    ensure!(
        via_door.is_some() && via_door == direct_version,
        "the front door answers {via_door:?} but the app on {private} answers {direct_version:?}"
    );
    eprintln!(
        "downloading {} MiB {DOWNLOAD_ROUNDS}× through the door ({door}) and straight from the app ({private})",
        BIG_FILE_BYTES >> 20
    );
    let path = format!("/files/{BIG_FILE}");
    let mut result = Downloads {
        direct: Vec::new(),
        door: Vec::new(),
    };
    // One untimed round first: the first read of the file after writing it, and each
    // path's first connection, are not what is compared.
    download(private, &path, BIG_FILE_BYTES)?;
    download(door, &path, BIG_FILE_BYTES)?;
    for _ in 0..DOWNLOAD_ROUNDS {
        result
            .direct
            .push(download(private, &path, BIG_FILE_BYTES)?);
        result.door.push(download(door, &path, BIG_FILE_BYTES)?);
    }
    Ok(result)
}

/// Downloads `path` and checks it is `expect` bytes long; returns how long it took from
/// connect to the last byte.
fn download(addr: SocketAddr, path: &str, expect: u64) -> Result<Duration> {
    let started = Instant::now();
    let what = || format!("downloading http://{addr}{path}");
    let stream = connect(addr).map_err(|e| anyhow!("{}: {e}", what()))?;
    let mut reader = BufReader::with_capacity(DOWNLOAD_BUFFER, stream);
    send_get(reader.get_mut(), addr, path, false).map_err(|e| anyhow!("{}: {e}", what()))?;
    let head = read_head(&mut reader).map_err(|e| anyhow!("{}: {e}", what()))?;
    ensure!(
        head.status == 200 && head.content_length == Some(expect),
        "{}: status {}, content-length {:?}, expected 200 and {expect}",
        what(),
        head.status,
        head.content_length
    );
    let mut buffer = vec![0u8; DOWNLOAD_BUFFER];
    let mut got = 0u64;
    loop {
        let n = reader.read(&mut buffer).with_context(what)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    ensure!(got == expect, "{}: {got} of {expect} bytes", what());
    Ok(started.elapsed())
}

/// The TCP port process `pid` listens on, from its socket descriptors and `/proc/net/tcp`.
fn listening_port(pid: u32) -> Result<u16> {
    let fd_dir = format!("/proc/{pid}/fd");
    let mut inodes = HashSet::new();
    for entry in fs::read_dir(&fd_dir).with_context(|| format!("listing {fd_dir}"))? {
        let Ok(target) = fs::read_link(entry?.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'));
        if let Some(inode) = inode {
            inodes.insert(inode.to_owned());
        }
    }
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).with_context(|| format!("reading {table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1 (ADDR:PORT in hex), st field 3 (0A = LISTEN), inode 9.
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap_or_default();
                return u16::from_str_radix(port, 16)
                    .with_context(|| format!("bad local address {:?} in {table}", fields[1]));
            }
        }
    }
    bail!("process {pid} listens on no TCP port")
}

// ---------------------------------------------------------------------------------------
// 4. Rollback of a 200 MB release against Mender's directory module.

struct FilesRollback {
    bytes: u64,
    flips: Vec<Flip>,
    /// `rm -rf; mkdir -p; tar -xf` per round, and the same followed by `sync`.
    tar: Vec<Duration>,
    tar_sync: Vec<Duration>,
}

fn bench_files_rollback(bins: &Bins) -> Result<FilesRollback> {
    let fleet = Fleet::start_with(Broker::Embedded, bins.clone())?;
    let [agent] = fleet.agents([NODE])?;
    let scratch = fleet.scratch("files")?;
    let (v1, v2) = (scratch.join("v1"), scratch.join("v2"));
    eprintln!(
        "writing two ~{} MB release trees",
        Shape::RELEASE.approx_bytes() / 1_000_000
    );
    let bytes = write_v1(&v1, FILES_SEED, &Shape::RELEASE)?;
    make_v2(&v1, &v2, &Shape::RELEASE, FILES_SEED)?;
    for (version, src) in [("1", &v1), ("2", &v2)] {
        eprintln!("publishing and rolling out {FILES_APP} {version}");
        fleet.publish(src, FILES_APP, version)?;
        fleet.rollout(FILES_APP, version)?;
        fleet.wait_all_on(FILES_APP, version, STEP_TIMEOUT * 3)?;
    }

    eprintln!("{FILES_ROLLBACKS} rollbacks of the files-only release, timed");
    let current = agent.data_dir().join("current");
    let poller = Poller::spawn(move || {
        let target = fs::read_link(&current).ok()?;
        target.file_name()?.to_str().map(str::to_owned)
    });
    let mut flips = Vec::with_capacity(FILES_ROLLBACKS);
    for _ in 0..FILES_ROLLBACKS {
        flips.push(operator_rollback(&fleet, &agent, Some(&poller), slot_name)?);
    }
    drop(poller);

    // Mender's module made this at install time: a tar of what the directory held before.
    eprintln!("baseline: Mender's directory module rollback, {TAR_ROUNDS} rounds");
    let backup = scratch.join("prev_files.tar");
    let dest = scratch.join("dest");
    let tar = Command::new("tar")
        .arg("-cf")
        .arg(&backup)
        .arg("-C")
        .arg(&v1)
        .arg(".")
        .status()
        .context("running tar -cf")?;
    ensure!(tar.success(), "tar -cf of {} failed ({tar})", v1.display());
    system_tests::copy_tree(&v2, &dest)?;
    let mut result = FilesRollback {
        bytes,
        flips,
        tar: Vec::new(),
        tar_sync: Vec::new(),
    };
    for _ in 0..TAR_ROUNDS {
        // Whatever the set-up left dirty is not the rollback's to write.
        sync()?;
        let started = Instant::now();
        // The module's ArtifactRollback, line for line.
        let status = Command::new("sh")
            .arg("-c")
            .arg(r#"set -e; rm -rf "$1"; mkdir -p "$1"; tar -xf "$2" -C "$1""#)
            .arg("sh")
            .arg(&dest)
            .arg(&backup)
            .status()
            .context("running the directory module's rollback")?;
        ensure!(
            status.success(),
            "the directory module's rollback failed ({status})"
        );
        result.tar.push(started.elapsed());
        sync()?;
        result.tar_sync.push(started.elapsed());
    }
    Ok(result)
}

fn sync() -> Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    ensure!(status.success(), "sync failed ({status})");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tables.

/// The 1-minute load average: other work on the machine moves every figure here.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The nearest-rank `p` quantile (0 < p ≤ 1) of sorted samples.
fn quantile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// `p50 / p90 / p99 / max` of samples, each formatted by `show`.
fn spread<T: Copy + Ord>(samples: impl Iterator<Item = T>, show: impl Fn(T) -> String) -> String {
    let mut sorted: Vec<T> = samples.collect();
    sorted.sort();
    let figures: Option<Vec<String>> = [0.5, 0.9, 0.99, 1.0]
        .into_iter()
        .map(|p| quantile(&sorted, p).map(&show))
        .collect();
    figures.map_or_else(|| "–".to_owned(), |f| f.join(" / "))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn ms_int(v: u64) -> String {
    format!("{v} ms")
}

fn print_machine(load_at_start: &str) {
    println!(
        "Machine: {} cores, shared; 1-minute load average {} at the start, {} at the end.\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_at_start,
        load_average()
    );
}

fn print_flips(flips: &[Flip], cli_floor: Duration) {
    println!("### 1. {FLIPS} operator rollbacks on one node, app behind the front door\n");
    println!("| flips | n | agent `switch_ms` | CLI start → CLI exits | CLI start → door answers the other version |");
    println!("|---|---|---|---|---|");
    type Pick = fn(&Flip) -> bool;
    let classes: [(&str, Pick); 3] = [
        ("all", |_| true),
        ("warm (the version rolled back to was running)", |f| f.warm),
        ("cold (started from its slot)", |f| !f.warm),
    ];
    for (label, pick) in classes {
        let class: Vec<&Flip> = flips.iter().filter(|f| pick(f)).collect();
        println!(
            "| {label} | {} | {} | {} | {} |",
            class.len(),
            spread(class.iter().map(|f| f.agent_ms), ms_int),
            spread(class.iter().map(|f| f.cli), ms),
            spread(class.iter().filter_map(|f| f.wall), ms),
        );
    }
    println!(
        "| baseline: `coordinator nodes --json` (median of {CLI_FLOOR_CALLS}) | | | {} | |",
        ms(cli_floor)
    );
    let mut warm: Vec<u64> = flips
        .iter()
        .filter(|f| f.warm)
        .map(|f| f.agent_ms)
        .collect();
    warm.sort();
    match quantile(&warm, 0.99) {
        Some(p99) => println!(
            "\nTarget p99 ≤ 20 ms for a warm flip (agent `switch_ms`): {} ({p99} ms over {} warm flips).",
            if p99 <= 20 { "met" } else { "missed" },
            warm.len()
        ),
        None => println!("\nTarget p99 ≤ 20 ms for a warm flip: no warm flip was measured."),
    }
    println!(
        "Figures are p50 / p90 / p99 / max. `switch_ms` is whole milliseconds from the \
         agent's decision to the version serving, as the agent reports it. The wall time \
         includes starting the CLI process, the HTTP call, signing, the broker and the \
         agent; the door was probed with a new connection every {POLL_EVERY:?}.\n"
    );
}

fn print_loads(loads: &[LoadRun]) {
    println!(
        "### 2. Requests through the front door at {LOAD_RATE}/s ({LOAD_THREADS} client threads, `GET /`)\n"
    );
    println!("| load | rollbacks (warm / cold) | duration | requests | achieved rate | failed | failures by cause | retried after an idle close | answered by the version traffic had left | slowest request |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for run in loads {
        let failed: u64 = run.failed.values().sum();
        let causes = if run.failed.is_empty() {
            "–".to_owned()
        } else {
            run.failed
                .iter()
                .map(|(cause, n)| format!("{n}× {cause}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let warm = run.flips.iter().filter(|f| f.warm).count();
        println!(
            "| {} | {} ({warm} / {}) | {:.1} s | {} | {:.0}/s | {failed} | {causes} | {} | {} of {} | {} |",
            run.label,
            run.flips.len(),
            run.flips.len() - warm,
            run.elapsed.as_secs_f64(),
            run.requests,
            run.requests as f64 / run.elapsed.as_secs_f64(),
            run.retried,
            run.stale,
            run.judged,
            ms(run.max_latency)
        );
    }
    println!(
        "\nKeep-alive off: every request opens a new connection (`Connection: close`). \
         Keep-alive on: one connection per thread, reopened after the server closes it; a \
         request whose reused connection was closed before any byte of the response is sent \
         once more on a new connection, as HTTP clients do, and counted as retried (failed \
         only if that fails too). Rollbacks start {ROLLBACK_EVERY:?} apart. \"Answered by the \
         version traffic had left\": of the requests sent while no rollback was under way, \
         those answered by the other version (a connection stays with the version it was \
         opened to).\n"
    );
}

fn print_downloads(downloads: &Downloads) {
    let rate = |d: Duration| BIG_FILE_BYTES as f64 / 1e6 / d.as_secs_f64();
    let describe = |samples: &[Duration]| {
        let rates: Vec<f64> = samples.iter().map(|d| rate(*d)).collect();
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        format!("{:.0} MB/s ({min:.0}–{max:.0})", rate(median(samples)))
    };
    println!(
        "### 3. Streaming a {} MiB file (`GET /files/{BIG_FILE}`, {DOWNLOAD_ROUNDS} rounds each, alternating, after one untimed round)\n",
        BIG_FILE_BYTES >> 20
    );
    println!("| path | median (min–max) | median ÷ direct median | best ÷ direct best |");
    println!("|---|---|---|---|");
    let best = |samples: &[Duration]| samples.iter().min().map_or(0.0, |d| rate(*d));
    let ratio = rate(median(&downloads.door)) / rate(median(&downloads.direct));
    println!(
        "| baseline: straight from the app's private port | {} | 1.00 | 1.00 |",
        describe(&downloads.direct)
    );
    println!(
        "| through the agent's front door | {} | {ratio:.2} (target ≥ 0.9: {}) | {:.2} |",
        describe(&downloads.door),
        if ratio >= 0.9 { "met" } else { "missed" },
        best(&downloads.door) / best(&downloads.direct)
    );
    println!(
        "\nThe file lives outside the slot (the release passes `--root` with an absolute path); \
         it is in the page cache, so this measures the proxy, not the disk.\n"
    );
}

fn print_files(files: &FilesRollback) {
    println!(
        "### 4. Rolling back a {} files-only release ({} rollbacks; baseline {TAR_ROUNDS} rounds)\n",
        bench_data::mb(files.bytes),
        files.flips.len()
    );
    let agent: Vec<Duration> = files
        .flips
        .iter()
        .map(|f| Duration::from_millis(f.agent_ms))
        .collect();
    let walls: Vec<Duration> = files.flips.iter().filter_map(|f| f.wall).collect();
    let (ours_agent, ours_wall) = (median(&agent), median(&walls));
    println!(
        "| method | median | max | median ÷ ours (agent `switch_ms`) | median ÷ ours (wall) |"
    );
    println!("|---|---|---|---|---|");
    let row = |label: &str, samples: &[Duration], ratios: bool| {
        let med = median(samples);
        let ratio = |ours: Duration| {
            if ratios && !ours.is_zero() {
                format!("{:.0}×", med.as_secs_f64() / ours.as_secs_f64())
            } else {
                "–".to_owned()
            }
        };
        println!(
            "| {label} | {} | {} | {} | {} |",
            ms(med),
            ms(samples.iter().max().copied().unwrap_or_default()),
            ratio(ours_agent),
            ratio(ours_wall)
        );
    };
    row("ours: agent `switch_ms`", &agent, false);
    row(
        "ours: CLI start → `DATA/current` names the other slot",
        &walls,
        false,
    );
    row(
        "Mender `directory` module ArtifactRollback: `rm -rf; mkdir -p; tar -xf`",
        &files.tar,
        true,
    );
    row("  … followed by `sync`", &files.tar_sync, true);
    println!(
        "\nOurs moves one symlink (rename + fsync of the directory) and journals; the slot \
         is already on disk. The module rewrites every byte of the tree.\n"
    );
}
