//! The operator's `release.toml`: what a release says about itself beyond its files, read
//! from the source directory at publish time: the `[run]` table (how the release runs on a
//! node, [`RunSpec`], signed into the manifest) and the `[rollout]` table (the plan defaults
//! of its rollouts, [`PlanOptions`], kept by the coordinator with the release), and the
//! `[canary]` table (how its canaries are judged, [`CanaryConfig`], kept likewise).
//!
//! ```toml
//! [run]
//! command = "bin/server"
//! args = ["--listen-env", "PORT"]
//! [run.health]
//! http = "/healthz"
//! [run.front_door]
//! listen = "0.0.0.0:8080"
//! ```
//!
//! Invariants: a key this build does not know is refused, never ignored (a typo such as
//! `probaton_secs` must not silently fall back to a default), and a run section is returned
//! only after [`RunSpec::validate`] passed. Every error names the file and the dotted key
//! (`run.health.http`), plus the line and column when the TOML itself points at one.
//! The file also ships as an ordinary file of the image: it is part of the directory.

use std::path::{Path, PathBuf};

use protocol::run::RunSpecError;
use protocol::RunSpec;
use serde::Deserialize;

use crate::canary::{CanaryConfig, CanaryConfigError};
use crate::rollout::plan::{PlanError, PlanOptions};

/// The file's name inside the release's source directory.
pub const FILE_NAME: &str = "release.toml";

/// The whole file. Every section is optional: an empty file is a files-only release.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseFile {
    /// How the release runs; `None` for files only (the switch flips the pointer).
    #[serde(default)]
    pub run: Option<RunSpec>,
    /// Defaults for `rollout start` of this release (waves, bake, thresholds, windows…);
    /// flags given to `rollout start` win over them.
    #[serde(default)]
    pub rollout: Option<PlanOptions>,
    /// How canaries of this release are judged; `None` for the defaults. Keys left out take
    /// the defaults (merged per metric, see `canary::CanaryConfig`).
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseFileError {
    /// The message includes the I/O error's, so it is not also chained as a source.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type. `key` is the dotted path
    /// (`run.health.http`), empty when the error is in the file's syntax itself.
    #[error("{}: {}{message}{}", path.display(), key_prefix(key), position(*line_column))]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
        line_column: Option<(usize, usize)>,
    },
    /// Parsed, but the run section breaks a rule (the message names the `run.*` field).
    #[error("{}: {error}", path.display())]
    Invalid { path: PathBuf, error: RunSpecError },
    /// Parsed, but the rollout section's waves or limits do not add up.
    #[error("{}: rollout: {error}", path.display())]
    InvalidRollout { path: PathBuf, error: PlanError },
    /// Parsed, but a canary setting is out of range (the message names the `canary.*` key).
    #[error("{}: {error}", path.display())]
    InvalidCanary {
        path: PathBuf,
        error: CanaryConfigError,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

fn position(line_column: Option<(usize, usize)>) -> String {
    line_column.map_or_else(String::new, |(line, column)| {
        format!(" (line {line}, column {column})")
    })
}

/// Reads `SRC_DIR/release.toml`; a directory without one is a files-only release.
pub fn read(src_dir: &Path) -> Result<ReleaseFile, ReleaseFileError> {
    let path = src_dir.join(FILE_NAME);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(ReleaseFile::default()),
        Err(error) => Err(ReleaseFileError::Read { path, error }),
    }
}

/// Parses and validates the text of a `release.toml`; `path` is used in messages only.
pub fn parse(path: &Path, text: &str) -> Result<ReleaseFile, ReleaseFileError> {
    let file: ReleaseFile = serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|error| {
            let key = error.path().to_string();
            let inner = error.into_inner();
            ReleaseFileError::Parse {
                path: path.to_owned(),
                // serde_path_to_error writes "." for the root.
                key: if key == "." { String::new() } else { key },
                // toml's messages may span lines ("invalid table header\nexpected ...").
                message: inner.message().trim().replace('\n', "; "),
                line_column: inner.span().map(|span| line_column(text, span.start)),
            }
        })?;
    if let Some(run) = &file.run {
        run.validate().map_err(|error| ReleaseFileError::Invalid {
            path: path.to_owned(),
            error,
        })?;
    }
    if let Some(rollout) = &file.rollout {
        rollout
            .check()
            .map_err(|error| ReleaseFileError::InvalidRollout {
                path: path.to_owned(),
                error,
            })?;
    }
    if let Some(canary) = &file.canary {
        canary
            .validate()
            .map_err(|error| ReleaseFileError::InvalidCanary {
                path: path.to_owned(),
                error,
            })?;
    }
    Ok(file)
}

