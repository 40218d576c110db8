//! What serves on the node: the running versions of the app and its front door. The daemon
//! decides (see `node` and the save points in `daemon`); this module carries the decisions
//! out with the pieces in [`crate::app`].
//!
//! At most two versions run: the active one, which takes traffic, and during a switch or a
//! grace period the other one, kept warm so that a rollback is only a flip of the front
//! door's upstream. A files-only release (no run section) runs nothing; its switch is the
//! slot pointer alone.
//!
//! **Invariants**: the front door's listener stays bound across switches, so no client
//! connection is refused by a flip; a version takes traffic only after its health check
//! passed; every process started here is stopped here (or, if the agent is killed, found by
//! its pid file and killed at the next start).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::run::Strategy;
use protocol::{ReleaseId, RunSpec};
use tokio::time::Instant;

use crate::app::front_door::FrontDoor;
use crate::app::health::{self, HealthFailure, PROBATION_FAILURES};
use crate::app::hooks::{self, HookEnv};
use crate::app::ports;
use crate::app::process::{self, Launch, RestartPolicy, Supervisor};

/// How long a switch hook may take.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a version could not be started or made active. The message is what the node reports;
/// `output` holds the app's (or hook's) last lines.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{release} did not start: {reason}")]
    Start {
        release: ReleaseId,
        reason: String,
        output: Vec<String>,
    },
    #[error("{release}: front door on {listen}: {reason}")]
    FrontDoor {
        release: ReleaseId,
        listen: String,
        reason: String,
    },
    #[error("{release}: switch hook failed: {reason}")]
    Hook {
        release: ReleaseId,
        reason: String,
        output: Vec<String>,
    },
}

impl ServeError {
    pub fn output(&self) -> Vec<String> {
        match self {
            ServeError::Start { output, .. } | ServeError::Hook { output, .. } => output.clone(),
            ServeError::FrontDoor { .. } => Vec::new(),
        }
    }
}

/// One version of the app, running (or started by a hook) from its slot.
pub struct Version {
    pub release: ReleaseId,
    pub slot: String,
    pub dir: PathBuf,
    pub spec: RunSpec,
    pub port: u16,
    /// `None` when a `start` hook runs the process instead of the agent.
    supervisor: Option<Supervisor>,
}

impl Version {
    pub fn last_output(&self) -> Vec<String> {
        self.supervisor
            .as_ref()
            .map(Supervisor::last_output)
            .unwrap_or_default()
    }

    /// Whether the process crash-loops (restarted too often in a short time).
    pub fn crash_looping(&self) -> bool {
        self.supervisor
            .as_ref()
            .is_some_and(|s| s.status().crash_loop)
    }

    fn hook_env(&self, old: Option<&Version>) -> HookEnv {
        HookEnv {
            slot: self.slot.clone(),
            version: self.release.version.to_string(),
            port: Some(self.port),
            old_slot: old.map(|o| o.slot.clone()),
            old_port: old.map(|o| o.port),
        }
    }

    /// Stops the process (or runs the `stop` hook), SIGKILL after the spec's timeout.
    async fn stop(self) {
        let timeout = Duration::from_secs(u64::from(self.spec.stop_timeout_secs));
        if let Some(supervisor) = self.supervisor {
            supervisor.stop(timeout).await;
        }
        if let Ok(Strategy::Hooks(h)) = self.spec.strategy() {
            if let Some(stop) = &h.stop {
                let env = HookEnv {
                    slot: self.slot.clone(),
                    version: self.release.version.to_string(),
                    port: Some(self.port),
                    ..HookEnv::default()
                };
                if let Err(e) = hooks::run("stop", stop, &self.dir, &env, timeout).await {
                    tracing::warn!(release = %self.release, error = %e, "stop hook failed");
                }
            }
        }
        tracing::info!(release = %self.release, "stopped");
    }
}

/// Probation of the active version: health probes until `until`.
struct Probation {
    until: Instant,
    next_probe: Instant,
    failures: u32,
}

pub struct Serving {
    run_dir: PathBuf,
    door: Option<(SocketAddr, FrontDoor)>,
    active: Option<Version>,
    /// The version traffic moved away from, kept running until `Instant` for a fast rollback.
    warm: Option<(Version, Instant)>,
    probation: Option<Probation>,
}

/// What a tick found about the active version.
pub enum Verdict {
    Fine,
    /// Probation passed: the version is kept.
    Kept,
    /// Probation failed: the daemon rolls back.
    Failed {
        reason: String,
        output: Vec<String>,
    },
}

impl Serving {
    /// Kills app processes a previous agent left running (it was killed outright).
    pub async fn new(data_dir: &Path) -> Serving {
        let run_dir = data_dir.join("run");
        match process::kill_stale(&run_dir, Duration::from_secs(10)).await {
            Ok(stale) if !stale.is_empty() => {
                tracing::warn!(
                    count = stale.len(),
                    "stopped app processes a previous agent left running"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, dir = %run_dir.display(), "could not look for leftover app processes")
            }
        }
        Serving {
            run_dir,
            door: None,
            active: None,
            warm: None,
            probation: None,
        }
    }

