//! Tests that need root and system tools (network namespaces, tmpfs mounts).
//!
//! The rule: in CI (`CI=true`) such a test must run, so a missing privilege or tool fails
//! it; on a developer's machine it is skipped with a loud message on stderr, so a plain
//! `cargo test` as a normal user still passes everything it can run.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// Directories searched for system tools besides `$PATH`: `ip` lives in `/usr/sbin`, which a
/// normal user's `$PATH` often lacks.
const SBIN: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Whether `test` can run here: the process is root and every tool in `tools` is installed.
/// `Ok(false)` means skip (after printing why); an error means fail (in CI).
pub fn require_root(test: &str, tools: &[&str]) -> Result<bool> {
    let mut missing = Vec::new();
    if !is_root()? {
        missing.push("root (the effective uid is not 0)".to_owned());
    }
    for tool in tools {
        if find_tool(tool).is_none() {
            missing.push(format!("the `{tool}` command"));
        }
    }
    if missing.is_empty() {
        return Ok(true);
    }
    let why = format!("{test} needs {}", missing.join(" and "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{why}; CI=true, so this is a failure, not a skip (`.ci/run` installs the tools and runs as root)");
    }
    // Straight to the stderr handle: the test harness captures `eprintln!`, and a skip must
    // be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!! SKIPPED: {why}. Run as root with those tools installed to exercise it.\n"
    );
    Ok(false)
}

/// The full path of a system tool, from `$PATH` or the usual sbin directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs a system tool to completion; fails with its stderr when it exits non-zero.
pub fn run_tool(name: &str, args: &[&str]) -> Result<String> {
    let tool = find_tool(name).with_context(|| format!("`{name}` is not installed"))?;
    let out = std::process::Command::new(&tool)
        .args(args)
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    if !out.status.success() {
        bail!(
            "`{name} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The effective uid, from `/proc/self/status` (the workspace forbids `unsafe`, so no
/// `geteuid`).
fn is_root() -> Result<bool> {
    let status = Path::new("/proc/self/status");
    let text =
        std::fs::read_to_string(status).with_context(|| format!("reading {}", status.display()))?;
    let uids = text
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .with_context(|| format!("no Uid line in {}", status.display()))?;
    // Real, effective, saved, filesystem.
    Ok(uids.split_whitespace().nth(1) == Some("0"))
}
