//! What a sidecar costs, read from `/proc`: resident memory (`VmRSS`) and
//! CPU time (`utime + stime`), summed over a process and its descendants
//! (nginx's master and worker count as one sidecar).

use std::collections::HashMap;
use std::time::Duration;

/// One reading of a process tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// The system (kernel) part of `cpu_ticks`.
    pub sys_ticks: u64,
}

impl Usage {
    /// Resident memory in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 almost everywhere).
pub fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// CPU time of `ticks` clock ticks.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64)
}

/// `pid` and every live descendant of it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(stat) = read_stat(p) {
                children.entry(stat.ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids.iter().copied());
        }
        i += 1;
    }
    out
}

/// Memory and CPU time of `pid` and its descendants; processes that are
/// gone count as zero.
///
/// Memory is `pid`'s `VmRSS` plus each descendant's private pages only: a
/// forked worker (nginx's) shares the binary, the libraries and what its master
/// had before the fork, and summing every process's RSS would count those
/// pages once per process. A single-process sidecar's figure is its `VmRSS`.
pub fn usage(pid: u32) -> Usage {
    tree(pid).into_iter().fold(Usage::default(), |acc, p| {
        let (user, sys) = read_stat(p).map_or((0, 0), |s| (s.utime, s.stime));
        let memory = if p == pid {
            read_rss_kib(p)
        } else {
            read_private_kib(p).or_else(|| read_rss_kib(p))
        };
        Usage {
            rss_kib: acc.rss_kib + memory.unwrap_or(0),
            cpu_ticks: acc.cpu_ticks + user + sys,
            sys_ticks: acc.sys_ticks + sys,
        }
    })
}

/// A process's private pages (`Private_Clean` + `Private_Dirty` of
/// `/proc/<pid>/smaps_rollup`), KiB.
fn read_private_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_private_kib(&rollup)
}

fn parse_private_kib(rollup: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    Some(field("Private_Clean:")? + field("Private_Dirty:")?)
}

/// The fields of `/proc/<pid>/stat` this module reads.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    ppid: u32,
    /// User CPU time, clock ticks.
    utime: u64,
    /// System CPU time, clock ticks.
    stime: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<Stat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): field n is fields[n - 3].
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Stat { ppid, utime, stime })
}

fn read_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss_kib(&status)
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_pages_are_clean_plus_dirty() {
        let rollup = "55d0c0a3a000-7ffd0b1f5000 ---p 00000000 00:00 0                          [rollup]\nRss:                6400 kB\nPss:                2100 kB\nShared_Clean:       4000 kB\nShared_Dirty:        400 kB\nPrivate_Clean:       300 kB\nPrivate_Dirty:      1700 kB\n";
        assert_eq!(parse_private_kib(rollup), Some(2000));
        assert_eq!(parse_private_kib("Rss: 1 kB\n"), None);
    }

    #[test]
    fn parses_stat_with_awkward_names() {
        let stat =
            "4242 (we ird) (name)) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 1 1 1";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                ppid: 17,
                utime: 250,
                stime: 75
            })
        );
    }

    #[test]
    fn parses_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads: 1\n";
        assert_eq!(parse_rss_kib(status), Some(5120));
    }

    #[test]
    fn reads_this_process() {
        let me = usage(std::process::id());
        assert!(me.rss_kib > 0);
        assert!(tree(std::process::id()).contains(&std::process::id()));
    }
}
