//! `bench-delta`: the delta-delivery figures of issue 3, each a ratio against a baseline
//! measured in the same run on the same data.
//!
//! ```text
//! cargo build --release --bins && cargo run --release -p system-tests --bin bench-delta
//! ```
//!
//! Data: a seeded ~200 MB streaming release (`system_tests::bench_data`, `Shape::RELEASE`)
//! and its v2 (200 KB of the binary rewritten, a config file edited, one segment added).
//!
//! 1. **Delta size**: a real coordinator (embedded broker) and one agent install v1, then v2.
//!    Bytes moved for v2 = the chunk bytes the agent reports fetching (HTTP + MQTT) plus the
//!    deploy command for v2 as it crossed the broker (it carries the signed manifest).
//!    Baseline: `zstd --patch-from=v1.tar -3 --long` of v2's tar. Run once over HTTP (the
//!    default) and once MQTT-only (`--no-http`), each in a fresh fleet.
//! 2. **Staging throughput**: `images::assemble` of the whole v1 from a local, warm chunk
//!    store into a fresh slot (complete and verified, ready to switch; its writeback to disk
//!    is the durability barrier's, which the agent runs in the background and the switch
//!    waits for), against `zstd -d -c v1.tar.zst | b3sum`; median of 3 runs each, after one
//!    untimed run each. For context, to tell CPU from file-system cost: assembly followed at
//!    once by `images::make_durable` (what a switch right after staging waits for), our
//!    chunk reads without writing, and `zstd -d | tar -x` followed by an fsync of every file.
//! 3. **Memory**: the agent's peak resident set (`VmHWM`) after staging v1 from nothing in the
//!    delta runs, with its idle `VmRSS` before the rollout for context.
//!
//! Prints markdown tables on stdout, progress on stderr. Needs `tar`, `zstd` and `b3sum`.
//! `-- --staging-only` runs figure 2 alone (no fleet), for working on assembly speed.

use std::fs::{self, File};
use std::io::{BufReader, Read as _};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use images::{assemble, build_image, make_durable, ChunkSource as _, ChunkStore};
use protocol::messages::{Command as NodeCommand, UpdateReport};
use protocol::{AppName, Entry, Envelope, NodeTopic, ReleaseKind, Version};
use system_tests::bench_data::{
    make_v2, mb, median, proc_status_kib, require_tool, write_v1, Shape, V2Changes, BINARY,
};
use system_tests::process::run;
use system_tests::{AgentOptions, Bins, Broker, Fleet};

const SHAPE: Shape = Shape::RELEASE;
const SEED: u64 = 2024;
const APP: &str = "stream";
/// Timed runs per throughput figure (after one untimed warm-up run).
const RUNS: usize = 3;
/// Generous: a rollout of 200 MB over MQTT on a loaded 2-core machine.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(600);
/// A baseline tool run (tar or zstd over ~200 MB).
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);
/// Time the agent is left alone before its idle memory is read.
const SETTLE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-delta: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    require_tool("tar", "tar")?;
    require_tool("zstd", "zstd")?;
    require_tool("b3sum", "b3sum")?;
    let bins = Bins::of_this_build().clone();
    if !bins.agent.parent().is_some_and(|d| d.ends_with("release")) {
        eprintln!(
            "warning: not a release build; run with `cargo run --release …` for real figures"
        );
    }
    let work = tempfile::Builder::new().prefix("bench-delta-").tempdir()?;
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let started = Instant::now();
    let v1_bytes = write_v1(&v1, SEED, &SHAPE)?;
    let changes = make_v2(&v1, &v2, &SHAPE, SEED)?;
    eprintln!(
        "data: v1 {} written, v2 made ({changes}) in {:.1?}",
        mb(v1_bytes),
        started.elapsed()
    );

    let patch = zstd_patch(work.path(), &v1, &v2)?;
    eprintln!(
        "baseline: zstd --patch-from = {} in {:.1?}",
        mb(patch.bytes),
        patch.took
    );
    if std::env::args().any(|arg| arg == "--staging-only") {
        let staging = staging_throughput(work.path(), &v1)?;
        print_staging(&staging);
        return Ok(());
    }
    let runs = TRANSPORTS
        .into_iter()
        .map(|(transport, no_http)| delta_run(&bins, &v1, &v2, transport, no_http))
        .collect::<Result<Vec<_>>>()?;
    let staging = staging_throughput(work.path(), &v1)?;

    print_tables(v1_bytes, &changes, &patch, &runs, &staging);
    Ok(())
}

/// The baseline delta: v2's tar compressed against v1's tar.
struct Patch {
    bytes: u64,
    took: Duration,
    window_log: u32,
}

