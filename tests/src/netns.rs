//! A network namespace joined to the host by a veth pair, so a test can cut a node's link.
//!
//! ```text
//!  host (coordinator, broker)                      namespace (agent)
//!  HOST_DEV  10.231.a.b+1/30  <── veth ──>  10.231.a.b+2/30  PEER_DEV
//! ```
//!
//! [`NetNs::cut`] takes the host end down: packets from the node are silently lost, as when
//! a link fails somewhere on the path (connections are not reset, they stall). The host
//! keeps its address, so the harness still reaches the coordinator at [`NetNs::host_ip`].
//!
//! Names carry the test process id and a counter, so parallel tests and concurrent runs do
//! not collide; the namespace (and with it both ends of the veth pair) is deleted on drop,
//! and namespaces left by test processes that died are deleted on the next [`NetNs::create`].
//! Needs root and `ip` (see [`crate::privilege::require_root`]).

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context as _, Result};

use crate::privilege::{find_tool, run_tool};

/// Every namespace this harness creates is named `{PREFIX}{pid}-{n}`.
const PREFIX: &str = "fleet-test-";
/// Subnets are /30s carved from 10.231.0.0/16.
const SUBNETS: u32 = 16384;

/// A network namespace with a veth link to the host; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_dev: String,
    host_ip: Ipv4Addr,
    node_ip: Ipv4Addr,
}

impl NetNs {
    /// Creates the namespace, the veth pair and both addresses, with both ends up.
    pub fn create() -> Result<NetNs> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale()?;
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (host_ip, node_ip) = free_subnet(pid, n)?;
        let ns = NetNs {
            name: format!("{PREFIX}{pid}-{n}"),
            // Interface names are at most 15 bytes: "ft" + pid in hex (≤ 6) + n + "h".
            host_dev: format!("ft{pid:x}x{n}h"),
            host_ip,
            node_ip,
        };
        let peer_dev = format!("ft{pid:x}x{n}n");
        run_tool("ip", &["netns", "add", &ns.name])?;
        // From here on, drop deletes whatever was made.
        let host_cidr = format!("{host_ip}/30");
        let node_cidr = format!("{node_ip}/30");
        let steps: [&[&str]; 6] = [
            &[
                "link",
                "add",
                &ns.host_dev,
                "type",
                "veth",
                "peer",
                "name",
                &peer_dev,
                "netns",
                &ns.name,
            ],
            &["addr", "add", &host_cidr, "dev", &ns.host_dev],
            &["link", "set", &ns.host_dev, "up"],
            &["-n", &ns.name, "addr", "add", &node_cidr, "dev", &peer_dev],
            &["-n", &ns.name, "link", "set", &peer_dev, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for args in steps {
            run_tool("ip", args).with_context(|| format!("setting up namespace {}", ns.name))?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the link: what the coordinator listens on.
    pub fn host_ip(&self) -> IpAddr {
        IpAddr::V4(self.host_ip)
    }

    /// The node's address inside the namespace.
    pub fn node_ip(&self) -> IpAddr {
        IpAddr::V4(self.node_ip)
    }

    /// The program and leading arguments that run `program` inside the namespace `name`:
    /// `ip netns exec NAME PROGRAM` (which execs it, so the pid is the program's own).
    pub fn command_in(name: &str, program: &Path) -> Result<(PathBuf, Vec<OsString>)> {
        let ip = find_tool("ip").context("`ip` (iproute2) is not installed")?;
        Ok((
            ip,
            vec![
                "netns".into(),
                "exec".into(),
                name.into(),
                program.as_os_str().to_owned(),
            ],
        ))
    }

    /// Cuts the link: the host end goes down and everything the node sends is lost.
    pub fn cut(&self) -> Result<()> {
        run_tool("ip", &["link", "set", &self.host_dev, "down"]).map(drop)
    }

    /// Restores the link cut by [`NetNs::cut`].
    pub fn restore(&self) -> Result<()> {
        run_tool("ip", &["link", "set", &self.host_dev, "up"]).map(drop)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys the peer end, which destroys the pair; the explicit
        // link delete covers a namespace that was never made.
        if let Err(e) = run_tool("ip", &["netns", "delete", &self.name]) {
            eprintln!("cleaning up network namespace {}: {e:#}", self.name);
        }
        let _ = run_tool("ip", &["link", "delete", &self.host_dev]);
    }
}

/// A /30 in 10.231.0.0/16 that no interface uses: (host address, node address).
fn free_subnet(pid: u32, n: u32) -> Result<(Ipv4Addr, Ipv4Addr)> {
    // `ip -o -4 addr show` prints one address per line as "... inet A.B.C.D/LEN ...".
    let listing = run_tool("ip", &["-o", "-4", "addr", "show"])?;
    let in_use: Vec<Ipv4Addr> = listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect();
    let start = pid.wrapping_mul(64).wrapping_add(n) % SUBNETS;
    for step in 0..SUBNETS {
        let index = (start + step) % SUBNETS;
        let (c, d) = ((index / 64) as u8, ((index % 64) * 4) as u8);
        let taken = in_use.iter().any(|ip| {
            let [a, b, c2, d2] = ip.octets();
            (a, b, c2, d2 & !3) == (10, 231, c, d)
        });
        if !taken {
            return Ok((
                Ipv4Addr::new(10, 231, c, d + 1),
                Ipv4Addr::new(10, 231, c, d + 2),
            ));
        }
    }
    bail!("every /30 in 10.231.0.0/16 is in use")
}

/// Deletes namespaces this harness made in test processes that no longer run.
fn remove_stale() -> Result<()> {
    let list = run_tool("ip", &["netns", "list"])?;
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid.to_string()).exists() {
            run_tool("ip", &["netns", "delete", name])
                .with_context(|| format!("deleting stale namespace {name}"))?;
        }
    }
    Ok(())
}