    pub fn active_release(&self) -> Option<&ReleaseId> {
        self.active.as_ref().map(|v| &v.release)
    }

    /// The version taking traffic.
    pub fn active(&self) -> Option<&Version> {
        self.active.as_ref()
    }

    /// The public address of the front door, once bound.
    pub fn front_door(&self) -> Option<SocketAddr> {
        self.door.as_ref().map(|(_, d)| d.local_addr())
    }

    /// Starts `release` from `dir` beside whatever runs and waits until it is healthy
    /// (bounded by the spec's start timeout). Traffic does not move.
    pub async fn start(
        &mut self,
        release: &ReleaseId,
        slot: &str,
        dir: &Path,
        spec: &RunSpec,
    ) -> Result<Version, ServeError> {
        let start_error = |reason: String, output: Vec<String>| ServeError::Start {
            release: release.clone(),
            reason,
            output,
        };
        let busy: Vec<u16> = [self.active.as_ref(), self.warm.as_ref().map(|(v, _)| v)]
            .into_iter()
            .flatten()
            .map(|v| v.port)
            .collect();
        let port = ports::pick_free(&busy)
            .map_err(|e| start_error(format!("no free private port: {e}"), Vec::new()))?;
        let supervisor = match spec.strategy() {
            Ok(Strategy::Hooks(h)) if h.start.is_some() => {
                let env = HookEnv {
                    slot: slot.to_owned(),
                    version: release.version.to_string(),
                    port: Some(port),
                    ..HookEnv::default()
                };
                let start = h.start.as_deref().unwrap_or_default();
                let timeout = Duration::from_secs(u64::from(spec.start_timeout_secs));
                hooks::run("start", start, dir, &env, timeout)
                    .await
                    .map_err(|e| start_error(e.to_string(), e.output().to_vec()))?;
                None
            }
            _ => {
                let launch = Launch {
                    slot: slot.to_owned(),
                    version: release.version.to_string(),
                    dir: dir.to_owned(),
                    port,
                    run_dir: self.run_dir.clone(),
                };
                Some(
                    Supervisor::start(spec, launch, RestartPolicy::default())
                        .map_err(|e| start_error(e.to_string(), Vec::new()))?,
                )
            }
        };
        let version = Version {
            release: release.clone(),
            slot: slot.to_owned(),
            dir: dir.to_owned(),
            spec: spec.clone(),
            port,
            supervisor,
        };
        let deadline = Instant::now() + Duration::from_secs(u64::from(spec.start_timeout_secs));
        if let Err(failure) =
            health::wait_healthy(version.supervisor.as_ref(), spec, port, dir, deadline).await
        {
            let output = failure.output().to_vec();
            version.stop().await;
            return Err(start_error(failure.to_string(), output));
        }
        tracing::info!(%release, port, "healthy");
        Ok(version)
    }

    /// Moves traffic to `version` (a flip of the front door, or the switch hook), makes it
    /// the active one and keeps the one it replaces warm. A `probation` (zero for none) starts
    /// now; the warm version is kept for the spec's grace period after it.
    pub async fn activate(
        &mut self,
        version: Version,
        probation: Duration,
    ) -> Result<(), (ServeError, Version)> {
        if let Ok(Strategy::FrontDoor(door)) = version.spec.strategy() {
            if let Err(e) = self.ensure_door(&version.release, &door.listen).await {
                return Err((e, version));
            }
        }
        if let Err(e) = self.route(&version, self.active.as_ref()).await {
            return Err((e, version));
        }
        let grace = Duration::from_secs(u64::from(version.spec.grace_secs));
        let now = Instant::now();
        self.probation = (!probation.is_zero()).then_some(Probation {
            until: now + probation,
            next_probe: now,
            failures: 0,
        });
        if let Some(old) = self.active.replace(version) {
            if let Some((stale, _)) = self.warm.take() {
                stale.stop().await;
            }
            self.warm = Some((old, now + probation + grace));
        }
        Ok(())
    }

    /// Binds the front door at `listen` unless it already listens there. A release that moved
    /// its public port gets a new listener and the old one closes.
    async fn ensure_door(&mut self, release: &ReleaseId, listen: &str) -> Result<(), ServeError> {
        let error = |reason: String| ServeError::FrontDoor {
            release: release.clone(),
            listen: listen.to_owned(),
            reason,
        };
        let addr: SocketAddr = listen
            .parse()
            .map_err(|e: std::net::AddrParseError| error(e.to_string()))?;
        if self.door.as_ref().map(|(bound, _)| *bound) == Some(addr) {
            return Ok(());
        }
        let door = FrontDoor::bind(addr)
            .await
            .map_err(|e| error(e.to_string()))?;
        if let Some((_, old)) = self.door.replace((addr, door)) {
            old.shutdown(Duration::from_secs(5)).await;
        }
        Ok(())
    }

