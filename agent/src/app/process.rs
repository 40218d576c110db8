//! Supervising one version of the app: one [`Supervisor`] per running slot.
//!
//! The supervisor spawns the release's `command` (a path inside the slot, or an absolute
//! path) with the spec's arguments, in the slot directory, with a clean environment (see
//! [`super::INHERITED_ENV`]) plus the spec's `env`, `{port_env}=PORT`, `FLEET_SLOT`,
//! `FLEET_VERSION` and `FLEET_PORT`. When the process exits it is restarted after a backoff
//! that doubles from [`RestartPolicy::first_backoff`] up to [`RestartPolicy::max_backoff`]
//! and is reset once a run has lasted [`RestartPolicy::reset_after`]. Too many exits within
//! a window raise [`Status::crash_loop`]; the daemon treats that (or any exit during
//! probation) as a failed switch. Everything the supervisor knows is published on a
//! `watch` channel ([`Supervisor::subscribe`]).
//!
//! # Process groups, and an agent that dies
//!
//! Each app process leads its own process group, and every signal the supervisor sends goes
//! to the group, so a wrapper script's children stop with it. After the leader exits on its
//! own, whatever is left of its group is killed before the restart (the port must be free
//! again), so apps that daemonize themselves are not supported.
//!
//! Linux can kill a child when its parent dies (`PR_SET_PDEATHSIG`), but only from inside
//! the child between fork and exec, which needs `unsafe` code this workspace forbids. So an
//! app process survives an agent that is killed outright (SIGKILL, OOM; a clean agent
//! shutdown stops its apps, and under systemd the default `KillMode=control-group` kills
//! the whole service anyway). For that case every running leader is recorded in
//! `RUN_DIR/<slot>.pid` (written atomically: `"<pid> <start time in clock ticks>\n"`), and
//! [`kill_stale`], run by the next agent before it starts anything, kills those leftovers.
//! The start time read from `/proc/<pid>/stat` proves a pid still names the process the file
//! was written for, so a reused pid is never signalled.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::run::RunSpec;
use rustix::process::{Pid, Signal};
use tokio::process::Child;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use super::output::{capture, OutputTail};

/// How often a stop polls for the last members of a process group to be gone.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// What a [`Supervisor`] runs: one version, in one slot, on one private port.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The slot's name (the directory under `DATA/slots/`): names the pid file and is
    /// passed as `FLEET_SLOT`.
    pub slot: String,
    /// The release version, passed as `FLEET_VERSION` and logged with every output line.
    pub version: String,
    /// The slot directory: the working directory, and the base of a relative `command`.
    pub dir: PathBuf,
    /// The private port the version must listen on, passed in `{port_env}` and `FLEET_PORT`.
    pub port: u16,
    /// Where pid files live (`DATA/run`); created if missing.
    pub run_dir: PathBuf,
}

/// When to restart an exited process, and what counts as a crash loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Wait before the first restart; doubled after each further exit.
    pub first_backoff: Duration,
    /// The longest wait between restarts.
    pub max_backoff: Duration,
    /// A run at least this long resets the backoff and clears the crash-loop flag.
    pub reset_after: Duration,
    /// This many exits within [`RestartPolicy::crash_loop_window`] is a crash loop.
    pub crash_loop_exits: u32,
    pub crash_loop_window: Duration,
}

impl Default for RestartPolicy {
    /// 0.5 s doubling to 30 s, reset after a 60 s run; a crash loop is 3 exits in 60 s.
    fn default() -> RestartPolicy {
        RestartPolicy {
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            crash_loop_exits: 3,
            crash_loop_window: Duration::from_secs(60),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It ran and exited (or was killed by a signal).
    Status(ExitStatus),
    /// A restart could not start it (its program vanished, ran out of memory, …), or its
    /// exit status could not be collected.
    Failed(String),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Status(status) => write!(f, "{status}"),
            Exit::Failed(why) => write!(f, "could not run: {why}"),
        }
    }
}

