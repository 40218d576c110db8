//! Pure release and command logic: summarising a manifest, telling whether a re-publish is the
//! same release, checking a release's mirror list and that its run command ships in it,
//! reading back a stored envelope, and building and sealing a node's commands: stage and
//! deploy (with the HTTP sources they list, in order) and rollback.
//!
//! No I/O and no clock: `now` is a parameter, so every rule here is tested without a database.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use protocol::format;
use protocol::messages::{Action, Command};
use protocol::{
    ChunkRef, Digest, Entry, Envelope, Manifest, NodeId, ReleaseId, UnixSeconds, PROTOCOL_VERSION,
};

use crate::config::{self, BaseUrlError};
use crate::db::{NodeRecord, ReleaseInfo};

/// How long a command (deploy or rollback) stays valid. An agent refuses an expired command, so a node
/// that comes back after this must be sent a fresh one.
pub const COMMAND_LIFETIME_SECS: u64 = 7 * 24 * 3600;

/// Most mirrors one release lists. Agents try them one after another for a chunk none has,
/// so a long list only delays the fall-back to the coordinator and MQTT.
pub const MAX_MIRRORS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorsError {
    /// Not a source: the message already carries it.
    #[error("{0}; give the http:// or https:// base URL that serves {{URL}}/chunks/{{digest}}")]
    Url(BaseUrlError),
    #[error("{0} mirrors listed; a release lists at most {MAX_MIRRORS}")]
    TooMany(usize),
}

/// A release's mirror list as an operator gave it: each URL checked like `--public-url`
/// ([`config::parse_base_url`]), trailing `/` dropped, duplicates removed keeping the first, the
/// order otherwise kept (agents try mirrors in this order).
pub fn mirror_list<S: AsRef<str>>(urls: &[S]) -> Result<Vec<String>, MirrorsError> {
    let mut mirrors: Vec<String> = Vec::with_capacity(urls.len());
    for url in urls {
        let url = config::parse_base_url(url.as_ref()).map_err(MirrorsError::Url)?;
        if !mirrors.contains(&url) {
            mirrors.push(url);
        }
    }
    if mirrors.len() > MAX_MIRRORS {
        return Err(MirrorsError::TooMany(mirrors.len()));
    }
    Ok(mirrors)
}

/// The `http_sources` of a deploy command: the release's mirrors in order, then this
/// coordinator's public URL (unless it is already listed as a mirror). Agents try them in this
/// order and fall back to MQTT last.
pub fn http_sources(mirrors: &[String], public_url: &str) -> Vec<String> {
    let mut sources = mirrors.to_vec();
    if !sources.iter().any(|m| m == public_url) {
        sources.push(public_url.to_owned());
    }
    sources
}

/// The summary stored next to a release.
pub fn summarize(
    manifest: &Manifest,
    envelope: &Envelope,
    mirrors: Vec<String>,
    now: UnixSeconds,
) -> ReleaseInfo {
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
        mirrors,
        run: manifest.run.clone(),
        rollout: None,
        canary: None,
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
        && a.run == b.run
}

#[derive(Debug, thiserror::Error)]
#[error("stored manifest envelope does not parse: {0}")]
pub struct StoredManifestError(String);

/// Reads back a manifest envelope this coordinator sealed and stored. The signature is not
/// checked: the bytes never left our own database (agents check it).
pub fn stored_manifest(envelope: &[u8]) -> Result<(Envelope, Manifest), StoredManifestError> {
    stored_payload(envelope)
}

/// Reads back a command envelope this coordinator sealed and stored (a node's desired
/// command), unchecked like [`stored_manifest`].
pub fn stored_command(envelope: &[u8]) -> Result<Command, StoredManifestError> {
    stored_payload(envelope).map(|(_, command)| command)
}

