//! Seeded test data and byte-exact comparison of file trees.
//!
//! The data is generated at run time from a fixed seed, so a failure reproduces exactly and
//! nothing large is committed.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use rand::rngs::StdRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};

/// Share of [`write_tree`]'s bytes that is incompressible, media-like data; the rest is text.
pub const INCOMPRESSIBLE_SHARE: f64 = 0.8;

const WORDS: &[&str] = &[
    "edge", "node", "stream", "cache", "segment", "manifest", "bitrate", "origin", "request",
    "latency", "release", "canary", "rollout", "wave", "health", "probe", "config", "region",
    "the", "a", "of", "to", "and", "is", "in", "on", "for", "with", "served", "from",
];

/// Writes a release-like tree of about `total_bytes` into `dir` (created if needed), the
/// same for the same `seed`:
///
/// - nested directories (`docs/guide/deep/er`), one with mode 0750;
/// - an executable script `bin/start.sh` (0755), an empty file `conf/empty`, a private
///   file `conf/secret.key` (0600);
/// - symlinks to files inside the tree: `app.conf -> conf/app.conf` and
///   `bin/config -> ../conf/app.conf`;
/// - incompressible random files under `media/` ([`INCOMPRESSIBLE_SHARE`] of the bytes) and
///   compressible text under `docs/`.
pub fn write_tree(dir: &Path, seed: u64, total_bytes: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    for (sub, mode) in [
        ("bin", 0o755),
        ("conf", 0o750),
        ("media", 0o755),
        ("media/video", 0o755),
        ("docs", 0o755),
        ("docs/guide", 0o755),
        ("docs/guide/deep", 0o755),
        ("docs/guide/deep/er", 0o755),
    ] {
        let path = dir.join(sub);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        set_mode(&path, mode)?;
    }
    write_file(
        &dir.join("bin/start.sh"),
        format!("#!/bin/sh\n# release seed {seed}\nexec sleep 3600\n").as_bytes(),
        0o755,
    )?;
    write_file(&dir.join("conf/empty"), b"", 0o644)?;
    write_file(&dir.join("conf/app.conf"), &text(&mut rng, 2000), 0o644)?;
    write_file(&dir.join("conf/secret.key"), &random(&mut rng, 64), 0o600)?;
    symlink("conf/app.conf", dir.join("app.conf"))?;
    symlink("../conf/app.conf", dir.join("bin/config"))?;

    let media_budget = (total_bytes as f64 * INCOMPRESSIBLE_SHARE) as u64;
    fill(dir, &mut rng, media_budget, |rng, i| {
        let sub = if i % 3 == 0 { "media/video" } else { "media" };
        let size = rng.gen_range(100_000..1_500_000);
        (format!("{sub}/clip-{i:03}.bin"), random(rng, size))
    })?;
    let text_budget = total_bytes.saturating_sub(media_budget);
    fill(dir, &mut rng, text_budget, |rng, i| {
        let sub = ["docs", "docs/guide", "docs/guide/deep/er"][i % 3];
        let size = rng.gen_range(20_000..400_000);
        (format!("{sub}/page-{i:03}.txt"), text(rng, size))
    })
}

/// Writes files made by `make` until `budget` bytes are written (the last one is cut short).
fn fill(
    dir: &Path,
    rng: &mut StdRng,
    budget: u64,
    mut make: impl FnMut(&mut StdRng, usize) -> (String, Vec<u8>),
) -> Result<()> {
    let mut written = 0u64;
    let mut i = 0;
    while written < budget {
        let (name, mut bytes) = make(rng, i);
        bytes.truncate((budget - written) as usize);
        written += bytes.len() as u64;
        write_file(&dir.join(name), &bytes, 0o644)?;
        i += 1;
    }
    Ok(())
}

