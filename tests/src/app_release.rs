//! Releases that run: a source directory holding the `sample-app` binary, a few files and a
//! `release.toml` whose `[run]` section has the agent run it red/black behind its front door.
//!
//! The version label is passed as `APP_VERSION`, so `GET /version` through the front door
//! tells which version answers; the sample app's misbehaviour knobs (`APP_CRASH_AT_START`,
//! `APP_FAIL_HEALTH`, `APP_CRASH_AFTER_SECS`, `APP_ERROR_RATE`, …) are set the same way.
//! Timings default to short ones so a whole switch, probation and grace fit in seconds. The
//! agent scrapes the app's `/metrics` (`metrics_path`) on its metrics interval.
//!
//! The front door's address is part of the release, so every node that runs it listens
//! there: give each agent of a test its own app (or run one agent per fleet), or have a
//! switch hook move traffic instead ([`AppRelease::switch_hook`],
//! [`AppRelease::serving_port_hook`]), which binds nothing shared, so many agents on one
//! machine can run the same release.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::fleet::Fleet;

/// The file in an agent's data directory where [`AppRelease::serving_port_hook`] writes the
/// active version's private port.
pub const SERVING_PORT_FILE: &str = "serving-port";

/// The release's `[run]` section, written as `release.toml`.
#[derive(Debug, Clone)]
pub struct AppRelease {
    version: String,
    front_door: SocketAddr,
    env: BTreeMap<String, String>,
    start_timeout_secs: u32,
    probation_secs: u32,
    grace_secs: u32,
    health_interval_ms: u32,
    /// `[run.hooks] switch = …` in place of the front door.
    switch_hook: Option<Vec<String>>,
    /// Sections appended after `[run]` (`[canary]`, `[rollout]`).
    sections: String,
}

impl AppRelease {
    /// Version `version` of the sample app behind a front door on `front_door`: health
    /// `GET /healthz` every 100 ms, 10 s to start, 2 s of probation, 1 s of grace.
    pub fn new(version: &str, front_door: SocketAddr) -> AppRelease {
        AppRelease {
            version: version.to_owned(),
            front_door,
            env: BTreeMap::from([("APP_VERSION".to_owned(), version.to_owned())]),
            start_timeout_secs: 10,
            probation_secs: 2,
            grace_secs: 1,
            health_interval_ms: 100,
            switch_hook: None,
            sections: String::new(),
        }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn front_door(&self) -> SocketAddr {
        self.front_door
    }

    /// Sets an environment variable of the app (a misbehaviour knob such as
    /// `APP_CRASH_AT_START=true`).
    pub fn env(mut self, name: &str, value: &str) -> AppRelease {
        self.env.insert(name.to_owned(), value.to_owned());
        self
    }

    pub fn start_timeout_secs(mut self, secs: u32) -> AppRelease {
        self.start_timeout_secs = secs;
        self
    }

    pub fn probation_secs(mut self, secs: u32) -> AppRelease {
        self.probation_secs = secs;
        self
    }

    pub fn grace_secs(mut self, secs: u32) -> AppRelease {
        self.grace_secs = secs;
        self
    }

    pub fn health_interval_ms(mut self, ms: u32) -> AppRelease {
        self.health_interval_ms = ms;
        self
    }

    /// Moves traffic with this `[run.hooks] switch` command instead of the front door (which
    /// is then left out: no shared port is bound). The hook runs with `FLEET_PORT` and
    /// `FLEET_SLOT` in its environment.
    pub fn switch_hook(mut self, argv: &[&str]) -> AppRelease {
        self.switch_hook = Some(argv.iter().map(|a| (*a).to_owned()).collect());
        self
    }

    /// Moves traffic with a switch hook that writes the new version's private port to
    /// [`SERVING_PORT_FILE`] in the agent's data directory (the hook runs in the slot,
    /// `DATA/slots/NAME`), where [`crate::traffic::NodeTraffic`] follows it.
    pub fn serving_port_hook(self) -> AppRelease {
        let script = format!(
            "echo $FLEET_PORT > ../../{SERVING_PORT_FILE}.new && mv ../../{SERVING_PORT_FILE}.new ../../{SERVING_PORT_FILE}"
        );
        self.switch_hook(&["/bin/sh", "-c", &script])
    }

    /// Appends `toml` (whole sections such as `[canary]`) to `release.toml`.
    pub fn sections(mut self, toml: &str) -> AppRelease {
        self.sections.push_str(toml);
        if !self.sections.ends_with('\n') {
            self.sections.push('\n');
        }
        self
    }

    /// The text of `release.toml`.
    pub fn release_toml(&self) -> String {
        let mut env = String::new();
        for (name, value) in &self.env {
            // Names are plain identifiers; values are quoted.
            let _ = writeln!(env, "{name} = {}", toml_string(value));
        }
        format!(
            "[run]\n\
             command = \"bin/sample-app\"\n\
             args = [\"--root\", \".\"]\n\
             start_timeout_secs = {start}\n\
             probation_secs = {probation}\n\
             grace_secs = {grace}\n\
             stop_timeout_secs = 5\n\
             metrics_path = \"/metrics\"\n\
             \n\
             [run.env]\n\
             {env}\
             \n\
             [run.health]\n\
             http = \"/healthz\"\n\
             interval_ms = {interval}\n\
             timeout_ms = 1000\n\
             \n\
             {traffic}{sections}",
            start = self.start_timeout_secs,
            probation = self.probation_secs,
            grace = self.grace_secs,
            interval = self.health_interval_ms,
            traffic = match &self.switch_hook {
                Some(argv) => {
                    let argv: Vec<String> = argv.iter().map(|a| toml_string(a)).collect();
                    format!("[run.hooks]\nswitch = [{}]\n", argv.join(", "))
                }
                None => format!(
                    "[run.front_door]\nlisten = {}\n",
                    toml_string(&self.front_door.to_string())
                ),
            },
            // A blank line before the appended sections, as between the others.
            sections = match self.sections.as_str() {
                "" => String::new(),
                sections => format!("\n{sections}"),
            },
        )
    }

    /// Writes the release into the empty (or missing) directory `dir`: `bin/sample-app`
    /// (a copy of `sample_app` without its debug information, mode 755), `index.html` and `data/version.txt` naming the
    /// version, and `release.toml`.
    pub fn write(&self, dir: &Path, sample_app: &Path) -> Result<()> {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        let program = bin.join("sample-app");
        std::fs::copy(sample_app, &program).with_context(|| {
            format!("copying {} to {}", sample_app.display(), program.display())
        })?;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", program.display()))?;
        strip_debug_info(&program)?;
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::write(
            dir.join("index.html"),
            format!("<h1>sample app {}</h1>\n", self.version),
        )?;
        std::fs::write(dir.join("data/version.txt"), format!("{}\n", self.version))?;
        std::fs::write(dir.join("release.toml"), self.release_toml())?;
        Ok(())
    }
}

impl Fleet {
    /// Writes `release` into a fresh scratch directory and publishes it as `app@version`;
    /// returns the source directory.
    pub fn publish_app(&self, app: &str, release: &AppRelease) -> Result<PathBuf> {
        let src = self.scratch(&format!("{app}-{}", release.version))?;
        release.write(&src, &self.bins().sample_app)?;
        self.publish(&src, app, &release.version)?;
        Ok(src)
    }

