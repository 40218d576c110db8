//! An update hard-links the files it shares with an installed slot (verified by hash first)
//! instead of writing them again, writes everything else, and falls back to writing whenever
//! the installed file cannot be trusted or linked.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{build, pseudo_random, snapshot, write};
use images::{
    assemble, missing_chunks, slot_bytes_needed, verify_slot, AssembleError, ChunkSource,
    ChunkStore, LocalChunks, VerifiedChunk,
};
use protocol::{ChunkRef, Entry, Manifest};

struct Installed {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    /// The builder's store: has every chunk of both versions.
    built: ChunkStore,
    v1: Manifest,
    v2: Manifest,
    v2_src: PathBuf,
    slot_v1: PathBuf,
}

/// v1 installed in a slot; v2 keeps `same.bin` and `docs/readme.txt`, edits `changed.bin`,
/// and keeps `run.sh`'s bytes but changes its mode.
fn installed_v1_and_built_v2() -> Installed {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let (v1_src, v2_src) = (root.join("v1"), root.join("v2"));
    let same = pseudo_random(700_000, 1);
    let changed = pseudo_random(300_000, 2);
    let mut edited = changed.clone();
    edited[1000] ^= 0xff;
    for (src, changed, run_mode) in [(&v1_src, &changed, 0o755), (&v2_src, &edited, 0o700)] {
        write(src, "same.bin", &same, 0o640);
        write(src, "docs/readme.txt", b"unchanged docs", 0o644);
        write(src, "changed.bin", changed, 0o644);
        write(src, "run.sh", b"#!/bin/sh\n", run_mode);
    }
    let built = ChunkStore::open(root.join("built")).unwrap();
    let v1 = build(&v1_src, "1", &built);
    let v2 = build(&v2_src, "2", &built);
    let slot_v1 = root.join("slots/v1");
    fs::create_dir(root.join("slots")).unwrap();
    assemble(&v1, &slot_v1, &[&built]).unwrap();
    Installed {
        _tmp: tmp,
        root,
        built,
        v1,
        v2,
        v2_src,
        slot_v1,
    }
}

fn file_size(manifest: &Manifest, path: &str) -> u64 {
    manifest
        .entries
        .iter()
        .find_map(|e| match e {
            Entry::File { path: p, size, .. } if p.as_str() == path => Some(*size),
            _ => None,
        })
        .unwrap()
}

