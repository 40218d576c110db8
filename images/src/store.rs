//! The chunk store: a directory of compressed chunks, one file per chunk.
//!
//! Layout: `<dir>/<first two hex digits>/<64 lowercase hex digits>`, the name being the BLAKE3
//! digest of the uncompressed chunk and the content its zstd frame. The fan-out keeps
//! directories small for stores holding a million chunks.
//!
//! Invariant: a chunk file appears under its final name only by an atomic rename of a fully
//! written temp file in the same directory, so no reader ever sees a half-written chunk and a
//! writer that dies leaves only a temp file (cleaned up by the next [`ChunkStore::open`] or
//! [`ChunkStore::open_cache`]). Files that go bad later (disk errors, tampering, a power cut)
//! are caught by the reader, who decodes with [`crate::chunk::decompress_verified`]; the store
//! itself never trusts its own files.
//!
//! Two durability modes share that one write path and differ only in fsync:
//!
//! - **Durable** ([`ChunkStore::open`]): the temp file is fsynced before the rename and the
//!   directory after it, so a chunk that was put survives a power cut intact. For a store that
//!   is the source of truth (the coordinator's).
//! - **Cache** ([`ChunkStore::open_cache`]): no fsync per chunk, which costs about a
//!   millisecond each. After a power cut a chunk may be missing, empty or torn under its final
//!   name. That is safe for a store whose chunks can be fetched again (the agent's fetch
//!   store) because nothing trusts a stored chunk: reading one through
//!   [`crate::assemble::ChunkSource`] decodes and verifies it, and a bad one is deleted and
//!   reported as [`crate::assemble::AssembleError::CorruptStoredChunk`] so it is fetched
//!   again; and the slot assembled from the chunks is itself fsynced before it is renamed into
//!   place, so durability is decided there, not here.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use protocol::format;
use protocol::{ChunkRef, Digest};

use crate::chunk::{self, ChunkError};
use crate::sync_dir;

/// Temp files start with this; no digest does, so listings can tell them apart.
const TEMP_PREFIX: &str = ".tmp.";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("chunk store: {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

impl StoreError {
    /// Whether this failed because the disk or the quota is full: retrying will fail the same
    /// way until space is freed.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => crate::disk::is_storage_full(source),
            StoreError::Chunk(_) => false,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A directory of compressed, content-addressed chunks. See the module doc for the layout
/// and the two durability modes.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
    /// Whether writes are fsynced (durable mode) or not (cache mode).
    durable: bool,
}

impl ChunkStore {
    /// Opens (creating if needed) the durable store at `dir`: every chunk put is on disk
    /// before the put returns. Deletes temp files left by writers that crashed: those whose
    /// process is gone. A live writer's temp file is left alone.
    pub fn open(dir: impl Into<PathBuf>) -> Result<ChunkStore, StoreError> {
        ChunkStore::open_with(dir.into(), true)
    }

    /// Opens (creating if needed) the store at `dir` in cache mode: the same layout and atomic
    /// rename as [`ChunkStore::open`], without the fsyncs. Only for chunks that can be fetched
    /// again; the module doc says why that is safe.
    pub fn open_cache(dir: impl Into<PathBuf>) -> Result<ChunkStore, StoreError> {
        ChunkStore::open_with(dir.into(), false)
    }

    fn open_with(dir: PathBuf, durable: bool) -> Result<ChunkStore, StoreError> {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let store = ChunkStore { dir, durable };
        for shard in store.shards()? {
            for entry in fs::read_dir(&shard).map_err(io_err(&shard))? {
                let entry = entry.map_err(io_err(&shard))?;
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(temp_file_pid) else {
                    continue;
                };
                if !Path::new("/proc").join(pid.to_string()).exists() {
                    let path = entry.path();
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
            }
        }
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the chunk named `digest` lives, whether or not it is there.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.path(digest)).is_ok_and(|m| m.is_file())
    }

    /// The compressed bytes stored for `digest`, unverified: pass them through
    /// [`chunk::decompress_verified`] before use. A file longer than any valid chunk is
    /// truncated to one byte over the limit, so that check fails without reading it all.
    pub fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(digest);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let limit = format::MAX_COMPRESSED_CHUNK_SIZE as u64 + 1;
        // Sized from the file up front (the length is only a hint, so still bounded by
        // `take`): growing the buffer by doubling would copy each chunk several times.
        let hint = file.metadata().map_or(0, |m| m.len()).min(limit);
        let mut bytes = Vec::with_capacity(hint as usize);
        file.take(limit)
            .read_to_end(&mut bytes)
            .map_err(io_err(&path))?;
        Ok(Some(bytes))
    }

    /// Stores a chunk that came from elsewhere, after checking it decodes to what `chunk`
    /// names. Bytes that do not verify are never written.
    pub fn put_verified(&self, chunk: &ChunkRef, compressed: &[u8]) -> Result<(), StoreError> {
        chunk::decompress_verified(chunk, compressed)?;
        self.write_atomically(&chunk.digest, compressed)
    }

    /// Stores a chunk without decoding it. Only for a caller that produced `compressed` itself
    /// with [`chunk::compress`] from bytes it hashed into `digest` (the image builder).
    pub fn put_trusted(&self, digest: &Digest, compressed: &[u8]) -> Result<(), StoreError> {
        self.write_atomically(digest, compressed)
    }

    /// Deletes a chunk; deleting one that is not there is not an error.
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Every chunk in the store, sorted. Temp files and anything else are ignored.
    pub fn digests(&self) -> Result<Vec<Digest>, StoreError> {
        let mut digests = Vec::new();
        for shard in self.shards()? {
            for entry in fs::read_dir(&shard).map_err(io_err(&shard))? {
                let entry = entry.map_err(io_err(&shard))?;
                let name = entry.file_name();
                if let Some(digest) = name.to_str().and_then(|n| n.parse::<Digest>().ok()) {
                    // A digest filed in the wrong shard would never be found by `path`.
                    if self.path(&digest) == entry.path() {
                        digests.push(digest);
                    }
                }
            }
        }
        digests.sort();
        Ok(digests)
    }

    /// The two-hex-digit subdirectories that exist.
    fn shards(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut shards = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let is_shard = entry.file_name().to_str().is_some_and(|n| {
                n.len() == 2 && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            });
            if is_shard && entry.file_type().is_ok_and(|t| t.is_dir()) {
                shards.push(entry.path());
            }
        }
        Ok(shards)
    }

    fn write_atomically(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = self.path(digest);
        let shard = path.parent().unwrap_or(&self.dir);
        match fs::create_dir(shard) {
            // A new shard is itself a directory entry that must survive a crash.
            Ok(()) if self.durable => sync_dir(&self.dir).map_err(io_err(&self.dir))?,
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(shard)(e)),
        }
        let temp = shard.join(format!(
            "{TEMP_PREFIX}{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(io_err(&temp))?;
            file.write_all(bytes).map_err(io_err(&temp))?;
            if self.durable {
                // Data first, then the name: after a crash the final name holds all of it or
                // does not exist.
                file.sync_all().map_err(io_err(&temp))?;
            }
            fs::rename(&temp, &path).map_err(io_err(&path))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
            return written;
        }
        if self.durable {
            sync_dir(shard).map_err(io_err(shard))?;
        }
        Ok(())
    }
}

