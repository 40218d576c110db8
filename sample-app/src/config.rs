//! The misbehaviour knobs: what they are, where they come from, and their validation.
//!
//! Knobs are read once at start from an optional config file inside the release (TOML, or
//! JSON when the file name ends in `.json`) and then overridden one by one by environment
//! variables (`APP_ERROR_RATE`, …; the `ENV_*` constants), so a test or an operator can change a
//! single knob without rewriting the release. An environment variable that is set but empty
//! counts as unset.
//!
//! **Invariant:** a [`Knobs`] value returned by [`load`] is valid (`error_rate` is a finite
//! number in 0.0..=1.0); nothing downstream re-checks it. Unknown keys in the file are an
//! error, so a misspelt knob is refused instead of silently ignored.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// File name of the config looked up in the served root when no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "app.toml";

// The environment variables that override knobs, one per knob.
pub const ENV_ERROR_RATE: &str = "APP_ERROR_RATE";
pub const ENV_ADDED_LATENCY_MS: &str = "APP_ADDED_LATENCY_MS";
pub const ENV_LATENCY_JITTER_MS: &str = "APP_LATENCY_JITTER_MS";
pub const ENV_CRASH_AT_START: &str = "APP_CRASH_AT_START";
pub const ENV_CRASH_AFTER_SECS: &str = "APP_CRASH_AFTER_SECS";
pub const ENV_FAIL_HEALTH: &str = "APP_FAIL_HEALTH";
pub const ENV_SEED: &str = "APP_SEED";

/// How the app misbehaves on purpose. The default is a well-behaved app.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Knobs {
    /// Fraction (0.0–1.0) of traffic requests (`/`, `/work`, `/files/…`) answered with 500.
    pub error_rate: f64,
    /// Delay added before answering each traffic request.
    pub added_latency_ms: u64,
    /// Extra delay, uniformly drawn from `0..=latency_jitter_ms`, added to `added_latency_ms`.
    pub latency_jitter_ms: u64,
    /// Exit with status 1 right after binding the listener and logging the start line.
    pub crash_at_start: bool,
    /// Exit with status 1 this many seconds after start (a crash during probation).
    pub crash_after_secs: Option<u64>,
    /// `/healthz` answers 503 instead of 200.
    pub fail_health: bool,
    /// Seed for the random choices (`error_rate`, jitter). Without it the generator is
    /// seeded from the OS, so runs differ. With it the *sequence* of choices repeats; which
    /// request gets which choice still depends on arrival order.
    pub seed: Option<u64>,
}

/// Why the knobs could not be loaded. Every variant names the file or variable at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for the sample app's knobs: {source}")]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {path} is not valid JSON for the sample app's knobs: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("environment variable {var}={value:?} is not {expected}")]
    Env {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("knob {knob} = {value} from {origin} is out of range: {reason}")]
    Invalid {
        knob: &'static str,
        value: String,
        origin: String,
        reason: &'static str,
    },
}

/// Loads the knobs: from `explicit` if given (it must exist), else from
/// `root/app.toml` if that file exists, else defaults; then applies the environment
/// overrides read through `env` (pass `|name| std::env::var(name).ok()` in a binary).
///
/// Returns the knobs and the config file actually read, if any.
pub fn load(
    explicit: Option<&Path>,
    root: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Knobs, Option<PathBuf>), ConfigError> {
    let file = match explicit {
        Some(path) => Some(path.to_path_buf()),
        None => {
            let candidate = root.join(DEFAULT_CONFIG_FILE);
            candidate.is_file().then_some(candidate)
        }
    };
    let mut knobs = match &file {
        Some(path) => parse_file(path)?,
        None => Knobs::default(),
    };
    let origin = |path: &Option<PathBuf>| match path {
        Some(path) => path.display().to_string(),
        None => "defaults".to_owned(),
    };
    knobs.validate(&origin(&file))?;
    knobs.apply_env(env)?;
    knobs.validate("the environment")?;
    Ok((knobs, file))
}

fn parse_file(path: &Path) -> Result<Knobs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if path.extension().is_some_and(|ext| ext == "json") {
        serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })
    } else {
        toml::from_str(&text).map_err(|source| ConfigError::Toml {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl Knobs {
    /// Overrides each knob whose environment variable is set and non-empty.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |var: &str| {
            env(var)
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        const MS: &str = "a whole number of milliseconds";
        if let Some(value) = get(ENV_ERROR_RATE) {
            self.error_rate = parse_env(ENV_ERROR_RATE, &value, "a number")?;
        }
        if let Some(value) = get(ENV_ADDED_LATENCY_MS) {
            self.added_latency_ms = parse_env(ENV_ADDED_LATENCY_MS, &value, MS)?;
        }
        if let Some(value) = get(ENV_LATENCY_JITTER_MS) {
            self.latency_jitter_ms = parse_env(ENV_LATENCY_JITTER_MS, &value, MS)?;
        }
        if let Some(value) = get(ENV_CRASH_AT_START) {
            self.crash_at_start = parse_bool(ENV_CRASH_AT_START, &value)?;
        }
        if let Some(value) = get(ENV_CRASH_AFTER_SECS) {
            let secs = parse_env(ENV_CRASH_AFTER_SECS, &value, "a whole number of seconds")?;
            self.crash_after_secs = Some(secs);
        }
        if let Some(value) = get(ENV_FAIL_HEALTH) {
            self.fail_health = parse_bool(ENV_FAIL_HEALTH, &value)?;
        }
        if let Some(value) = get(ENV_SEED) {
            self.seed = Some(parse_env(ENV_SEED, &value, "an unsigned 64-bit integer")?);
        }
        Ok(())
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if !(self.error_rate.is_finite() && (0.0..=1.0).contains(&self.error_rate)) {
            return Err(ConfigError::Invalid {
                knob: "error_rate",
                value: self.error_rate.to_string(),
                origin: origin.to_owned(),
                reason: "must be a fraction between 0.0 and 1.0",
            });
        }
        Ok(())
    }
}

fn parse_env<T: std::str::FromStr>(
    var: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<T, ConfigError> {
    value.parse().map_err(|_| ConfigError::Env {
        var,
        value: value.to_owned(),
        expected,
    })
}

fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Env {
            var,
            value: value.to_owned(),
            expected: "a boolean (1/0, true/false, yes/no, on/off)",
        }),
    }
}

