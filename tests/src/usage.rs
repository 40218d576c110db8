//! What a process or a listener has cost so far, read from the kernel: CPU seconds
//! (`/proc/PID/stat`), peak resident memory (`VmHWM`, see
//! [`crate::bench_data::proc_status_kib`], which [`reset_peak_rss`] restarts), and the bytes a
//! TCP listener's connections have sent (`ss -ti`: the kernel's per-socket `bytes_acked`),
//! what its threads are, and how busy the whole machine was ([`MachineCpu`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anyhow::{Context as _, Result};

use crate::privilege::run_tool;

/// CPU time (user + system, all threads) the process has used since it started, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the last
    // ')'. After it come field 3 (state) onwards; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("malformed {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("malformed {path}: no field {}", i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_second())
}

/// The process's threads by name (`/proc/PID/task/*/comm`, at most 15 bytes each), with how
/// many bear each name: what runs a thread per agent shows up as a count near the agents'.
pub fn thread_names(pid: u32) -> Result<BTreeMap<String, usize>> {
    let dir = format!("/proc/{pid}/task");
    let mut names = BTreeMap::new();
    for task in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        // A thread may end while it is being listed.
        let Ok(name) = std::fs::read_to_string(task?.path().join("comm")) else {
            continue;
        };
        *names.entry(name.trim_end().to_owned()).or_insert(0) += 1;
    }
    Ok(names)
}

/// `getconf CLK_TCK`: the unit of `/proc/PID/stat` times (100 on every common Linux, the
/// fallback if getconf cannot say).
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The whole machine's CPU time so far, from the first line of `/proc/stat`, in clock ticks
/// summed over all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineCpu {
    /// User, nice, system, irq, softirq and steal time: cores doing something.
    pub busy: u64,
    /// Idle time with I/O outstanding: cores waiting on the disk.
    pub iowait: u64,
    /// Everything, idle included.
    pub total: u64,
}

impl MachineCpu {
    pub fn read() -> Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no cpu line in /proc/stat")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().context("malformed cpu line in /proc/stat"))
            .collect::<Result<_>>()?;
        let field = |i: usize| ticks.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
        let (idle, iowait) = (field(3), field(4));
        Ok(MachineCpu {
            busy,
            iowait,
            total: busy + idle + iowait,
        })
    }

    /// Shares of the time between `earlier` and this reading that the cores were busy and
    /// waiting on I/O, as fractions of all cores' time.
    pub fn shares_since(&self, earlier: &MachineCpu) -> (f64, f64) {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        (
            self.busy.saturating_sub(earlier.busy) as f64 / total,
            self.iowait.saturating_sub(earlier.iowait) as f64 / total,
        )
    }
}

/// Restarts the process's peak resident memory (`VmHWM`) from its current resident size, so a
/// later reading is the peak of what happened in between (`5` to `/proc/PID/clear_refs`; needs
/// the right to write there: the same user, or root).
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

/// Bytes sent so far on each established TCP connection accepted on a local port, by peer
/// address: what the kernel counts as acknowledged by the peer (`bytes_acked`), so
/// retransmissions count once and TCP/IP headers not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketBytes(BTreeMap<String, u64>);

/// What connections on a port sent between two [`SocketBytes`] readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentBetween {
    /// Bytes sent, counting connections opened in between from zero.
    pub bytes: u64,
    /// Connections in the later reading.
    pub connections: usize,
    /// Connections of the earlier reading gone from the later one: what they sent after
    /// the earlier reading is not counted.
    pub closed: usize,
}

impl SocketBytes {
    /// The connections accepted on local port `port`, from `ss -tinH state established`.
    pub fn on_port(port: u16) -> Result<SocketBytes> {
        let filter = format!("( sport = :{port} )");
        let out = run_tool("ss", &["-tinH", "state", "established", &filter])?;
        Ok(SocketBytes::parse(&out))
    }

    /// Parses `ss -tinH state established` output: a line per socket ("Recv-Q Send-Q LOCAL
    /// PEER"), each followed by an indented line of TCP info holding `bytes_acked:N` (left
    /// out while it is zero).
    fn parse(text: &str) -> SocketBytes {
        let mut sockets = BTreeMap::new();
        let mut peer: Option<String> = None;
        for line in text.lines() {
            if line.starts_with(char::is_whitespace) {
                let Some(peer) = peer.take() else { continue };
                let acked = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("bytes_acked:"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                sockets.insert(peer, acked);
            } else {
                peer = line.split_whitespace().nth(3).map(str::to_owned);
                if let Some(peer) = &peer {
                    sockets.entry(peer.clone()).or_insert(0);
                }
            }
        }
        SocketBytes(sockets)
    }

    /// Total bytes of the connections in this reading.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn connections(&self) -> usize {
        self.0.len()
    }

    /// What was sent since `earlier`, a reading of the same port.
    pub fn since(&self, earlier: &SocketBytes) -> SentBetween {
        let bytes = self
            .0
            .iter()
            .map(|(peer, &now)| now.saturating_sub(earlier.0.get(peer).copied().unwrap_or(0)))
            .sum();
        SentBetween {
            bytes,
            connections: self.0.len(),
            closed: earlier
                .0
                .keys()
                .filter(|p| !self.0.contains_key(*p))
                .count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: &str = "\
0      0      127.0.0.1:1883 127.0.0.1:40000
\t cubic wscale:7,7 rto:204 bytes_sent:1500 bytes_acked:1200 bytes_received:33 segs_out:4
0      0      127.0.0.1:1883 127.0.0.1:40002
\t cubic wscale:7,7 rto:204 bytes_received:33 segs_out:1
";

    #[test]
    fn acked_bytes_are_read_per_peer_and_a_missing_count_is_zero() {
        let read = SocketBytes::parse(SS);
        assert_eq!(read.connections(), 2);
        assert_eq!(read.total(), 1200);
    }

    #[test]
    fn bytes_between_readings_count_new_connections_whole_and_closed_ones_apart() {
        let earlier = SocketBytes::parse(SS);
        let later = SocketBytes::parse(
            "\
0      0      127.0.0.1:1883 127.0.0.1:40000
\t cubic bytes_acked:5200
0      0      127.0.0.1:1883 127.0.0.1:40004
\t cubic bytes_acked:700
",
        );
        assert_eq!(
            later.since(&earlier),
            SentBetween {
                bytes: 4000 + 700,
                connections: 2,
                closed: 1
            }
        );
    }

    #[test]
    fn cpu_seconds_of_this_process_grow_with_work() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = cpu_seconds(pid).unwrap();
        assert!(after - before >= 0.1, "{before} -> {after}");
    }
}
