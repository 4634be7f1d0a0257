//! CPU lists (`0`, `0,2`, `1-3`) and pinning worker threads to them.
//!
//! A fair mesh benchmark pins the load generator to its own core and the
//! sidecars plus upstream to another; `--cpu` does the generator's half.

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

/// A CPU list that could not be parsed, or a failed pin.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The list is malformed.
    #[error("invalid CPU list {0:?} (expected e.g. 0 or 0,2 or 1-3)")]
    Parse(String),
    /// `sched_setaffinity` refused (CPU offline or outside the cpuset).
    #[error("cannot pin thread to CPU {cpu}: {source}")]
    Pin {
        /// The CPU asked for.
        cpu: usize,
        /// The errno.
        source: nix::Error,
    },
}

/// Parses a CPU list such as `0`, `0,2` or `0-3,6`.
///
/// ```
/// assert_eq!(weft_bench::cpu::parse_list("0,2-4").unwrap(), vec![0, 2, 3, 4]);
/// ```
pub fn parse_list(input: &str) -> Result<Vec<usize>, CpuError> {
    let bad = || CpuError::Parse(input.to_owned());
    let mut cpus = Vec::new();
    for part in input.split(',').map(str::trim) {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let lo: usize = lo.trim().parse().map_err(|_| bad())?;
                let hi: usize = hi.trim().parse().map_err(|_| bad())?;
                if lo > hi || hi - lo > 4096 {
                    return Err(bad());
                }
                cpus.extend(lo..=hi);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), CpuError> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .map_err(|source| CpuError::Pin { cpu, source })?;
    // Pid 0 is the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|source| CpuError::Pin { cpu, source })
}

/// The number of CPUs this process may run on.
pub fn available() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert_eq!(parse_list("1").unwrap(), vec![1]);
        assert_eq!(parse_list("0, 3").unwrap(), vec![0, 3]);
        assert_eq!(parse_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_list("").is_err());
        assert!(parse_list("3-1").is_err());
        assert!(parse_list("a").is_err());
    }

    #[test]
    fn pins_to_cpu_zero() {
        // CPU 0 exists wherever the tests run; run in a scratch thread so the
        // test harness's own thread keeps its affinity.
        let pinned = std::thread::spawn(|| pin_current_thread(0).is_ok())
            .join()
            .unwrap_or(false);
        assert!(pinned);
    }
}
