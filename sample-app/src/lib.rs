//! `sample-app`: the small HTTP app the fleet deploy system ships in its demos and tests.
//!
//! It plays the part of the node software the agent runs red/black: it serves the files of
//! its own release slot (streamed, confined to the slot), answers a health check and its
//! version, exposes Prometheus metrics for canary judgment, and can be told to misbehave
//! (errors, latency, failing health, crashing) by a config file in the release or by
//! environment variables, so that tests and the demo can produce a bad release on purpose.
//!
//! Modules: [`config`] (the knobs and where they come from), [`files`] (confined, streamed
//! file serving), [`metrics`] (the registry and its text exposition), [`server`] (routes,
//! fault injection, graceful serving). The binary (`src/main.rs`) owns the command line,
//! logging, the listener, signals and the crash knobs; nothing in this library exits the
//! process.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

pub mod config;
pub mod files;
pub mod metrics;
pub mod server;

/// The root served when `--root` is not given, for the binary at `exe` (its resolved path):
/// the binary's directory, or that directory's parent when it is named `bin`. So a release
/// laid out as `SLOT/bin/sample-app` or as `SLOT/sample-app` serves `SLOT`. The path is
/// the resolved one, so it names the slot directory itself, not the agent's `current` link,
/// and stays put when the link moves to another version.
pub fn default_root_for(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|name| name == "bin") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_root_is_the_slot_whether_or_not_the_binary_sits_in_bin() {
        assert_eq!(
            default_root_for(Path::new("/data/slots/app-v1/bin/sample-app")),
            Some(PathBuf::from("/data/slots/app-v1"))
        );
        assert_eq!(
            default_root_for(Path::new("/data/slots/app-v1/sample-app")),
            Some(PathBuf::from("/data/slots/app-v1"))
        );
    }
}
