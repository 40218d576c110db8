//! Assembling an image into a slot directory, and checking a slot against its manifest.
//!
//! Invariants: a slot directory either does not exist or holds the complete image. It is built
//! under a temp sibling name (`<slot>.partial-<pid>`) and renamed into place; on any error the
//! temp directory is removed. [`assemble`] leaves the slot complete in the page cache;
//! [`make_durable`] is the barrier that puts it on disk, and a slot must pass it before it
//! becomes the active version (after a power loss an assembled slot that never passed it may
//! hold anything, so a caller re-checks such a slot with [`verify_slot`]). Sources hand out chunks as [`VerifiedChunk`]s, which
//! only [`crate::chunk`] can make and only by hashing, and each one is confirmed to be the
//! manifest's chunk right before it is written, whatever the [`ChunkSource`] is, so unverified
//! bytes never reach a slot and no chunk is hashed twice. The manifest is validated here too,
//! so a caller that forgot cannot be led outside the slot by a path or a symlink.
//!
//! **Unchanged files are shared, not copied.** When a source offers an installed file with
//! exactly a manifest file's chunk list and mode ([`ChunkSource::linkable`], answered by
//! [`LocalChunks`]), that file is hard-linked into the new slot after its bytes are read back
//! and checked chunk by chunk against the manifest; if the check or the link fails (changed
//! bytes, another filesystem, too many links, no permission) the file is written as usual.
//! Sharing an inode between slots is safe because slots are immutable: nothing writes to an
//! installed slot's files, so neither slot can change the other's bytes, and a file's mode is
//! part of what must match. Removing an old slot only drops its names.
//!
//! **Throughput.** Writing a file is a two-stage pipeline: the calling thread creates the
//! tree and gets each verified chunk from the sources (for a store: read, decode, hash); a
//! writer thread confirms each chunk is the one the manifest names and writes it. Memory stays
//! bounded whatever the image size: at most `CHUNKS_IN_FLIGHT` (8) decoded chunks wait for
//! the writer. Assembly does not wait for the disk: staging ends when the slot is complete
//! and verified, and the disk's work is [`make_durable`]'s, which a caller runs in the
//! background right after and waits for only before the switch (a release staged ahead of
//! its switch pays nothing then). It fsyncs every file before the directories, and the
//! directories before the slot's parent, which holds the rename.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;

use protocol::manifest::MODE_MASK;
use protocol::{ChunkRef, Digest, Entry, Manifest, ManifestError, RelPath};

use crate::chunk::{self, ChunkError, VerifiedChunk};
use crate::store::{ChunkStore, StoreError};
use crate::sync_dir;

/// Decoded chunks that may wait for the writer thread (each at most
/// [`protocol::format::MAX_CHUNK_SIZE`], so at most 2 MiB of chunk data in flight). Enough to
/// ride out a slow write without stalling the decoder.
const CHUNKS_IN_FLIGHT: usize = 8;

/// Threads fsyncing a slot's files at once in [`make_durable`]. They only wait on the disk;
/// one alone leaves it idle between a file's data write and its journal commit. Making 210 MB
/// of 2 MB files durable on ext4 (virtio disk, busy 2-core machine) took 0.7-1.1 s with 1
/// thread, 0.6-0.7 s with 3, 0.4-0.6 s with 4, and no less with 8.
const SYNC_THREADS: usize = 4;

/// Disk space allowed per manifest entry on top of file contents in
/// [`slot_bytes_needed`]. Filesystems allocate in blocks (4 KiB on ext4, xfs and most
/// others): the last block of a file is allocated whole, a directory takes at least one block,
/// a symlink whose target does not fit in the inode takes one, and every name makes its
/// parent directory grow. One block per entry covers each of these.
const ENTRY_ALLOWANCE_BYTES: u64 = 4096;

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
    /// A [`ChunkSource`] broke its contract by returning another chunk than the one asked
    /// for. The chunk's digest is in `source`.
    #[error("{path}: chunk source #{source_index} returned another chunk than the one asked for")]
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

