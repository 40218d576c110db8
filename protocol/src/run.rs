//! How a release runs on a node: the `[run]` section an operator writes in the release's
//! `release.toml`, carried inside the signed manifest so nobody between the coordinator and
//! the node can change what the node executes.
//!
//! The same struct reads the TOML at publish time and the manifest's JSON on the node.
//! [`RunSpec::validate`] is the one gate: after it passes, the command is a plain path
//! inside the slot (or an absolute path to a program the node already has), exactly one
//! traffic strategy is chosen, and every count and duration is bounded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::RelPath;

/// Most arguments, environment variables or hook words a run section may carry.
pub const MAX_ITEMS: usize = 64;
/// Longest argument, environment value, path or URL path in a run section.
pub const MAX_STRING: usize = 4096;
/// Longest any configured duration may be, in seconds (a day).
pub const MAX_SECS: u32 = 86_400;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The program: a path inside the slot (`bin/server`), or an absolute path to a program
    /// installed on the node (`/usr/bin/python3`). Runs with the slot as working directory.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The environment variable that carries the private port the agent gives this version.
    #[serde(default = "default_port_env")]
    pub port_env: String,
    #[serde(default)]
    pub health: HealthSpec,
    /// How long a starting version has to become healthy before the switch is abandoned.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_secs: u32,
    /// After the switch, how long the new version must stay healthy (and not crash) before
    /// it is kept; a failure within it returns the node to the previous version.
    #[serde(default = "default_probation")]
    pub probation_secs: u32,
    /// How long the old version is kept running (warm, for an instant rollback) after the
    /// switch, counted from the end of probation.
    #[serde(default = "default_grace")]
    pub grace_secs: u32,
    /// How long a version has to exit after SIGTERM before it is killed.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u32,
    /// The URL path of the version's Prometheus-format metrics (e.g. `/metrics`), scraped by
    /// the agent on its private port for the health telemetry canaries are judged on. Without
    /// it the node reports host metrics only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_path: Option<String>,
    /// The default strategy: the agent owns the public port and forwards to the version.
    #[serde(default)]
    pub front_door: Option<FrontDoor>,
    /// The alternative: operator commands move traffic (systemd, nginx, …).
    #[serde(default)]
    pub hooks: Option<Hooks>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontDoor {
    /// The public address the agent listens on, e.g. `0.0.0.0:8080`.
    pub listen: String,
}

/// Operator commands, each an argv run with the slot as working directory and
/// `FLEET_SLOT`, `FLEET_VERSION`, `FLEET_PORT` (and for `switch`/`stop` the other version's
/// `FLEET_OLD_SLOT`, `FLEET_OLD_PORT`) in the environment. A hook succeeds by exiting 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Starts the version (instead of the agent running `command` itself), if set.
    #[serde(default)]
    pub start: Option<Vec<String>>,
    /// Moves traffic to the version named in the environment.
    pub switch: Vec<String>,
    /// Stops the version named in the environment, if set.
    #[serde(default)]
    pub stop: Option<Vec<String>>,
}

/// How to tell the version is healthy. At most one of `http`, `tcp`, `command`; none means
/// a TCP connect to the version's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// `GET http://127.0.0.1:PORT{path}` must answer 2xx.
    #[serde(default)]
    pub http: Option<String>,
    /// A TCP connect to the port must succeed.
    #[serde(default)]
    pub tcp: bool,
    /// This argv must exit 0 (run in the slot, with `FLEET_PORT` set).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default = "default_interval")]
    pub interval_ms: u32,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u32,
}

impl Default for HealthSpec {
    fn default() -> HealthSpec {
        HealthSpec {
            http: None,
            tcp: false,
            command: None,
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
        }
    }
}