/// Turns the tree [`write_tree`] wrote into a plausible next version: rewrites 8 KiB in the
/// middle of a media file, appends to a text page, adds a file, removes one, makes a
/// file executable and repoints a symlink. Deterministic for the same `seed`.
pub fn change_tree(dir: &Path, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let media = files_under(&dir.join("media"))?;
    let pages = files_under(&dir.join("docs"))?;
    anyhow::ensure!(
        media.len() >= 2 && !pages.is_empty(),
        "{} is not a tree from write_tree",
        dir.display()
    );

    let clip = &media[0];
    let mut bytes = fs::read(clip)?;
    let at = bytes.len() / 2;
    let end = (at + 8192).min(bytes.len());
    rng.fill_bytes(&mut bytes[at..end]);
    fs::write(clip, &bytes)?;

    let mut page = fs::OpenOptions::new().append(true).open(&pages[0])?;
    page.write_all(&text(&mut rng, 5000))?;

    write_file(
        &dir.join("docs/changelog.txt"),
        &text(&mut rng, 3000),
        0o644,
    )?;
    fs::remove_file(&media[1])?;
    set_mode(&dir.join("conf/app.conf"), 0o755)?;
    fs::remove_file(dir.join("app.conf"))?;
    symlink("docs/changelog.txt", dir.join("app.conf"))?;
    Ok(())
}

/// Copies a tree: contents, permission bits and symlinks (not followed).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    set_mode(to, mode_of(from)?)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            symlink(fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)?;
            set_mode(&dst, mode_of(&src)?)?;
        }
    }
    Ok(())
}

/// One entry of a tree as compared by [`tree_diff`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, size: u64 },
    Symlink { target: PathBuf },
    Other,
}

/// Every difference between two trees (below their roots): missing and extra entries,
/// kinds, permission bits, file contents and symlink targets. Empty when byte-identical.
pub fn tree_diff(expected: &Path, actual: &Path) -> Result<Vec<String>> {
    let want = scan(expected)?;
    let have = scan(actual)?;
    let mut diffs = Vec::new();
    for (path, w) in &want {
        match have.get(path) {
            None => diffs.push(format!("missing {path}: want {w:?}")),
            Some(h) if h != w => diffs.push(format!("{path}: want {w:?}, have {h:?}")),
            Some(Node::File { .. }) => {
                if fs::read(expected.join(path))? != fs::read(actual.join(path))? {
                    diffs.push(format!("{path}: contents differ"));
                }
            }
            Some(_) => {}
        }
    }
    for (path, h) in &have {
        if !want.contains_key(path) {
            diffs.push(format!("extra {path}: {h:?}"));
        }
    }
    Ok(diffs)
}

/// Asserts that `actual` is a byte-identical copy of `expected`: same entries, contents,
/// permission bits and symlink targets, nothing extra.
#[track_caller]
pub fn assert_tree_eq(expected: &Path, actual: &Path) {
    match tree_diff(expected, actual) {
        Ok(diffs) if diffs.is_empty() => {}
        Ok(diffs) => panic!(
            "{} differs from {} in {} ways:\n  {}",
            actual.display(),
            expected.display(),
            diffs.len(),
            diffs.join("\n  ")
        ),
        Err(e) => panic!(
            "comparing {} with {}: {e:#}",
            actual.display(),
            expected.display()
        ),
    }
}

fn scan(root: &Path) -> Result<BTreeMap<String, Node>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) -> Result<()> {
        let entries =
            fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let mode = meta.permissions().mode() & 0o777;
            let node = if meta.file_type().is_symlink() {
                Node::Symlink {
                    target: fs::read_link(&path)?,
                }
            } else if meta.is_dir() {
                walk(root, &path, out)?;
                Node::Dir { mode }
            } else if meta.is_file() {
                Node::File {
                    mode,
                    size: meta.len(),
                }
            } else {
                Node::Other
            };
            out.insert(rel, node);
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (rel, node) in scan(dir)? {
        if matches!(node, Node::File { .. }) {
            files.push(dir.join(rel));
        }
    }
    Ok(files)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn mode_of(path: &Path) -> Result<u32> {
    Ok(fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

/// `len` random bytes.
pub fn random(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// About `len` bytes of compressible text: random words from a small vocabulary, in lines.
fn text(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
        out.push(if rng.gen_range(0..12) == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(len);
    out
}
