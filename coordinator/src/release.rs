//! Pure release and command logic: summarising a manifest, telling whether a re-publish is the
//! same release, reading back a stored envelope, and building a node's deploy command.
//!
//! No I/O and no clock: `now` is a parameter, so every rule here is tested without a database.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use protocol::messages::{Action, Command};
use protocol::{
    ChunkRef, Digest, Entry, Envelope, Manifest, NodeId, UnixSeconds, PROTOCOL_VERSION,
};

use crate::db::ReleaseInfo;

/// How long a deploy command stays valid. An agent refuses an expired command, so a node
/// that comes back after this must be sent a fresh one.
pub const COMMAND_LIFETIME_SECS: u64 = 7 * 24 * 3600;

/// The summary stored next to a release.
pub fn summarize(manifest: &Manifest, envelope: &Envelope, now: UnixSeconds) -> ReleaseInfo {
    let files = manifest
        .entries
        .iter()
        .filter(|e| matches!(e, Entry::File { .. }))
        .count() as u64;
    ReleaseInfo {
        release: manifest.release_id(),
        kind: manifest.kind,
        files,
        bytes: manifest.total_size(),
        chunks: chunk_index(manifest).len() as u64,
        manifest_digest: envelope.payload_digest(),
        created_at: manifest.created_at,
        published_at: now,
    }
}

/// Every distinct chunk of a manifest by digest.
pub fn chunk_index(manifest: &Manifest) -> HashMap<Digest, ChunkRef> {
    manifest.chunks().map(|c| (c.digest, *c)).collect()
}

/// Whether two manifests describe the same release content. The build time is ignored, so
/// re-running `release publish` on an unchanged tree is harmless; anything else differing
/// (a file, a mode, a chunk, the kind) makes it a different release.
pub fn same_content(a: &Manifest, b: &Manifest) -> bool {
    a.format == b.format
        && a.app == b.app
        && a.version == b.version
        && a.kind == b.kind
        && a.entries == b.entries
}

#[derive(Debug, thiserror::Error)]
#[error("stored manifest envelope does not parse: {0}")]
pub struct StoredManifestError(String);

/// Reads back a manifest envelope this coordinator sealed and stored. The signature is not
/// checked: the bytes never left our own database (agents check it).
pub fn stored_manifest(envelope: &[u8]) -> Result<(Envelope, Manifest), StoredManifestError> {
    let envelope: Envelope =
        serde_json::from_slice(envelope).map_err(|e| StoredManifestError(e.to_string()))?;
    let payload = BASE64
        .decode(&envelope.payload)
        .map_err(|e| StoredManifestError(e.to_string()))?;
    let manifest =
        serde_json::from_slice(&payload).map_err(|e| StoredManifestError(e.to_string()))?;
    Ok((envelope, manifest))
}

/// The deploy command for one node, valid from `now` for [`COMMAND_LIFETIME_SECS`].
pub fn deploy_command(
    node: NodeId,
    seq: u64,
    now: UnixSeconds,
    manifest: Envelope,
    http_sources: Vec<String>,
) -> Command {
    Command {
        protocol: PROTOCOL_VERSION,
        node,
        seq,
        issued_at: now,
        expires_at: now + COMMAND_LIFETIME_SECS,
        action: Action::Deploy {
            manifest,
            http_sources,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use protocol::format::FORMAT_VERSION;
    use protocol::{AppName, RelPath, ReleaseKind, TrustedKeys, Version};

    fn manifest(created_at: u64, mode: u32) -> Manifest {
        let chunk = ChunkRef {
            digest: Digest::of(b"hello"),
            size: 5,
            zsize: 14,
        };
        Manifest {
            format: FORMAT_VERSION,
            app: AppName::new("web").expect("app"),
            version: Version::new("1").expect("version"),
            kind: ReleaseKind::App,
            created_at,
            entries: vec![
                Entry::File {
                    path: RelPath::new("a").expect("path"),
                    mode,
                    size: 5,
                    chunks: vec![chunk],
                },
                Entry::File {
                    path: RelPath::new("b").expect("path"),
                    mode,
                    size: 5,
                    chunks: vec![chunk],
                },
            ],
        }
    }

    #[test]
    fn a_rebuild_of_the_same_tree_is_the_same_release_but_a_changed_mode_is_not() {
        assert!(same_content(&manifest(1, 0o644), &manifest(2, 0o644)));
        assert!(!same_content(&manifest(1, 0o644), &manifest(1, 0o755)));
    }

    #[test]
    fn the_summary_counts_files_bytes_and_distinct_chunks() {
        let envelope = Envelope::seal(&manifest(1, 0o644), &SigningKey::from_bytes(&[7u8; 32]));
        let info = summarize(&manifest(1, 0o644), &envelope, 9);
        assert_eq!((info.files, info.bytes, info.chunks), (2, 10, 1));
        assert_eq!(info.manifest_digest, envelope.payload_digest());
        assert_eq!(info.published_at, 9);
    }

    #[test]
    fn a_stored_envelope_reads_back_and_the_command_opens_for_its_node() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let sealed = Envelope::seal(&manifest(1, 0o644), &key).to_bytes();
        let (envelope, read) = stored_manifest(&sealed).expect("reads back");
        assert_eq!(read, manifest(1, 0o644));
        let node = NodeId::new("n1").expect("node");
        let command = deploy_command(node.clone(), 3, 100, envelope, vec!["http://c".into()]);
        assert_eq!(command.expires_at, 100 + COMMAND_LIFETIME_SECS);
        let trust = TrustedKeys::new([key.verifying_key()]);
        let opened: Command = Envelope::seal(&command, &key).open(&trust).expect("opens");
        assert_eq!((opened.node, opened.seq), (node, 3));
        assert!(stored_manifest(b"{}").is_err());
    }
}