/// Where the supervised process is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Being spawned (first start or a restart).
    Starting,
    Running {
        pid: u32,
        since: Instant,
    },
    /// It exited on its own; it is restarted after `restart_in`.
    Exited {
        exit: Exit,
        restart_in: Duration,
    },
    /// [`Supervisor::stop`] is terminating it.
    Stopping,
    /// Stopped for good; `exit` is how the last process ended (`None` if none was running).
    Stopped {
        exit: Option<Exit>,
    },
}

/// What a [`Supervisor`] publishes after every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub phase: Phase,
    /// Times a process exited on its own (or could not be restarted).
    pub exits: u32,
    /// Times a process was started again after an exit.
    pub restarts: u32,
    /// Set when [`RestartPolicy::crash_loop_exits`] exits fell within the window; cleared
    /// when a run lasts [`RestartPolicy::reset_after`]. Restarts continue either way.
    pub crash_loop: bool,
    /// How the most recent process ended on its own, if one did.
    pub last_exit: Option<Exit>,
}

/// Why a version could not be started at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    #[error(
        "cannot start {program} for slot {slot}: {source}; check run.command in the \
         release and that the file is an executable for this node"
    )]
    Spawn {
        slot: String,
        program: PathBuf,
        source: io::Error,
    },
    #[error("cannot create the pid directory {dir}: {source}")]
    RunDir { dir: PathBuf, source: io::Error },
}

/// Runs one version of the app and keeps it running until [`Supervisor::stop`].
///
/// Dropping a supervisor without stopping it kills the process group at once (SIGKILL).
#[derive(Debug)]
pub struct Supervisor {
    launch: Launch,
    status: watch::Receiver<Status>,
    output: OutputTail,
    /// Sends the stop timeout to the task; `None` once stopped.
    stop: Option<oneshot::Sender<Duration>>,
    task: Option<JoinHandle<()>>,
    /// The running leader's pid, 0 between processes; read by `Drop`.
    pid: Arc<AtomicU32>,
}

impl Supervisor {
    /// Spawns the first process now (so a missing or non-executable command fails here,
    /// with the reason) and supervises it from a task. Must be called within a tokio
    /// runtime.
    pub fn start(
        spec: &RunSpec,
        launch: Launch,
        policy: RestartPolicy,
    ) -> Result<Supervisor, SpawnError> {
        let launch = Launch {
            dir: super::absolute(&launch.dir),
            run_dir: super::absolute(&launch.run_dir),
            ..launch
        };
        std::fs::create_dir_all(&launch.run_dir).map_err(|source| SpawnError::RunDir {
            dir: launch.run_dir.clone(),
            source,
        })?;
        let program = launch.dir.join(&spec.command);
        let port = launch.port.to_string();
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Last, so the spec's `env` cannot override what the agent decides.
        env.extend([
            ("FLEET_SLOT".to_owned(), launch.slot.clone()),
            ("FLEET_VERSION".to_owned(), launch.version.clone()),
            ("FLEET_PORT".to_owned(), port.clone()),
            (spec.port_env.clone(), port),
        ]);
        let output = OutputTail::default();
        let pid = Arc::new(AtomicU32::new(0));
        let runner = Runner {
            program,
            args: spec.args.clone(),
            env,
            pid_file: pid_file(&launch.run_dir, &launch.slot),
            source: Arc::from(format!("{}@{}", launch.version, launch.slot)),
            launch: launch.clone(),
            policy,
            output: output.clone(),
            pid: pid.clone(),
            status: watch::channel(Status {
                phase: Phase::Starting,
                exits: 0,
                restarts: 0,
                crash_loop: false,
                last_exit: None,
            })
            .0,
            backoff: policy.first_backoff,
            exits_at: VecDeque::new(),
        };
        let child = runner.spawn().map_err(|source| SpawnError::Spawn {
            slot: launch.slot.clone(),
            program: runner.program.clone(),
            source,
        })?;
        let status = runner.status.subscribe();
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(runner.run(child, stop_rx));
        Ok(Supervisor {
            launch,
            status,
            output,
            stop: Some(stop_tx),
            task: Some(task),
            pid,
        })
    }

    pub fn slot(&self) -> &str {
        &self.launch.slot
    }

    pub fn version(&self) -> &str {
        &self.launch.version
    }

