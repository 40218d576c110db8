//! Assembling an image into a slot directory, and checking a slot against its manifest.
//!
//! Invariants: a slot directory either does not exist or holds the complete image. It is built
//! under a temp sibling name (`<slot>.partial-<pid>`), fsynced, and renamed into place; on any
//! error the temp directory is removed. Every chunk is checked against the manifest right
//! before it is written, whatever the [`ChunkSource`] promised, so unverified bytes never reach
//! a slot. The manifest is validated here too, so a caller that forgot cannot be led outside
//! the slot by a path or a symlink.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::manifest::MODE_MASK;
use protocol::{ChunkRef, Digest, Entry, Manifest, ManifestError, RelPath};

use crate::chunk::{self, ChunkError};
use crate::store::{ChunkStore, StoreError};
use crate::sync_dir;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssembleError {
    #[error("manifest refused: {0}")]
    Invalid(#[from] ManifestError),
    #[error("{path}: slot already exists; slots are never overwritten")]
    SlotExists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: chunk {digest} is in none of the chunk sources")]
    MissingChunk { path: RelPath, digest: Digest },
    /// The stored copy was bad and has been deleted from the store: fetching it again and
    /// retrying is the fix.
    #[error("stored chunk {digest} is corrupt and was removed from the store; fetch it again")]
    CorruptStoredChunk {
        digest: Digest,
        #[source]
        source: ChunkError,
    },
    /// A [`ChunkSource`] broke its contract by returning bytes that do not verify.
    /// The chunk's digest is in `source`.
    #[error("{path}: chunk source #{source_index} returned bytes that do not verify")]
    UnverifiedChunk {
        path: RelPath,
        source_index: usize,
        #[source]
        source: ChunkError,
    },
    #[error("slot does not match its manifest at {path}: {why}")]
    SlotMismatch { path: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Somewhere to get chunks from: the local chunk store, files of installed slots, a network
/// fetcher. Returns the verified uncompressed bytes, or `None` if this source lacks the chunk.
pub trait ChunkSource {
    fn read_chunk(&self, chunk: &ChunkRef) -> Result<Option<Vec<u8>>, AssembleError>;
}

impl ChunkSource for ChunkStore {
    fn read_chunk(&self, chunk: &ChunkRef) -> Result<Option<Vec<u8>>, AssembleError> {
        let Some(compressed) = self.get(&chunk.digest)? else {
            return Ok(None);
        };
        match chunk::decompress_verified(chunk, &compressed) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(source) => {
                // Left in place it would fail every later assembly and block a re-fetch.
                tracing::warn!(digest = %chunk.digest, error = %source, "removing corrupt stored chunk");
                self.remove(&chunk.digest)?;
                Err(AssembleError::CorruptStoredChunk {
                    digest: chunk.digest,
                    source,
                })
            }
        }
    }
}

/// Chunks already on disk inside installed slots, found by their manifests. Reading one
/// re-verifies it, since a slot file could have changed since it was installed; a chunk that
/// no longer matches is just unavailable here.
#[derive(Debug, Default)]
pub struct LocalChunks {
    by_digest: HashMap<Digest, Location>,
}

#[derive(Debug)]
struct Location {
    file: PathBuf,
    offset: u64,
}

impl LocalChunks {
    /// Indexes the chunks of each `(slot directory, manifest)`; the first place a chunk
    /// appears is where it will be read from.
    pub fn index(slots: &[(PathBuf, &Manifest)]) -> LocalChunks {
        let mut by_digest = HashMap::new();
        for (slot_dir, manifest) in slots {
            for entry in &manifest.entries {
                let Entry::File { path, chunks, .. } = entry else {
                    continue;
                };
                let file = slot_dir.join(path.as_str());
                let mut offset = 0u64;
                for chunk in chunks {
                    by_digest.entry(chunk.digest).or_insert_with(|| Location {
                        file: file.clone(),
                        offset,
                    });
                    offset += u64::from(chunk.size);
                }
            }
        }
        LocalChunks { by_digest }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.by_digest.contains_key(digest)
    }

    fn read_range(location: &Location, size: u32) -> io::Result<Vec<u8>> {
        let mut file = File::open(&location.file)?;
        file.seek(SeekFrom::Start(location.offset))?;
        let mut bytes = vec![0u8; size as usize];
        file.read_exact(&mut bytes)?;
        Ok(bytes)
    }
}

impl ChunkSource for LocalChunks {
    fn read_chunk(&self, chunk: &ChunkRef) -> Result<Option<Vec<u8>>, AssembleError> {
        let Some(location) = self.by_digest.get(&chunk.digest) else {
            return Ok(None);
        };
        // Never trust a claimed size to allocate before checking it is a possible chunk.
        if chunk.size as usize > protocol::format::MAX_CHUNK_SIZE {
            return Ok(None);
        }
        // Local data is only a shortcut: any failure means "fetch it instead".
        let bytes = match LocalChunks::read_range(location, chunk.size) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(digest = %chunk.digest, file = %location.file.display(), %error, "local chunk unreadable");
                return Ok(None);
            }
        };
        match chunk::verify_plain(chunk, &bytes) {
            Ok(()) => Ok(Some(bytes)),
            Err(error) => {
                tracing::warn!(digest = %chunk.digest, file = %location.file.display(), %error, "local chunk changed on disk");
                Ok(None)
            }
        }
    }
}

