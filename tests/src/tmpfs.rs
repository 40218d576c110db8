//! A small tmpfs mounted for one test, so a node's disk can be made to run out.
//!
//! Mounted on the host (not in a private mount namespace) so the test reads and writes the
//! same files as the agent; unmounted on drop. Needs root and `mount`/`umount` (see
//! [`crate::privilege::require_root`]).

use std::cell::Cell;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::privilege::run_tool;

/// Linux's errno for "no space left on device".
const ENOSPC: i32 = 28;

/// A mounted tmpfs of a fixed size; unmounted on drop or by [`Tmpfs::unmount`].
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
    size: u64,
    mounted: Cell<bool>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes at `path` (created if needed).
    pub fn mount(path: &Path, size: u64) -> Result<Tmpfs> {
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let target = path.to_str().context("tmpfs mount point is not UTF-8")?;
        run_tool(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "fleet-test",
                target,
            ],
        )?;
        Ok(Tmpfs {
            path: path.to_owned(),
            size,
            mounted: Cell::new(true),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size it was mounted with.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes free for an unprivileged writer (`df --output=avail`).
    pub fn available(&self) -> Result<u64> {
        let target = self
            .path
            .to_str()
            .context("tmpfs mount point is not UTF-8")?;
        let out = run_tool("df", &["--output=avail", "-B1", target])?;
        out.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("cannot read `df --output=avail` of {target}: {out:?}"))
    }

    /// Writes `name` in the tmpfs until the disk is full, then gives `leave` bytes back:
    /// what another process filling the disk looks like. Returns the filler's size.
    pub fn fill(&self, name: &str, leave: u64) -> Result<u64> {
        let path = self.path.join(name);
        let mut file =
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let block = vec![0x5au8; 256 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(ENOSPC) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
            }
        }
        let size = written.saturating_sub(leave);
        file.set_len(size)
            .with_context(|| format!("truncating {}", path.display()))?;
        Ok(size)
    }

    /// Unmounts it now (its contents are gone); a no-op the second time. For an owner that
    /// must unmount before removing the directory around it while others still hold this.
    pub fn unmount(&self) {
        if !self.mounted.replace(false) {
            return;
        }
        let Some(target) = self.path.to_str() else {
            return;
        };
        // The processes using it are killed first; a lazy unmount covers a straggler.
        if let Err(e) = run_tool("umount", &[target]) {
            if let Err(lazy) = run_tool("umount", &["-l", target]) {
                eprintln!("unmounting tmpfs {target}: {e:#}; lazily: {lazy:#}");
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.unmount();
    }
}
