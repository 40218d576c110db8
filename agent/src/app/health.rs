//! Health of a version: one probe, waiting for a start, and holding through probation.
//!
//! The probe is the release's `[run.health]`: `GET http://127.0.0.1:PORT{path}` answering
//! 2xx, a TCP connect to the port (the default), or a command exiting 0 (run like a hook:
//! in the slot, with `FLEET_PORT`). Each probe is bounded by `timeout_ms` and repeated every
//! `interval_ms`. Probes go straight to the version's private port, never through the front
//! door, so they judge the version being started and not the one serving traffic.
//!
//! A version under a [`Supervisor`] fails at once when its process exits: during a start
//! or a probation any exit is a failed switch, without waiting for the health check to
//! notice (the supervisor restarts it, but the switch no longer trusts it).

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use protocol::run::{HealthCheck, RunSpec};
use tokio::sync::watch;
use tokio::time::Instant;

use super::hooks::{self, HookEnv};
use super::process::{Exit, Phase, Status, Supervisor};

/// Failed probes in a row that fail a probation. One is not enough: a single probe can
/// time out on a busy node without the version being at fault.
pub const PROBATION_FAILURES: u32 = 3;

/// Longest part of an unhealthy HTTP answer's body quoted in the error.
const BODY_QUOTE: usize = 200;

/// Why a version was judged unhealthy. Each variant carries the app's last output lines
/// (empty when the agent does not run the process itself); the message shows the last one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HealthFailure {
    #[error("the app exited ({exit}){}", last_line(output))]
    Exited { exit: Exit, output: Vec<String> },
    #[error("the app was stopped while its health was being checked")]
    Stopped { output: Vec<String> },
    #[error(
        "the app did not become healthy within {} ms: {last_error}{}",
        waited.as_millis(),
        last_line(output)
    )]
    NotHealthy {
        waited: Duration,
        last_error: String,
        output: Vec<String>,
    },
    #[error(
        "the app failed {failures} health checks in a row during probation: {last_error}{}",
        last_line(output)
    )]
    Unhealthy {
        failures: u32,
        last_error: String,
        output: Vec<String>,
    },
}

impl HealthFailure {
    /// The app's last output lines, oldest first.
    pub fn output(&self) -> &[String] {
        match self {
            HealthFailure::Exited { output, .. }
            | HealthFailure::Stopped { output }
            | HealthFailure::NotHealthy { output, .. }
            | HealthFailure::Unhealthy { output, .. } => output,
        }
    }
}

fn last_line(output: &[String]) -> String {
    match output.last() {
        Some(line) => format!("; its last output line: {line}"),
        None => String::new(),
    }
}

/// The HTTP client for probes and metric scrapes of a version's private port: no proxy (the
/// environment's `HTTP_PROXY` must not capture loopback probes), no redirects (a 3xx is not
/// healthy), no idle connections kept (each probe is a fresh connection, and none is held to
/// a version being stopped).
pub(crate) fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(0)
                .build()
                .map_err(|e| format!("cannot set up the HTTP client for health checks: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One probe of the version on `port` whose slot directory is `slot`, bounded by the
/// spec's `timeout_ms`. The error says what was tried and what happened.
pub async fn check(spec: &RunSpec, port: u16, slot: &Path) -> Result<(), String> {
    let timeout = Duration::from_millis(u64::from(spec.health.timeout_ms));
    let check = spec.health_check().map_err(|e| e.to_string())?;
    let probe = match check {
        HealthCheck::Http { path } => Box::pin(http(port, path)) as ProbeFuture<'_>,
        HealthCheck::Tcp => Box::pin(async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|e| format!("TCP connect to 127.0.0.1:{port} failed: {e}"))
        }),
        HealthCheck::Command { argv } => {
            let env = HookEnv {
                slot: slot
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                port: Some(port),
                ..HookEnv::default()
            };
            // Bounded by the hook runner itself, which also kills the command's whole
            // process group at the timeout (dropping it here would not).
            return hooks::run("health", argv, slot, &env, timeout)
                .await
                .map(drop)
                .map_err(|e| e.to_string());
        }
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(result) => result,
        Err(_elapsed) => Err(format!(
            "no answer within {} ms ({})",
            timeout.as_millis(),
            describe(&check, port)
        )),
    }
}

type ProbeFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

fn describe(check: &HealthCheck<'_>, port: u16) -> String {
    match check {
        HealthCheck::Http { path } => format!("GET http://127.0.0.1:{port}{path}"),
        HealthCheck::Tcp => format!("TCP connect to 127.0.0.1:{port}"),
        HealthCheck::Command { argv } => format!("health command `{}`", argv.join(" ")),
    }
}