fn zstd_patch(work: &Path, v1: &Path, v2: &Path) -> Result<Patch> {
    let (v1_tar, v2_tar) = (work.join("v1.tar"), work.join("v2.tar"));
    for (dir, tar) in [(v1, &v1_tar), (v2, &v2_tar)] {
        tool(
            Command::new("tar")
                .args([
                    "--sort=name",
                    "--owner=0",
                    "--group=0",
                    "--numeric-owner",
                    "--mtime=@0",
                    "-cf",
                ])
                .arg(tar)
                .arg("-C")
                .arg(dir)
                .arg("."),
        )?;
    }
    // The window must cover the reference (v1.tar), and zstd must be allowed that much
    // memory for it (by default it refuses a dictionary over 128 MiB).
    let largest = fs::metadata(&v1_tar)?
        .len()
        .max(fs::metadata(&v2_tar)?.len());
    let window_log = (64 - largest.leading_zeros()).clamp(27, 31);
    let memory = format!("--memory={}MB", 1u64 << (window_log - 20));
    let long = format!("--long={window_log}");
    let patch = work.join("v2.patch.zst");
    // `zstd -q -f MODE --long=N --memory=M --patch-from=v1.tar INPUT -o OUTPUT`.
    let patch_from = |mode: &str, input: &Path, output: &Path| {
        tool(
            Command::new("zstd")
                .args(["-q", "-f", mode, &long, &memory])
                .arg(format!("--patch-from={}", v1_tar.display()))
                .arg(input)
                .arg("-o")
                .arg(output),
        )
    };
    let started = Instant::now();
    patch_from("-3", &v2_tar, &patch)?;
    let took = started.elapsed();
    // The baseline must be a real patch: applying it to v1.tar gives v2.tar.
    let check = work.join("v2.check.tar");
    patch_from("-d", &patch, &check)?;
    ensure!(
        same_bytes(&check, &v2_tar)?,
        "zstd --patch-from did not reproduce v2.tar from v1.tar: the baseline is wrong"
    );
    let bytes = fs::metadata(&patch)?.len();
    for file in [&v1_tar, &v2_tar, &check, &patch] {
        fs::remove_file(file)?;
    }
    Ok(Patch {
        bytes,
        took,
        window_log,
    })
}

/// One agent's v1 and v2 installs, over one transport.
struct DeltaRun {
    transport: &'static str,
    idle_rss_kib: u64,
    v1_peak_kib: u64,
    v1: UpdateReport,
    v2: UpdateReport,
    /// The v2 deploy command as the broker delivered it, in bytes.
    command_bytes: u64,
}

/// The transports compared: a label and whether the agent runs with `--no-http`.
const TRANSPORTS: [(&str, bool); 2] =
    [("HTTP (default)", false), ("MQTT only (`--no-http`)", true)];

/// A fresh fleet with one agent that installs v1, then v2. One fleet per transport: agents
/// of one fleet would share the release's chunk topic and use each other's MQTT frames.
fn delta_run(
    bins: &Bins,
    v1: &Path,
    v2: &Path,
    transport: &'static str,
    no_http: bool,
) -> Result<DeltaRun> {
    let fleet = Fleet::start_with(Broker::Embedded, bins.clone())?;
    let options = AgentOptions {
        no_http,
        ..AgentOptions::default()
    };
    let [node] = fleet.agents_with(["n1"], &options)?;
    let pid = node.pid().context("the agent is not running")?;
    std::thread::sleep(SETTLE);
    let idle_rss_kib = proc_status_kib(pid, "VmRSS")?;

    let started = Instant::now();
    fleet.publish(v1, APP, "1")?;
    eprintln!("{transport}: v1 published in {:.1?}", started.elapsed());
    let started = Instant::now();
    fleet.rollout(APP, "1")?;
    fleet.wait_all_on(APP, "1", ROLLOUT_TIMEOUT)?;
    let v1_switched = started.elapsed();
    // VmHWM is the peak since the agent started, which includes all of v1's staging.
    let v1_peak_kib = proc_status_kib(pid, "VmHWM")?;
    let after_v1 = node.status()?;
    let v1_report = after_v1
        .last_update
        .context("the agent reports no last update after installing v1")?;
    eprintln!(
        "{transport}: v1 switched {v1_switched:.1?} after rollout start (staged in {} ms), peak RSS {v1_peak_kib} KiB",
        v1_report.staging_ms
    );

    // Subscribed before the v2 rollout, so its command cannot be missed; v1's command,
    // retained, arrives first and is told apart by its seq.
    let mut client = fleet.mqtt_client()?;
    let topic = fleet.topics().node(node.node(), NodeTopic::Command);
    client.subscribe(&topic)?;
    let trust = fleet.trusted_keys()?;
    let started = Instant::now();
    fleet.publish(v2, APP, "2")?;
    eprintln!("{transport}: v2 published in {:.1?}", started.elapsed());
    fleet.rollout(APP, "2")?;
    let command = client
        .next_message(Duration::from_secs(60), |m| {
            m.topic == topic
                && Envelope::open_bytes::<NodeCommand>(&m.payload, &trust)
                    .is_ok_and(|c| c.seq > after_v1.last_seq)
        })?
        .with_context(|| format!("no v2 deploy command on {topic} within 60 s"))?;
    fleet.wait_all_on(APP, "2", ROLLOUT_TIMEOUT)?;
    let v2_report = node
        .status()?
        .last_update
        .context("the agent reports no last update after installing v2")?;
    ensure!(
        v2_report.release.version.as_str() == "2",
        "the agent's last update is {}, not v2",
        v2_report.release
    );
    eprintln!(
        "{transport}: v2 fetched {} http + {} mqtt, command {} bytes",
        v2_report.bytes_fetched_http,
        v2_report.bytes_fetched_mqtt,
        command.payload.len()
    );
    Ok(DeltaRun {
        transport,
        idle_rss_kib,
        v1_peak_kib,
        v1: v1_report,
        v2: v2_report,
        command_bytes: command.payload.len() as u64,
    })
}

