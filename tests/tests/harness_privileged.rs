//! The root-only harness pieces do what the fault tests rely on: a cut link really stops
//! traffic and a restored one carries it again; a tmpfs has the size asked for, fills up,
//! and is unmounted when dropped. Runs without the coordinator or the agent; skipped
//! without root outside CI, failed in CI (see `system_tests::privilege`).

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, Result};
use system_tests::{require_root, NetNs, Tmpfs};

/// How the host's attempt to connect to a closed port inside the namespace ends.
fn probe(ns: &NetNs) -> ErrorKind {
    // Nothing listens on port 9 inside the namespace: a live link answers with a reset.
    let addr = SocketAddr::new(ns.node_ip(), 9);
    match TcpStream::connect_timeout(&addr, Duration::from_millis(700)) {
        Ok(_) => ErrorKind::Other,
        Err(e) => e.kind(),
    }
}

#[test]
fn a_cut_link_carries_nothing_and_a_restored_one_carries_traffic_again() -> Result<()> {
    if !require_root("the network-namespace harness test", &["ip"])? {
        return Ok(());
    }
    let ns = NetNs::create()?;
    assert_ne!(ns.host_ip(), ns.node_ip());
    assert_eq!(
        probe(&ns),
        ErrorKind::ConnectionRefused,
        "the node's address does not answer over a live link"
    );
    ns.cut()?;
    let cut = probe(&ns);
    assert_ne!(
        cut,
        ErrorKind::ConnectionRefused,
        "the node still answers over a cut link"
    );
    ns.restore()?;
    system_tests::wait_until(
        Duration::from_secs(10),
        "the restored link to answer",
        || Ok(probe(&ns) == ErrorKind::ConnectionRefused),
    )?;
    let name = ns.name().to_owned();
    drop(ns);
    let list =
        std::process::Command::new(system_tests::privilege::find_tool("ip").context("no `ip`")?)
            .args(["netns", "list"])
            .output()?;
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&name),
        "namespace {name} outlived its NetNs"
    );
    Ok(())
}

#[test]
fn a_tmpfs_has_its_size_fills_up_and_is_unmounted_on_drop() -> Result<()> {
    if !require_root("the tmpfs harness test", &["mount", "umount", "df"])? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let point = dir.path().join("disk");
    let size = 4 * 1024 * 1024;
    let disk = Tmpfs::mount(&point, size)?;
    let free = disk.available()?;
    assert!(
        free <= size && free > size - 64 * 1024,
        "a fresh {size}-byte tmpfs has {free} bytes free"
    );
    let filler = disk.fill("filler", 0)?;
    assert!(
        filler > size - 64 * 1024,
        "the filler is only {filler} bytes"
    );
    assert_eq!(disk.available()?, 0, "the filled tmpfs still has room");
    let err = std::fs::write(point.join("more"), vec![1u8; 64 * 1024])
        .expect_err("a write to a full disk succeeded");
    assert_eq!(err.raw_os_error(), Some(28), "not ENOSPC: {err}");
    drop(disk);
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    assert!(
        !mounts.contains(point.to_str().context("temp path is not UTF-8")?),
        "{} is still mounted",
        point.display()
    );
    Ok(())
}