fn inode(path: &Path) -> (u64, u64) {
    let meta = fs::symlink_metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

#[test]
fn unchanged_files_are_hard_linked_from_the_installed_slot_and_the_rest_written() {
    let at = installed_v1_and_built_v2();
    let local = LocalChunks::index(&[(at.slot_v1.clone(), &at.v1)]);
    // The node fetches only what neither its store nor its slots have.
    let node_store = ChunkStore::open_cache(at.root.join("fetch")).unwrap();
    for chunk in missing_chunks(&at.v2, |d| local.contains(d)) {
        let compressed = at.built.get(&chunk.digest).unwrap().unwrap();
        node_store.put_verified(&chunk, &compressed).unwrap();
    }

    let slot_v2 = at.root.join("slots/v2");
    let stats = assemble(&at.v2, &slot_v2, &[&node_store, &local]).unwrap();

    let linked = file_size(&at.v2, "same.bin") + file_size(&at.v2, "docs/readme.txt");
    let written = file_size(&at.v2, "changed.bin") + file_size(&at.v2, "run.sh");
    assert_eq!(stats.files, 4);
    assert_eq!(stats.bytes_linked, linked);
    assert_eq!(stats.bytes_written, written);
    assert_eq!(stats.bytes_from.iter().sum::<u64>(), written);
    for shared in ["same.bin", "docs/readme.txt"] {
        assert_eq!(
            inode(&slot_v2.join(shared)),
            inode(&at.slot_v1.join(shared)),
            "{shared}"
        );
        assert_eq!(fs::metadata(slot_v2.join(shared)).unwrap().nlink(), 2);
    }
    // Same bytes but another mode is a different file: sharing the inode would change v1.
    for own in ["changed.bin", "run.sh"] {
        assert_ne!(
            inode(&slot_v2.join(own)),
            inode(&at.slot_v1.join(own)),
            "{own}"
        );
    }
    assert_eq!(snapshot(&at.v2_src), snapshot(&slot_v2));
    verify_slot(&at.v2, &slot_v2).unwrap();
    verify_slot(&at.v1, &at.slot_v1).unwrap();

    // Removing the old slot leaves the new one whole.
    fs::remove_dir_all(&at.slot_v1).unwrap();
    verify_slot(&at.v2, &slot_v2).unwrap();
}

#[test]
fn an_installed_file_that_changed_on_disk_is_written_not_linked() {
    let at = installed_v1_and_built_v2();
    // Same size, one byte different: only reading it back can tell.
    let same = at.slot_v1.join("same.bin");
    let mut bytes = fs::read(&same).unwrap();
    bytes[123_456] ^= 1;
    fs::write(&same, &bytes).unwrap();
    // Another file's mode changed: linking it would give v2 the wrong mode.
    let readme = at.slot_v1.join("docs/readme.txt");
    fs::set_permissions(&readme, fs::Permissions::from_mode(0o666)).unwrap();

    let local = LocalChunks::index(&[(at.slot_v1.clone(), &at.v1)]);
    let slot_v2 = at.root.join("slots/v2");
    let stats = assemble(&at.v2, &slot_v2, &[&local, &at.built]).unwrap();
    assert_eq!(stats.bytes_linked, 0);
    assert_eq!(stats.bytes_written, at.v2.total_size());
    assert_ne!(inode(&slot_v2.join("same.bin")), inode(&same));
    assert_ne!(inode(&slot_v2.join("docs/readme.txt")), inode(&readme));
    assert_eq!(snapshot(&at.v2_src), snapshot(&slot_v2));
    verify_slot(&at.v2, &slot_v2).unwrap();
}

/// Offers, for every file, a path of its choosing instead of a verified installed file.
struct Offers {
    path: PathBuf,
}

impl ChunkSource for Offers {
    fn read_chunk(&self, _chunk: &ChunkRef) -> Result<Option<VerifiedChunk>, AssembleError> {
        Ok(None)
    }
    fn linkable(&self, _chunks: &[ChunkRef], _mode: u32) -> Option<&Path> {
        Some(&self.path)
    }
}

#[test]
fn an_offered_file_that_cannot_be_linked_as_itself_is_written_instead() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let content = pseudo_random(50_000, 9);
    write(&src, "f", &content, 0o644);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let manifest = build(&src, "1", &store);
    // A symlink to the right bytes verifies when opened, but a hard link to it would be a
    // link to the symlink, not to the verified file: it must not end up in the slot.
    let real = tmp.path().join("real");
    fs::write(&real, &content).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
    let via_symlink = tmp.path().join("via-symlink");
    symlink(&real, &via_symlink).unwrap();

    for offered in [
        via_symlink,
        tmp.path().join("missing"),
        tmp.path().join("src"),
    ] {
        let slot = tmp.path().join("slot");
        let offers = Offers {
            path: offered.clone(),
        };
        let stats = assemble(&manifest, &slot, &[&offers, &store]).unwrap();
        assert_eq!(stats.bytes_linked, 0, "{offered:?}");
        assert_eq!(stats.bytes_from, vec![0, content.len() as u64]);
        let meta = fs::symlink_metadata(slot.join("f")).unwrap();
        assert!(meta.is_file());
        assert_ne!(meta.ino(), fs::metadata(&real).unwrap().ino());
        verify_slot(&manifest, &slot).unwrap();
        fs::remove_dir_all(&slot).unwrap();
    }
    // The verified target itself is linked.
    let slot = tmp.path().join("slot");
    let offers = Offers { path: real.clone() };
    let stats = assemble(&manifest, &slot, &[&offers, &store]).unwrap();
    assert_eq!(stats.bytes_linked, content.len() as u64);
    assert_eq!(inode(&slot.join("f")), inode(&real));
}

#[test]
fn slot_bytes_needed_counts_the_files_to_write_plus_a_block_per_entry() {
    let at = installed_v1_and_built_v2();
    let entries = at.v2.entries.len() as u64;
    assert_eq!(
        slot_bytes_needed(&at.v2, &LocalChunks::default()),
        at.v2.total_size() + entries * 4096
    );
    let local = LocalChunks::index(&[(at.slot_v1.clone(), &at.v1)]);
    let to_write = file_size(&at.v2, "changed.bin") + file_size(&at.v2, "run.sh");
    assert_eq!(slot_bytes_needed(&at.v2, &local), to_write + entries * 4096);
    // Reinstalling the same release writes no file contents at all.
    assert_eq!(
        slot_bytes_needed(&at.v1, &local),
        at.v1.entries.len() as u64 * 4096
    );
}

#[test]
fn linkable_matches_the_whole_chunk_list_and_the_mode() {
    let at = installed_v1_and_built_v2();
    let local = LocalChunks::index(&[(at.slot_v1.clone(), &at.v1)]);
    let Some(Entry::File { chunks, mode, .. }) = at
        .v1
        .entries
        .iter()
        .find(|e| e.path().as_str() == "same.bin")
    else {
        panic!("same.bin is a file in v1");
    };
    assert_eq!(
        local.linkable(chunks, *mode),
        Some(at.slot_v1.join("same.bin").as_path())
    );
    assert_eq!(local.linkable(chunks, 0o600), None);
    assert_eq!(local.linkable(&chunks[1..], *mode), None);
    let mut reversed = chunks.clone();
    reversed.reverse();
    assert_eq!(local.linkable(&reversed, *mode), None);
}