fn stored_payload<T: serde::de::DeserializeOwned>(
    envelope: &[u8],
) -> Result<(Envelope, T), StoredManifestError> {
    let envelope: Envelope =
        serde_json::from_slice(envelope).map_err(|e| StoredManifestError(e.to_string()))?;
    let payload = BASE64
        .decode(&envelope.payload)
        .map_err(|e| StoredManifestError(e.to_string()))?;
    let value = serde_json::from_slice(&payload).map_err(|e| StoredManifestError(e.to_string()))?;
    Ok((envelope, value))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the command for node {node} is {bytes} bytes sealed, too large for MQTT")]
pub struct CommandTooLarge {
    pub node: NodeId,
    pub bytes: usize,
}

/// Signs a command into the envelope bytes stored as the node's desired command and
/// published; refuses one that would not fit an MQTT packet.
pub fn seal_command(command: &Command, key: &SigningKey) -> Result<Vec<u8>, CommandTooLarge> {
    let sealed = Envelope::seal(command, key).to_bytes();
    if sealed.len() > format::MAX_MQTT_PACKET - 4096 {
        return Err(CommandTooLarge {
            node: command.node.clone(),
            bytes: sealed.len(),
        });
    }
    Ok(sealed)
}

/// A command for one node, valid from `now` for [`COMMAND_LIFETIME_SECS`].
pub fn command(node: NodeId, seq: u64, now: UnixSeconds, action: Action) -> Command {
    Command {
        protocol: PROTOCOL_VERSION,
        node,
        seq,
        issued_at: now,
        expires_at: now + COMMAND_LIFETIME_SECS,
        action,
    }
}

/// The deploy command for one node, valid from `now` for [`COMMAND_LIFETIME_SECS`]. (A
/// rollout sends `Stage` and then `Deploy` of the same manifest, built with [`command`].)
pub fn deploy_command(
    node: NodeId,
    seq: u64,
    now: UnixSeconds,
    manifest: Envelope,
    http_sources: Vec<String>,
) -> Command {
    command(
        node,
        seq,
        now,
        Action::Deploy {
            manifest,
            http_sources,
        },
    )
}

/// The command that sends one node back to its previous version, valid from `now` for
/// [`COMMAND_LIFETIME_SECS`].
pub fn rollback_command(node: NodeId, seq: u64, now: UnixSeconds) -> Command {
    command(node, seq, now, Action::Rollback {})
}

/// Why a node is not sent a rollback. The agent refuses one it cannot carry out anyway; the
/// coordinator refuses up front what the node's last report already rules out, so the
/// operator hears it at once rather than as a node event later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RollbackRefused {
    #[error("{0} is not in the inventory")]
    Unknown(NodeId),
    #[error(
        "{0} has not reported its versions yet, so it is not known to have a previous version"
    )]
    NoReport(NodeId),
    #[error("{0} has no previous version to roll back to")]
    NoPrevious(NodeId),
}

