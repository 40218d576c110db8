//! The release manifest: what a release is, signed as a whole.
//!
//! A manifest names its app and version, lists every entry of the file tree (directories,
//! files with their modes and chunk lists, symlinks) in an order where each parent comes
//! before its children, and carries the image format version. [`Manifest::validate`] is the
//! single gate for untrusted manifests: after it passes, every path is a plain relative path
//! inside the slot and every symlink resolves inside the slot.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::envelope::Signed;
use crate::format::{self, FORMAT_VERSION};
use crate::names::{AppName, ReleaseId, Version};
use crate::run::{RunSpec, RunSpecError};
use crate::{Digest, UnixSeconds};

/// A path inside an image: relative, `/`-separated, no empty, `.` or `..` components, no NUL
/// or backslash. It can only name something inside the slot it is joined to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("path {path:?} is not allowed: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("symlink {path:?} -> {target:?} points outside the release")]
    EscapingSymlink { path: String, target: String },
    #[error("manifest is image format {found}, this build reads format {FORMAT_VERSION}; upgrade the agent or rebuild the release")]
    UnsupportedFormat { found: u32 },
    #[error("{path:?} appears twice")]
    Duplicate { path: String },
    #[error("{path:?} comes before its parent directory")]
    OrphanEntry { path: String },
    #[error("file {path:?}: {why}")]
    BadFile { path: String, why: String },
    #[error("manifest has {count} entries, over the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("release is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error(transparent)]
    Run(#[from] RunSpecError),
}