async fn http(port: u16, path: &str) -> Result<(), String> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let mut response = client()?
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url} failed: {e}"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    // Quote the start of the body: apps often say why they are unhealthy.
    let body = match response.chunk().await {
        Ok(Some(chunk)) => {
            let text = String::from_utf8_lossy(&chunk[..chunk.len().min(BODY_QUOTE)]);
            format!(": {}", text.trim())
        }
        _ => String::new(),
    };
    Err(format!("GET {url} answered {status}{body}"))
}

/// Watches a supervisor for an exit (or a stop) after the baseline `exits` count.
struct Watch<'a> {
    supervisor: &'a Supervisor,
    status: watch::Receiver<Status>,
    exits: u32,
}

impl<'a> Watch<'a> {
    fn new(supervisor: &'a Supervisor) -> Watch<'a> {
        let status = supervisor.subscribe();
        let exits = status.borrow().exits;
        Watch {
            supervisor,
            status,
            exits,
        }
    }

    /// A failure if the process exited since the watch began or was stopped.
    fn failure(&self) -> Option<HealthFailure> {
        let status = self.status.borrow();
        if let Phase::Stopping | Phase::Stopped { .. } = status.phase {
            return Some(HealthFailure::Stopped {
                output: self.supervisor.last_output(),
            });
        }
        if status.exits > self.exits {
            let exit = status
                .last_exit
                .clone()
                .unwrap_or_else(|| Exit::Failed("exited".to_owned()));
            return Some(HealthFailure::Exited {
                exit,
                output: self.supervisor.last_output(),
            });
        }
        None
    }
}

/// Sleeps until `until`, waking early when the supervised process changes state.
async fn pause(watch: &mut Option<Watch<'_>>, until: Instant) {
    match watch {
        Some(w) => {
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                changed = w.status.changed() => {
                    if changed.is_err() {
                        // The supervisor's task is gone; its last status stays readable.
                        tokio::time::sleep_until(until).await;
                    }
                }
            }
        }
        None => tokio::time::sleep_until(until).await,
    }
}

fn output_of(supervisor: Option<&Supervisor>) -> Vec<String> {
    supervisor.map(Supervisor::last_output).unwrap_or_default()
}

/// Probes every `interval_ms` until the version is healthy (`Ok`), its process exits, or
/// `deadline` passes. `supervisor` is `None` when the agent does not run the process itself
/// (a `start` hook did); `slot` is the slot directory.
pub async fn wait_healthy(
    supervisor: Option<&Supervisor>,
    spec: &RunSpec,
    port: u16,
    slot: &Path,
    deadline: Instant,
) -> Result<(), HealthFailure> {
    let started = Instant::now();
    let interval = Duration::from_millis(u64::from(spec.health.interval_ms));
    let mut watch = supervisor.map(Watch::new);
    loop {
        if let Some(failure) = watch.as_ref().and_then(Watch::failure) {
            return Err(failure);
        }
        let probe = check(spec, port, slot).await;
        // An exit during the probe is the better explanation for a failed probe.
        if let Some(failure) = watch.as_ref().and_then(Watch::failure) {
            return Err(failure);
        }
        let last_error = match probe {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            return Err(HealthFailure::NotHealthy {
                waited: started.elapsed(),
                last_error,
                output: output_of(supervisor),
            });
        }
        pause(&mut watch, (Instant::now() + interval).min(deadline)).await;
    }
}

/// Probes every `interval_ms` until `until` (the end of probation) and succeeds if the
/// process did not exit and no [`PROBATION_FAILURES`] probes in a row failed.
pub async fn hold_healthy(
    supervisor: Option<&Supervisor>,
    spec: &RunSpec,
    port: u16,
    slot: &Path,
    until: Instant,
) -> Result<(), HealthFailure> {
    let interval = Duration::from_millis(u64::from(spec.health.interval_ms));
    let mut watch = supervisor.map(Watch::new);
    let mut failures = 0;
    loop {
        if let Some(failure) = watch.as_ref().and_then(Watch::failure) {
            return Err(failure);
        }
        if Instant::now() >= until {
            return Ok(());
        }
        let probe = check(spec, port, slot).await;
        if let Some(failure) = watch.as_ref().and_then(Watch::failure) {
            return Err(failure);
        }
        match probe {
            Ok(()) => failures = 0,
            Err(last_error) => {
                failures += 1;
                tracing::debug!(port, failures, %last_error, "health check failed during probation");
                if failures >= PROBATION_FAILURES {
                    return Err(HealthFailure::Unhealthy {
                        failures,
                        last_error,
                        output: output_of(supervisor),
                    });
                }
            }
        }
        pause(&mut watch, (Instant::now() + interval).min(until)).await;
    }
}

#[cfg(test)]
mod tests;
