//! Serving the files of the app's own root (its release slot) at `GET /files/{path}`.
//!
//! **Invariant:** only regular files whose canonical path lies inside the canonical root are
//! opened. A request path with `..`, a root or a drive prefix is refused before touching the
//! disk; a path that passes that check is canonicalized (resolving every symlink) and refused
//! if it lands outside the root. The check and the open are two steps, so a symlink swapped
//! in between could escape; release slots are immutable, which is what makes this enough.
//!
//! Bodies are streamed in [`STREAM_CHUNK`]-sized reads, never read whole into memory, so
//! one request for a multi-gigabyte file costs a few MiB at most.

use std::path::{Component, Path, PathBuf};

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::io::ReaderStream;

/// Size of each read while streaming a file. Large enough that per-read overhead (a
/// blocking-pool hop per read in tokio's file) stays small at GB/s, small enough that many
/// concurrent downloads stay cheap.
pub const STREAM_CHUNK: usize = 1 << 20;

/// Why a requested file is not served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("path {0:?} escapes the served root")]
    Escapes(String),
    #[error("no file {0:?} under the served root")]
    NotFound(String),
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
    #[error("cannot read {path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl FileError {
    fn status(&self) -> StatusCode {
        match self {
            FileError::Escapes(_) => StatusCode::FORBIDDEN,
            FileError::NotFound(_) | FileError::NotAFile(_) => StatusCode::NOT_FOUND,
            FileError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for FileError {
    fn into_response(self) -> Response {
        (self.status(), format!("{self}\n")).into_response()
    }
}

/// Checks a request path lexically: only plain names (and `.`), no `..`, no absolute path.
/// Returns the path relative to the root.
pub fn lexically_contained(request: &str) -> Result<PathBuf, FileError> {
    let mut relative = PathBuf::new();
    for component in Path::new(request).components() {
        match component {
            Component::Normal(name) => relative.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(FileError::Escapes(request.to_owned()))
            }
        }
    }
    Ok(relative)
}

/// Resolves `request` to a regular file inside `canonical_root` (which must already be
/// canonical), following symlinks only as far as they stay inside it.
pub async fn resolve(canonical_root: &Path, request: &str) -> Result<PathBuf, FileError> {
    let relative = lexically_contained(request)?;
    let joined = canonical_root.join(relative);
    let canonical = match tokio::fs::canonicalize(&joined).await {
        Ok(path) => path,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(FileError::NotFound(request.to_owned()))
        }
        Err(source) => {
            return Err(FileError::Io {
                path: request.to_owned(),
                source,
            })
        }
    };
    if !canonical.starts_with(canonical_root) {
        return Err(FileError::Escapes(request.to_owned()));
    }
    Ok(canonical)
}

/// Answers `GET /files/{request}`: the file's bytes as a stream, with its length.
pub async fn serve(canonical_root: &Path, request: &str) -> Result<Response, FileError> {
    let path = resolve(canonical_root, request).await?;
    let io = |source| FileError::Io {
        path: request.to_owned(),
        source,
    };
    // Checked before opening as well as after: opening a FIFO would block until a writer
    // shows up, and a directory is not something to stream.
    if !tokio::fs::metadata(&path).await.map_err(io)?.is_file() {
        return Err(FileError::NotAFile(request.to_owned()));
    }
    let file = tokio::fs::File::open(&path).await.map_err(io)?;
    let metadata = file.metadata().await.map_err(io)?;
    if !metadata.is_file() {
        return Err(FileError::NotAFile(request.to_owned()));
    }
    let body = Body::from_stream(ReaderStream::with_capacity(file, STREAM_CHUNK));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, metadata.len().to_string()),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths_pass_the_lexical_check() {
        assert_eq!(
            lexically_contained("a/./b/c.bin").unwrap(),
            PathBuf::from("a/b/c.bin")
        );
        assert_eq!(lexically_contained("a//b").unwrap(), PathBuf::from("a/b"));
    }

    #[test]
    fn parent_and_absolute_paths_fail_the_lexical_check() {
        for bad in ["..", "../x", "a/../../x", "a/..", "/etc/passwd"] {
            assert!(
                matches!(lexically_contained(bad), Err(FileError::Escapes(_))),
                "{bad} should be refused"
            );
        }
    }

    #[tokio::test]
    async fn symlinks_are_followed_only_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let root_dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(root_dir.path()).unwrap();
        std::fs::write(root.join("real"), b"r").unwrap();
        std::os::unix::fs::symlink("real", root.join("inside")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("outside")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("outdir")).unwrap();

        assert_eq!(resolve(&root, "inside").await.unwrap(), root.join("real"));
        assert!(matches!(
            resolve(&root, "outside").await,
            Err(FileError::Escapes(_))
        ));
        assert!(matches!(
            resolve(&root, "outdir/secret").await,
            Err(FileError::Escapes(_))
        ));
        assert!(matches!(
            resolve(&root, "missing").await,
            Err(FileError::NotFound(_))
        ));
    }
}
