//! Disk space: how much is free, how full the disk is, and whether an error means the disk
//! (or the quota) is full.
//!
//! These let a caller plan a stage before writing anything ([`available_space`] against
//! [`crate::assemble::slot_bytes_needed`]) and, when a write fails anyway, tell "no space
//! left" (retrying cannot help until something is deleted) from every other I/O error;
//! [`used_percent`] is what the agent reports in its health telemetry.

use std::io;
use std::path::Path;

use rustix::io::Errno;

/// Bytes an unprivileged process can still write on the filesystem holding `path`:
/// `statvfs`'s `f_bavail * f_frsize`. Blocks reserved for root are not counted, so the figure
/// is what the agent can rely on even when it runs as root.
pub fn available_space(path: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// How full the filesystem holding `path` is, as a percentage of the space an unprivileged
/// process could use, the way `df` shows it: used blocks / (used + `f_bavail`) × 100. Blocks
/// reserved for root count as neither, so a disk reads 100 % when the agent can no longer
/// write to it.
pub fn used_percent(path: &Path) -> io::Result<f64> {
    let stat = rustix::fs::statvfs(path)?;
    let used = stat.f_blocks.saturating_sub(stat.f_bfree);
    let usable = used.saturating_add(stat.f_bavail);
    if usable == 0 {
        return Ok(0.0);
    }
    Ok(used as f64 / usable as f64 * 100.0)
}

/// Whether `error` means the filesystem or the user's quota is full: `ENOSPC` or `EDQUOT`
/// from the OS, or the kinds std maps them to (an error built from a kind has no OS code).
pub fn is_storage_full(error: &io::Error) -> bool {
    if let Some(code) = error.raw_os_error() {
        return code == Errno::NOSPC.raw_os_error() || code == Errno::DQUOT.raw_os_error();
    }
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;

    use super::*;

    #[test]
    fn enospc_edquot_and_their_kinds_are_storage_full_and_nothing_else_is() {
        for full in [
            io::Error::from_raw_os_error(Errno::NOSPC.raw_os_error()),
            io::Error::from_raw_os_error(Errno::DQUOT.raw_os_error()),
            io::Error::from(io::ErrorKind::StorageFull),
            io::Error::from(io::ErrorKind::QuotaExceeded),
        ] {
            assert!(is_storage_full(&full), "{full:?}");
        }
        for other in [
            io::Error::from_raw_os_error(Errno::IO.raw_os_error()),
            io::Error::from_raw_os_error(Errno::ACCESS.raw_os_error()),
            io::Error::from(io::ErrorKind::NotFound),
            io::Error::other("no space left on device (but only in words)"),
        ] {
            assert!(!is_storage_full(&other), "{other:?}");
        }
    }

    #[test]
    fn a_real_write_to_dev_full_is_storage_full() {
        // /dev/full fails every write with ENOSPC, no privileges or mounts needed.
        let mut full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let error = full.write_all(&[0u8; 4096]).unwrap_err();
        assert!(is_storage_full(&error), "{error:?}");
    }

    #[test]
    fn available_space_is_a_plausible_figure_and_missing_paths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let free = available_space(dir.path()).unwrap();
        // Something was writable a moment ago (the temp dir itself), and no disk here holds
        // an exabyte.
        assert!(free > 0 && free < 1 << 60, "{free}");
        let error = available_space(&dir.path().join("missing")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn used_percent_is_a_share_and_missing_paths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let used = used_percent(dir.path()).unwrap();
        // Something was writable a moment ago (the temp dir itself), so it is not full.
        assert!((0.0..100.0).contains(&used), "{used}");
        let error = used_percent(&dir.path().join("missing")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
