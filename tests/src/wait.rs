//! Polling with a deadline: the only way a test waits.

use std::fmt::Display;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(200);

/// Polls `cond` until it returns `Ok(true)` or `timeout` passes. A failing probe (`Err`) is
/// not fatal, since the process under test may still be starting, unless the error is
/// [`Fatal`]. On timeout the error says what was awaited and the last probe error, if any.
pub fn wait_until(
    timeout: Duration,
    what: impl Display,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    wait_for(timeout, what, || Ok(cond()?.then_some(())))
}

/// Like [`wait_until`], for a probe that yields a value once the condition holds.
pub fn wait_for<T>(
    timeout: Duration,
    what: impl Display,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(e) if e.is::<Fatal>() => return Err(e.context(format!("while waiting for {what}"))),
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!(
                    "timed out after {timeout:?} waiting for {what}; the last check failed: {e:#}"
                ),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// An error that ends a [`wait_until`] at once, e.g. "the agent exited".
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}
