//! Seeded release trees for the delta-delivery benches (issue 3): what a streaming edge node
//! actually ships, generated at run time so nothing large is committed.
//!
//! A tree of [`Shape`] has three kinds of content, because each stresses delivery
//! differently:
//!
//! - `media/seg-NNNNN.ts`: incompressible video segments (random bytes): compression cannot
//!   help, only not sending them twice can;
//! - `meta/*.json`, `meta/master.m3u8`, `config/*.toml`: text that compresses well;
//! - `bin/server`: one large binary-like file (instruction-like byte patterns, string and
//!   pointer tables, random data blocks) that zstd compresses about 2–3×, where a small
//!   code change must not cost the whole file.
//!
//! [`make_v2`] turns such a tree into its next version: 200 KB rewritten in the middle of the
//! binary (same length), a few lines of `config/app.toml` changed, one segment added; every
//! other byte identical. The same seed always gives the same bytes (within one build of this
//! crate: `rand`'s `StdRng` is pinned by `Cargo.lock`).
//!
//! The few measurement helpers those benches share live here too: reading a process's
//! memory from `/proc`, checking that a baseline tool is installed, and formatting figures.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::{ensure, Context as _, Result};
use rand::rngs::StdRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};

use crate::tree::copy_tree;

/// Sizes of a generated release tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Number of media segments in v1.
    pub segments: usize,
    /// Bytes per media segment.
    pub segment_bytes: usize,
    /// Bytes of `meta/` JSON and playlist text, about.
    pub meta_bytes: usize,
    /// Bytes of `bin/server`.
    pub binary_bytes: usize,
    /// Bytes of `bin/server` that [`make_v2`] rewrites.
    pub binary_rewrite: usize,
}

impl Shape {
    /// About 200 MB: 90 × 2 MB segments, 3 MB of metadata, a 20 MB binary (the delta bench).
    pub const RELEASE: Shape = Shape {
        segments: 90,
        segment_bytes: 2_000_000,
        meta_bytes: 3_000_000,
        binary_bytes: 20_000_000,
        binary_rewrite: 200_000,
    };

    /// About 24 MB of the same mix (the fan-out bench, where 50 nodes fetch it at once).
    pub const SMALL: Shape = Shape {
        segments: 8,
        segment_bytes: 2_000_000,
        meta_bytes: 2_000_000,
        binary_bytes: 6_000_000,
        binary_rewrite: 200_000,
    };

    /// Total bytes of the files of a v1 tree of this shape, about (config files are a few
    /// KB more).
    pub fn approx_bytes(&self) -> u64 {
        (self.segments * self.segment_bytes + self.meta_bytes + self.binary_bytes) as u64
    }
}

/// What [`make_v2`] changed, for the benches to print next to their figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Changes {
    /// `bin/server` bytes `binary_offset .. binary_offset + binary_len` were rewritten.
    pub binary_offset: u64,
    pub binary_len: u64,
    /// Lines of `config/app.toml` that differ.
    pub config_lines: usize,
    /// The added segment, relative to the tree root.
    pub added: String,
    pub added_bytes: u64,
}

impl fmt::Display for V2Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} KB of {BINARY} rewritten at offset {}, {} lines of {APP_CONFIG} changed, {} added ({:.1} MB)",
            self.binary_len / 1000,
            self.binary_offset,
            self.config_lines,
            self.added,
            self.added_bytes as f64 / 1e6
        )
    }
}

/// The binary-like file of every tree, relative to its root.
pub const BINARY: &str = "bin/server";
/// The config file [`make_v2`] edits.
pub const APP_CONFIG: &str = "config/app.toml";