impl RelPath {
    pub fn new(path: impl Into<String>) -> Result<RelPath, ManifestError> {
        let path = path.into();
        let bad = |why| {
            Err(ManifestError::BadPath {
                path: path.chars().take(200).collect(),
                why,
            })
        };
        if path.is_empty() {
            return bad("empty");
        }
        if path.len() > format::MAX_PATH_BYTES {
            return bad("longer than 4096 bytes");
        }
        if path.starts_with('/') {
            return bad("absolute");
        }
        if path.contains('\0') || path.contains('\\') {
            return bad("contains NUL or backslash");
        }
        for component in path.split('/') {
            match component {
                "" => return bad("empty component"),
                "." => return bad("contains '.'"),
                ".." => return bad("contains '..'"),
                _ => {}
            }
        }
        Ok(RelPath(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<&str> {
        self.0.rsplit_once('/').map(|(parent, _)| parent)
    }
}

impl TryFrom<String> for RelPath {
    type Error = ManifestError;
    fn try_from(value: String) -> Result<Self, ManifestError> {
        RelPath::new(value)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseKind {
    #[default]
    App,
    Content,
}

/// One chunk of a file: its digest (BLAKE3 of the uncompressed bytes) and sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub digest: Digest,
    /// Uncompressed size in bytes.
    pub size: u32,
    /// Compressed (zstd frame) size in bytes.
    pub zsize: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Entry {
    Dir {
        path: RelPath,
        mode: u32,
    },
    File {
        path: RelPath,
        mode: u32,
        size: u64,
        chunks: Vec<ChunkRef>,
    },
    Symlink {
        path: RelPath,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &RelPath {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Symlink { path, .. } => {
                path
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub app: AppName,
    pub version: Version,
    #[serde(default)]
    pub kind: ReleaseKind,
    pub created_at: UnixSeconds,
    pub entries: Vec<Entry>,
    /// How the release runs; `None` for files only (the switch flips the pointer and runs
    /// nothing). Left out of the JSON when absent, so files-only manifests are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSpec>,
}

impl Signed for Manifest {
    const PAYLOAD_TYPE: &'static str = "application/vnd.fleet.manifest.v1+json";
    const MAX_PAYLOAD_BYTES: usize = format::MAX_MANIFEST_BYTES;
}

/// Only the permission bits (and setuid/setgid/sticky are dropped: a release cannot ask for them).
pub const MODE_MASK: u32 = 0o777;

impl Manifest {
    pub fn release_id(&self) -> ReleaseId {
        ReleaseId::new(self.app.clone(), self.version.clone())
    }

    /// Every chunk of every file, in order, duplicates included.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.entries.iter().flat_map(|e| match e {
            Entry::File { chunks, .. } => chunks.as_slice(),
            _ => &[],
        })
    }

    /// Total uncompressed size of all files.
    pub fn total_size(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// The gate for untrusted manifests; see the module doc for what holds after it passes.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedFormat { found: self.format });
        }
        if let Some(run) = &self.run {
            run.validate()?;
        }
        if self.entries.len() > format::MAX_ENTRIES {
            return Err(ManifestError::TooManyEntries {
                count: self.entries.len(),
                limit: format::MAX_ENTRIES,
            });
        }
        let mut dirs: HashSet<&str> = HashSet::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut total: u64 = 0;
        for entry in &self.entries {
            let path = entry.path().as_str();
            if !seen.insert(path) {
                return Err(ManifestError::Duplicate { path: path.into() });
            }
            if let Some(parent) = entry.path().parent() {
                if !dirs.contains(parent) {
                    return Err(ManifestError::OrphanEntry { path: path.into() });
                }
            }
            match entry {
                Entry::Dir { .. } => {
                    dirs.insert(path);
                }
                Entry::File { size, chunks, .. } => {
                    let bad = |why: String| ManifestError::BadFile {
                        path: path.into(),
                        why,
                    };
                    let mut sum: u64 = 0;
                    for c in chunks {
                        if c.size == 0 || c.size as usize > format::MAX_CHUNK_SIZE {
                            return Err(bad(format!(
                                "chunk {} has size {}",
                                c.digest.short(),
                                c.size
                            )));
                        }
                        if c.zsize == 0 || c.zsize as usize > format::MAX_COMPRESSED_CHUNK_SIZE {
                            return Err(bad(format!(
                                "chunk {} has compressed size {}",
                                c.digest.short(),
                                c.zsize
                            )));
                        }
                        sum += u64::from(c.size);
                    }
                    if sum != *size {
                        return Err(bad(format!("size {size} but its chunks add up to {sum}")));
                    }
                    total = total.saturating_add(sum);
                }
                Entry::Symlink { target, .. } => {
                    if !symlink_stays_inside(entry.path(), target) {
                        return Err(ManifestError::EscapingSymlink {
                            path: path.into(),
                            target: target.chars().take(200).collect(),
                        });
                    }
                }
            }
        }
        if total > format::MAX_IMAGE_BYTES {
            return Err(ManifestError::TooLarge {
                size: total,
                limit: format::MAX_IMAGE_BYTES,
            });
        }
        Ok(())
    }
}

/// Whether a symlink at `link` with `target` resolves, lexically, to a place inside the slot
/// (the slot root itself included). Absolute targets never do. Because every other entry is a
/// plain path and every symlink is checked the same way, no chain of links can leave the slot.
pub fn symlink_stays_inside(link: &RelPath, target: &str) -> bool {
    if target.is_empty()
        || target.starts_with('/')
        || target.contains('\0')
        || target.len() > format::MAX_PATH_BYTES
    {
        return false;
    }
    let mut depth: usize = link.as_str().matches('/').count();
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => depth += 1,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            app: AppName::new("app").unwrap(),
            version: Version::new("1").unwrap(),
            kind: ReleaseKind::App,
            created_at: 0,
            entries,
            run: None,
        }
    }

    #[test]
    fn paths_that_leave_the_slot_are_refused() {
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "",
            "a\\b",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<RelPath>("\"../../etc\"").is_err());
        assert_eq!(p("a/b/c").parent(), Some("a/b"));
        assert_eq!(p("a").parent(), None);
    }

    #[test]
    fn symlinks_are_resolved_lexically_against_their_directory() {
        assert!(symlink_stays_inside(&p("a/link"), "../b"));
        assert!(symlink_stays_inside(&p("a/link"), ".."));
        assert!(symlink_stays_inside(&p("link"), "dir/file"));
        assert!(!symlink_stays_inside(&p("link"), ".."));
        assert!(!symlink_stays_inside(&p("a/link"), "../../b"));
        assert!(!symlink_stays_inside(&p("a/link"), "b/../../../x"));
        assert!(!symlink_stays_inside(&p("link"), "/etc/passwd"));
    }

    #[test]
    fn validate_refuses_orphans_duplicates_and_lying_sizes() {
        let file = |path: &str, size: u64| Entry::File {
            path: p(path),
            mode: 0o644,
            size,
            chunks: vec![ChunkRef {
                digest: Digest::of(b"x"),
                size: 1,
                zsize: 10,
            }],
        };
        assert!(manifest(vec![file("a", 1)]).validate().is_ok());
        assert!(matches!(
            manifest(vec![file("d/a", 1)]).validate(),
            Err(ManifestError::OrphanEntry { .. })
        ));
        assert!(matches!(
            manifest(vec![file("a", 1), file("a", 1)]).validate(),
            Err(ManifestError::Duplicate { .. })
        ));
        assert!(matches!(
            manifest(vec![file("a", 2)]).validate(),
            Err(ManifestError::BadFile { .. })
        ));
        let link = Entry::Symlink {
            path: p("l"),
            target: "../x".into(),
        };
        assert!(matches!(
            manifest(vec![link]).validate(),
            Err(ManifestError::EscapingSymlink { .. })
        ));
        let mut m = manifest(vec![]);
        m.format = 99;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::UnsupportedFormat { found: 99 })
        ));
    }
}
