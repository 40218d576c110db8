//! Shared fixtures for the integration tests: a source tree with every kind of entry, and a
//! tree comparison that checks what a slot must preserve (contents, modes, link targets).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use images::ChunkStore;
use protocol::{AppName, Manifest, ReleaseKind, Version};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

pub fn write(root: &Path, rel: &str, bytes: &[u8], mode: u32) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Nested dirs, an executable, an empty file, a ~1 MB multi-chunk file, symlinks inside the
/// tree, and a read-only directory (its children must still be created at assembly).
pub fn fixture_tree(root: &Path) {
    write(root, "bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755);
    write(root, "etc/empty.conf", b"", 0o644);
    write(root, "data/blob.bin", &pseudo_random(1_000_000, 1), 0o640);
    write(root, "a/b/c/deep.txt", b"deep", 0o600);
    write(root, "readonly/inside.txt", b"locked in", 0o444);
    fs::set_permissions(root.join("readonly"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("bin/run.sh", root.join("current")).unwrap();
    symlink("../../../data/blob.bin", root.join("a/b/c/blob")).unwrap();
}

pub fn build(src: &Path, version: &str, store: &ChunkStore) -> Manifest {
    images::build_image(
        src,
        AppName::new("web").unwrap(),
        Version::new(version).unwrap(),
        ReleaseKind::App,
        store,
    )
    .unwrap()
}

#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, bytes: Vec<u8> },
    Symlink { target: String },
}

/// Everything under `root` (not the root itself), keyed by relative path.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let node = if meta.is_symlink() {
                let target = fs::read_link(&path).unwrap().to_str().unwrap().to_owned();
                Node::Symlink { target }
            } else if meta.is_dir() {
                stack.push(path.clone());
                Node::Dir { mode }
            } else {
                Node::File {
                    mode,
                    bytes: fs::read(&path).unwrap(),
                }
            };
            out.insert(rel, node);
        }
    }
    out
}

/// Makes every directory under `root` writable again so the temp dir can be deleted when
/// the tests do not run as root.
pub fn make_writable(root: &Path) {
    for (rel, node) in snapshot(root) {
        if let Node::Dir { .. } = node {
            fs::set_permissions(root.join(rel), fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}
