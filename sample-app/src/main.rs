//! `sample-app`: parses the command line, loads the knobs, binds, prints the bound address
//! on stdout, serves until SIGTERM/SIGINT, and carries out the crash knobs.
//!
//! Exit status: 0 after a graceful shutdown, 1 when a crash knob fires, 2 when it cannot
//! start (bad flags, config or root; address in use).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use sample_app::config;
use sample_app::server::{self, AppState};
use tokio::net::TcpListener;

/// Port used when neither `--listen`, `--port` nor `PORT` says otherwise.
const DEFAULT_PORT: u16 = 8080;

/// A small HTTP app for the fleet deploy system's demos and tests.
///
/// Misbehaviour knobs come from the config file and from the environment (which wins):
/// APP_ERROR_RATE, APP_ADDED_LATENCY_MS, APP_LATENCY_JITTER_MS, APP_CRASH_AT_START,
/// APP_CRASH_AFTER_SECS, APP_FAIL_HEALTH, APP_SEED.
#[derive(Debug, Parser)]
#[command(name = "sample-app", version)]
struct Cli {
    /// Address to listen on; wins over --port and PORT.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Port to listen on at 127.0.0.1 (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Directory whose files are served at /files/. Default: the directory holding this
    /// binary, or its parent if that directory is named `bin` (the release slot).
    #[arg(long, env = "APP_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,
    /// Knobs file, TOML (or JSON if it ends in .json). Default: ROOT/app.toml if present.
    #[arg(long, env = "APP_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Version string reported by /version, / and the app_info metric.
    #[arg(long, env = "APP_VERSION", default_value = "dev")]
    version_label: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in the agent's captured logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sample-app: error: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(cli));
    // After a crash knob fires, streams may still be open; they are cut, as a crash would.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sample-app: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = match cli.root {
        Some(root) => root,
        None => {
            let exe = std::env::current_exe().context(
                "cannot find this binary's path to derive the default root; pass --root DIR",
            )?;
            sample_app::default_root_for(&exe).with_context(|| {
                format!("{} has no parent directory; pass --root DIR", exe.display())
            })?
        }
    };
    let root = std::fs::canonicalize(&root)
        .with_context(|| format!("cannot use {} as the served root (--root)", root.display()))?;
    anyhow::ensure!(
        root.is_dir(),
        "the served root {} is not a directory (--root)",
        root.display()
    );
    let (knobs, config_file) = config::load(cli.config.as_deref(), &root, |name| {
        std::env::var(name).ok()
    })
    .context("cannot load the misbehaviour knobs")?;

    let listen = cli
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], cli.port)));
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen}; pick another with --listen or PORT")
    })?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    // The first stdout line is machine-readable: whoever started the app (the agent, a
    // test) learns the bound port from it. A closed stdout must not stop the app.
    let _ = writeln!(std::io::stdout().lock(), "listening on {bound}");
    let config_file = config_file.map_or_else(|| "none".to_owned(), |p| p.display().to_string());
    tracing::info!(
        listen = %bound,
        version = %cli.version_label,
        root = %root.display(),
        config = %config_file,
        knobs = %knobs,
        "sample-app started"
    );

    if knobs.crash_at_start {
        tracing::error!("crashing at start because the crash_at_start knob is set; exit status 1");
        return Ok(ExitCode::from(1));
    }
    let crash_after = knobs.crash_after_secs;
    let state = Arc::new(AppState::new(root, cli.version_label, knobs));
    tokio::select! {
        result = server::serve(listener, state, shutdown_signal()) => {
            result.context("serving HTTP failed")?;
            tracing::info!("in-flight requests finished; exiting");
            Ok(ExitCode::SUCCESS)
        }
        () = crash_timer(crash_after) => {
            tracing::error!(
                after_secs = crash_after,
                "crashing because the crash_after_secs knob is set; exit status 1"
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// Completes `secs` seconds from now, or never.
async fn crash_timer(secs: Option<u64>) {
    match secs {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => std::future::pending().await,
    }
}

/// Completes on SIGTERM (how the agent stops a version) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing in-flight requests"),
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the app");
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("SIGINT: finishing in-flight requests");
        }
    }
}