    pub fn port(&self) -> u16 {
        self.launch.port
    }

    /// The slot directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.launch.dir
    }

    /// The status now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of every status change, e.g. `rx.wait_for(|s| s.crash_loop)`.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The last lines the version printed (stdout and stderr), oldest first.
    pub fn last_output(&self) -> Vec<String> {
        self.output.lines()
    }

    /// A handle on the version's output tail, which stays readable after the supervisor is
    /// gone (for a failure report written after the stop).
    pub fn output(&self) -> OutputTail {
        self.output.clone()
    }

    /// Stops the version for good: SIGTERM to its process group, SIGKILL to the group
    /// after `timeout` (the spec's `stop_timeout_secs`) if anything of it is left, no
    /// restart. Removes the pid file. Returns how the last process ended.
    pub async fn stop(mut self, timeout: Duration) -> Option<Exit> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(timeout);
        }
        if let Some(task) = self.task.take() {
            if let Err(error) = task.await {
                tracing::error!(slot = %self.launch.slot, %error, "the app's supervisor task failed");
            }
        }
        match &self.status.borrow().phase {
            Phase::Stopped { exit } => exit.clone(),
            _ => None,
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.stop.is_none() {
            return;
        }
        // Not stopped: the daemon is going away or lost the handle. Kill now rather than
        // leave a process nobody supervises.
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let pid = self.pid.load(Ordering::SeqCst);
        if pid != 0 {
            let _ = signal_group(pid, Signal::KILL);
        }
        let _ = std::fs::remove_file(pid_file(&self.launch.run_dir, &self.launch.slot));
    }
}

/// The supervising task's state.
struct Runner {
    launch: Launch,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pid_file: PathBuf,
    /// `version@slot`, the `source` field of every logged output line.
    source: Arc<str>,
    policy: RestartPolicy,
    output: OutputTail,
    pid: Arc<AtomicU32>,
    status: watch::Sender<Status>,
    backoff: Duration,
    /// When the most recent exits happened, at most `crash_loop_exits` of them.
    exits_at: VecDeque<Instant>,
}

enum Ended {
    Exited(Exit),
    Stopped,
}

impl Runner {
    fn spawn(&self) -> io::Result<Child> {
        let mut child = super::child_command(&self.program, &self.launch.dir)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()?;
        self.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        if let Some(stdout) = child.stdout.take() {
            capture(stdout, self.output.clone(), self.source.clone(), "stdout");
        }
        if let Some(stderr) = child.stderr.take() {
            capture(stderr, self.output.clone(), self.source.clone(), "stderr");
        }
        Ok(child)
    }

    async fn run(mut self, first: Child, mut stop: oneshot::Receiver<Duration>) {
        let mut next = Ok(first);
        loop {
            let exit = match next {
                Ok(child) => match self.supervise(child, &mut stop).await {
                    Ended::Exited(exit) => exit,
                    Ended::Stopped => return,
                },
                Err(exit) => exit,
            };
            let restart_in = self.backoff;
            self.note_exit(exit.clone(), restart_in);
            tokio::select! {
                () = sleep(restart_in) => {}
                _ = &mut stop => {
                    self.finish(Some(exit)).await;
                    return;
                }
            }
            self.backoff = (self.backoff * 2).min(self.policy.max_backoff);
            self.status.send_modify(|s| {
                s.phase = Phase::Starting;
                s.restarts += 1;
            });
            next = self
                .spawn()
                .map_err(|error| Exit::Failed(error.to_string()));
        }
    }

