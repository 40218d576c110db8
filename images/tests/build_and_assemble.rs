//! A built image assembles into a slot identical to its source, and `verify_slot` notices any
//! difference afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::{build, fixture_tree, make_writable, snapshot};
use images::{assemble, make_durable, verify_slot, AssembleError, ChunkStore};
use protocol::Entry;

#[test]
fn a_built_image_assembles_into_a_slot_identical_to_its_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fixture_tree(&src);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let manifest = build(&src, "1", &store);

    let find = |p: &str| {
        manifest
            .entries
            .iter()
            .find(|e| e.path().as_str() == p)
            .unwrap()
    };
    assert!(
        matches!(find("etc/empty.conf"), Entry::File { size: 0, chunks, .. } if chunks.is_empty())
    );
    assert!(matches!(find("data/blob.bin"), Entry::File { chunks, .. } if chunks.len() > 1));
    assert!(matches!(
        find("bin/run.sh"),
        Entry::File { mode: 0o755, .. }
    ));
    assert!(
        matches!(find("a/b/c/blob"), Entry::Symlink { target, .. } if target == "../../../data/blob.bin")
    );

    let slot = tmp.path().join("slots/web-1");
    fs::create_dir(tmp.path().join("slots")).unwrap();
    let stats = assemble(&manifest, &slot, &[&store]).unwrap();
    assert_eq!(stats.bytes_written, manifest.total_size());
    assert_eq!(stats.bytes_from, vec![manifest.total_size()]);
    assert_eq!(stats.bytes_linked, 0);
    assert_eq!(stats.files, 5);

    assert_eq!(snapshot(&src), snapshot(&slot));
    verify_slot(&manifest, &slot).unwrap();
    // Nothing but the slot itself is left next to it.
    assert_eq!(fs::read_dir(tmp.path().join("slots")).unwrap().count(), 1);
    // The barrier before a switch: every file, directory and the rename, twice (idempotent).
    make_durable(&manifest, &slot).unwrap();
    make_durable(&manifest, &slot).unwrap();
    make_writable(tmp.path());
}

#[test]
fn the_durability_barrier_names_the_file_it_could_not_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fixture_tree(&src);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let manifest = build(&src, "1", &store);
    let slot = tmp.path().join("web-1");
    assemble(&manifest, &slot, &[&store]).unwrap();
    make_writable(&slot);
    fs::remove_file(slot.join("data/blob.bin")).unwrap();
    match make_durable(&manifest, &slot) {
        Err(AssembleError::Io { path, source }) => {
            assert_eq!(path, slot.join("data/blob.bin"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    make_writable(tmp.path());
}

#[test]
fn building_the_same_tree_twice_gives_the_same_entries_in_parent_first_sorted_order() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fixture_tree(&src);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let first = build(&src, "1", &store);
    let second = build(&src, "1", &store);
    assert_eq!(first.entries, second.entries);
    let paths: Vec<&str> = first.entries.iter().map(|e| e.path().as_str()).collect();
    assert_eq!(
        paths,
        [
            "a",
            "a/b",
            "a/b/c",
            "a/b/c/blob",
            "a/b/c/deep.txt",
            "bin",
            "bin/run.sh",
            "current",
            "data",
            "data/blob.bin",
            "etc",
            "etc/empty.conf",
            "readonly",
            "readonly/inside.txt",
        ]
    );
    make_writable(tmp.path());
}

#[test]
fn assembly_never_overwrites_a_slot_and_clears_stale_partials() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    common::write(&src, "f", b"hello", 0o644);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let manifest = build(&src, "1", &store);

    let slot = tmp.path().join("slot");
    let stale = tmp.path().join("slot.partial-999999");
    common::write(&stale, "junk", b"left by a crash", 0o644);
    assemble(&manifest, &slot, &[&store]).unwrap();
    assert!(!stale.exists());
    assert!(matches!(
        assemble(&manifest, &slot, &[&store]),
        Err(AssembleError::SlotExists { .. })
    ));
    assert_eq!(fs::read(slot.join("f")).unwrap(), b"hello");
}

#[test]
fn verify_slot_notices_changed_bytes_modes_targets_and_extra_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fixture_tree(&src);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let manifest = build(&src, "1", &store);
    let fresh_slot = |name: &str| {
        let slot = tmp.path().join(name);
        assemble(&manifest, &slot, &[&store]).unwrap();
        verify_slot(&manifest, &slot).unwrap();
        slot
    };
    let is_mismatch = |slot: &std::path::Path| {
        matches!(
            verify_slot(&manifest, slot),
            Err(AssembleError::SlotMismatch { .. })
        )
    };

    let slot = fresh_slot("flipped-byte");
    let blob = slot.join("data/blob.bin");
    let mut bytes = fs::read(&blob).unwrap();
    bytes[500_000] ^= 1;
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&blob, bytes).unwrap();
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(is_mismatch(&slot));

    let slot = fresh_slot("mode");
    fs::set_permissions(slot.join("bin/run.sh"), fs::Permissions::from_mode(0o644)).unwrap();
    assert!(is_mismatch(&slot));

    let slot = fresh_slot("target");
    fs::remove_file(slot.join("current")).unwrap();
    std::os::unix::fs::symlink("etc/empty.conf", slot.join("current")).unwrap();
    assert!(is_mismatch(&slot));

    let slot = fresh_slot("extra");
    fs::write(slot.join("a/b/c/extra"), b"").unwrap();
    assert!(is_mismatch(&slot));

    let slot = fresh_slot("missing");
    fs::remove_file(slot.join("etc/empty.conf")).unwrap();
    assert!(is_mismatch(&slot));
    make_writable(tmp.path());
}
