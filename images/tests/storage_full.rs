//! A full disk is reported as such (so the agent can fail a stage with "disk full" instead of
//! retrying), by the store and by assembly, and a slot that did not fit leaves nothing behind.
//!
//! The disk is a small tmpfs mounted for the test, which needs root. Without root the test
//! says so and passes, except under CI (`CI=true`), where not being able to mount fails it.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{build, pseudo_random, write};
use images::disk::available_space;
use images::{assemble, ChunkStore, StoreError};
use protocol::{ChunkRef, Digest};

/// A tmpfs mounted on the host for one test, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// `None` when mounting is not possible here (and this is not CI).
    fn mount(path: &Path, bytes: u64) -> Option<SmallDisk> {
        fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "images-test"])
            .arg(path)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(SmallDisk {
                path: path.to_owned(),
            }),
            other => {
                let why = format!("cannot mount a tmpfs at {}: {other:?}", path.display());
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "{why}; CI runs as root and must run this test"
                );
                eprintln!("skipping the storage-full test: {why} (needs root)");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[test]
fn a_full_disk_is_storage_full_for_the_store_and_for_assembly_and_leaves_no_partial_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&tmp.path().join("disk"), 512 * 1024) else {
        return;
    };
    let free = available_space(&disk.path).unwrap();
    assert!(free > 0 && free <= 512 * 1024, "{free}");

    // The store: incompressible chunks until the disk refuses one.
    let store = ChunkStore::open_cache(disk.path.join("fetch")).unwrap();
    let mut refused = None;
    for seed in 0..8 {
        let data = pseudo_random(200_000, seed);
        let compressed = images::chunk::compress(&data);
        let chunk = ChunkRef {
            digest: Digest::of(&data),
            size: data.len() as u32,
            zsize: compressed.len() as u32,
        };
        if let Err(error) = store.put_verified(&chunk, &compressed) {
            refused = Some(error);
            break;
        }
    }
    let refused = refused.expect("a 512 KiB disk took 1.6 MB of chunks");
    assert!(
        matches!(refused, StoreError::Io { .. }) && refused.is_storage_full(),
        "{refused:?}"
    );
    // No temp file of the refused chunk is left taking space.
    for shard in fs::read_dir(store.dir()).unwrap() {
        for file in fs::read_dir(shard.unwrap().path()).unwrap() {
            let name = file.unwrap().file_name();
            assert!(!name.to_str().unwrap().starts_with('.'), "{name:?}");
        }
    }
    fs::remove_dir_all(store.dir()).unwrap();

    // Assembly: a 1 MB image into a slot on the same disk.
    let src = tmp.path().join("src");
    write(&src, "big.bin", &pseudo_random(1_000_000, 99), 0o644);
    let built = ChunkStore::open(tmp.path().join("built")).unwrap();
    let manifest = build(&src, "1", &built);
    let slots = disk.path.join("slots");
    fs::create_dir(&slots).unwrap();
    let error = assemble(&manifest, &slots.join("web-1"), &[&built]).unwrap_err();
    assert!(error.is_storage_full(), "{error:?}");
    assert_eq!(fs::read_dir(&slots).unwrap().count(), 0);
}
