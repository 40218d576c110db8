//! Test harness: starts the real `sample-app` binary on a free port and talks HTTP to it.

#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

/// How long any single wait in these tests may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Environment variables the app reads; cleared so the test runner's environment cannot
/// change what a test sees.
const APP_ENV: [&str; 11] = [
    "PORT",
    "APP_ROOT",
    "APP_CONFIG",
    "APP_VERSION",
    "APP_ERROR_RATE",
    "APP_ADDED_LATENCY_MS",
    "APP_LATENCY_JITTER_MS",
    "APP_CRASH_AT_START",
    "APP_CRASH_AFTER_SECS",
    "APP_FAIL_HEALTH",
    "APP_SEED",
];

/// A command line for the app serving `root`, listening on a free port unless told else.
pub fn command(root: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sample-app"));
    for var in APP_ENV {
        command.env_remove(var);
    }
    command
        .env("RUST_LOG", "info")
        .arg("--root")
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running app.
pub struct App {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
    pub http: reqwest::Client,
}

impl App {
    /// Starts the app serving `root` with `env` on `127.0.0.1:0`.
    pub async fn start(root: &Path, env: &[(&str, &str)]) -> App {
        let mut command = command(root);
        command.args(["--listen", "127.0.0.1:0"]);
        command.envs(env.iter().copied());
        App::spawn(command).await
    }

    /// Spawns `command` and waits for its `listening on ADDR` line.
    pub async fn spawn(mut command: Command) -> App {
        let mut child = command.spawn().expect("spawn sample-app");
        let stderr = collect_stderr(&mut child);
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("the app prints its address in time")
            .expect("read stdout");
        let Some(first) = first else {
            let status = child.wait().await;
            panic!(
                "the app exited ({status:?}) before printing its address; stderr:\n{}",
                stderr.lock().expect("stderr buffer lock")
            );
        };
        let addr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .expect("a socket address");
        App {
            child,
            addr,
            stderr,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn status(&self, path: &str) -> u16 {
        self.get(path).await.status().as_u16()
    }

    pub async fn text(&self, path: &str) -> (u16, String) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    pub async fn metrics(&self) -> String {
        let (status, text) = self.text("/metrics").await;
        assert_eq!(status, 200);
        text
    }

    /// Sends a raw request line, bypassing any client-side path normalisation; returns the
    /// status code.
    pub async fn raw_status(&self, target: &str) -> u16 {
        let mut stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let request = format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
            .await
            .expect("response in time")
            .expect("read");
        let response = String::from_utf8_lossy(&response);
        response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"))
    }

    /// What the app has written to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().expect("stderr buffer lock").clone()
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        wait_exit(&mut self.child).await
    }

    pub fn send_sigterm(&self) {
        send_sigterm(&self.child);
    }

    /// Polls until stderr contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !self.log().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} in stderr:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub async fn wait_exit(child: &mut Child) -> ExitStatus {
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the app exits in time")
        .expect("wait")
}

pub fn send_sigterm(child: &Child) {
    let pid = child.id().expect("the app is running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Reads the child's stderr into a shared string in the background.
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let collected = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let sink = collected.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf).await {
            sink.lock()
                .expect("stderr buffer lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    collected
}

/// The value of the sample named exactly `series` (name plus labels) in an exposition.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .expect("a number")
}

/// Deterministic, incompressible-looking bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