impl AssembleError {
    /// Whether this failed because the disk or the quota is full (in the slot or in the chunk
    /// store): retrying will fail the same way until space is freed.
    pub fn is_storage_full(&self) -> bool {
        match self {
            AssembleError::Io { source, .. } => crate::disk::is_storage_full(source),
            AssembleError::Store(error) => error.is_storage_full(),
            _ => false,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Somewhere to get chunks from: the local chunk store, files of installed slots, a network
/// fetcher.
pub trait ChunkSource {
    /// The uncompressed bytes of `chunk`, verified against it, or `None` if this source
    /// lacks it.
    fn read_chunk(&self, chunk: &ChunkRef) -> Result<Option<VerifiedChunk>, AssembleError>;

    /// A file on disk holding exactly `chunks` (the same digests in the same order) with
    /// permission bits `mode`, that [`assemble`] may hard-link into a new slot instead of
    /// writing the file. Offer only files that are never modified in place (those of
    /// installed slots): a link shares the inode. [`assemble`] re-reads and verifies the file
    /// before linking it, so a wrong answer costs time, never correctness. Default: none.
    fn linkable(&self, _chunks: &[ChunkRef], _mode: u32) -> Option<&Path> {
        None
    }
}

impl ChunkSource for ChunkStore {
    fn read_chunk(&self, chunk: &ChunkRef) -> Result<Option<VerifiedChunk>, AssembleError> {
        let Some(compressed) = self.get(&chunk.digest)? else {
            return Ok(None);
        };
        match VerifiedChunk::decompress(chunk, &compressed) {
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

/// Chunks and whole files already on disk inside installed slots, found by their manifests.
/// Reading a chunk re-verifies it, since a slot file could have changed since it was
/// installed; a chunk that no longer matches is just unavailable here. A whole file offered
/// by [`LocalChunks::linkable`] is likewise verified by [`assemble`] before it is linked.
#[derive(Debug, Default)]
pub struct LocalChunks {
    by_digest: HashMap<Digest, Location>,
    files: HashMap<FileKey, PathBuf>,
}

#[derive(Debug)]
struct Location {
    file: PathBuf,
    offset: u64,
}

/// A file's identity for linking: a hash of its chunk digests in order, and its permission
/// bits. Equal keys mean equal contents (BLAKE3 is collision resistant) and equal modes, in
/// 36 bytes whatever the file size.
#[derive(Debug, PartialEq, Eq, Hash)]
struct FileKey {
    chunks: [u8; 32],
    mode: u32,
}

impl FileKey {
    fn new(chunks: &[ChunkRef], mode: u32) -> FileKey {
        let mut hasher = blake3::Hasher::new();
        for chunk in chunks {
            hasher.update(chunk.digest.as_bytes());
        }
        FileKey {
            chunks: *hasher.finalize().as_bytes(),
            mode: mode & MODE_MASK,
        }
    }
}

impl LocalChunks {
    /// Indexes the chunks and files of each `(slot directory, manifest)`; the first place a
    /// chunk or file appears is where it will be read or linked from.
    pub fn index(slots: &[(PathBuf, &Manifest)]) -> LocalChunks {
        let mut by_digest = HashMap::new();
        let mut files = HashMap::new();
        for (slot_dir, manifest) in slots {
            for entry in &manifest.entries {
                let Entry::File {
                    path, mode, chunks, ..
                } = entry
                else {
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
                files.entry(FileKey::new(chunks, *mode)).or_insert(file);
            }
        }
        LocalChunks { by_digest, files }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.by_digest.contains_key(digest)
    }

    /// The installed file whose manifest entry has exactly `chunks` (digests in order) and
    /// permission bits `mode`, if any: a candidate for a hard link. Unverified; [`assemble`]
    /// checks its bytes before linking.
    pub fn linkable(&self, chunks: &[ChunkRef], mode: u32) -> Option<&Path> {
        self.files
            .get(&FileKey::new(chunks, mode))
            .map(PathBuf::as_path)
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
    fn read_chunk(&self, chunk: &ChunkRef) -> Result<Option<VerifiedChunk>, AssembleError> {
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
        match VerifiedChunk::check(chunk, bytes) {
            Ok(verified) => Ok(Some(verified)),
            Err(error) => {
                tracing::warn!(digest = %chunk.digest, file = %location.file.display(), %error, "local chunk changed on disk");
                Ok(None)
            }
        }
    }

    fn linkable(&self, chunks: &[ChunkRef], mode: u32) -> Option<&Path> {
        LocalChunks::linkable(self, chunks, mode)
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

/// Disk space the slot for `manifest` will take when assembled with `local` among the
/// sources: the contents of every file that cannot be hard-linked from an installed slot,
/// plus 4096 bytes per entry for blocks and metadata (see `ENTRY_ALLOWANCE_BYTES`). Compare it with
/// [`crate::disk::available_space`] before staging. It assumes offered links succeed; a link
/// that fails falls back to writing the file, needing its size more. Chunks still to be
/// fetched need room in the chunk store as well (their `zsize`), which this does not count.
pub fn slot_bytes_needed(manifest: &Manifest, local: &LocalChunks) -> u64 {
    manifest.entries.iter().fold(0u64, |total, entry| {
        let contents = match entry {
            Entry::File {
                mode, size, chunks, ..
            } if local.linkable(chunks, *mode).is_none() => *size,
            _ => 0,
        };
        total
            .saturating_add(contents)
            .saturating_add(ENTRY_ALLOWANCE_BYTES)
    })
}

/// What an assembly did, so the caller can report how much came from local data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssembleStats {
    /// Regular files in the slot, written or linked.
    pub files: u64,
    /// Uncompressed bytes written to files.
    pub bytes_written: u64,
    /// Uncompressed bytes written from each source, indexed like the `sources` argument.
    pub bytes_from: Vec<u64>,
    /// Bytes of files hard-linked from installed slots instead of written (verified by
    /// hash first); not counted in `bytes_written` or `bytes_from`.
    pub bytes_linked: u64,
}

/// Writes the image `manifest` describes into `slot_dir`, which must not exist yet, taking each
/// chunk from the first of `sources` that has it and hard-linking unchanged files a source
/// offers. See the module doc for the guarantees. Only one assembly per slot may run at a
/// time: it removes stale partials of the same slot.
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
        // The commit point for this process and any other; `make_durable` makes it one for
        // a power loss too.
        fs::rename(&partial, slot_dir).map_err(io_err(slot_dir))?;
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

/// A file being written by the pipeline, shared by the messages that carry its chunks.
struct OpenFile {
    file: File,
    /// Where it is on disk, for errors.
    target: PathBuf,
    /// Its image path, for errors.
    path: RelPath,
    mode: u32,
}

/// What the calling thread sends the writer thread, in file order.
enum WriteOp {
    /// Confirm `bytes` are `chunk` and append them to `file`.
    Chunk {
        file: Arc<OpenFile>,
        chunk: ChunkRef,
        bytes: VerifiedChunk,
        source_index: usize,
    },
    /// Every chunk of `file` has been sent: set its mode and close it.
    Finish(Arc<OpenFile>),
}

/// Why a pipeline stage stopped before the end.
enum Stop {
    Failed(AssembleError),
    /// The next stage hung up, which it does only when it has failed: its error is the one
    /// to report.
    NextStageGone,
}

impl From<AssembleError> for Stop {
    fn from(error: AssembleError) -> Stop {
        Stop::Failed(error)
    }
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
    run_pipeline(root, |to_writer| {
        produce(manifest, root, sources, to_writer, &mut stats, &mut dirs)
    })?;
    // Directory modes last and deepest first: a read-only directory must still accept its
    // children while they are created.
    for (dir, mode) in dirs.iter().rev() {
        fs::set_permissions(dir, Permissions::from_mode(mode & MODE_MASK)).map_err(io_err(dir))?;
    }
    Ok(stats)
}

/// Runs `feed` on the calling thread with the writer thread behind it, and returns once both
/// have stopped (so nothing writes under `root` any more): `Ok` if both finished, else the
/// error that stopped the first stage that failed.
fn run_pipeline(
    root: &Path,
    feed: impl FnOnce(&SyncSender<WriteOp>) -> Result<(), Stop>,
) -> Result<(), AssembleError> {
    let outcomes = thread::scope(|scope| {
        let (to_writer, writer_inbox) = mpsc::sync_channel(CHUNKS_IN_FLIGHT);
        let writer = scope.spawn(move || write_files(writer_inbox));
        let fed = feed(&to_writer);
        // Closing the channel is how the writer learns there is no more work.
        drop(to_writer);
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        [fed, written]
    });
    // A stage that only saw the next one hang up is not the cause.
    let mut next_stage_gone = false;
    for outcome in outcomes {
        match outcome {
            Ok(()) => {}
            Err(Stop::Failed(error)) => return Err(error),
            Err(Stop::NextStageGone) => next_stage_gone = true,
        }
    }
    if next_stage_gone {
        return Err(io_err(root)(io::Error::other(
            "assembly pipeline stopped without an error (a bug in images::assemble)",
        )));
    }
    Ok(())
}

/// The calling thread's stage: creates directories and symlinks, links unchanged files, and
/// feeds every other file's chunks, in order, to the writer.
fn produce(
    manifest: &Manifest,
    root: &Path,
    sources: &[&dyn ChunkSource],
    to_writer: &SyncSender<WriteOp>,
    stats: &mut AssembleStats,
    dirs: &mut Vec<(PathBuf, u32)>,
) -> Result<(), Stop> {
    for entry in &manifest.entries {
        // Safe to join: validation made every path plain and relative, with only real
        // directories (never symlinks) as parents.
        let target = root.join(entry.path().as_str());
        match entry {
            Entry::Dir { mode, .. } => {
                fs::create_dir(&target).map_err(io_err(&target))?;
                dirs.push((target, *mode));
            }
            Entry::Symlink { target: link, .. } => {
                symlink(link, &target).map_err(io_err(&target))?;
            }
            Entry::File {
                path,
                mode,
                size,
                chunks,
            } => {
                stats.files += 1;
                if link_unchanged(path, &target, *mode, chunks, sources) {
                    stats.bytes_linked += size;
                    continue;
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_err(&target))?;
                let file = Arc::new(OpenFile {
                    file,
                    target,
                    path: path.clone(),
                    mode: *mode,
                });
                for chunk in chunks {
                    let (source_index, bytes) = read_from_sources(path, chunk, sources)?;
                    stats.bytes_from[source_index] += bytes.len() as u64;
                    stats.bytes_written += bytes.len() as u64;
                    let op = WriteOp::Chunk {
                        file: Arc::clone(&file),
                        chunk: *chunk,
                        bytes,
                        source_index,
                    };
                    to_writer.send(op).map_err(|_| Stop::NextStageGone)?;
                }
                to_writer
                    .send(WriteOp::Finish(file))
                    .map_err(|_| Stop::NextStageGone)?;
            }
        }
    }
    Ok(())
}

/// The chunk from the first source that has it, and that source's index.
fn read_from_sources(
    path: &RelPath,
    chunk: &ChunkRef,
    sources: &[&dyn ChunkSource],
) -> Result<(usize, VerifiedChunk), AssembleError> {
    for (index, source) in sources.iter().enumerate() {
        if let Some(bytes) = source.read_chunk(chunk)? {
            return Ok((index, bytes));
        }
    }
    Err(AssembleError::MissingChunk {
        path: path.clone(),
        digest: chunk.digest,
    })
}

/// The writer thread's stage: confirms each chunk is the manifest's right before appending it
/// to its file.
fn write_files(inbox: Receiver<WriteOp>) -> Result<(), Stop> {
    for op in inbox {
        match op {
            WriteOp::Chunk {
                file,
                chunk,
                bytes,
                source_index,
            } => {
                bytes
                    .confirm(&chunk)
                    .map_err(|source| AssembleError::UnverifiedChunk {
                        path: file.path.clone(),
                        source_index,
                        source,
                    })?;
                (&file.file)
                    .write_all(&bytes)
                    .map_err(io_err(&file.target))?;
            }
            WriteOp::Finish(file) => {
                // Only permission bits: a release cannot ask for setuid, setgid or sticky.
                file.file
                    .set_permissions(Permissions::from_mode(file.mode & MODE_MASK))
                    .map_err(io_err(&file.target))?;
            }
        }
    }
    Ok(())
}

/// The durability barrier for a slot [`assemble`] made: returns once every file, directory
/// and the rename into place are on disk. Cheap when the kernel has already written the
/// slot back (a release staged ahead of its switch), and idempotent, so a caller may run it
/// in the background after assembly and again, to be sure, before the switch.
pub fn make_durable(manifest: &Manifest, slot_dir: &Path) -> Result<(), AssembleError> {
    manifest.validate()?;
    let files: Vec<PathBuf> = manifest
        .entries
        .iter()
        .filter(|entry| matches!(entry, Entry::File { .. }))
        .map(|entry| slot_dir.join(entry.path().as_str()))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    thread::scope(|scope| {
        let syncers: Vec<_> = (0..SYNC_THREADS.min(files.len()))
            .map(|_| {
                scope.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let Some(path) = files.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(());
                        };
                        if let Err(error) = sync_file(path) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(io_err(path)(error));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        syncers.into_iter().try_for_each(|syncer| {
            syncer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })?;
    // Deepest first, the slot itself last: a name is durable once its directory is.
    let mut dirs: Vec<PathBuf> = manifest
        .entries
        .iter()
        .filter(|entry| matches!(entry, Entry::Dir { .. }))
        .map(|entry| slot_dir.join(entry.path().as_str()))
        .collect();
    dirs.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
    dirs.push(slot_dir.to_owned());
    if let Some(parent) = slot_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        dirs.push(parent.to_owned());
    }
    for dir in &dirs {
        sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(())
}

/// Fsyncs one file of a slot. A release may ship a file its owner cannot read (mode 0200),
/// which cannot be opened to be fsynced on its own: the whole filesystem is synced instead.
fn sync_file(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(file) => file.sync_all(),
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
            let dir = File::open(path.parent().unwrap_or(Path::new(".")))?;
            rustix::fs::syncfs(&dir).map_err(io::Error::from)
        }
        Err(error) => Err(error),
    }
}

/// Why an offered file was not linked; the file is written instead.
#[derive(Debug, thiserror::Error)]
enum NotLinked {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("it no longer matches its manifest: {0}")]
    Changed(String),
}

/// Hard-links the file a source offers for `chunks` and `mode` to `target`, if one verifies.
/// Returns whether it did; on `false` the file is to be written as usual.
fn link_unchanged(
    path: &RelPath,
    target: &Path,
    mode: u32,
    chunks: &[ChunkRef],
    sources: &[&dyn ChunkSource],
) -> bool {
    for source in sources {
        let Some(installed) = source.linkable(chunks, mode) else {
            continue;
        };
        match link_verified(installed, target, mode, chunks) {
            Ok(()) => return true,
            Err(NotLinked::Changed(why)) => {
                tracing::warn!(%path, installed = %installed.display(), %why, "installed file changed on disk; writing it instead of linking");
            }
            Err(NotLinked::Io(error)) => {
                tracing::debug!(%path, installed = %installed.display(), %error, "could not link installed file; writing it instead");
            }
        }
    }
    false
}

/// Verifies that `installed` holds exactly `chunks` with permission bits `mode`, then links
/// it to `target` and checks the new name is that same verified inode (the installed path
/// could have been swapped for something else, even a symlink, between the two steps).
fn link_verified(
    installed: &Path,
    target: &Path,
    mode: u32,
    chunks: &[ChunkRef],
) -> Result<(), NotLinked> {
    let mut file = File::open(installed)?;
    let meta = file.metadata()?;
    let size: u64 = chunks.iter().map(|c| u64::from(c.size)).sum();
    if !meta.is_file() {
        return Err(NotLinked::Changed("not a regular file".into()));
    }
    // All mode bits, so a file that gained setuid is not shared into a new slot.
    let on_disk = meta.permissions().mode() & 0o7777;
    if on_disk != mode & MODE_MASK {
        return Err(NotLinked::Changed(format!(
            "mode {on_disk:o}, want {:o}",
            mode & MODE_MASK
        )));
    }
    if meta.len() != size {
        return Err(NotLinked::Changed(format!(
            "{} bytes, want {size}",
            meta.len()
        )));
    }
    let mut buffer = Vec::new();
    for chunk in chunks {
        // The manifest was validated, so every size is at most one chunk.
        buffer.resize(chunk.size as usize, 0);
        file.read_exact(&mut buffer)?;
        chunk::verify_plain(chunk, &buffer).map_err(|e| NotLinked::Changed(e.to_string()))?;
    }
    fs::hard_link(installed, target)?;
    let linked = fs::symlink_metadata(target)?;
    if linked.dev() != meta.dev() || linked.ino() != meta.ino() {
        fs::remove_file(target)?;
        return Err(NotLinked::Changed(
            "replaced while it was being verified".into(),
        ));
    }
    Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs::OpenOptions;

    use rustix::io::Errno;

    use super::*;

    fn os_error(errno: Errno) -> io::Error {
        io::Error::from_raw_os_error(errno.raw_os_error())
    }

    /// Files whose writes fail (opened read-only: EBADF), fed to the pipeline far beyond what
    /// its channel holds, must stop both stages and report the write error, not hang.
    #[test]
    fn a_failed_write_stops_the_whole_pipeline_with_its_error() {
        let chunk = ChunkRef {
            digest: Digest::of(b"x"),
            size: 1,
            zsize: 10,
        };
        let byte = VerifiedChunk::check(&chunk, b"x".to_vec()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let read_only = dir.path().join("read-only");
        fs::write(&read_only, b"").unwrap();
        let (done, outcome) = mpsc::channel();
        thread::spawn(move || {
            let result = run_pipeline(Path::new("/slot"), |to_writer| {
                for n in 0..CHUNKS_IN_FLIGHT * 10 {
                    let file = Arc::new(OpenFile {
                        file: File::open(&read_only).unwrap(),
                        target: PathBuf::from(format!("/slot/file{n}")),
                        path: RelPath::new(format!("file{n}")).unwrap(),
                        mode: 0o600,
                    });
                    let op = WriteOp::Chunk {
                        file: Arc::clone(&file),
                        chunk,
                        bytes: byte.clone(),
                        source_index: 0,
                    };
                    to_writer.send(op).map_err(|_| Stop::NextStageGone)?;
                    to_writer
                        .send(WriteOp::Finish(file))
                        .map_err(|_| Stop::NextStageGone)?;
                }
                Ok(())
            });
            done.send(result).unwrap();
        });
        let result = outcome
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the pipeline hung after a failed write");
        match result {
            Err(AssembleError::Io { path, source }) => {
                assert_eq!(path, PathBuf::from("/slot/file0"));
                assert_eq!(source.raw_os_error(), Some(Errno::BADF.raw_os_error()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn disk_full_and_quota_errors_are_storage_full_wherever_they_are_wrapped() {
        let path = PathBuf::from("/slots/web-1.partial-1/f");
        // A real ENOSPC, as a write into a full slot would see it.
        let real = OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
            .write_all(b"x")
            .unwrap_err();
        let full = [
            io_err(&path)(real),
            io_err(&path)(os_error(Errno::DQUOT)),
            AssembleError::Store(StoreError::Io {
                path: path.clone(),
                source: os_error(Errno::NOSPC),
            }),
        ];
        for error in &full {
            assert!(error.is_storage_full(), "{error:?}");
        }
        let other = [
            io_err(&path)(os_error(Errno::IO)),
            AssembleError::Store(StoreError::Io {
                path: path.clone(),
                source: os_error(Errno::ACCESS),
            }),
            AssembleError::SlotExists { path },
            AssembleError::Store(StoreError::Chunk(ChunkError::DigestMismatch {
                expected: Digest::of(b"a"),
                got: Digest::of(b"b"),
            })),
        ];
        for error in &other {
            assert!(!error.is_storage_full(), "{error:?}");
        }
    }
}
