//! A cache-mode store skips fsync but is otherwise the same store: same layout, same atomic
//! rename, and a chunk torn by a power cut costs one failed assembly and a re-fetch, never a
//! bad slot.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;

use common::{build, pseudo_random, snapshot, write};
use images::{assemble, missing_chunks, AssembleError, ChunkStore};

#[test]
fn a_cache_store_and_a_durable_store_read_each_others_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src, "f", &pseudo_random(300_000, 4), 0o644);
    let built = ChunkStore::open(tmp.path().join("built")).unwrap();
    let manifest = build(&src, "1", &built);

    let cache = ChunkStore::open_cache(tmp.path().join("node")).unwrap();
    for chunk in manifest.chunks() {
        let compressed = built.get(&chunk.digest).unwrap().unwrap();
        cache.put_verified(chunk, &compressed).unwrap();
    }
    let durable_view = ChunkStore::open(tmp.path().join("node")).unwrap();
    assert_eq!(durable_view.digests().unwrap(), built.digests().unwrap());
    assert!(missing_chunks(&manifest, |d| durable_view.contains(d)).is_empty());
    // No temp file is left behind by a put that returned.
    for shard in fs::read_dir(tmp.path().join("node")).unwrap() {
        for file in fs::read_dir(shard.unwrap().path()).unwrap() {
            let name = file.unwrap().file_name();
            assert!(!name.to_str().unwrap().starts_with('.'), "{name:?}");
        }
    }
    let slot = tmp.path().join("slot");
    assemble(&manifest, &slot, &[&cache]).unwrap();
    assert_eq!(snapshot(&src), snapshot(&slot));
}

#[test]
fn a_chunk_torn_by_a_power_cut_fails_one_assembly_then_is_fetched_again() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src, "f", &pseudo_random(300_000, 6), 0o644);
    let built = ChunkStore::open(tmp.path().join("built")).unwrap();
    let manifest = build(&src, "1", &built);
    let cache = ChunkStore::open_cache(tmp.path().join("node")).unwrap();
    let fetch_missing = |cache: &ChunkStore| {
        for chunk in missing_chunks(&manifest, |d| cache.contains(d)) {
            let compressed = built.get(&chunk.digest).unwrap().unwrap();
            cache.put_verified(&chunk, &compressed).unwrap();
        }
    };
    fetch_missing(&cache);

    // What an unsynced rename can leave after a power cut: the name, with a short file.
    let victim = *manifest.chunks().nth(1).unwrap();
    let path = cache.path(&victim.digest);
    let stored = fs::read(&path).unwrap();
    fs::write(&path, &stored[..stored.len() / 2]).unwrap();
    let cache = ChunkStore::open_cache(tmp.path().join("node")).unwrap();

    let slot = tmp.path().join("slot");
    match assemble(&manifest, &slot, &[&cache]) {
        Err(AssembleError::CorruptStoredChunk { digest, .. }) => assert_eq!(digest, victim.digest),
        other => panic!("{other:?}"),
    }
    assert!(!slot.exists());
    assert_eq!(
        missing_chunks(&manifest, |d| cache.contains(d)),
        vec![victim]
    );
    fetch_missing(&cache);
    assemble(&manifest, &slot, &[&cache]).unwrap();
    assert_eq!(snapshot(&src), snapshot(&slot));
}