    /// Watches one running process until it exits or a stop is asked for.
    async fn supervise(
        &mut self,
        mut child: Child,
        stop: &mut oneshot::Receiver<Duration>,
    ) -> Ended {
        let pid = child.id().unwrap_or(0);
        let since = Instant::now();
        self.status
            .send_modify(|s| s.phase = Phase::Running { pid, since });
        self.record_pid(pid).await;
        tracing::info!(slot = %self.launch.slot, version = %self.launch.version, pid, port = self.launch.port, "app started");
        let reset_at = since + self.policy.reset_after;
        let mut reset_done = false;
        loop {
            tokio::select! {
                status = child.wait() => {
                    self.pid.store(0, Ordering::SeqCst);
                    // Whatever the leader left behind in its group would hold the port.
                    if group_exists(pid) {
                        let _ = signal_group(pid, Signal::KILL);
                    }
                    return Ended::Exited(match status {
                        Ok(status) => Exit::Status(status),
                        Err(error) => Exit::Failed(format!("cannot collect its exit status: {error}")),
                    });
                }
                timeout = &mut *stop => {
                    // A dropped sender means the supervisor is gone: no time to be gentle.
                    let timeout = timeout.unwrap_or(Duration::ZERO);
                    self.status.send_modify(|s| s.phase = Phase::Stopping);
                    let exit = terminate(&mut child, pid, timeout).await;
                    self.pid.store(0, Ordering::SeqCst);
                    tracing::info!(slot = %self.launch.slot, version = %self.launch.version, %exit, "app stopped");
                    self.finish(Some(exit)).await;
                    return Ended::Stopped;
                }
                () = sleep_until(reset_at), if !reset_done => {
                    reset_done = true;
                    self.backoff = self.policy.first_backoff;
                    if self.status.borrow().crash_loop {
                        tracing::info!(slot = %self.launch.slot, "app has stayed up; crash loop cleared");
                        self.status.send_modify(|s| s.crash_loop = false);
                    }
                }
            }
        }
    }

    fn note_exit(&mut self, exit: Exit, restart_in: Duration) {
        let now = Instant::now();
        let window = self.policy.crash_loop_window;
        self.exits_at.push_back(now);
        while self
            .exits_at
            .front()
            .is_some_and(|&at| now.duration_since(at) > window)
            || self.exits_at.len() > self.policy.crash_loop_exits as usize
        {
            self.exits_at.pop_front();
        }
        let crash_loop = self.exits_at.len() >= self.policy.crash_loop_exits as usize;
        let last_line = self.output.last(1).pop().unwrap_or_default();
        tracing::warn!(
            slot = %self.launch.slot,
            version = %self.launch.version,
            %exit,
            restart_in_ms = restart_in.as_millis() as u64,
            crash_loop,
            last_line,
            "app exited; restarting after the backoff"
        );
        self.status.send_modify(|s| {
            s.last_exit = Some(exit.clone());
            s.phase = Phase::Exited { exit, restart_in };
            s.exits += 1;
            s.crash_loop |= crash_loop;
        });
    }

    async fn finish(&self, exit: Option<Exit>) {
        let path = self.pid_file.clone();
        let removed = tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        })
        .await;
        if let Ok(Err(error)) = removed {
            tracing::warn!(file = %self.pid_file.display(), %error, "cannot remove the app's pid file");
        }
        self.status
            .send_modify(|s| s.phase = Phase::Stopped { exit });
    }

    /// Writes the pid file; a failure is logged, not fatal: it only matters if the agent
    /// is killed before the app, and refusing to run the app would be worse.
    async fn record_pid(&self, pid: u32) {
        let Some(start) = read_stat(pid).map(|stat| stat.start_ticks) else {
            return; // Already gone; the exit is about to be seen.
        };
        let path = self.pid_file.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::journal::write_atomic(&path, format!("{pid} {start}\n").as_bytes())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(file = %self.pid_file.display(), %error, "cannot record the app's pid; if the agent is killed, this process must be stopped by hand")
            }
            Err(error) => tracing::warn!(%error, "recording the app's pid failed"),
        }
    }
}

/// SIGTERM to the group, SIGKILL after `timeout`; returns how the leader ended. Waits (up
/// to the same deadline) for the rest of the group before killing what is left of it.
async fn terminate(child: &mut Child, pid: u32, timeout: Duration) -> Exit {
    let deadline = Instant::now() + timeout;
    let _ = signal_group(pid, Signal::TERM);
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => status,
        Err(_elapsed) => {
            tracing::warn!(
                pid,
                timeout_ms = timeout.as_millis() as u64,
                "app did not exit after SIGTERM; killing it"
            );
            let _ = signal_group(pid, Signal::KILL);
            child.wait().await
        }
    };
    while group_exists(pid) && Instant::now() < deadline {
        sleep(GROUP_POLL).await;
    }
    if group_exists(pid) {
        let _ = signal_group(pid, Signal::KILL);
    }
    match status {
        Ok(status) => Exit::Status(status),
        Err(error) => Exit::Failed(format!("cannot collect its exit status: {error}")),
    }
}