/// Writes a v1 release tree of `shape` into `dir` (created if needed) and returns the total
/// bytes of its files. The same `seed` and shape always give the same tree.
pub fn write_v1(dir: &Path, seed: u64, shape: &Shape) -> Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    for sub in ["bin", "config", "media", "meta"] {
        let path = dir.join(sub);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    let mut total = 0u64;
    let mut put = |rel: &str, bytes: &[u8], mode: u32| -> Result<()> {
        write_file(&dir.join(rel), bytes, mode)?;
        total += bytes.len() as u64;
        Ok(())
    };

    put(
        APP_CONFIG,
        app_config(&mut rng, "1.0.0", 512).as_bytes(),
        0o644,
    )?;
    put("config/cdn.toml", cdn_config(&mut rng).as_bytes(), 0o644)?;
    put("config/logging.toml", LOGGING_CONFIG.as_bytes(), 0o644)?;
    put(BINARY, &binary_like(&mut rng, shape.binary_bytes), 0o755)?;

    // One buffer reused for every segment: they are the bulk of the bytes.
    let mut segment = vec![0u8; shape.segment_bytes];
    for i in 0..shape.segments {
        rng.fill_bytes(&mut segment);
        put(&segment_path(i), &segment, 0o644)?;
    }

    put(
        "meta/master.m3u8",
        &playlist(&mut rng, shape.segments),
        0o644,
    )?;
    let mut written = 0;
    let mut index = 0;
    while written < shape.meta_bytes {
        let want = (shape.meta_bytes - written).min(META_FILE_BYTES);
        let json = segment_index(&mut rng, index, shape.segments, want);
        put(&format!("meta/segments-{index:03}.json"), &json, 0o644)?;
        written += json.len();
        index += 1;
    }
    Ok(total)
}