    /// Moves traffic to `to` from `from`: the front door's upstream (atomic), or the switch
    /// hook.
    async fn route(&self, to: &Version, from: Option<&Version>) -> Result<(), ServeError> {
        match to.spec.strategy() {
            Ok(Strategy::FrontDoor(_)) => {
                if let Some((_, door)) = &self.door {
                    door.set_upstream(to.port);
                }
                Ok(())
            }
            Ok(Strategy::Hooks(h)) => {
                let env = to.hook_env(from);
                hooks::run("switch", &h.switch, &to.dir, &env, HOOK_TIMEOUT)
                    .await
                    .map(drop)
                    .map_err(|e| ServeError::Hook {
                        release: to.release.clone(),
                        reason: e.to_string(),
                        output: e.output().to_vec(),
                    })
            }
            // Validated with the manifest: a run section always has a strategy.
            Err(_) => Ok(()),
        }
    }

    /// Stops a version that was started but will not take traffic.
    pub async fn discard(&mut self, version: Version) {
        version.stop().await;
    }

    /// Flips traffic back to the warm version, if it is `release`; returns whether it did.
    /// The version traffic leaves is stopped when it `failed`; otherwise (an operator's
    /// rollback of a healthy version) it stays warm for the grace period of the version now
    /// serving, as after any switch, so rolling forward again is a flip too.
    pub async fn flip_back_to(&mut self, release: &ReleaseId, failed: bool) -> bool {
        let Some((warm, _)) = self.warm.take_if(|(v, _)| &v.release == release) else {
            return false;
        };
        let left = self.active.take();
        if let Err(e) = self.route(&warm, left.as_ref()).await {
            tracing::error!(release = %warm.release, error = %e, "moving traffic back failed");
        }
        self.active = Some(warm);
        self.probation = None;
        match left {
            Some(left) if !failed => {
                let grace = Duration::from_secs(u64::from(
                    self.active.as_ref().map_or(0, |a| a.spec.grace_secs),
                ));
                self.warm = Some((left, Instant::now() + grace));
            }
            Some(left) => left.stop().await,
            None => {}
        }
        true
    }

    /// Stops everything: used when the node switches to a files-only release, and on exit.
    pub async fn stop_all(&mut self) {
        self.probation = None;
        if let Some((warm, _)) = self.warm.take() {
            warm.stop().await;
        }
        if let Some(active) = self.active.take() {
            if let Some((_, door)) = &self.door {
                door.clear_upstream();
            }
            active.stop().await;
        }
    }

    /// Runs due probation probes and retires the warm version when its time is up. Called
    /// on the daemon's tick; each probe is bounded by the spec's `timeout_ms`.
    pub async fn tick(&mut self) -> Verdict {
        let now = Instant::now();
        if let Some((warm, until)) = &self.warm {
            let drained = self
                .door
                .as_ref()
                .is_none_or(|(_, door)| door.connections_to(warm.port) == 0);
            let hard_stop = *until + Duration::from_secs(u64::from(warm.spec.stop_timeout_secs));
            if self.probation.is_none() && now >= *until && (drained || now >= hard_stop) {
                if let Some((warm, _)) = self.warm.take() {
                    tracing::info!(release = %warm.release, "grace period over; stopping the previous version");
                    warm.stop().await;
                }
            }
        }
        let (Some(probation), Some(active)) = (&mut self.probation, &self.active) else {
            return Verdict::Fine;
        };
        if active.crash_looping() {
            let output = active.last_output();
            self.probation = None;
            return Verdict::Failed {
                reason: format!("{} crashed repeatedly during probation", active.release),
                output,
            };
        }
        if now < probation.next_probe {
            return Verdict::Fine;
        }
        if now >= probation.until {
            self.probation = None;
            return Verdict::Kept;
        }
        let spec = &active.spec;
        probation.next_probe = now + Duration::from_millis(u64::from(spec.health.interval_ms));
        match health::check(spec, active.port, &active.dir).await {
            Ok(()) => probation.failures = 0,
            Err(error) => {
                probation.failures += 1;
                if probation.failures >= PROBATION_FAILURES {
                    let failure = HealthFailure::Unhealthy {
                        failures: probation.failures,
                        last_error: error,
                        output: active.last_output(),
                    };
                    self.probation = None;
                    return Verdict::Failed {
                        reason: format!("{} failed its probation: {failure}", active.release),
                        output: failure.output().to_vec(),
                    };
                }
            }
        }
        Verdict::Fine
    }

    /// Whether a probation or a warm version needs the daemon's tick.
    pub fn needs_tick(&self) -> bool {
        self.probation.is_some() || self.warm.is_some()
    }
}
