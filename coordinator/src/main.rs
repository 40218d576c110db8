//! `coordinator`: parses the command line, sets up logging to stderr, runs, reports errors.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_malloc();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    start_malloc_trim();
    let cli = coordinator::cli::Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(coordinator::run(cli));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's default for the size from which `malloc` maps a block of its own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// The most heaps (arenas) glibc keeps; its default is 8 per core.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: libc::c_int = 2;

/// Two glibc settings that keep the coordinator's resident memory near what it uses.
///
/// - The mmap threshold stays where it starts, so large blocks (chunk and message bodies,
///   the database's log buffers) are mapped on their own and returned whole. Left alone,
///   glibc raises it to the size of every mapped block freed (up to 32 MiB); from then on
///   those blocks come from its heaps, which stay fragmented and resident. At a 1,000-node
///   rollout that was 251–267 MiB of resident memory against 182 MiB pinned.
/// - At most [`ARENA_MAX`] heaps. Connections are served by whichever runtime or blocking
///   thread is free, so their buffers come from many heaps; which heap held what was not
///   traced, only the total was measured. Same bench, embedded broker: 220–240 MiB with
///   glibc's default, 209 MiB with two in one run (`MALLOC_ARENA_MAX=2`), before the
///   database's smaller page cache.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    // SAFETY: `mallopt` only sets allocator parameters; it is called first thing in
    // `main`, before any other thread exists. A refusal (it returns 0) leaves glibc's
    // behaviour as it was, which is correct, only heavier.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// How often freed heap memory is handed back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Hands glibc's free heap pages back to the kernel every [`TRIM_EVERY`].
///
/// glibc gives back by itself only the free top of a heap; memory freed below blocks
/// still alive stays resident. `malloc_trim` releases every whole free page in every
/// arena. Seen at a 1,000-node rollout (README, "Fleet scale"): 250–258 MiB without,
/// 220–240 MiB with, on the embedded broker; the cause of the rest was not traced.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn start_malloc_trim() {
    let started = std::thread::Builder::new()
        .name("malloc-trim".to_owned())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_EVERY);
                // SAFETY: `malloc_trim` takes each arena's lock itself and only releases
                // pages that hold no allocation; it is safe to call from any thread.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    if let Err(error) = started {
        // Only heavier without it, never wrong.
        eprintln!("warning: cannot start the malloc-trim thread: {error}");
    }
}
