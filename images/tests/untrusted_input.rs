//! What must be refused: trees the format cannot carry (at build time), manifests that would
//! write outside the slot, and chunks that do not match what the manifest names.
#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;

use common::{build, write};
use images::{
    assemble, build_image, AssembleError, BuildError, ChunkError, ChunkSource, ChunkStore,
    VerifiedChunk,
};
use protocol::{AppName, ChunkRef, Digest, Entry, Manifest, ManifestError, ReleaseKind, Version};

fn try_build(src: &Path, store: &ChunkStore) -> Result<Manifest, BuildError> {
    build_image(
        src,
        AppName::new("web").unwrap(),
        Version::new("1").unwrap(),
        ReleaseKind::App,
        store,
    )
}

#[test]
fn symlinks_leaving_the_tree_are_rejected_at_build_time() {
    for target in ["/etc/passwd", "../outside", "a/../../outside"] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        write(&src, "a/file", b"x", 0o644);
        symlink(target, src.join("link")).unwrap();
        let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
        match try_build(&src, &store) {
            Err(BuildError::EscapingSymlink { path, target: t }) => {
                assert_eq!(path, src.join("link"));
                assert_eq!(t, target);
            }
            other => panic!("{target}: {other:?}"),
        }
    }
}

#[test]
fn fifos_sockets_and_non_utf8_names_are_rejected_at_build_time() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();

    let src = tmp.path().join("fifo");
    fs::create_dir(&src).unwrap();
    let status = Command::new("mkfifo")
        .arg(src.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    assert!(matches!(
        try_build(&src, &store),
        Err(BuildError::Unsupported { kind: "FIFO", path }) if path == src.join("pipe")
    ));

    let src = tmp.path().join("socket");
    fs::create_dir(&src).unwrap();
    let _listener = UnixListener::bind(src.join("sock")).unwrap();
    assert!(matches!(
        try_build(&src, &store),
        Err(BuildError::Unsupported { kind: "socket", .. })
    ));

    let src = tmp.path().join("names");
    fs::create_dir(&src).unwrap();
    fs::write(src.join(OsStr::from_bytes(b"bad\xffname")), b"x").unwrap();
    assert!(matches!(
        try_build(&src, &store),
        Err(BuildError::NonUtf8 { .. })
    ));

    let src = tmp.path().join("backslash");
    write(&src, "a\\b", b"x", 0o644);
    assert!(matches!(
        try_build(&src, &store),
        Err(BuildError::BadPath { .. })
    ));
}

fn manifest_json(entries: &str) -> String {
    format!(
        r#"{{"format":1,"app":"web","version":"1","kind":"app","created_at":0,"entries":[{entries}]}}"#
    )
}

#[test]
fn a_manifest_with_a_dotdot_path_does_not_even_deserialize() {
    let ok = manifest_json(r#"{"type":"dir","path":"x","mode":493}"#);
    assert!(serde_json::from_str::<Manifest>(&ok).is_ok());
    for bad in ["../x", "a/../../x", "/etc"] {
        let json = manifest_json(&format!(r#"{{"type":"dir","path":"{bad}","mode":493}}"#));
        assert!(
            serde_json::from_str::<Manifest>(&json).is_err(),
            "{bad} accepted"
        );
    }
}

#[test]
fn a_manifest_with_an_escaping_symlink_is_refused_and_no_slot_appears() {
    let json = manifest_json(
        r#"{"type":"dir","path":"d","mode":493},{"type":"symlink","path":"d/evil","target":"../../etc"}"#,
    );
    let manifest: Manifest = serde_json::from_str(&json).unwrap();
    assert!(matches!(
        manifest.validate(),
        Err(ManifestError::EscapingSymlink { .. })
    ));

    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let slot = tmp.path().join("slot");
    assert!(matches!(
        assemble(&manifest, &slot, &[&store]),
        Err(AssembleError::Invalid(
            ManifestError::EscapingSymlink { .. }
        ))
    ));
    assert!(!slot.exists());
}

#[test]
fn a_corrupt_stored_chunk_is_detected_removed_and_never_written_into_a_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src, "first", b"fine", 0o644);
    write(&src, "second", &common::pseudo_random(200_000, 5), 0o644);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let manifest = build(&src, "1", &store);
    let Entry::File { chunks, .. } = &manifest.entries[1] else {
        panic!("second entry is not a file");
    };
    let victim = chunks[chunks.len() - 1];
    // A well-formed frame of other bytes: only the digest check can catch it.
    let forged = images::chunk::compress(&vec![0u8; victim.size as usize]);
    fs::write(store.path(&victim.digest), forged).unwrap();

    let slot = tmp.path().join("slot");
    match assemble(&manifest, &slot, &[&store]) {
        Err(AssembleError::CorruptStoredChunk { digest, .. }) => assert_eq!(digest, victim.digest),
        other => panic!("{other:?}"),
    }
    assert!(!slot.exists());
    assert!(!store.contains(&victim.digest));
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");

    // With the chunk gone, the error says which file needs which chunk.
    match assemble(&manifest, &slot, &[&store]) {
        Err(AssembleError::MissingChunk { path, digest }) => {
            assert_eq!(path.as_str(), "second");
            assert_eq!(digest, victim.digest);
        }
        other => panic!("{other:?}"),
    }
    assert!(!slot.exists());
}

/// A source that ignores its contract: whatever it is asked for, it hands out the same
/// (genuinely verified) chunk of other bytes.
struct LyingSource;

impl ChunkSource for LyingSource {
    fn read_chunk(&self, chunk: &ChunkRef) -> Result<Option<VerifiedChunk>, AssembleError> {
        let other = vec![b'?'; chunk.size as usize];
        let claim = ChunkRef {
            digest: Digest::of(&other),
            ..*chunk
        };
        Ok(Some(VerifiedChunk::check(&claim, other).unwrap()))
    }
}

#[test]
fn bytes_from_a_source_that_breaks_its_contract_are_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src, "f", b"the real content", 0o644);
    let store = ChunkStore::open(tmp.path().join("chunks")).unwrap();
    let manifest = build(&src, "1", &store);
    let slot = tmp.path().join("slot");
    assert!(matches!(
        assemble(&manifest, &slot, &[&LyingSource, &store]),
        Err(AssembleError::UnverifiedChunk {
            source_index: 0,
            source: ChunkError::DigestMismatch { .. },
            ..
        })
    ));
    assert!(!slot.exists());
    // The writer thread refused the chunk; the partial directory is gone too.
    let left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}
