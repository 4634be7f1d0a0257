//! The standard `process_*` metrics, read from `/proc` when scraped (a prometheus-client
//! [`Collector`]), as Prometheus's own client libraries define them:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`.
//!
//! CPU time in `/proc/<pid>/stat` is in clock ticks of `USER_HZ`, which the kernel fixes at
//! 100 for user space on every architecture Linux supports (the Go client's procfs assumes the
//! same); memory comes from `/proc/<pid>/status` in kB, so the page size is not needed. A value
//! that cannot be read is left out of the scrape rather than reported as 0.

use std::path::{Path, PathBuf};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `USER_HZ`: clock ticks per second in `/proc`.
const USER_HZ: f64 = 100.0;

/// Reads `/proc/<pid>` (by default `/proc/self`) at each scrape.
#[derive(Debug, Clone)]
pub struct ProcessCollector {
    proc_dir: PathBuf,
    proc_root: PathBuf,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

/// One reading of the process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, bytes.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

/// Fields of `/proc/<pid>/stat` after the command name, 0-based from `state` (field 3).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().collect())
}

fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    kb.checked_mul(1024)
}

fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

impl ProcessCollector {
    /// A collector for this process.
    pub fn new() -> Self {
        Self::for_dir("/proc/self", "/proc")
    }

    /// A collector reading `proc_dir` (e.g. `/proc/1234`), with `/proc` at `proc_root`.
    pub fn for_dir(proc_dir: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_dir: proc_dir.into(),
            proc_root: proc_root.into(),
        }
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.proc_dir.join(name)).ok()
    }

    /// Reads the process's numbers now.
    pub fn stats(&self) -> ProcessStats {
        let mut s = ProcessStats::default();
        if let Some(stat) = self.read("stat")
            && let Some(f) = stat_fields(&stat)
        {
            // utime and stime are fields 14 and 15 (1-based), starttime 22: indices from 3.
            let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
            if let (Some(u), Some(k)) = (num(14), num(15)) {
                s.cpu_seconds = Some((u + k) as f64 / USER_HZ);
            }
            let btime = std::fs::read_to_string(self.proc_root.join("stat"))
                .ok()
                .and_then(|t| boot_time(&t));
            if let (Some(start), Some(boot)) = (num(22), btime) {
                s.start_time_seconds = Some(boot as f64 + start as f64 / USER_HZ);
            }
        }
        if let Some(status) = self.read("status") {
            s.resident_bytes = status_kb(&status, "VmRSS:");
            s.virtual_bytes = status_kb(&status, "VmSize:");
        }
        s.max_fds = self.read("limits").and_then(|l| max_open_files(&l));
        s.open_fds = std::fs::read_dir(self.proc_dir.join("fd"))
            .ok()
            .map(|d| d.count() as u64);
        s
    }

    /// The directory read.
    pub fn proc_dir(&self) -> &Path {
        &self.proc_dir
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.stats();
        if let Some(v) = s.cpu_seconds {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        let gauges: [(&str, &str, Option<f64>); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(v).encode(m)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (we ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    8 0 4200 100000000 500 18446744073709551615";
        let f = stat_fields(stat).expect("fields");
        assert_eq!(f[0], "S");
        assert_eq!(f[14 - 3], "250");
        assert_eq!(f[22 - 3], "4200");
        assert_eq!(
            status_kb("Name:\tx\nVmSize:\t  2048 kB\nVmRSS:\t 100 kB\n", "VmRSS:"),
            Some(102_400)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert_eq!(stat_fields("no parenthesis"), None);
    }

    #[test]
    fn reads_this_process() {
        let s = ProcessCollector::new().stats();
        assert!(s.resident_bytes.is_some_and(|v| v > 0), "{s:?}");
        assert!(s.virtual_bytes.is_some_and(|v| v > 0), "{s:?}");
        assert!(s.open_fds.is_some_and(|v| v > 0), "{s:?}");
        assert!(s.max_fds.is_some_and(|v| v > 0), "{s:?}");
        assert!(s.cpu_seconds.is_some(), "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let start = s.start_time_seconds.expect("start time");
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "{start}"
        );

        let mut r = Registry::default();
        r.register_collector(Box::new(ProcessCollector::new()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encode");
        for name in [
            "# TYPE process_cpu_seconds counter",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn a_missing_proc_dir_reports_nothing() {
        let c = ProcessCollector::for_dir("/nonexistent/proc/self", "/nonexistent/proc");
        assert_eq!(c.stats(), ProcessStats::default());
    }
}