/// Copies the v1 tree at `v1` to `v2` (which must not exist) and turns the copy into the
/// next version, as the module doc says. `shape` and `seed` must be those `v1` was written
/// with; the change itself is drawn from `seed` too, so it is also reproducible.
pub fn make_v2(v1: &Path, v2: &Path, shape: &Shape, seed: u64) -> Result<V2Changes> {
    ensure!(
        fs::symlink_metadata(v2).is_err(),
        "{} already exists; make_v2 writes a fresh tree",
        v2.display()
    );
    copy_tree(v1, v2).with_context(|| format!("copying {} to {}", v1.display(), v2.display()))?;
    // A different stream from write_v1's, so the new bytes are new.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0002_0002_0002);

    let binary = v2.join(BINARY);
    let mut bytes = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    ensure!(
        bytes.len() == shape.binary_bytes && shape.binary_rewrite <= bytes.len(),
        "{} is {} bytes, not the {} of the shape it was supposedly written with",
        binary.display(),
        bytes.len(),
        shape.binary_bytes
    );
    // Somewhere in the middle, at no round offset: a recompiled function, not a page.
    let offset = (bytes.len() * 9 / 20 + 4321).min(bytes.len() - shape.binary_rewrite);
    let end = offset + shape.binary_rewrite;
    let new = binary_like(&mut rng, shape.binary_rewrite);
    bytes[offset..end].copy_from_slice(&new);
    write_file(&binary, &bytes, 0o755)?;

    let config = v2.join(APP_CONFIG);
    let old =
        fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
    let new = bump_app_config(&old)?;
    let config_lines = old.lines().zip(new.lines()).filter(|(a, b)| a != b).count();
    write_file(&config, new.as_bytes(), 0o644)?;

    let added = segment_path(shape.segments);
    let mut segment = vec![0u8; shape.segment_bytes];
    rng.fill_bytes(&mut segment);
    write_file(&v2.join(&added), &segment, 0o644)?;

    Ok(V2Changes {
        binary_offset: offset as u64,
        binary_len: shape.binary_rewrite as u64,
        config_lines,
        added,
        added_bytes: segment.len() as u64,
    })
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`: resident now, `VmHWM`: peak resident since
/// the process started), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))
        .with_context(|| format!("no {field} line in {path}"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("malformed {field} line in {path}: {line:?}"))
}

/// Fails, naming the Debian package to install, unless `tool --version` runs.
pub fn require_tool(tool: &str, apt_package: &str) -> Result<()> {
    match std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => anyhow::bail!("`{tool} --version` failed ({status}); the baseline needs a working {tool}"),
        Err(e) => anyhow::bail!(
            "cannot run `{tool}` ({e}): the baseline needs it; install it with `apt-get install {apt_package}`"
        ),
    }
}

/// Bytes as decimal megabytes (10^6), the unit of every bench table.
pub fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// The median of `samples` (the upper one of the middle two for an even count).
pub fn median(samples: &[std::time::Duration]) -> std::time::Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn segment_path(index: usize) -> String {
    format!("media/seg-{index:05}.ts")
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Size of one `meta/segments-NNN.json` file.
const META_FILE_BYTES: usize = 100_000;

const WORDS: &[&str] = &[
    "edge", "node", "stream", "cache", "segment", "manifest", "bitrate", "origin", "request",
    "latency", "release", "session", "packet", "buffer", "decoder", "encoder", "playlist",
    "variant", "audio", "video", "track", "codec", "frame", "header", "handler", "router",
];

/// `len` bytes that look like a compiled executable to a compressor: sections of machine
/// code, string tables, pointer tables and embedded random data. zstd -3 compresses the mix
/// about 2.5×, as it does real executables.
fn binary_like(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let isa = Isa::new(rng);
    let mut out = Vec::with_capacity(len + 64 * 1024);
    while out.len() < len {
        let section = rng.gen_range(8 * 1024..64 * 1024);
        let end = out.len() + section;
        match rng.gen_range(0..100) {
            0..=59 => isa.code(rng, &mut out, end),
            60..=74 => {
                let start = out.len();
                out.resize(end, 0);
                rng.fill_bytes(&mut out[start..]);
            }
            75..=84 => strings(rng, &mut out, end),
            _ => pointers(rng, &mut out, end),
        }
    }
    out.truncate(len);
    out
}

/// A file's made-up instruction set: opcodes of 1–6 bytes, and idioms (short instruction
/// sequences, like prologues and loops) that recur all over real code.
struct Isa {
    opcodes: Vec<Vec<u8>>,
    idioms: Vec<Vec<u8>>,
}

impl Isa {
    fn new(rng: &mut StdRng) -> Isa {
        let opcodes = (0..256)
            .map(|_| {
                let mut op = vec![0u8; rng.gen_range(1..=6)];
                rng.fill_bytes(&mut op);
                op
            })
            .collect();
        let mut isa = Isa {
            opcodes,
            idioms: Vec::new(),
        };
        isa.idioms = (0..1024)
            .map(|_| {
                let mut idiom = Vec::new();
                let len = rng.gen_range(8..48);
                while idiom.len() < len {
                    isa.instruction(rng, &mut idiom);
                }
                idiom
            })
            .collect();
        isa
    }

    /// Machine code up to `end`: mostly idioms, some one-off instructions.
    fn code(&self, rng: &mut StdRng, out: &mut Vec<u8>, end: usize) {
        while out.len() < end {
            let r = rng.next_u32();
            if r & 3 == 0 {
                self.instruction(rng, out);
            } else {
                // AND of two uniform numbers: a few idioms are far more frequent.
                let i = ((r >> 2) & (r >> 12) & 0x3ff) as usize;
                out.extend_from_slice(&self.idioms[i]);
            }
        }
    }

    /// One instruction: a skewed choice of opcode, then maybe an operand: a small offset
    /// (high bytes zero) or a full random immediate.
    fn instruction(&self, rng: &mut StdRng, out: &mut Vec<u8>) {
        let r = rng.next_u64();
        let op = (r & (r >> 8) & 0xff) as usize;
        out.extend_from_slice(&self.opcodes[op]);
        match (r >> 16) & 7 {
            0..=2 => {}
            3..=5 => out.extend_from_slice(&(((r >> 24) & 0xfff) as u32).to_le_bytes()),
            _ => out.extend_from_slice(&((r >> 32) as u32).to_le_bytes()),
        }
    }
}

/// NUL-terminated mangled-looking symbol names.
fn strings(rng: &mut StdRng, out: &mut Vec<u8>, end: usize) {
    while out.len() < end {
        out.extend_from_slice(b"_ZN");
        for _ in 0..rng.gen_range(2..5) {
            let word = WORDS[rng.gen_range(0..WORDS.len())];
            let _ = write!(out, "{}{word}", word.len());
        }
        let _ = write!(out, "17h{:016x}E\0", rng.next_u64());
    }
}

/// A table of 8-byte little-endian addresses, increasing by small random strides.
fn pointers(rng: &mut StdRng, out: &mut Vec<u8>, end: usize) {
    let mut addr: u64 = 0x0040_0000 + (rng.next_u64() & 0x00ff_fff0);
    while out.len() < end {
        addr += rng.gen_range(1..64) * 16;
        out.extend_from_slice(&addr.to_le_bytes());
    }
}

/// About `len` bytes of a JSON index of segments, as a packager writes next to its media.
fn segment_index(rng: &mut StdRng, file: usize, segments: usize, len: usize) -> Vec<u8> {
    const RESOLUTIONS: [(&str, u32); 4] = [
        ("640x360", 800_000),
        ("1280x720", 2_500_000),
        ("1920x1080", 4_500_000),
        ("3840x2160", 12_000_000),
    ];
    let mut out = Vec::with_capacity(len + 512);
    let _ = write!(
        out,
        "{{\"version\":1,\"index\":{file},\"generated_by\":\"packager 4.2\",\"segments\":["
    );
    let mut i = 0usize;
    while out.len() + 2 < len {
        let (resolution, bitrate) = RESOLUTIONS[rng.gen_range(0..RESOLUTIONS.len())];
        let seq = (file * 997 + i) % segments.max(1);
        let _ = write!(
            out,
            "{}\n  {{\"seq\":{seq},\"uri\":\"{}\",\"duration\":{}.{:03},\"bitrate\":{},\
             \"resolution\":\"{resolution}\",\"codec\":\"avc1.640028\",\"checksum\":\"{:016x}{:016x}\",\
             \"origin\":\"origin-{}-{}\",\"cache\":\"max-age=31536000, immutable\"}}",
            if i == 0 { "" } else { "," },
            segment_path(seq),
            rng.gen_range(4..7),
            rng.gen_range(0..1000),
            bitrate + rng.gen_range(0..50_000),
            rng.next_u64(),
            rng.next_u64(),
            ["eu", "us", "ap"][rng.gen_range(0..3)],
            rng.gen_range(1..9),
        );
        i += 1;
    }
    out.extend_from_slice(b"\n]}\n");
    out
}

/// An HLS media playlist over every segment.
fn playlist(rng: &mut StdRng, segments: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = write!(
        out,
        "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:6\n#EXT-X-MEDIA-SEQUENCE:0\n"
    );
    for i in 0..segments {
        let _ = write!(
            out,
            "#EXTINF:{}.{:03},\n{}\n",
            rng.gen_range(4..7),
            rng.gen_range(0..1000),
            segment_path(i)
        );
    }
    out.extend_from_slice(b"#EXT-X-ENDLIST\n");
    out
}

/// The keys [`bump_app_config`] changes, with their v2 values.
const APP_CONFIG_BUMPS: [(&str, &str); 3] = [
    ("version", "\"1.1.0\""),
    ("max_connections", "1024"),
    ("segment_cache_mb", "768"),
];

fn app_config(rng: &mut StdRng, version: &str, max_connections: u32) -> String {
    let mut out = format!(
        "# edge streaming server\nversion = \"{version}\"\nmax_connections = {max_connections}\n\
         segment_cache_mb = 512\nlisten = \"0.0.0.0:8443\"\nworkers = 4\n\n"
    );
    for section in ["origin", "tls", "abr", "metrics", "limits"] {
        out += &format!("[{section}]\n");
        for _ in 0..8 {
            let key = WORDS[rng.gen_range(0..WORDS.len())];
            let value = rng.gen_range(1..100_000);
            out += &format!("{key}_{} = {value}\n", rng.gen_range(0..100));
        }
        out.push('\n');
    }
    out
}

/// `text` with the values of [`APP_CONFIG_BUMPS`] replaced; fails if a key is missing.
fn bump_app_config(text: &str) -> Result<String> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut bumped = 0;
    for line in text.lines() {
        let key = line.split(" = ").next().unwrap_or_default();
        match APP_CONFIG_BUMPS.iter().find(|(k, _)| *k == key) {
            Some((k, v)) => {
                out += &format!("{k} = {v}\n");
                bumped += 1;
            }
            None => {
                out += line;
                out.push('\n');
            }
        }
    }
    ensure!(
        bumped == APP_CONFIG_BUMPS.len(),
        "{APP_CONFIG} lacks some of the keys {:?}: not a tree from write_v1",
        APP_CONFIG_BUMPS.map(|(k, _)| k)
    );
    Ok(out)
}

fn cdn_config(rng: &mut StdRng) -> String {
    let mut out = String::from("[cdn]\nprovider = \"self\"\n\n");
    for i in 0..24 {
        out += &format!(
            "[[cdn.pop]]\nname = \"pop-{i:02}\"\naddress = \"10.{}.{}.{}\"\nweight = {}\n\n",
            rng.gen_range(0..256),
            rng.gen_range(0..256),
            rng.gen_range(1..255),
            rng.gen_range(1..10)
        );
    }
    out
}

const LOGGING_CONFIG: &str = "[logging]\nlevel = \"info\"\nformat = \"json\"\nrotate_mb = 64\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::tree_diff;

    const TINY: Shape = Shape {
        segments: 3,
        segment_bytes: 50_000,
        meta_bytes: 150_000,
        binary_bytes: 1_000_000,
        binary_rewrite: 100_000,
    };

    #[test]
    fn the_same_seed_writes_the_same_tree_and_another_seed_a_different_one() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        let total = write_v1(&a, 7, &TINY).unwrap();
        write_v1(&b, 7, &TINY).unwrap();
        write_v1(&c, 8, &TINY).unwrap();
        assert_eq!(tree_diff(&a, &b).unwrap(), Vec::<String>::new());
        assert!(!tree_diff(&a, &c).unwrap().is_empty());
        let approx = TINY.approx_bytes();
        assert!(
            total >= approx && total < approx + 20_000,
            "{total} bytes written for a shape of about {approx}"
        );
        assert_eq!(
            fs::metadata(a.join(BINARY)).unwrap().len(),
            TINY.binary_bytes as u64
        );
    }

    #[test]
    fn v2_changes_one_binary_region_a_few_config_lines_and_adds_one_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
        write_v1(&v1, 3, &TINY).unwrap();
        let changes = make_v2(&v1, &v2, &TINY, 3).unwrap();

        // tree_diff says "contents differ" for same-size files, else gives both sizes.
        let mut changed: Vec<String> = tree_diff(&v1, &v2)
            .unwrap()
            .iter()
            .map(|d| d.split(':').next().unwrap().to_owned())
            .collect();
        changed.sort();
        assert_eq!(changed, [BINARY, APP_CONFIG, "extra media/seg-00003.ts"]);
        assert_eq!(changes.added, "media/seg-00003.ts");
        assert_eq!(changes.config_lines, APP_CONFIG_BUMPS.len());

        let (old, new) = (
            fs::read(v1.join(BINARY)).unwrap(),
            fs::read(v2.join(BINARY)).unwrap(),
        );
        assert_eq!(old.len(), new.len());
        let differing: Vec<usize> = (0..old.len()).filter(|&i| old[i] != new[i]).collect();
        let (first, last) = (differing[0] as u64, *differing.last().unwrap() as u64);
        let region = changes.binary_offset..changes.binary_offset + changes.binary_len;
        assert!(
            region.contains(&first) && region.contains(&last),
            "bytes {first}..={last} differ, outside the reported {region:?}"
        );
        // Nearly all of the region is new (a random byte matches the old one 1 in 256).
        assert!(differing.len() as u64 > changes.binary_len * 9 / 10);
    }

    #[test]
    fn the_binary_compresses_two_to_three_times_like_an_executable() {
        let mut rng = StdRng::seed_from_u64(1);
        let binary = binary_like(&mut rng, 4_000_000);
        // Per 64 KiB piece (the average chunk), as image chunks are compressed one by one.
        let compressed: usize = binary
            .chunks(64 * 1024)
            .map(|piece| images::chunk::compress(piece).len())
            .sum();
        let ratio = binary.len() as f64 / compressed as f64;
        assert!((2.0..=3.0).contains(&ratio), "compression ratio {ratio:.2}");
    }
}
