//! Running a release's app red/black: the pieces the daemon composes into a switch.
//!
//! This module owns the app's processes and its public port; it makes no deploy decisions
//! (those are [`crate::node`]'s) and never touches slots, the journal or the broker.
//!
//! - [`process`]: [`process::Supervisor`] runs one version (one slot) of the app: spawns the
//!   spec's `command` in its own process group, captures its output, restarts it with
//!   backoff, flags a crash loop, stops it (SIGTERM, then SIGKILL), and records its pid under
//!   `DATA/run/` so a restarted agent can kill leftovers ([`process::kill_stale`]).
//! - [`health`]: one probe ([`health::check`]), waiting for a starting version to become
//!   healthy ([`health::wait_healthy`]) and watching it through probation
//!   ([`health::hold_healthy`]).
//! - [`front_door`]: [`front_door::FrontDoor`] owns the public TCP port and forwards each
//!   connection to the active version's private port; a switch is an atomic flip.
//! - [`hooks`]: operator commands (`[run.hooks]`) run with a timeout and captured output.
//! - [`ports`]: a free private port for a new version.
//! - [`output`]: the bounded tail of a child's output, shared by all of the above.
//!
//! # How the daemon drives a switch with these (front-door strategy)
//!
//! ```text
//! agent start: process::kill_stale(&data.join("run"), stop_timeout).await   leftovers
//!              door = FrontDoor::bind(listen).await?                        once per service
//! switch:      port = ports::pick_free(&[old.port()])?
//!              new = Supervisor::start(&spec, Launch { slot, version, dir, port, run_dir },
//!                                      RestartPolicy::default())?
//!              health::wait_healthy(Some(&new), &spec, port, new.dir(), now + start_timeout)
//!                  Err(failure) => new.stop(stop_timeout), report failure + failure.output()
//!              door.set_upstream(port)                                     the flip
//!              health::hold_healthy(Some(&new), &spec, port, new.dir(), now + probation)
//!                  Err(failure) => door.set_upstream(old.port()), new.stop(..)   rollback
//!              after grace_secs: door.wait_drained(old.port(), deadline).await;
//!                                old.stop(stop_timeout).await
//! steady state: new.subscribe().wait_for(|s| s.crash_loop)    a crash loop after probation
//! agent stop:  door.shutdown(grace).await; supervisor.stop(stop_timeout).await
//! ```
//!
//! With `[run.hooks]` the flip is `hooks::run("switch", &hooks.switch, slot_dir, &HookEnv
//! { .. old_slot, old_port }, timeout)` instead of `set_upstream`; when `hooks.start` is
//! set the agent runs that hook instead of a [`process::Supervisor`] and passes `None` as
//! the supervisor to the health functions. Stopping and dropping are `async`/`Drop` safe:
//! `Supervisor::stop` and `FrontDoor::shutdown` take `self` and can be spawned as tasks.
//!
//! # Invariants
//!
//! - Every child the agent starts (app, hook, health command) leads its own process group.
//!   An app's group is signalled as a whole when it is stopped, after its leader exits on
//!   its own, and when its [`process::Supervisor`] is dropped; a hook's or health command's
//!   group is killed when its timeout passes. An app process outlives the agent only if
//!   the agent itself is killed outright; its pid file lets the next agent kill it.
//! - Children get a clean environment (only [`INHERITED_ENV`] from the agent's own, plus
//!   what the release and the agent set): broker credentials and tokens are not inherited.
//! - Memory per child and per proxied connection is bounded: output tails of
//!   [`output::KEEP_LINES`] lines of at most [`output::MAX_LINE`] bytes, and one 16 KiB
//!   buffer per connection (downloads are spliced, see [`front_door`]).

pub mod front_door;
pub mod health;
pub mod hooks;
pub mod output;
pub mod ports;
pub mod process;

#[cfg(test)]
mod testing;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Variables passed through from the agent's environment to every child; everything else
/// the agent has (credentials, tokens, `RUST_LOG`) is withheld, as a service manager would.
pub const INHERITED_ENV: [&str; 9] = [
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME",
];

/// A command for a child of the agent: `program` with the slot `cwd` as working directory,
/// stdin from /dev/null, stdout and stderr piped, in a new process group (so a stop or a
/// timeout reaches whatever it forks), killed if its handle is dropped, and an environment
/// of only [`INHERITED_ENV`]; the caller adds the rest.
pub(crate) fn child_command(program: &Path, cwd: &Path) -> Command {
    let mut command = Command::new(program);
    command.env_clear();
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// `path` made absolute against the agent's working directory, so that a relative data
/// directory still names the right files once a child runs in its slot.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
