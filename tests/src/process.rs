//! A child process whose output goes to a log file, killed (SIGKILL) and reaped on drop.

use std::ffi::OsString;
use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::bins::tail;
use crate::wait::wait_until;

/// One long-running process of the system under test. It can be killed and started again
/// with the same command line; every start appends to the same log file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    /// Set in the process's environment on top of the test's own, at every start.
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Proc {
    /// Starts `program args…`, with stdout and stderr appended to `log`.
    pub fn spawn<I, S>(name: &str, program: &Path, args: I, log: PathBuf) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Proc::spawn_with_env(name, program, args, Vec::new(), log)
    }

    /// Like [`Proc::spawn`], with `env` added to the environment it inherits.
    pub fn spawn_with_env<I, S>(
        name: &str,
        program: &Path,
        args: I,
        env: Vec<(OsString, OsString)>,
        log: PathBuf,
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut proc = Proc {
            name: name.to_owned(),
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
            env,
            log,
            child: None,
            starts: 0,
        };
        proc.start()?;
        Ok(proc)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The OS process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Replaces the variables added to the environment; they take effect at the next start.
    pub fn set_env(&mut self, env: Vec<(OsString, OsString)>) {
        self.env = env;
    }

    /// Starts the process again after [`Proc::kill`]; a no-op while it runs.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening log {}", self.log.display()))?;
        writeln!(
            log,
            "----- start #{} of {}: {}{} {}",
            self.starts,
            self.name,
            self.env
                .iter()
                .map(|(k, v)| format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()))
                .collect::<String>(),
            self.program.display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        )?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL (what `Child::kill` sends on Unix; the workspace forbids `unsafe`, so no
    /// `libc::kill`) and reap. A no-op when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log) {
                let _ = writeln!(log, "----- killed {} (SIGKILL)", self.name);
            }
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start()
    }

    /// Whether the process is alive (it has not exited since its last start).
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none() && self.child.is_some()
    }

    /// How the process ended, if it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last `lines` lines of its log, headed by its name.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.name, &self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of the log file at `path`, headed by `name`.
pub fn log_tail(name: &str, path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(no log: {e})"));
    format!(
        "===== {name}: last {lines} lines of {}\n{}\n",
        path.display(),
        tail(&text, lines)
    )
}

/// The live processes whose command line (arguments joined by spaces) contains `needle`,
/// by pid. Zombies have no command line, so a process that exited but was not reaped yet
/// is not listed.
pub fn pids_with_cmdline_containing(needle: &str) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // The process may be gone by now; then it is not listed.
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// SIGKILLs every process whose command line names a path under `dir` (the app processes
/// of a fleet's agents, which outlive a killed agent) and waits (a few seconds at most) until
/// they are gone, so they no longer hold files under `dir`. Best effort: one that cannot be
/// killed is reported on stderr.
pub fn kill_processes_naming(dir: &Path) {
    let needle = format!("{}/", dir.display());
    let pids = match pids_with_cmdline_containing(&needle) {
        Ok(pids) => pids,
        Err(e) => {
            eprintln!(
                "cannot look for processes left under {}: {e:#}",
                dir.display()
            );
            return;
        }
    };
    if pids.is_empty() {
        return;
    }
    for pid in &pids {
        // The workspace forbids `unsafe`, so no `libc::kill`; kill(1) is everywhere.
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let gone = wait_until(
        Duration::from_secs(5),
        format_args!("processes {pids:?} to die"),
        || {
            let left = pids_with_cmdline_containing(&needle)?;
            Ok(!pids.iter().any(|pid| left.contains(pid)))
        },
    );
    if let Err(e) = gone {
        eprintln!("left running under {}: {e:#}", dir.display());
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_listener(addr: SocketAddr, what: impl Display, timeout: Duration) -> Result<()> {
    wait_until(timeout, what, || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
    })
}

/// Runs a short-lived command to completion and returns its output; kills it and fails
/// if it takes longer than `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut stdout = tempfile::tempfile()?;
    let mut stderr = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |f: &mut File| -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        f.seek(SeekFrom::Start(0))?;
        f.read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    Ok(Output {
        status,
        stdout: read(&mut stdout)?,
        stderr: read(&mut stderr)?,
    })
}
