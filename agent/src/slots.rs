//! Slot directories and the active-version pointer.
//!
//! Layout under the data directory:
//! ```text
//! slots/<app>-<version>-<digest12>/   one immutable directory per installed release
//! current -> slots/<name>             the active version: a symlink, replaced by rename
//! ```
//! **Invariants**: a slot directory exists only once it is complete and verified (`images`
//! assembles into a `.partial-*` sibling and renames it). The pointer is moved with a single
//! `rename(2)` of a freshly made symlink, so a reader or a crash sees the old or the new target,
//! never none.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

pub struct Slots {
    data_dir: PathBuf,
}

impl Slots {
    pub fn open(data_dir: &Path) -> io::Result<Slots> {
        fs::create_dir_all(data_dir.join("slots"))?;
        Ok(Slots {
            data_dir: data_dir.to_owned(),
        })
    }

    pub fn dir(&self, slot: &str) -> PathBuf {
        self.data_dir.join("slots").join(slot)
    }

    fn pointer(&self) -> PathBuf {
        self.data_dir.join("current")
    }

    /// The slot the active pointer names, if any.
    pub fn active(&self) -> Option<String> {
        let target = fs::read_link(self.pointer()).ok()?;
        let name = target.file_name()?.to_str()?.to_owned();
        Some(name)
    }

    /// Moves the active pointer to `slot`: atomic, durable when it returns, idempotent.
    pub fn activate(&self, slot: &str) -> io::Result<()> {
        let tmp = self.data_dir.join(".current.tmp");
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        symlink(Path::new("slots").join(slot), &tmp)?;
        fs::rename(&tmp, self.pointer())?;
        fs::File::open(&self.data_dir)?.sync_all()
    }

    /// Removes every slot directory (and leftover partial directory) not named in `keep`.
    /// Returns the names removed.
    pub fn collect_garbage<'a>(
        &self,
        keep: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<Vec<String>> {
        let keep: Vec<&str> = keep.into_iter().collect();
        let mut removed = Vec::new();
        for entry in fs::read_dir(self.data_dir.join("slots"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A staging slot's partial directory belongs to it while it is being assembled.
            let owner = name.split(".partial").next().unwrap_or(&name);
            if keep.contains(&owner) {
                continue;
            }
            remove_slot_dir(&entry.path())?;
            removed.push(name);
        }
        Ok(removed)
    }
}

/// A release may ship directories without write permission (their modes come from the
/// manifest), which would stop `remove_dir_all`: give them back to the owner first.
fn remove_slot_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for entry in walk_dirs(path)? {
        let _ = fs::set_permissions(&entry, fs::Permissions::from_mode(0o700));
    }
    fs::remove_dir_all(path)
}

fn walk_dirs(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut dirs = vec![];
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        if fs::symlink_metadata(&dir)?.is_dir() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    stack.push(entry.path());
                }
            }
            dirs.push(dir);
        }
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pointer_moves_atomically_and_garbage_spares_the_kept_slots() {
        let data = tempfile::tempdir().unwrap();
        let slots = Slots::open(data.path()).unwrap();
        assert_eq!(slots.active(), None);
        for name in ["a", "b", "c", "c.partial-1", "d.partial-2"] {
            fs::create_dir(slots.dir(name)).unwrap();
        }
        slots.activate("a").unwrap();
        slots.activate("b").unwrap();
        slots.activate("b").unwrap();
        assert_eq!(slots.active().as_deref(), Some("b"));
        let mut removed = slots.collect_garbage(["b", "c"]).unwrap();
        removed.sort();
        assert_eq!(removed, ["a", "d.partial-2"]);
        assert!(slots.dir("c.partial-1").exists());
    }
}
