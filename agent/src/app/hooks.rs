//! Operator commands (`[run.hooks]`, and `health.command`): one argv run to completion.
//!
//! A hook runs in the slot directory with a clean environment (see
//! [`super::INHERITED_ENV`]) plus `FLEET_SLOT`, `FLEET_VERSION`, `FLEET_PORT` and, when
//! there is another version, `FLEET_OLD_SLOT` and `FLEET_OLD_PORT`. `argv[0]` is looked up
//! in `PATH` when it is a bare name (`systemctl`) and taken inside the slot when it is a
//! relative path (`bin/switch`). A hook succeeds by exiting 0 within its timeout; past it,
//! its whole process group is killed. Its output is kept (the last
//! [`super::output::KEEP_LINES`] lines) for the error or the caller.
//!
//! A hook may leave a process running (a `start` hook that backgrounds the app): that
//! process is not killed after the hook exits 0, and its output keeps being logged at debug
//! level until it closes it.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use super::output::{capture, OutputTail};

/// How long to wait, after the hook exits, for the rest of its output (a process it left
/// running may hold the pipe open for good).
const OUTPUT_LINGER: Duration = Duration::from_millis(250);

/// Lines of a hook's output shown in an error message.
const SHOWN_LINES: usize = 10;

/// The versions a hook acts on, passed in its environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookEnv {
    /// `FLEET_SLOT`: the slot the hook acts on.
    pub slot: String,
    /// `FLEET_VERSION`.
    pub version: String,
    /// `FLEET_PORT`: the version's private port, if it has one.
    pub port: Option<u16>,
    /// `FLEET_OLD_SLOT`: the other version (the one traffic moves away from), if any.
    pub old_slot: Option<String>,
    /// `FLEET_OLD_PORT`.
    pub old_port: Option<u16>,
}

impl HookEnv {
    fn vars(&self) -> Vec<(&'static str, String)> {
        // An empty name means "not known" (a health command knows only the port).
        let mut vars: Vec<(&'static str, String)> =
            [("FLEET_SLOT", &self.slot), ("FLEET_VERSION", &self.version)]
                .into_iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(name, value)| (name, value.clone()))
                .collect();
        if let Some(port) = self.port {
            vars.push(("FLEET_PORT", port.to_string()));
        }
        if let Some(slot) = &self.old_slot {
            vars.push(("FLEET_OLD_SLOT", slot.clone()));
        }
        if let Some(port) = self.old_port {
            vars.push(("FLEET_OLD_PORT", port.to_string()));
        }
        vars
    }
}

/// Why a hook did not succeed. Each variant names the hook and its command line and carries
/// the hook's last output lines, which the message shows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    #[error("the {hook} hook has an empty command line; fix run.hooks in the release")]
    Empty { hook: String },
    #[error("the {hook} hook `{argv}` could not be started: {source}")]
    Spawn {
        hook: String,
        argv: String,
        source: io::Error,
    },
    #[error("the {hook} hook `{argv}` failed ({status}){}", shown(output))]
    Failed {
        hook: String,
        argv: String,
        status: ExitStatus,
        output: Vec<String>,
    },
    #[error(
        "the {hook} hook `{argv}` did not finish within {} ms and was killed{}",
        timeout.as_millis(),
        shown(output)
    )]
    TimedOut {
        hook: String,
        argv: String,
        timeout: Duration,
        output: Vec<String>,
    },
}

impl HookError {
    /// The hook's last output lines, if it ran.
    pub fn output(&self) -> &[String] {
        match self {
            HookError::Failed { output, .. } | HookError::TimedOut { output, .. } => output,
            HookError::Empty { .. } | HookError::Spawn { .. } => &[],
        }
    }
}

/// `; last output: a | b | c`, or nothing when there was none.
fn shown(output: &[String]) -> String {
    if output.is_empty() {
        return String::new();
    }
    let last = &output[output.len().saturating_sub(SHOWN_LINES)..];
    format!("; last output: {}", last.join(" | "))
}