/// The check a [`HealthSpec`] asks for, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck<'a> {
    Http { path: &'a str },
    Tcp,
    Command { argv: &'a [String] },
}

/// How the node moves traffic for a release, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy<'a> {
    FrontDoor(&'a FrontDoor),
    Hooks(&'a Hooks),
}

fn default_port_env() -> String {
    "PORT".to_owned()
}
fn default_start_timeout() -> u32 {
    30
}
fn default_probation() -> u32 {
    10
}
fn default_grace() -> u32 {
    30
}
fn default_stop_timeout() -> u32 {
    10
}
fn default_interval() -> u32 {
    500
}
fn default_timeout() -> u32 {
    2000
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunSpecError {
    #[error(
        "run.command {0:?} must be a path inside the release (bin/server) or an absolute path"
    )]
    BadCommand(String),
    #[error("run.{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("run: choose exactly one of [run.front_door] (the agent owns the public port) and [run.hooks] (your commands move traffic)")]
    Strategy,
    #[error("run.health: choose at most one of http, tcp and command")]
    Health,
}

fn invalid(field: &'static str, why: impl Into<String>) -> RunSpecError {
    RunSpecError::Invalid {
        field,
        why: why.into(),
    }
}

fn check_strings<'a>(
    field: &'static str,
    items: impl ExactSizeIterator<Item = &'a String>,
) -> Result<(), RunSpecError> {
    if items.len() > MAX_ITEMS {
        return Err(invalid(field, format!("more than {MAX_ITEMS} items")));
    }
    for item in items {
        if item.len() > MAX_STRING || item.contains('\0') {
            return Err(invalid(
                field,
                format!("an item is over {MAX_STRING} bytes or contains NUL"),
            ));
        }
    }
    Ok(())
}

fn check_argv(field: &'static str, argv: &[String]) -> Result<(), RunSpecError> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(invalid(field, "must name a program"));
    }
    check_strings(field, argv.iter())
}

fn check_secs(field: &'static str, secs: u32, min: u32) -> Result<(), RunSpecError> {
    if !(min..=MAX_SECS).contains(&secs) {
        return Err(invalid(
            field,
            format!("must be {min}..={MAX_SECS} seconds"),
        ));
    }
    Ok(())
}

fn is_url_path(path: &str) -> bool {
    path.starts_with('/') && path.len() <= MAX_STRING && !path.contains(char::is_whitespace)
}

impl RunSpec {
    pub fn validate(&self) -> Result<(), RunSpecError> {
        let command_ok = if self.command.starts_with('/') {
            !self.command.contains('\0') && self.command.len() <= MAX_STRING
        } else {
            RelPath::new(&self.command).is_ok()
        };
        if !command_ok {
            return Err(RunSpecError::BadCommand(self.command.clone()));
        }
        check_strings("args", self.args.iter())?;
        check_strings("env", self.env.values())?;
        let valid_name = |name: &str| {
            !name.is_empty()
                && name.len() <= 256
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if let Some(bad) = self.env.keys().find(|k| !valid_name(k)) {
            return Err(invalid("env", format!("{bad:?} is not a variable name")));
        }
        if !valid_name(&self.port_env) {
            return Err(invalid("port_env", "must be a variable name such as PORT"));
        }
        check_secs("start_timeout_secs", self.start_timeout_secs, 1)?;
        check_secs("probation_secs", self.probation_secs, 0)?;
        check_secs("grace_secs", self.grace_secs, 0)?;
        check_secs("stop_timeout_secs", self.stop_timeout_secs, 1)?;
        self.health_check()?;
        if let Some(path) = &self.metrics_path {
            if !is_url_path(path) {
                return Err(invalid(
                    "metrics_path",
                    "must be a URL path such as /metrics",
                ));
            }
        }
        let health = &self.health;
        if !(50..=60_000).contains(&health.interval_ms)
            || !(50..=60_000).contains(&health.timeout_ms)
        {
            return Err(invalid(
                "health",
                "interval_ms and timeout_ms must be 50..=60000",
            ));
        }
        match self.strategy()? {
            Strategy::FrontDoor(door) => {
                if door.listen.parse::<std::net::SocketAddr>().is_err() {
                    return Err(invalid(
                        "front_door.listen",
                        format!("{:?} is not IP:PORT, e.g. 0.0.0.0:8080", door.listen),
                    ));
                }
            }
            Strategy::Hooks(hooks) => {
                check_argv("hooks.switch", &hooks.switch)?;
                if let Some(start) = &hooks.start {
                    check_argv("hooks.start", start)?;
                }
                if let Some(stop) = &hooks.stop {
                    check_argv("hooks.stop", stop)?;
                }
            }
        }
        Ok(())
    }

    pub fn strategy(&self) -> Result<Strategy<'_>, RunSpecError> {
        match (&self.front_door, &self.hooks) {
            (Some(door), None) => Ok(Strategy::FrontDoor(door)),
            (None, Some(hooks)) => Ok(Strategy::Hooks(hooks)),
            _ => Err(RunSpecError::Strategy),
        }
    }

