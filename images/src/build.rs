//! Building an image: a source directory in, a [`Manifest`] and stored chunks out.
//!
//! Invariants of the result: entries are in a deterministic order (depth first, siblings
//! sorted by file name bytes, each directory before its children), so the same tree always
//! gives the same entry list; every chunk a file lists is in the store; and the manifest has
//! passed [`Manifest::validate`]. Anything the format cannot carry faithfully (special files,
//! non-UTF-8 names, symlinks leaving the tree) is refused here, naming the path, rather than
//! dropped or rewritten.

use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use fastcdc::v2020::StreamCDC;
use protocol::format::{self, FORMAT_VERSION};
use protocol::manifest::{symlink_stays_inside, MODE_MASK};
use protocol::{
    AppName, ChunkRef, Digest, Entry, Manifest, ManifestError, RelPath, ReleaseKind, Version,
};

use crate::chunk;
use crate::store::{ChunkStore, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: the image source must be a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path}: is a {kind}; an image holds only directories, regular files and symlinks")]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{path}: name or symlink target is not UTF-8")]
    NonUtf8 { path: PathBuf },
    #[error("{path}: cannot be an image path")]
    BadPath {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("{path}: symlink to {target:?} leaves the image; image rejected at build time")]
    EscapingSymlink { path: PathBuf, target: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("built manifest is not valid: {0}")]
    Invalid(#[from] ManifestError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Builds the image of the tree at `src` (the root itself is not an entry), storing its chunks
/// in `store` and returning the validated manifest. Symlinks are recorded, never followed;
/// hard links become independent regular files.
pub fn build_image(
    src: &Path,
    app: AppName,
    version: Version,
    kind: ReleaseKind,
    store: &ChunkStore,
) -> Result<Manifest, BuildError> {
    if !fs::metadata(src).map_err(io_err(src))?.is_dir() {
        return Err(BuildError::NotADirectory {
            path: src.to_owned(),
        });
    }
    let mut entries = Vec::new();
    // An explicit stack rather than recursion: depth is bounded only by the path length.
    // Children are pushed in reverse so they pop in sorted order, right after their parent.
    let mut stack: Vec<(PathBuf, String)> = sorted_children(src, "")?.into_iter().rev().collect();
    while let Some((abs, rel)) = stack.pop() {
        let path = RelPath::new(rel.as_str()).map_err(|source| BuildError::BadPath {
            path: abs.clone(),
            source,
        })?;
        let meta = fs::symlink_metadata(&abs).map_err(io_err(&abs))?;
        let file_type = meta.file_type();
        let mode = meta.permissions().mode() & MODE_MASK;
        if file_type.is_dir() {
            entries.push(Entry::Dir { path, mode });
            stack.extend(sorted_children(&abs, &rel)?.into_iter().rev());
        } else if file_type.is_file() {
            let (size, chunks) = chunk_file(&abs, store)?;
            entries.push(Entry::File {
                path,
                mode,
                size,
                chunks,
            });
        } else if file_type.is_symlink() {
            let target = fs::read_link(&abs).map_err(io_err(&abs))?;
            let target = target
                .to_str()
                .ok_or_else(|| BuildError::NonUtf8 { path: abs.clone() })?
                .to_owned();
            if !symlink_stays_inside(&path, &target) {
                return Err(BuildError::EscapingSymlink { path: abs, target });
            }
            entries.push(Entry::Symlink { path, target });
        } else {
            let kind = if file_type.is_fifo() {
                "FIFO"
            } else if file_type.is_socket() {
                "socket"
            } else if file_type.is_block_device() || file_type.is_char_device() {
                "device"
            } else {
                "special file"
            };
            return Err(BuildError::Unsupported { path: abs, kind });
        }
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        app,
        version,
        kind,
        // A clock before 1970 is not worth failing a build over; the field is informational.
        created_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        entries,
        run: None,
    };
    manifest.validate()?;
    Ok(manifest)
}

/// The children of `dir` as (absolute path, image path), sorted by file name bytes.
fn sorted_children(dir: &Path, rel: &str) -> Result<Vec<(PathBuf, String)>, BuildError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        names.push(entry.map_err(io_err(dir))?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names
        .into_iter()
        .map(|name| {
            let abs = dir.join(&name);
            let name = name
                .to_str()
                .ok_or_else(|| BuildError::NonUtf8 { path: abs.clone() })?;
            let rel = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            Ok((abs, rel))
        })
        .collect()
}

/// Cuts one file into content-defined chunks and stores each new one. Memory stays at about
/// one maximum-size chunk whatever the file size.
fn chunk_file(path: &Path, store: &ChunkStore) -> Result<(u64, Vec<ChunkRef>), BuildError> {
    let file = File::open(path).map_err(io_err(path))?;
    let params = format::CHUNKER;
    let mut size = 0u64;
    let mut chunks = Vec::new();
    for piece in StreamCDC::new(file, params.min_size, params.avg_size, params.max_size) {
        let piece = piece.map_err(|e| io_err(path)(e.into()))?;
        let digest = Digest::of(&piece.data);
        // Compressed even when already stored, so `zsize` depends only on the bytes and the
        // manifest does not vary with what happened to be in the store.
        let compressed = chunk::compress(&piece.data);
        if !store.contains(&digest) {
            store.put_trusted(&digest, &compressed)?;
        }
        // Both fit: the chunker never cuts more than `max_size` bytes, and zstd's worst case
        // for that is `MAX_COMPRESSED_CHUNK_SIZE`.
        chunks.push(ChunkRef {
            digest,
            size: piece.data.len() as u32,
            zsize: compressed.len() as u32,
        });
        size += piece.data.len() as u64;
    }
    Ok((size, chunks))
}