/// The writer's pid, if `name` is one of our temp files.
fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    rest.split('.').next()?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stored(store: &ChunkStore, data: &[u8]) -> ChunkRef {
        let compressed = chunk::compress(data);
        let chunk = ChunkRef {
            digest: Digest::of(data),
            size: data.len() as u32,
            zsize: compressed.len() as u32,
        };
        store.put_verified(&chunk, &compressed).unwrap();
        chunk
    }

    #[test]
    fn put_get_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks")).unwrap();
        let a = stored(&store, b"alpha");
        let b = stored(&store, b"beta");
        assert!(store.contains(&a.digest));
        let got = store.get(&a.digest).unwrap().unwrap();
        assert_eq!(chunk::decompress_verified(&a, &got).unwrap(), b"alpha");
        let mut want = vec![a.digest, b.digest];
        want.sort();
        assert_eq!(store.digests().unwrap(), want);
        store.remove(&a.digest).unwrap();
        store.remove(&a.digest).unwrap();
        assert!(!store.contains(&a.digest));
        assert_eq!(store.get(&a.digest).unwrap(), None);
        assert_eq!(store.digests().unwrap(), vec![b.digest]);
    }

    #[test]
    fn bytes_that_do_not_verify_are_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let claim = ChunkRef {
            digest: Digest::of(b"wanted"),
            size: 6,
            zsize: 15,
        };
        let err = store
            .put_verified(&claim, &chunk::compress(b"forged"))
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::Chunk(ChunkError::DigestMismatch { .. })
        ));
        assert!(!store.contains(&claim.digest));
        assert!(store.digests().unwrap().is_empty());
    }

    #[test]
    fn temp_files_are_not_chunks_and_dead_writers_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let a = stored(&store, b"alpha");
        let shard = store.path(&a.digest).parent().unwrap().to_owned();
        // pid 0 is never a process that could still be writing.
        let dead = shard.join(format!("{TEMP_PREFIX}0.7"));
        let live = shard.join(format!("{TEMP_PREFIX}{}.7", std::process::id()));
        fs::write(&dead, b"half").unwrap();
        fs::write(&live, b"half").unwrap();
        assert_eq!(store.digests().unwrap(), vec![a.digest]);
        ChunkStore::open(dir.path()).unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
