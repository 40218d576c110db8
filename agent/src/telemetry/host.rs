//! Host metrics: CPU, memory, load and the disk holding the agent's data directory.
//!
//! **Invariants**: one `sysinfo::System` lives as long as the probe, so CPU usage is always
//! measured over the time since the previous sample (sysinfo computes it from the
//! difference of two readings of `/proc/stat`); only CPU usage and RAM are ever refreshed,
//! never the process list, which is what keeps this cheap in memory and time. The disk
//! figure comes from `statvfs` ([`images::disk::used_percent`]). A figure the host cannot
//! give is left out of the sample (and logged once), never reported as zero.

use std::collections::BTreeMap;
use std::path::PathBuf;

use protocol::telemetry::names;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// What is refreshed, once at the start and then at every sample.
fn refresh_kind() -> RefreshKind {
    RefreshKind::nothing()
        .with_cpu(CpuRefreshKind::nothing().with_usage())
        .with_memory(MemoryRefreshKind::nothing().with_ram())
}

pub struct HostProbe {
    /// `None` if sysinfo cannot read this host at all (no `/proc`).
    system: Option<System>,
    data_dir: PathBuf,
    /// Which figures failed last time, so a lasting failure is logged once.
    failing: Failing,
}

#[derive(Default)]
struct Failing {
    load: bool,
    disk: bool,
}

impl HostProbe {
    /// Takes the first CPU reading, which the first sample's usage is measured from.
    pub fn new(data_dir: PathBuf) -> HostProbe {
        let system = match System::new_with_specifics(refresh_kind()) {
            Ok(system) => Some(system),
            Err(error) => {
                tracing::warn!(%error, "cannot read CPU and memory figures of this host; reporting without them");
                None
            }
        };
        HostProbe {
            system,
            data_dir,
            failing: Failing::default(),
        }
    }

    /// Adds this interval's host figures to `values`.
    pub fn measure(&mut self, values: &mut BTreeMap<String, f64>) {
        let mut put = |name: &str, value: f64| {
            if value.is_finite() {
                values.insert(name.to_owned(), value);
            }
        };
        if let Some(system) = &mut self.system {
            system.refresh_specifics(refresh_kind());
            let cores = system.cpus().len();
            if cores > 0 {
                // sysinfo's global figure is the average over cores (0–100); the metric is
                // in one core's worth, like `top`.
                put(
                    names::HOST_CPU_PERCENT,
                    f64::from(system.global_cpu_usage()) * cores as f64,
                );
            }
            let total = system.total_memory();
            if total > 0 {
                put(
                    names::HOST_MEM_USED_PERCENT,
                    system.used_memory() as f64 / total as f64 * 100.0,
                );
            }
        }
        match System::load_average() {
            Ok(load) => {
                self.failing.load = false;
                put(names::HOST_LOAD1, load.one);
            }
            Err(error) => {
                if !std::mem::replace(&mut self.failing.load, true) {
                    tracing::warn!(%error, "cannot read the load average");
                }
            }
        }
        match images::disk::used_percent(&self.data_dir) {
            Ok(used) => {
                self.failing.disk = false;
                put(names::HOST_DISK_USED_PERCENT, used);
            }
            Err(error) => {
                if !std::mem::replace(&mut self.failing.disk, true) {
                    tracing::warn!(%error, dir = %self.data_dir.display(), "cannot read how full the data directory's disk is");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linux_host_reports_all_four_figures_within_their_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = HostProbe::new(dir.path().to_owned());
        let mut values = BTreeMap::new();
        probe.measure(&mut values);
        let get = |name| values.get(name).copied().unwrap_or(f64::NAN);
        let cpu = get(names::HOST_CPU_PERCENT);
        // Up to 100 per core; no test machine has a thousand.
        assert!((0.0..=100_000.0).contains(&cpu), "{values:?}");
        let mem = get(names::HOST_MEM_USED_PERCENT);
        assert!(mem > 0.0 && mem <= 100.0, "{values:?}");
        assert!(get(names::HOST_LOAD1) >= 0.0, "{values:?}");
        assert!(
            (0.0..100.0).contains(&get(names::HOST_DISK_USED_PERCENT)),
            "{values:?}"
        );
        assert_eq!(values.len(), 4, "{values:?}");
    }

    #[test]
    fn a_missing_data_directory_leaves_only_the_disk_figure_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = HostProbe::new(dir.path().join("gone"));
        let mut values = BTreeMap::new();
        probe.measure(&mut values);
        assert!(!values.contains_key(names::HOST_DISK_USED_PERCENT));
        assert!(values.contains_key(names::HOST_MEM_USED_PERCENT));
    }
}