fn signal_group(pgid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    rustix::process::kill_process_group(pid, signal).map_err(io::Error::from)
}

/// Whether any process (a zombie leader included) is in group `pgid`.
fn group_exists(pgid: u32) -> bool {
    i32::try_from(pgid)
        .ok()
        .and_then(Pid::from_raw)
        .is_some_and(|pid| rustix::process::test_kill_process_group(pid).is_ok())
}

fn pid_file(run_dir: &Path, slot: &str) -> PathBuf {
    run_dir.join(format!("{slot}.pid"))
}

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    pgrp: u32,
    /// Field 22: when the process started, in clock ticks after boot. With the pid, it
    /// names one process for the life of the system.
    start_ticks: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) is in parentheses and may itself contain spaces and
    // parentheses, so the fixed fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Whether a live (not zombie) process is in group `pgid`, by scanning `/proc`. Unlike
/// [`group_exists`] this ignores zombies, which a process that is not their parent cannot
/// reap, and works for groups whose leader is gone.
fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
            .and_then(read_stat)
            .is_some_and(|stat| stat.pgrp == pgid && stat.state != 'Z')
    })
}

/// An app process left running by an agent that was killed, found and killed by
/// [`kill_stale`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The slot named by the pid file.
    pub slot: String,
    /// The process group that was killed.
    pub pid: u32,
}

/// Kills the app processes a previous agent left behind: for every `RUN_DIR/<slot>.pid`
/// (or its temp file `.<slot>.pid.tmp`, when the agent died before renaming it),
/// if the recorded leader is still the same process (same start time), or is gone but
/// members of its group are left, the group gets SIGTERM, then SIGKILL after `timeout`.
/// A pid now used by an unrelated process is left alone. Every pid file is removed.
/// Call it once at agent start, before starting any version. A missing `run_dir` is fine.
pub async fn kill_stale(run_dir: &Path, timeout: Duration) -> io::Result<Vec<Stale>> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut killed = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // A pid file, or the temp file of one (`journal::write_atomic`) when the agent was
        // killed before renaming it: the process it names was started all the same. A temp
        // file cut short is unreadable, removed below.
        let Some(slot) = name
            .strip_suffix(".pid")
            .filter(|n| !n.starts_with('.'))
            .or_else(|| name.strip_prefix('.')?.strip_suffix(".pid.tmp"))
            .map(str::to_owned)
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let record = text.split_whitespace().collect::<Vec<_>>();
        let parsed = match record.as_slice() {
            [pid, start] => pid.parse::<u32>().ok().zip(start.parse::<u64>().ok()),
            _ => None,
        };
        match parsed {
            Some((pid, start)) if pid > 1 => {
                let ours = match read_stat(pid) {
                    Some(stat) => stat.start_ticks == start,
                    // The leader is gone. A group id cannot be reused while the group has
                    // members, so members left under this id are the leader's.
                    None => group_alive(pid),
                };
                if ours {
                    tracing::warn!(%slot, pid, "killing an app process left running by a previous agent");
                    kill_group_until_gone(pid, timeout).await;
                    killed.push(Stale { slot, pid });
                } else {
                    tracing::debug!(%slot, pid, "pid file names a process that is gone");
                }
            }
            _ => tracing::warn!(file = %path.display(), "ignoring an unreadable pid file"),
        }
        std::fs::remove_file(&path)?;
    }
    Ok(killed)
}

async fn kill_group_until_gone(pgid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let _ = signal_group(pgid, Signal::TERM);
    while group_alive(pgid) {
        if Instant::now() >= deadline {
            let _ = signal_group(pgid, Signal::KILL);
            return;
        }
        sleep(GROUP_POLL).await;
    }
}

#[cfg(test)]
mod tests;