/// Throughput of staging the whole of v1 from local data, ours and the baseline's.
struct Staging {
    bytes: u64,
    ours: Vec<Duration>,
    /// Ours, then the durability barrier at once: a slot on disk.
    durable: Vec<Duration>,
    /// Ours without writing: every chunk read, decompressed and verified.
    decode: Vec<Duration>,
    baseline: Vec<Duration>,
    /// The standard tools writing the tree durably.
    extract: Vec<Duration>,
    store_bytes: u64,
    tar_zst_bytes: u64,
    /// How much the image format compresses the binary: its size over its chunks' zsize.
    binary_ratio: f64,
}

fn staging_throughput(work: &Path, v1: &Path) -> Result<Staging> {
    let store = ChunkStore::open(work.join("store"))?;
    let manifest = build_image(
        v1,
        AppName::new(APP)?,
        Version::new("1")?,
        ReleaseKind::App,
        &store,
    )
    .with_context(|| format!("building the image of {}", v1.display()))?;
    let bytes = manifest.total_size();
    let binary_ratio = manifest
        .entries
        .iter()
        .find_map(|entry| match entry {
            Entry::File {
                path, size, chunks, ..
            } if path.as_str() == BINARY => {
                Some(*size as f64 / chunks.iter().map(|c| f64::from(c.zsize)).sum::<f64>())
            }
            _ => None,
        })
        .with_context(|| format!("the image of v1 has no {BINARY}"))?;
    // Warm the page cache with every stored chunk (and each figure has a warm-up run).
    let mut store_bytes = 0;
    for digest in store.digests()? {
        let path = store.path(&digest);
        store_bytes += fs::read(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len() as u64;
    }
    let slots = work.join("slots");
    fs::create_dir_all(&slots)?;
    // The fleet runs before leave hundreds of MB dirty; their writeback would otherwise
    // compete with whichever figure comes first.
    rustix::fs::sync();

    let ours = timed_runs("ours: assemble", |run| {
        let slot = slots.join(format!("assemble-{run}"));
        let started = Instant::now();
        assemble(&manifest, &slot, &[&store])
            .with_context(|| format!("assembling v1 into {}", slot.display()))?;
        let took = started.elapsed();
        fs::remove_dir_all(&slot)?;
        Ok(took)
    })?;
    let durable = timed_runs("ours: assemble, then make_durable", |run| {
        let slot = slots.join(format!("durable-{run}"));
        let started = Instant::now();
        assemble(&manifest, &slot, &[&store])
            .with_context(|| format!("assembling v1 into {}", slot.display()))?;
        make_durable(&manifest, &slot)
            .with_context(|| format!("making {} durable", slot.display()))?;
        let took = started.elapsed();
        fs::remove_dir_all(&slot)?;
        Ok(took)
    })?;
    // The same chunk reads (decompress, verify) with nothing written: CPU versus file system.
    let decode = timed_runs("ours without writing", |_| {
        let started = Instant::now();
        let mut decoded = 0u64;
        for chunk in manifest.chunks() {
            let bytes = store
                .read_chunk(chunk)?
                .with_context(|| format!("chunk {} is not in the store", chunk.digest))?;
            decoded += bytes.len() as u64;
        }
        let took = started.elapsed();
        ensure!(
            decoded == bytes,
            "decoded {decoded} bytes of a {bytes}-byte image"
        );
        Ok(took)
    })?;

    let tar_zst = work.join("v1.tar.zst");
    let mut tar = Command::new("tar");
    tar.arg("-cf").arg("-").arg("-C").arg(v1).arg(".");
    let mut zstd = Command::new("zstd");
    zstd.args(["-3", "-q", "-f", "-o"]).arg(&tar_zst);
    pipeline(tar, zstd)?;
    let tar_zst_bytes = fs::metadata(&tar_zst)?.len();
    let baseline = timed_runs("baseline: zstd -d | b3sum", |_| {
        let mut zstd = Command::new("zstd");
        zstd.args(["-d", "-q", "-c"]).arg(&tar_zst);
        let mut b3sum = Command::new("b3sum");
        b3sum.stdout(Stdio::null());
        let started = Instant::now();
        pipeline(zstd, b3sum)?;
        Ok(started.elapsed())
    })?;
    // What writing the tree durably costs the standard tools: extract, then fsync every
    // file and directory, as assemble does.
    let extract = timed_runs("baseline writing: zstd -d | tar -x, fsync", |run| {
        let dir = slots.join(format!("extract-{run}"));
        fs::create_dir(&dir)?;
        let mut zstd = Command::new("zstd");
        zstd.args(["-d", "-q", "-c"]).arg(&tar_zst);
        let mut tar = Command::new("tar");
        tar.arg("-xf").arg("-").arg("-C").arg(&dir);
        let started = Instant::now();
        pipeline(zstd, tar)?;
        fsync_tree(&dir)?;
        let took = started.elapsed();
        fs::remove_dir_all(&dir)?;
        Ok(took)
    })?;
    Ok(Staging {
        bytes,
        ours,
        durable,
        decode,
        baseline,
        extract,
        store_bytes,
        tar_zst_bytes,
        binary_ratio,
    })
}

/// One untimed warm-up run, then [`RUNS`] runs of `measure` (which times what matters to it).
fn timed_runs(
    what: &str,
    mut measure: impl FnMut(usize) -> Result<Duration>,
) -> Result<Vec<Duration>> {
    measure(0).with_context(|| format!("warm-up run of {what}"))?;
    let runs = (1..=RUNS)
        .map(|run| measure(run).with_context(|| format!("run {run} of {what}")))
        .collect::<Result<Vec<_>>>()?;
    eprintln!("staging, {what}: {}", list(&runs));
    Ok(runs)
}

/// fsyncs every file and directory under `dir`, and `dir` itself.
fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fsync_tree(&entry.path())?;
        } else if kind.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn print_tables(
    v1_bytes: u64,
    changes: &V2Changes,
    patch: &Patch,
    runs: &[DeltaRun],
    staging: &Staging,
) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("### Delta delivery (issue 3)\n");
    println!(
        "`cargo build --release --bins && cargo run --release -p system-tests --bin bench-delta`: \
         one coordinator (embedded broker) and one agent on one {cores}-core machine, once per \
         transport. \
         v1 is a seeded {} streaming release ({} × {} incompressible media segments, {} of JSON \
         and playlists, a {} binary that compresses {:.1}× in image chunks, config files); v2: {changes}. \
         MB = 10⁶ bytes.\n",
        mb(v1_bytes),
        SHAPE.segments,
        mb(SHAPE.segment_bytes as u64),
        mb(SHAPE.meta_bytes as u64),
        mb(SHAPE.binary_bytes as u64),
        staging.binary_ratio,
    );
    println!(
        "| v1 → v2, transport | chunks fetched | chunk bytes | deploy command (signed manifest) | total moved | `zstd --patch-from` baseline | ratio (target ≤ 1.25) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for run in runs {
        let chunks = run.v2.bytes_fetched_http + run.v2.bytes_fetched_mqtt;
        let total = chunks + run.command_bytes;
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} |",
            run.transport,
            run.v2.chunks_fetched,
            mb(chunks),
            mb(run.command_bytes),
            mb(total),
            mb(patch.bytes),
            total as f64 / patch.bytes as f64
        );
    }
    println!(
        "\nBaseline: `tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0` of each tree, \
         then `zstd -3 --long={} --patch-from=v1.tar v2.tar` (checked by applying it). Chunk bytes \
         are the agent's `last_update.bytes_fetched_http + bytes_fetched_mqtt`; the command is \
         the retained deploy message as a subscriber received it.\n",
        patch.window_log
    );
    for run in runs {
        println!(
            "- {}: v2 fetched {} over HTTP and {} over MQTT, reused {} from v1's slot; staged in {} ms.",
            run.transport,
            mb(run.v2.bytes_fetched_http),
            mb(run.v2.bytes_fetched_mqtt),
            mb(run.v2.bytes_reused),
            run.v2.staging_ms,
        );
    }

    print_staging(staging);

    println!("\n| agent memory | idle RSS before the rollout | peak RSS (VmHWM) staging v1 ({}) from nothing (target ≤ 32 MB) | v1 staging time |", mb(v1_bytes));
    println!("|---|---|---|---|");
    for run in runs {
        println!(
            "| {} | {} | {} | {:.1} s |",
            run.transport,
            mb(run.idle_rss_kib * 1024),
            mb(run.v1_peak_kib * 1024),
            run.v1.staging_ms as f64 / 1000.0
        );
    }
}