/// 1-based line and column (in characters) of a byte offset into `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::run::{FrontDoor, HealthCheck};

    fn parse_str(text: &str) -> Result<ReleaseFile, String> {
        parse(Path::new("SRC/release.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_run_section_reads_into_the_run_spec_with_defaults_filled_in() {
        let file = parse_str(
            r#"
[run]
command = "bin/sample-app"
args = ["--greeting", "hello"]
env = { RUST_LOG = "info" }
probation_secs = 5
[run.health]
http = "/healthz"
interval_ms = 200
[run.front_door]
listen = "0.0.0.0:8080"
"#,
        )
        .expect("valid");
        let run = file.run.expect("a run section");
        assert_eq!(run.command, "bin/sample-app");
        assert_eq!(run.args, ["--greeting", "hello"]);
        assert_eq!(run.env["RUST_LOG"], "info");
        assert_eq!((run.probation_secs, run.port_env.as_str()), (5, "PORT"));
        assert_eq!(run.health.interval_ms, 200);
        assert_eq!(
            run.health_check(),
            Ok(HealthCheck::Http { path: "/healthz" })
        );
        assert_eq!(
            run.front_door,
            Some(FrontDoor {
                listen: "0.0.0.0:8080".into()
            })
        );
    }

    #[test]
    fn an_empty_file_or_none_at_all_is_a_files_only_release() {
        assert_eq!(parse_str(""), Ok(ReleaseFile::default()));
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("no file"), ReleaseFile::default());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_dotted_path_and_line() {
        let error = parse_str(
            "[run]\ncommand = \"bin/x\"\nprobaton_secs = 5\n[run.front_door]\nlisten = \"0.0.0.0:1\"\n",
        )
        .expect_err("refused");
        assert!(
            error.starts_with("SRC/release.toml: run.probaton_secs: unknown field `probaton_secs`"),
            "{error}"
        );
        assert!(error.ends_with("(line 3, column 1)"), "{error}");
        let error = parse_str("run.command = \"bin/x\"\nrun.health = { htp = \"/h\" }\n")
            .expect_err("refused");
        assert!(
            error.contains("run.health.htp: unknown field `htp`"),
            "{error}"
        );
        let error = parse_str("[deploy]\nwaves = 3\n").expect_err("refused");
        assert!(
            error.contains(
                "deploy: unknown field `deploy`, expected one of `run`, `rollout`, `canary`"
            ),
            "{error}"
        );
    }

    #[test]
    fn wrong_types_and_broken_syntax_say_where() {
        let error =
            parse_str("[run]\ncommand = \"bin/x\"\nprobation_secs = \"ten\"\n").expect_err("type");
        assert_eq!(
            error,
            "SRC/release.toml: run.probation_secs: invalid type: string \"ten\", expected u32 (line 3, column 18)"
        );
        let error = parse_str("[run]\nargs = []\n").expect_err("missing");
        assert!(error.contains("run: missing field `command`"), "{error}");
        let error = parse_str("[run\n").expect_err("syntax");
        assert!(
            error.starts_with("SRC/release.toml: invalid table header; expected"),
            "{error}"
        );
        assert!(error.ends_with("(line 1, column 5)"), "{error}");
    }

    #[test]
    fn a_run_section_that_breaks_a_rule_is_refused_naming_file_and_field() {
        let error = parse_str(
            "[run]\ncommand = \"bin/x\"\n[run.health]\nhttp = \"/h\"\ntcp = true\n[run.front_door]\nlisten = \"0.0.0.0:8080\"\n",
        )
        .expect_err("refused");
        assert_eq!(
            error,
            "SRC/release.toml: run.health: choose at most one of http, tcp and command"
        );
        let error = parse_str("[run]\ncommand = \"../bin/sh\"\n").expect_err("refused");
        assert!(
            error.starts_with("SRC/release.toml: run.command"),
            "{error}"
        );
    }

    #[test]
    fn a_rollout_section_gives_plan_defaults_and_a_bad_one_names_the_key() {
        let file = parse_str(
            "[rollout]\nwaves = [1, \"10%\", \"100%\"]\nbake = \"2m\"\nmax_failure_pct = 5\n",
        )
        .expect("valid");
        let rollout = file.rollout.expect("a rollout section");
        assert_eq!(rollout.waves.map(|w| w.len()), Some(3));
        assert_eq!(rollout.bake.map(|b| b.0), Some(120));
        let error = parse_str("[rollout]\nwaves = [\"1\", \"5%\"]\n").expect_err("refused");
        assert!(
            error.starts_with("SRC/release.toml: rollout: the last wave is 5%, not 100%"),
            "{error}"
        );
        let error =
            parse_str("[rollout]\nwaves = [\"1\", \"x%\", \"100%\"]\n").expect_err("refused");
        assert!(error.contains("rollout.waves[1]: invalid wave"), "{error}");
        let error = parse_str("[rollout]\nbak = \"2m\"\n").expect_err("refused");
        assert!(
            error.contains("rollout.bak: unknown field `bak`"),
            "{error}"
        );
    }

    #[test]
    fn a_canary_section_is_merged_over_the_defaults_and_a_bad_one_names_the_key() {
        let file = parse_str(
            "[canary]\nwindow_secs = 300\n[canary.metrics.app_error_rate]\nallowed_increase = 1.5\n",
        )
        .expect("valid");
        let canary = file.canary.expect("a canary section");
        let defaults = CanaryConfig::default();
        assert_eq!(canary.window_secs, 300);
        assert_eq!(canary.warmup_secs, defaults.warmup_secs);
        let errors = &canary.metrics["app_error_rate"];
        assert_eq!(errors.allowed_increase, 1.5);
        assert!(errors.critical, "the default entry's other fields stay");
        assert_eq!(canary.metrics.len(), defaults.metrics.len());
        assert_eq!(parse_str("").expect("valid").canary, None);

        let error = parse_str("[canary.metrics.app_error_rate]\nallowed_increse = 1.5\n")
            .expect_err("refused");
        assert!(
            error.starts_with("SRC/release.toml: canary.metrics.app_error_rate.allowed_increse: unknown field `allowed_increse`"),
            "{error}"
        );
        assert!(error.ends_with("(line 2, column 1)"), "{error}");
        let error = parse_str("[canary]\nconfidence = 1.5\n").expect_err("refused");
        assert_eq!(
            error,
            "SRC/release.toml: canary.confidence is 1.5; expected at least 0.5 and below 1 (0.98 is usual)"
        );
    }

    #[test]
    fn an_unreadable_file_names_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join(FILE_NAME)).expect("a directory in its place");
        let error = read(dir.path()).expect_err("not a file").to_string();
        assert!(error.starts_with("cannot read "), "{error}");
        assert!(error.contains("release.toml"), "{error}");
    }
}
