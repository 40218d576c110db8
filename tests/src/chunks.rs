//! What a release is made of, worked out by the test on its own (not asked of the system
//! under test), and read-only views of chunk stores on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use images::ChunkStore;
use protocol::{AppName, ChunkRef, Digest, ReleaseKind, Version};

/// The distinct chunks of the image of `src`, by digest, built with the same
/// `images::build_image` the coordinator's CLI uses, into a throwaway store.
pub fn image_chunks(src: &Path) -> Result<BTreeMap<Digest, ChunkRef>> {
    let scratch = tempfile::Builder::new().prefix("image-chunks-").tempdir()?;
    let store = ChunkStore::open(scratch.path().join("chunks"))?;
    let manifest = images::build_image(
        src,
        AppName::new("probe")?,
        Version::new("0")?,
        ReleaseKind::App,
        &store,
    )
    .with_context(|| format!("building the image of {}", src.display()))?;
    Ok(manifest.chunks().map(|c| (c.digest, *c)).collect())
}

/// The chunks of `new` that are not in `old`: what a node on `old` must fetch for `new`.
pub fn chunks_not_in(
    new: &BTreeMap<Digest, ChunkRef>,
    old: &BTreeMap<Digest, ChunkRef>,
) -> BTreeMap<Digest, ChunkRef> {
    new.iter()
        .filter(|(d, _)| !old.contains_key(d))
        .map(|(d, c)| (*d, *c))
        .collect()
}

/// Total compressed size: the bytes a node receives for these chunks.
pub fn zsize_sum<'a>(chunks: impl IntoIterator<Item = &'a ChunkRef>) -> u64 {
    chunks.into_iter().map(|c| u64::from(c.zsize)).sum()
}

/// The chunks in a store laid out like `images::store` (`DIR/<2 hex>/<64 hex>`), without
/// opening it (opening tidies temp files, and a test only looks). A missing directory is an
/// empty store; temp files and anything else are not chunks.
pub fn store_digests(dir: &Path) -> Result<BTreeSet<Digest>> {
    let mut digests = BTreeSet::new();
    let Ok(shards) = std::fs::read_dir(dir) else {
        return Ok(digests);
    };
    for shard in shards {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        let Ok(files) = std::fs::read_dir(shard.path()) else {
            // Removed while we looked (the agent clears its fetch store after a switch).
            continue;
        };
        for file in files {
            let file = file?;
            let name = file.file_name();
            let Some(digest) = name.to_str().and_then(|n| n.parse::<Digest>().ok()) else {
                continue;
            };
            if digest.to_hex().get(..2) == shard.file_name().to_str() {
                digests.insert(digest);
            }
        }
    }
    Ok(digests)
}

/// Every path under `dir` (any depth, symlinks not followed) whose file name contains
/// `needle`.
pub fn paths_named(dir: &Path, needle: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_name().to_string_lossy().contains(needle) {
                found.push(entry.path());
            }
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}