/// Unique chunks of `manifest` (first occurrence order) for which `have` is false: what must
/// be fetched before [`assemble`] can succeed.
pub fn missing_chunks(manifest: &Manifest, have: impl Fn(&Digest) -> bool) -> Vec<ChunkRef> {
    let mut seen = HashSet::new();
    manifest
        .chunks()
        .filter(|c| seen.insert(c.digest) && !have(&c.digest))
        .copied()
        .collect()
}

/// What an assembly wrote, so the caller can report how much came from local data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssembleStats {
    pub files: u64,
    /// Uncompressed bytes written to files.
    pub bytes_written: u64,
    /// Uncompressed bytes taken from each source, indexed like the `sources` argument.
    pub bytes_from: Vec<u64>,
}

/// Writes the image `manifest` describes into `slot_dir`, which must not exist yet, taking each
/// chunk from the first of `sources` that has it. See the module doc for the guarantees.
/// Only one assembly per slot may run at a time: it removes stale partials of the same slot.
pub fn assemble(
    manifest: &Manifest,
    slot_dir: &Path,
    sources: &[&dyn ChunkSource],
) -> Result<AssembleStats, AssembleError> {
    manifest.validate()?;
    if fs::symlink_metadata(slot_dir).is_ok() {
        return Err(AssembleError::SlotExists {
            path: slot_dir.to_owned(),
        });
    }
    let (parent, name) = match (slot_dir.parent(), slot_dir.file_name()) {
        (Some(parent), Some(name)) => (parent, name),
        _ => {
            return Err(io_err(slot_dir)(io::Error::other(
                "not a directory path with a parent",
            )))
        }
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let mut prefix = name.to_owned();
    prefix.push(".partial-");
    remove_stale_partials(parent, &prefix)?;
    let mut partial_name: OsString = prefix;
    partial_name.push(std::process::id().to_string());
    let partial = parent.join(partial_name);
    fs::create_dir(&partial).map_err(io_err(&partial))?;

    let result = write_tree(manifest, &partial, sources).and_then(|stats| {
        fs::rename(&partial, slot_dir).map_err(io_err(slot_dir))?;
        // The rename is the commit point; make it durable before reporting success.
        sync_dir(parent).map_err(io_err(parent))?;
        Ok(stats)
    });
    if result.is_err() {
        if let Err(error) = fs::remove_dir_all(&partial) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %partial.display(), %error, "could not remove partial slot");
            }
        }
    }
    result
}

