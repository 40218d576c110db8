//! Content-defined chunking makes a small edit cost a few chunks, and assembly reuses the
//! rest from the installed slot instead of fetching it.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;

use common::{build, pseudo_random, snapshot, write};
use images::{assemble, missing_chunks, ChunkSource, ChunkStore, LocalChunks};

#[test]
fn editing_a_small_region_of_a_large_file_changes_only_a_few_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let v1_src = tmp.path().join("v1");
    let v2_src = tmp.path().join("v2");
    let original = pseudo_random(3_000_000, 7);
    let mut edited = original.clone();
    // An insertion shifts every later byte: fixed-size blocks would all change.
    edited.splice(1_500_000..1_500_100, pseudo_random(150, 8));
    write(&v1_src, "big.bin", &original, 0o644);
    write(&v2_src, "big.bin", &edited, 0o644);

    // The builder's store (coordinator side) gets both versions.
    let built = ChunkStore::open(tmp.path().join("built")).unwrap();
    let v1 = build(&v1_src, "1", &built);
    let v2 = build(&v2_src, "2", &built);
    let v1_chunks = v1.chunks().count();
    assert!(v1_chunks >= 20, "only {v1_chunks} chunks");

    // The node has v1 installed and an empty chunk store.
    let slot_v1 = tmp.path().join("slot-v1");
    assemble(&v1, &slot_v1, &[&built]).unwrap();
    let local = LocalChunks::index(&[(slot_v1.clone(), &v1)]);
    let node_store = ChunkStore::open(tmp.path().join("node-chunks")).unwrap();
    let to_fetch = missing_chunks(&v2, |d| local.contains(d) || node_store.contains(d));
    assert!(
        !to_fetch.is_empty() && to_fetch.len() <= 3,
        "{} chunks to fetch",
        to_fetch.len()
    );

    // "Fetch" them: the node verifies every chunk it stores.
    for chunk in &to_fetch {
        let compressed = built.get(&chunk.digest).unwrap().unwrap();
        node_store.put_verified(chunk, &compressed).unwrap();
    }
    let slot_v2 = tmp.path().join("slot-v2");
    let stats = assemble(&v2, &slot_v2, &[&local, &node_store]).unwrap();
    let fetched: u64 = to_fetch.iter().map(|c| u64::from(c.size)).sum();
    assert_eq!(stats.bytes_from, vec![v2.total_size() - fetched, fetched]);
    assert!(fetched * 5 < v2.total_size());
    assert_eq!(snapshot(&v2_src), snapshot(&slot_v2));
}

#[test]
fn local_chunks_that_changed_on_disk_are_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let data = pseudo_random(100_000, 3);
    write(&src, "f", &data, 0o644);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let manifest = build(&src, "1", &store);
    let slot = tmp.path().join("slot");
    assemble(&manifest, &slot, &[&store]).unwrap();

    let local = LocalChunks::index(&[(slot.clone(), &manifest)]);
    let first = *manifest.chunks().next().unwrap();
    assert_eq!(
        *local.read_chunk(&first).unwrap().unwrap(),
        data[..first.size as usize]
    );
    let mut tampered = data.clone();
    tampered[10] ^= 0xff;
    fs::write(slot.join("f"), &tampered).unwrap();
    assert_eq!(local.read_chunk(&first).unwrap(), None);
    fs::remove_file(slot.join("f")).unwrap();
    assert_eq!(local.read_chunk(&first).unwrap(), None);
}