/// The knobs that differ from a well-behaved app, for the start log line; `none` if none.
impl fmt::Display for Knobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut active = Vec::new();
        if self.error_rate > 0.0 {
            active.push(format!("error_rate={}", self.error_rate));
        }
        if self.added_latency_ms > 0 {
            active.push(format!("added_latency_ms={}", self.added_latency_ms));
        }
        if self.latency_jitter_ms > 0 {
            active.push(format!("latency_jitter_ms={}", self.latency_jitter_ms));
        }
        if self.crash_at_start {
            active.push("crash_at_start".to_owned());
        }
        if let Some(secs) = self.crash_after_secs {
            active.push(format!("crash_after_secs={secs}"));
        }
        if self.fail_health {
            active.push("fail_health".to_owned());
        }
        if let Some(seed) = self.seed {
            active.push(format!("seed={seed}"));
        }
        if active.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&active.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn without_a_config_file_the_app_is_well_behaved() {
        let dir = tempfile::tempdir().unwrap();
        let (knobs, file) = load(None, dir.path(), no_env).unwrap();
        assert_eq!(knobs, Knobs::default());
        assert_eq!(file, None);
        assert_eq!(knobs.to_string(), "none");
    }

    #[test]
    fn app_toml_in_the_root_is_read_by_default() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("app.toml"),
            "error_rate = 0.25\nadded_latency_ms = 40\nfail_health = true\ncrash_after_secs = 9\n",
        )
        .unwrap();
        let (knobs, file) = load(None, dir.path(), no_env).unwrap();
        assert_eq!(file, Some(dir.path().join("app.toml")));
        assert_eq!(knobs.error_rate, 0.25);
        assert_eq!(knobs.added_latency_ms, 40);
        assert!(knobs.fail_health);
        assert_eq!(knobs.crash_after_secs, Some(9));
        assert_eq!(
            knobs.to_string(),
            "error_rate=0.25 added_latency_ms=40 crash_after_secs=9 fail_health"
        );
    }

    #[test]
    fn a_json_file_is_parsed_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("knobs.json");
        std::fs::write(&path, r#"{"crash_at_start": true, "seed": 7}"#).unwrap();
        let (knobs, _) = load(Some(&path), dir.path(), no_env).unwrap();
        assert!(knobs.crash_at_start);
        assert_eq!(knobs.seed, Some(7));
    }

    #[test]
    fn environment_overrides_win_over_the_file_and_empty_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("app.toml"),
            "error_rate = 1.0\nfail_health = true\nadded_latency_ms = 5\n",
        )
        .unwrap();
        let env = env_of(&[
            ("APP_ERROR_RATE", "0"),
            ("APP_FAIL_HEALTH", "off"),
            ("APP_ADDED_LATENCY_MS", ""),
            ("APP_CRASH_AFTER_SECS", " 3 "),
        ]);
        let (knobs, _) = load(None, dir.path(), env).unwrap();
        assert_eq!(knobs.error_rate, 0.0);
        assert!(!knobs.fail_health);
        assert_eq!(knobs.added_latency_ms, 5, "empty variable counts as unset");
        assert_eq!(knobs.crash_after_secs, Some(3));
    }

    #[test]
    fn an_explicit_config_file_that_is_missing_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let error = load(Some(&path), dir.path(), no_env).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }), "{error}");
        assert!(error.to_string().contains("nope.toml"), "{error}");
    }

    #[test]
    fn misspelt_knobs_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.toml"), "eror_rate = 0.5\n").unwrap();
        let error = load(None, dir.path(), no_env).unwrap_err();
        assert!(matches!(error, ConfigError::Toml { .. }), "{error}");
        assert!(error.to_string().contains("eror_rate"), "{error}");
    }

    #[test]
    fn error_rate_outside_zero_to_one_is_refused_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.toml"), "error_rate = 1.5\n").unwrap();
        let error = load(None, dir.path(), no_env).unwrap_err();
        assert!(matches!(error, ConfigError::Invalid { .. }), "{error}");
        assert!(error.to_string().contains("app.toml"), "{error}");

        let empty = tempfile::tempdir().unwrap();
        let error = load(None, empty.path(), env_of(&[("APP_ERROR_RATE", "NaN")])).unwrap_err();
        assert!(error.to_string().contains("the environment"), "{error}");
    }

    #[test]
    fn unparsable_environment_values_name_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let error = load(None, dir.path(), env_of(&[("APP_FAIL_HEALTH", "maybe")])).unwrap_err();
        assert!(error.to_string().contains("APP_FAIL_HEALTH"), "{error}");
        let error = load(None, dir.path(), env_of(&[("APP_SEED", "-1")])).unwrap_err();
        assert!(error.to_string().contains("APP_SEED"), "{error}");
    }
}