fn remove_stale_partials(parent: &Path, prefix: &OsString) -> Result<(), AssembleError> {
    for entry in fs::read_dir(parent).map_err(io_err(parent))? {
        let entry = entry.map_err(io_err(parent))?;
        if entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(prefix.as_encoded_bytes())
        {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

fn write_tree(
    manifest: &Manifest,
    root: &Path,
    sources: &[&dyn ChunkSource],
) -> Result<AssembleStats, AssembleError> {
    let mut stats = AssembleStats {
        bytes_from: vec![0; sources.len()],
        ..AssembleStats::default()
    };
    let mut dirs = Vec::new();
    for entry in &manifest.entries {
        // Safe to join: validation made every path plain and relative, with only real
        // directories (never symlinks) as parents.
        let target = root.join(entry.path().as_str());
        match entry {
            Entry::Dir { mode, .. } => {
                fs::create_dir(&target).map_err(io_err(&target))?;
                dirs.push((target, *mode));
            }
            Entry::File {
                path, mode, chunks, ..
            } => {
                write_file(path, &target, *mode, chunks, sources, &mut stats)?;
                stats.files += 1;
            }
            Entry::Symlink { target: link, .. } => {
                symlink(link, &target).map_err(io_err(&target))?;
            }
        }
    }
    // Directory modes last and deepest first: a read-only directory must still accept its
    // children while they are created.
    for (dir, mode) in dirs.iter().rev() {
        fs::set_permissions(dir, Permissions::from_mode(mode & MODE_MASK)).map_err(io_err(dir))?;
        sync_dir(dir).map_err(io_err(dir))?;
    }
    sync_dir(root).map_err(io_err(root))?;
    Ok(stats)
}

/// Streams a file's chunks in order, one in memory at a time, verifying each before writing.
fn write_file(
    path: &RelPath,
    target: &Path,
    mode: u32,
    chunks: &[ChunkRef],
    sources: &[&dyn ChunkSource],
    stats: &mut AssembleStats,
) -> Result<(), AssembleError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(target)
        .map_err(io_err(target))?;
    for chunk in chunks {
        let mut found = None;
        for (index, source) in sources.iter().enumerate() {
            if let Some(bytes) = source.read_chunk(chunk)? {
                found = Some((index, bytes));
                break;
            }
        }
        let Some((index, bytes)) = found else {
            return Err(AssembleError::MissingChunk {
                path: path.clone(),
                digest: chunk.digest,
            });
        };
        chunk::verify_plain(chunk, &bytes).map_err(|source| AssembleError::UnverifiedChunk {
            path: path.clone(),
            source_index: index,
            source,
        })?;
        file.write_all(&bytes).map_err(io_err(target))?;
        stats.bytes_from[index] += bytes.len() as u64;
        stats.bytes_written += bytes.len() as u64;
    }
    // Only permission bits: a release cannot ask for setuid, setgid or sticky.
    file.set_permissions(Permissions::from_mode(mode & MODE_MASK))
        .map_err(io_err(target))?;
    file.sync_all().map_err(io_err(target))
}

/// Checks that `slot_dir` holds exactly the image `manifest` describes: every file's bytes,
/// modes and sizes, every directory's mode, every symlink's target, and nothing else. Used
/// after a crash to decide whether a slot can be trusted.
pub fn verify_slot(manifest: &Manifest, slot_dir: &Path) -> Result<(), AssembleError> {
    manifest.validate()?;
    let mismatch = |path: &str, why: String| AssembleError::SlotMismatch {
        path: path.to_owned(),
        why,
    };
    let expected: HashSet<&str> = manifest.entries.iter().map(|e| e.path().as_str()).collect();
    let mut dirs = vec![(slot_dir.to_owned(), String::new())];
    for entry in &manifest.entries {
        let rel = entry.path().as_str();
        let on_disk = slot_dir.join(rel);
        let meta = match fs::symlink_metadata(&on_disk) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(mismatch(rel, "missing".into()))
            }
            Err(e) => return Err(io_err(&on_disk)(e)),
        };
        let mode = meta.permissions().mode() & MODE_MASK;
        match entry {
            Entry::Dir { mode: want, .. } => {
                if !meta.is_dir() {
                    return Err(mismatch(rel, "not a directory".into()));
                }
                if mode != want & MODE_MASK {
                    return Err(mismatch(
                        rel,
                        format!("mode {mode:o}, want {:o}", want & MODE_MASK),
                    ));
                }
                dirs.push((on_disk, rel.to_owned()));
            }
            Entry::File {
                mode: want,
                size,
                chunks,
                ..
            } => {
                if !meta.is_file() {
                    return Err(mismatch(rel, "not a regular file".into()));
                }
                if mode != want & MODE_MASK {
                    return Err(mismatch(
                        rel,
                        format!("mode {mode:o}, want {:o}", want & MODE_MASK),
                    ));
                }
                if meta.len() != *size {
                    return Err(mismatch(rel, format!("{} bytes, want {size}", meta.len())));
                }
                let mut file = File::open(&on_disk).map_err(io_err(&on_disk))?;
                for chunk in chunks {
                    let mut bytes = vec![0u8; chunk.size as usize];
                    file.read_exact(&mut bytes).map_err(io_err(&on_disk))?;
                    chunk::verify_plain(chunk, &bytes)
                        .map_err(|e| mismatch(rel, format!("content differs: {e}")))?;
                }
            }
            Entry::Symlink { target, .. } => {
                if !meta.is_symlink() {
                    return Err(mismatch(rel, "not a symlink".into()));
                }
                let got = fs::read_link(&on_disk).map_err(io_err(&on_disk))?;
                if got.as_os_str() != target.as_str() {
                    return Err(mismatch(rel, format!("points to {got:?}, want {target:?}")));
                }
            }
        }
    }
    // Every real directory is in the manifest (checked above), so listing them finds any
    // entry the manifest does not name.
    for (dir, rel) in dirs {
        for child in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let name = child.map_err(io_err(&dir))?.file_name();
            let Some(name) = name.to_str() else {
                return Err(mismatch(
                    &rel,
                    format!("holds {name:?}, not in the manifest"),
                ));
            };
            let child_rel = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            if !expected.contains(child_rel.as_str()) {
                return Err(mismatch(&child_rel, "not in the manifest".into()));
            }
        }
    }
    Ok(())
}