fn print_staging(staging: &Staging) {
    let ours = median(&staging.ours);
    let baseline = median(&staging.baseline);
    let rate = |d: Duration| staging.bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "\n| staging all of v1 ({}) from local data, median of {RUNS} warm runs | time | MB/s |",
        mb(staging.bytes)
    );
    println!("|---|---|---|");
    println!(
        "| ours: `images::assemble` from a chunk store ({}) into a fresh slot, verified, ready to switch | {:.2} s | {:.0} |",
        mb(staging.store_bytes),
        ours.as_secs_f64(),
        rate(ours)
    );
    let durable = median(&staging.durable);
    println!(
        "| ours, then at once `images::make_durable` (the slot on disk: what a switch right after staging waits for) | {:.2} s | {:.0} |",
        durable.as_secs_f64(),
        rate(durable)
    );
    let decode = median(&staging.decode);
    println!(
        "| ours without writing: every chunk read, decompressed and verified (`ChunkSource::read_chunk`) | {:.2} s | {:.0} |",
        decode.as_secs_f64(),
        rate(decode)
    );
    println!(
        "| baseline: `zstd -d -c v1.tar.zst \\| b3sum` ({} at -3) | {:.2} s | {:.0} |",
        mb(staging.tar_zst_bytes),
        baseline.as_secs_f64(),
        rate(baseline)
    );
    println!(
        "| **ratio ours / baseline** (target ≥ 0.8) | | **{:.2}** |",
        rate(ours) / rate(baseline)
    );
    let extract = median(&staging.extract);
    println!(
        "| for context: `zstd -d -c v1.tar.zst \\| tar -x`, then fsync of every file and directory | {:.2} s | {:.0} |",
        extract.as_secs_f64(),
        rate(extract)
    );
    println!(
        "\nRuns: ours {}; then durable {}; without writing {}; baseline {}; tar -x and fsync {} (MB/s of the tree's file bytes for all).",
        list(&staging.ours),
        list(&staging.durable),
        list(&staging.decode),
        list(&staging.baseline),
        list(&staging.extract)
    );
}