    /// [`Fleet::publish_app`], then `rollout start` of it to every node.
    pub fn deploy_app(&self, app: &str, release: &AppRelease) -> Result<PathBuf> {
        let src = self.publish_app(app, release)?;
        self.rollout(app, &release.version)?;
        Ok(src)
    }
}

/// Removes the debug sections of the copied program, when binutils' `strip` is installed:
/// a debug build of the sample app is ~80 MB, nine tenths of it debug information, and every
/// publish chunks, hashes and compresses the whole file. Without `strip` the copy ships as
/// it is, only slower.
fn strip_debug_info(program: &Path) -> Result<()> {
    match Command::new("strip")
        .arg("--strip-debug")
        .arg(program)
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "`strip --strip-debug {}` failed ({}): {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                eprintln!("note: no `strip` on PATH; releases ship the sample app unstripped")
            });
            Ok(())
        }
        Err(e) => Err(e).context("running strip"),
    }
}

/// `value` as a TOML basic string. JSON's string escapes are a subset of TOML's.
fn toml_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_file_names_the_version_the_knobs_and_the_front_door() {
        let door: SocketAddr = "127.0.0.1:4321".parse().expect("address");
        let text = AppRelease::new("7", door)
            .env("APP_FAIL_HEALTH", "true")
            .probation_secs(3)
            .release_toml();
        assert!(text.contains("APP_VERSION = \"7\"\n"), "{text}");
        assert!(text.contains("APP_FAIL_HEALTH = \"true\"\n"), "{text}");
        assert!(text.contains("probation_secs = 3\n"), "{text}");
        assert!(text.contains("listen = \"127.0.0.1:4321\"\n"), "{text}");
        let hooked = AppRelease::new("7", door)
            .switch_hook(&["/bin/sh", "-c", "true"])
            .release_toml();
        assert!(
            hooked.ends_with("[run.hooks]\nswitch = [\"/bin/sh\", \"-c\", \"true\"]\n"),
            "{hooked}"
        );
        assert!(!hooked.contains("front_door"), "{hooked}");
        let judged = AppRelease::new("7", door)
            .sections("[canary]\nwindow_secs = 15")
            .release_toml();
        assert!(judged.contains("metrics_path = \"/metrics\"\n"), "{judged}");
        assert!(
            judged.ends_with("\"\n\n[canary]\nwindow_secs = 15\n"),
            "{judged}"
        );
    }

    #[test]
    fn quoted_values_escape_what_toml_needs_escaped() {
        assert_eq!(toml_string("a\"b\\c\n"), r#""a\"b\\c\n""#);
    }
}
