//! Test helpers shared by the `app` modules' tests: the real `sample-app` binary, run specs
//! and polling with a deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use protocol::run::RunSpec;

use super::process::{Launch, RestartPolicy, Supervisor};

/// Held by the tests that load the machine (many clients, big downloads), so that they do
/// not run at the same time as each other and the throughput measurement is not skewed by
/// its siblings in this test process.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long any single wait in these tests may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The `sample-app` binary of this build profile. When it is missing or older than the
/// sample app's sources and the tests run under cargo, it is built first: cargo builds only
/// this package's binaries for its tests. (Not built when fresh, because a nested `cargo
/// build` waits for the build directory's lock, which other builds may hold for minutes.)
pub fn sample_app() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut dir = exe.parent().expect("a directory").to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let bin = dir.join("sample-app");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("agent/ lives in the workspace");
        let stale = match std::fs::metadata(&bin).and_then(|m| m.modified()) {
            Ok(built) => newest_change(&workspace.join("sample-app")).is_some_and(|t| t > built),
            Err(_) => true,
        };
        if let (true, Ok(cargo)) = (stale, std::env::var("CARGO")) {
            let mut build = std::process::Command::new(cargo);
            build
                .arg("build")
                .arg("--manifest-path")
                .arg(workspace.join("Cargo.toml"))
                .args(["--bin", "sample-app", "-p", "sample-app"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let out = build.output().expect("run cargo build for sample-app");
            assert!(
                out.status.success(),
                "cargo build -p sample-app failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build -p sample-app`",
            bin.display()
        );
        bin
    })
}

/// The latest modification time of any file under `dir` (its sources and manifest).
fn newest_change(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_change(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(time);
    }
    newest
}

/// A run spec for `command` with `args`, a front door and the given JSON overrides.
pub fn spec(command: &str, args: &[&str], patch: serde_json::Value) -> RunSpec {
    let mut value = serde_json::json!({
        "command": command,
        "args": args,
        "front_door": { "listen": "127.0.0.1:0" },
    });
    if let Some(patch) = patch.as_object() {
        for (key, field) in patch {
            value[key] = field.clone();
        }
    }
    let spec: RunSpec = serde_json::from_value(value).expect("a run spec");
    spec.validate().expect("a valid run spec");
    spec
}

/// A spec running the sample app serving its slot, healthy at `/healthz`, with `env`.
pub fn sample_spec(env: &[(&str, &str)]) -> RunSpec {
    let env: serde_json::Map<String, serde_json::Value> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    spec(
        sample_app().to_str().expect("a UTF-8 path"),
        &["--root", "."],
        serde_json::json!({
            "env": env,
            "health": { "http": "/healthz", "interval_ms": 50, "timeout_ms": 1000 },
        }),
    )
}

/// A restart policy fast enough for tests.
pub fn fast_policy() -> RestartPolicy {
    RestartPolicy {
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        reset_after: Duration::from_secs(60),
        crash_loop_exits: 3,
        crash_loop_window: Duration::from_secs(60),
    }
}

/// A slot directory and a run directory that live as long as the value.
pub struct Dirs {
    pub root: tempfile::TempDir,
}

impl Dirs {
    pub fn new() -> Dirs {
        let root = tempfile::tempdir().expect("a temp dir");
        std::fs::create_dir(root.path().join("slot")).expect("slot dir");
        Dirs { root }
    }
    pub fn slot(&self) -> PathBuf {
        self.root.path().join("slot")
    }
    pub fn run(&self) -> PathBuf {
        self.root.path().join("run")
    }
    pub fn launch(&self, version: &str, port: u16) -> Launch {
        Launch {
            slot: format!("app-{version}"),
            version: version.to_owned(),
            dir: self.slot(),
            port,
            run_dir: self.run(),
        }
    }
}

/// Starts the sample app as `version` on a free port, healthy, and waits until it is.
pub async fn healthy_sample(dirs: &Dirs, version: &str) -> Supervisor {
    let spec = sample_spec(&[("APP_VERSION", version)]);
    let port = super::ports::pick_free(&[]).expect("a free port");
    let app = Supervisor::start(&spec, dirs.launch(version, port), fast_policy())
        .expect("the sample app starts");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    super::health::wait_healthy(Some(&app), &spec, port, app.dir(), deadline)
        .await
        .expect("the sample app becomes healthy");
    app
}

/// Polls `probe` every 10 ms until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|text| {
            let rest = &text[text.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}