/// Runs `argv` as the `hook` (a name for messages and logs: `switch`, `start`, …) in `cwd`
/// with `env`, and returns its output lines if it exits 0 within `timeout`.
pub async fn run(
    hook: &str,
    argv: &[String],
    cwd: &Path,
    env: &HookEnv,
    timeout: Duration,
) -> Result<Vec<String>, HookError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(HookError::Empty {
            hook: hook.to_owned(),
        });
    };
    let cwd = super::absolute(cwd);
    let program = if program.contains('/') {
        cwd.join(program)
    } else {
        PathBuf::from(program)
    };
    let command_line = argv.join(" ");
    let mut child = super::child_command(&program, &cwd)
        .args(args)
        .envs(env.vars())
        .spawn()
        .map_err(|source| HookError::Spawn {
            hook: hook.to_owned(),
            argv: command_line.clone(),
            source,
        })?;
    let tail = OutputTail::default();
    let source: Arc<str> = Arc::from(format!("{hook} hook"));
    let mut readers = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(capture(stdout, tail.clone(), source.clone(), "stdout"));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(capture(stderr, tail.clone(), source, "stderr"));
    }
    let pid = child.id();
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let linger = async {
        for reader in readers {
            let _ = reader.await;
        }
    };
    let status = match waited {
        Ok(Ok(status)) => {
            // Normally the pipes close with the hook; see OUTPUT_LINGER.
            let _ = tokio::time::timeout(OUTPUT_LINGER, linger).await;
            status
        }
        Ok(Err(error)) => {
            return Err(HookError::Spawn {
                hook: hook.to_owned(),
                argv: command_line,
                source: error,
            })
        }
        Err(_elapsed) => {
            if let Some(pid) = pid
                .and_then(|p| i32::try_from(p).ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            let _ = tokio::time::timeout(OUTPUT_LINGER, linger).await;
            tracing::warn!(hook, argv = %command_line, timeout_ms = timeout.as_millis() as u64, "hook timed out and was killed");
            return Err(HookError::TimedOut {
                hook: hook.to_owned(),
                argv: command_line,
                timeout,
                output: tail.lines(),
            });
        }
    };
    if status.success() {
        tracing::debug!(hook, argv = %command_line, "hook succeeded");
        Ok(tail.lines())
    } else {
        Err(HookError::Failed {
            hook: hook.to_owned(),
            argv: command_line,
            status,
            output: tail.lines(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()]
    }

    fn env() -> HookEnv {
        HookEnv {
            slot: "app-v2".to_owned(),
            version: "v2".to_owned(),
            port: Some(4002),
            old_slot: Some("app-v1".to_owned()),
            old_port: Some(4001),
        }
    }

    #[tokio::test]
    async fn a_hook_sees_the_versions_in_its_environment_and_runs_in_the_slot() {
        let slot = tempfile::tempdir().unwrap();
        let script =
            "echo $FLEET_SLOT $FLEET_VERSION $FLEET_PORT $FLEET_OLD_SLOT $FLEET_OLD_PORT; \
                      pwd; echo to-stderr >&2";
        let output = run(
            "switch",
            &sh(script),
            slot.path(),
            &env(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let cwd = std::fs::canonicalize(slot.path()).unwrap();
        assert_eq!(
            output
                .iter()
                .filter(|l| *l != "to-stderr")
                .collect::<Vec<_>>(),
            ["app-v2 v2 4002 app-v1 4001", &cwd.display().to_string()]
        );
        assert!(output.contains(&"to-stderr".to_owned()), "{output:?}");
    }

    #[tokio::test]
    async fn a_hook_does_not_inherit_the_agents_environment() {
        let slot = tempfile::tempdir().unwrap();
        let agent_only: Vec<String> = std::env::vars()
            .map(|(name, _)| name)
            .filter(|name| !crate::app::INHERITED_ENV.contains(&name.as_str()))
            .collect();
        assert!(!agent_only.is_empty(), "cargo sets CARGO_* for tests");
        let output = run(
            "switch",
            &["env".to_owned()],
            slot.path(),
            &env(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let names: Vec<&str> = output
            .iter()
            .filter_map(|l| l.split_once('='))
            .map(|(n, _)| n)
            .collect();
        assert!(names.contains(&"FLEET_OLD_PORT"), "{names:?}");
        for name in names {
            assert!(
                crate::app::INHERITED_ENV.contains(&name) || name.starts_with("FLEET_"),
                "{name} leaked into the hook's environment"
            );
        }
    }

    #[tokio::test]
    async fn a_relative_program_is_found_in_the_slot() {
        let slot = tempfile::tempdir().unwrap();
        std::fs::create_dir(slot.path().join("bin")).unwrap();
        let script = slot.path().join("bin/switch");
        std::fs::write(&script, "#!/bin/sh\necho switched to $FLEET_PORT\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let output = run(
            "switch",
            &["bin/switch".to_owned()],
            slot.path(),
            &env(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(output, ["switched to 4002"]);
    }

    #[tokio::test]
    async fn a_failing_hook_reports_its_status_and_last_lines() {
        let slot = tempfile::tempdir().unwrap();
        let error = run(
            "switch",
            &sh("echo reloading; echo nginx: bad config >&2; exit 3"),
            slot.path(),
            &env(),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, HookError::Failed { .. }), "{message}");
        assert!(message.contains("switch hook"), "{message}");
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.contains("nginx: bad config"), "{message}");
        assert_eq!(error.output().len(), 2);
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let slot = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        // The child `sleep` writes its pid first, so the test can check it died too.
        let error = run(
            "stop",
            &sh("sleep 30 & echo $! > child.pid; echo waiting; wait"),
            slot.path(),
            &env(),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(matches!(error, HookError::TimedOut { .. }), "{error}");
        assert!(error.to_string().contains("waiting"), "{error}");
        let pid: u32 = std::fs::read_to_string(slot.path().join("child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        crate::app::testing::eventually("the hook's child to die", || async {
            (!crate::app::testing::alive(pid)).then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_missing_program_or_an_empty_argv_is_an_error_naming_the_hook() {
        let slot = tempfile::tempdir().unwrap();
        let error = run(
            "start",
            &["bin/nope".to_owned()],
            slot.path(),
            &env(),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, HookError::Spawn { .. }), "{error}");
        assert!(
            error.to_string().contains("start hook `bin/nope`"),
            "{error}"
        );
        let error = run("start", &[], slot.path(), &env(), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(error, HookError::Empty { .. }), "{error}");
    }
}