fn list(samples: &[Duration]) -> String {
    samples
        .iter()
        .map(|d| format!("{:.2} s", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs a baseline tool to completion; fails with its stderr if it exits non-zero.
fn tool(cmd: &mut Command) -> Result<()> {
    let out = run(cmd, TOOL_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

/// Runs `first | second` and fails unless both exit successfully.
fn pipeline(mut first: Command, mut second: Command) -> Result<()> {
    let mut a = first
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {first:?}"))?;
    let stdout = a.stdout.take().context("no stdout pipe")?;
    let b = second
        .stdin(stdout)
        .spawn()
        .with_context(|| format!("starting {second:?}"));
    let b = match b {
        Ok(b) => b,
        Err(e) => {
            let _ = a.kill();
            let _ = a.wait();
            return Err(e);
        }
    };
    let finish = |mut child: Child, cmd: &Command| -> Result<()> {
        let status = child.wait()?;
        ensure!(status.success(), "{cmd:?} failed ({status})");
        Ok(())
    };
    let second_result = finish(b, &second);
    finish(a, &first)?;
    second_result
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let open = |p: &Path| -> Result<(u64, BufReader<File>)> {
        let file = File::open(p).with_context(|| format!("opening {}", p.display()))?;
        Ok((
            file.metadata()?.len(),
            BufReader::with_capacity(1 << 20, file),
        ))
    };
    let ((len_a, mut ra), (len_b, mut rb)) = (open(a)?, open(b)?);
    if len_a != len_b {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = ra.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        rb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}