/// Where a rollback takes a node, by its last report: from its current version (if any) to
/// its previous one.
pub fn rollback_target(
    node: &NodeId,
    record: Option<&NodeRecord>,
) -> Result<(Option<ReleaseId>, ReleaseId), RollbackRefused> {
    let record = record.ok_or_else(|| RollbackRefused::Unknown(node.clone()))?;
    let state = record
        .state
        .as_ref()
        .ok_or_else(|| RollbackRefused::NoReport(node.clone()))?;
    let previous = state
        .previous
        .as_ref()
        .ok_or_else(|| RollbackRefused::NoPrevious(node.clone()))?;
    let current = state.current.as_ref().map(|c| c.release.clone());
    Ok((current, previous.release.clone()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunCommandError {
    #[error("run.command {0:?} is not a file of the release; put the program in the source directory, or give the absolute path of one installed on the nodes")]
    Missing(String),
    #[error("run.command {0:?} is a directory of the release, not a program")]
    Directory(String),
    #[error("run.command {command:?} is not executable (mode {mode:o}); `chmod +x` it and publish again")]
    NotExecutable { command: String, mode: u32 },
}

/// Checks that a release's run command is a program it ships, so a typo is refused at publish
/// rather than found by every node failing to start the version. An absolute command is a
/// program on the node (not checkable here); with a `start` hook the agent does not run the
/// command itself; a symlink is resolved on the node.
pub fn check_run_command(manifest: &Manifest) -> Result<(), RunCommandError> {
    let Some(run) = &manifest.run else {
        return Ok(());
    };
    let started_by_hook = run.hooks.as_ref().is_some_and(|h| h.start.is_some());
    if run.command.starts_with('/') || started_by_hook {
        return Ok(());
    }
    let command = &run.command;
    match manifest
        .entries
        .iter()
        .find(|e| e.path().as_str() == command)
    {
        None => Err(RunCommandError::Missing(command.clone())),
        Some(Entry::Dir { .. }) => Err(RunCommandError::Directory(command.clone())),
        Some(Entry::File { mode, .. }) if mode & 0o111 == 0 => {
            Err(RunCommandError::NotExecutable {
                command: command.clone(),
                mode: *mode,
            })
        }
        Some(Entry::File { .. } | Entry::Symlink { .. }) => Ok(()),
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
            run: None,
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
        let info = summarize(&manifest(1, 0o644), &envelope, vec!["http://m".into()], 9);
        assert_eq!((info.files, info.bytes, info.chunks), (2, 10, 1));
        assert_eq!(info.mirrors, ["http://m"]);
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
        let sealed = seal_command(&command, &key).expect("fits");
        assert_eq!(stored_command(&sealed).expect("reads back"), command);
    }

    #[test]
    fn a_rollback_command_carries_no_manifest_and_expires_like_a_deploy() {
        let command = rollback_command(NodeId::new("n1").expect("node"), 7, 100);
        assert_eq!(command.action, Action::Rollback {});
        assert_eq!((command.seq, command.issued_at), (7, 100));
        assert_eq!(command.expires_at, 100 + COMMAND_LIFETIME_SECS);
    }

    #[test]
    fn a_rollback_needs_a_known_node_whose_last_report_has_a_previous_version() {
        use protocol::messages::{NodeState, SlotReport};
        let node = NodeId::new("n1").expect("node");
        let slot = |version: &str| SlotReport {
            release: ReleaseId::new(
                AppName::new("web").expect("app"),
                Version::new(version).expect("version"),
            ),
            manifest_digest: Digest::of(version.as_bytes()),
            slot_dir: format!("/slots/{version}"),
        };
        let mut state = NodeState {
            protocol: PROTOCOL_VERSION,
            node: node.clone(),
            labels: Default::default(),
            agent_version: "a".into(),
            current: Some(slot("2")),
            previous: None,
            staged: None,
            staging: None,
            last_update: None,
            last_seq: 3,
            reported_at: 1,
        };
        let record = |state: &NodeState| NodeRecord {
            state: Some(state.clone()),
            ..NodeRecord::default()
        };
        assert_eq!(
            rollback_target(&node, None),
            Err(RollbackRefused::Unknown(node.clone()))
        );
        assert_eq!(
            rollback_target(&node, Some(&NodeRecord::default())),
            Err(RollbackRefused::NoReport(node.clone()))
        );
        let refused = rollback_target(&node, Some(&record(&state))).expect_err("no previous");
        assert_eq!(
            refused.to_string(),
            "n1 has no previous version to roll back to"
        );
        state.previous = Some(slot("1"));
        assert_eq!(
            rollback_target(&node, Some(&record(&state))),
            Ok((Some(slot("2").release), slot("1").release))
        );
    }

    fn with_run(command: &str, mode: u32) -> Manifest {
        let mut m = manifest(1, mode);
        m.entries.insert(
            0,
            Entry::Dir {
                path: RelPath::new("bin").expect("path"),
                mode: 0o755,
            },
        );
        m.run = Some(
            serde_json::from_value(serde_json::json!({
                "command": command,
                "front_door": { "listen": "0.0.0.0:8080" }
            }))
            .expect("run spec"),
        );
        m
    }

    #[test]
    fn the_run_command_must_be_an_executable_the_release_ships_or_an_absolute_path() {
        assert_eq!(check_run_command(&manifest(1, 0o644)), Ok(()));
        assert_eq!(check_run_command(&with_run("a", 0o755)), Ok(()));
        assert_eq!(
            check_run_command(&with_run("/usr/bin/python3", 0o644)),
            Ok(())
        );
        assert_eq!(
            check_run_command(&with_run("bin/app", 0o755)),
            Err(RunCommandError::Missing("bin/app".into()))
        );
        assert_eq!(
            check_run_command(&with_run("bin", 0o755)),
            Err(RunCommandError::Directory("bin".into()))
        );
        let error = check_run_command(&with_run("a", 0o644)).expect_err("not executable");
        assert_eq!(
            error.to_string(),
            "run.command \"a\" is not executable (mode 644); `chmod +x` it and publish again"
        );
    }

    #[test]
    fn mirrors_keep_their_order_lose_duplicates_and_are_checked_like_the_public_url() {
        let mirrors = mirror_list(&[
            "https://cdn.example/fleet/",
            "http://m2:8080",
            "https://cdn.example/fleet",
        ])
        .expect("valid");
        assert_eq!(mirrors, ["https://cdn.example/fleet", "http://m2:8080"]);
        assert!(matches!(
            mirror_list(&["ftp://m"]),
            Err(MirrorsError::Url(_))
        ));
        let many: Vec<String> = (0..=MAX_MIRRORS).map(|i| format!("http://m{i}")).collect();
        assert_eq!(
            mirror_list(&many),
            Err(MirrorsError::TooMany(MAX_MIRRORS + 1))
        );
        assert_eq!(
            mirror_list::<&str>(&[]).expect("empty"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn deploy_sources_are_the_mirrors_in_order_then_the_coordinator_once() {
        let mirrors = vec!["https://a".to_owned(), "https://b".to_owned()];
        assert_eq!(
            http_sources(&mirrors, "http://c:7070"),
            ["https://a", "https://b", "http://c:7070"]
        );
        let with_self = vec!["http://c:7070".to_owned(), "https://a".to_owned()];
        assert_eq!(
            http_sources(&with_self, "http://c:7070"),
            ["http://c:7070", "https://a"]
        );
        assert_eq!(http_sources(&[], "http://c:7070"), ["http://c:7070"]);
    }
}
