//! The durable record of the node's state: a sled database under `DATA/journal`.
//!
//! **Invariant**: every [`Journal::save`] is flushed to disk before it returns, and callers
//! save before they act on (or acknowledge) the state they saved. sled alone only makes
//! writes durable at `flush()`, so nothing here skips it.
//!
//! Verified manifests of installed and staged releases are kept beside the state, keyed by
//! manifest digest, so that a restart can re-verify slots and reuse their chunks.
//! The telemetry buffer lives in a tree of its own ([`Journal::telemetry_tree`]).
//! `DATA/status.json` is a read-only snapshot for `agent status` (sled locks its directory,
//! so a second process cannot open the journal while the agent runs).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use protocol::{Digest, Envelope};

use crate::node::NodeState;

const STATE_KEY: &[u8] = b"state";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "cannot open the journal at {path}: {source} (is another agent running with this --data?)"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error("journal write failed: {0}")]
    Write(#[from] sled::Error),
    #[error("journal holds unreadable state: {0}; move {1} aside to start this node afresh")]
    Corrupt(serde_json::Error, PathBuf),
}

pub struct Journal {
    db: sled::Db,
    manifests: sled::Tree,
    path: PathBuf,
}

impl Journal {
    pub fn open(data_dir: &Path) -> Result<Journal, JournalError> {
        let path = data_dir.join("journal");
        let db = sled::Config::new()
            .path(&path)
            // The agent's footprint matters more than read speed: the state is a few KiB.
            .cache_capacity(512 * 1024)
            // Every write here and in the telemetry buffer is flushed by its caller, so sled's
            // background flusher (a thread waking every 500 ms) would only cost wake-ups.
            .flush_every_ms(None)
            .open()
            .map_err(|source| JournalError::Open {
                path: path.clone(),
                source,
            })?;
        let manifests = db.open_tree("manifests")?;
        Ok(Journal {
            db,
            manifests,
            path,
        })
    }

    pub fn load(&self) -> Result<NodeState, JournalError> {
        match self.db.get(STATE_KEY)? {
            None => Ok(NodeState::default()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| JournalError::Corrupt(e, self.path.clone())),
        }
    }

    /// Writes and flushes the state. Returns only once it is on disk.
    pub fn save(&self, state: &NodeState) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(state).expect("node state always serializes");
        self.db.insert(STATE_KEY, bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// The tree holding the telemetry buffer (see `telemetry::buffer`), in the same database
    /// so that the agent keeps one sled instance, one cache and one flush discipline.
    pub fn telemetry_tree(&self) -> Result<sled::Tree, JournalError> {
        Ok(self.db.open_tree("telemetry")?)
    }

    /// Stores a manifest envelope (already verified by the caller); flushed with the next save.
    pub fn put_manifest(&self, digest: &Digest, envelope: &Envelope) -> Result<(), JournalError> {
        self.manifests
            .insert(digest.as_bytes(), envelope.to_bytes())?;
        Ok(())
    }

    pub fn manifest(&self, digest: &Digest) -> Result<Option<Envelope>, JournalError> {
        Ok(self
            .manifests
            .get(digest.as_bytes())?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Drops manifests no longer referenced by `keep`.
    pub fn retain_manifests(&self, keep: &[Digest]) -> Result<(), JournalError> {
        for key in self.manifests.iter().keys() {
            let key = key?;
            if !keep.iter().any(|d| d.as_bytes().as_slice() == key.as_ref()) {
                self.manifests.remove(key)?;
            }
        }
        Ok(())
    }
}

/// Replaces `path` with `bytes` so that readers see the old or the new content, never a mix:
/// write a sibling temp file, fsync it, rename it over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeState;

    #[test]
    fn saved_state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let state = NodeState {
            last_seq: 42,
            ..NodeState::default()
        };
        {
            let journal = Journal::open(dir.path()).unwrap();
            assert_eq!(journal.load().unwrap(), NodeState::default());
            journal.save(&state).unwrap();
        }
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.load().unwrap().last_seq, 42);
    }
}
