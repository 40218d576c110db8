//! Where the binaries under test live, and making sure they are built.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `coordinator` and `agent` executables of one build profile, and the `sample-app`
/// that releases with a run section ship.
#[derive(Debug, Clone)]
pub struct Bins {
    pub coordinator: PathBuf,
    pub agent: PathBuf,
    pub sample_app: PathBuf,
}

impl Bins {
    /// The binaries of the profile this executable was built with (`target/debug` for
    /// `cargo test`, `target/release` for `cargo run --release`).
    ///
    /// `cargo test --workspace` builds a package's binaries only for that package's own
    /// integration tests, so when run by cargo this first runs `cargo build --bins -p agent
    /// -p coordinator -p sample-app` (once per process; a no-op when they are fresh). Run any
    /// other way, the binaries must already exist.
    pub fn of_this_build() -> &'static Bins {
        static BINS: OnceLock<Bins> = OnceLock::new();
        BINS.get_or_init(|| {
            let dir = profile_dir();
            let release = dir.file_name().is_some_and(|n| n == "release");
            if let Ok(cargo) = std::env::var("CARGO") {
                build_with_cargo(&cargo, release);
            }
            Bins::in_dir(&dir)
        })
    }

    /// The binaries in `dir`; panics with what to run if one is missing.
    pub fn in_dir(dir: &Path) -> Bins {
        let bins = Bins {
            coordinator: dir.join("coordinator"),
            agent: dir.join("agent"),
            sample_app: dir.join("sample-app"),
        };
        for bin in [&bins.coordinator, &bins.agent, &bins.sample_app] {
            assert!(
                bin.is_file(),
                "{} is missing: run via `cargo test --workspace` (or `cargo build --bins`, \
                 with --release for the bench)",
                bin.display()
            );
        }
        bins
    }
}

/// `target/<profile>`: the directory of this executable, without a trailing `deps`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running executable");
    let mut dir = exe
        .parent()
        .expect("an executable lives in a directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

fn build_with_cargo(cargo: &str, release: bool) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args([
            "--bins",
            "-p",
            "agent",
            "-p",
            "coordinator",
            "-p",
            "sample-app",
        ]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cargo} build: {e}"));
    assert!(
        out.status.success(),
        "`cargo build --bins -p agent -p coordinator -p sample-app` failed ({}):\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 60)
    );
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