    pub fn health_check(&self) -> Result<HealthCheck<'_>, RunSpecError> {
        let h = &self.health;
        match (&h.http, h.tcp, &h.command) {
            (Some(path), false, None) => {
                if !is_url_path(path) {
                    return Err(invalid(
                        "health.http",
                        "must be a URL path such as /healthz",
                    ));
                }
                Ok(HealthCheck::Http { path })
            }
            (None, _, None) => Ok(HealthCheck::Tcp),
            (None, false, Some(argv)) => {
                check_argv("health.command", argv)?;
                Ok(HealthCheck::Command { argv })
            }
            _ => Err(RunSpecError::Health),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> RunSpec {
        serde_json::from_value(json).expect("parses")
    }

    #[test]
    fn a_minimal_front_door_spec_gets_the_defaults() {
        let s = spec(serde_json::json!({
            "command": "bin/server",
            "front_door": { "listen": "0.0.0.0:8080" },
            "health": { "http": "/healthz" }
        }));
        s.validate().expect("valid");
        assert_eq!(s.port_env, "PORT");
        assert_eq!(s.health_check(), Ok(HealthCheck::Http { path: "/healthz" }));
        assert!(matches!(s.strategy(), Ok(Strategy::FrontDoor(_))));
        assert_eq!(s.start_timeout_secs, 30);
    }

    #[test]
    fn no_health_section_means_a_tcp_connect() {
        let s = spec(serde_json::json!({
            "command": "/usr/bin/python3", "args": ["-m", "http.server"],
            "front_door": { "listen": "127.0.0.1:80" }
        }));
        s.validate().expect("valid");
        assert_eq!(s.health_check(), Ok(HealthCheck::Tcp));
    }

    #[test]
    fn bad_specs_are_refused_with_the_field_named() {
        let base = serde_json::json!({ "command": "bin/server", "front_door": { "listen": "0.0.0.0:8080" } });
        let with = |patch: serde_json::Value| {
            let mut v = base.clone();
            for (k, val) in patch.as_object().expect("object") {
                v[k] = val.clone();
            }
            spec(v).validate().expect_err("refused").to_string()
        };
        assert!(with(serde_json::json!({ "command": "../../bin/sh" })).contains("run.command"));
        assert!(
            with(serde_json::json!({ "hooks": { "switch": ["true"] } })).contains("exactly one")
        );
        assert!(with(serde_json::json!({ "front_door": null })).contains("exactly one"));
        assert!(
            with(serde_json::json!({ "front_door": { "listen": "8080" } }))
                .contains("front_door.listen")
        );
        assert!(
            with(serde_json::json!({ "health": { "http": "/h", "tcp": true } }))
                .contains("at most one")
        );
        assert!(
            with(serde_json::json!({ "health": { "http": "healthz" } })).contains("health.http")
        );
        assert!(with(serde_json::json!({ "env": { "1X": "v" } })).contains("run.env"));
        assert!(with(serde_json::json!({ "start_timeout_secs": 0 })).contains("start_timeout_secs"));
        assert!(with(serde_json::json!({ "probation_secs": 90_000 })).contains("probation_secs"));
        let many: Vec<String> = (0..=MAX_ITEMS).map(|i| i.to_string()).collect();
        assert!(with(serde_json::json!({ "args": many })).contains("run.args"));
    }

    #[test]
    fn hooks_need_a_switch_command() {
        let s = spec(serde_json::json!({
            "command": "bin/server",
            "hooks": { "switch": [], "stop": ["systemctl", "stop", "app"] }
        }));
        assert!(s
            .validate()
            .expect_err("refused")
            .to_string()
            .contains("hooks.switch"));
    }

    #[test]
    fn unknown_keys_are_refused_rather_than_ignored() {
        let parsed: Result<RunSpec, _> = serde_json::from_value(serde_json::json!({
            "command": "bin/server", "front_door": { "listen": "0.0.0.0:1" }, "probaton_secs": 5
        }));
        assert!(parsed.is_err());
    }
}
