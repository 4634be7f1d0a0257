//! `weft-bench mesh --ebpf`: the whole run with weft's eBPF local redirect
//! ([`weft_iptables::ebpf`]) attached to the root of the cgroup2 hierarchy, so that every
//! loopback hop of every path (the generator to its outbound sidecar, the inbound sidecar
//! to the upstream), weft's and the peers' alike, skips the TCP/IP stack. The direct path
//! crosses the veth pair and is unchanged. A run is either all with or all without, so the
//! ratios within one run stay fair.
//!
//! The programs are host-wide while the run lasts: every process's local connections made
//! meanwhile are redirected (a blocking reader among them can see an early `EAGAIN`; see
//! [`weft_iptables::ebpf`]). [`Accelerated`] removes them, and unmounts what it mounted, when
//! it is dropped (also on error or panic).

use std::path::{Path, PathBuf};
use std::process::Command;

use weft_iptables::ebpf::{self, EbpfConfig};

use super::MeshError;

/// The programs attached for the run; removed on drop.
#[derive(Debug)]
pub struct Accelerated {
    cfg: EbpfConfig,
    /// Mounts made here (a cgroup2 hierarchy, a bpf filesystem), unmounted on drop.
    mounted: Vec<PathBuf>,
}

impl Accelerated {
    /// Attaches the programs to the cgroup2 root (mounting a cgroup2 hierarchy and a bpf
    /// filesystem under `dir` when the host has none), pinned under a name of this run's.
    pub fn install(dir: &Path) -> Result<Accelerated, MeshError> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut mounted = Vec::new();
        let mut find_or_mount = |fstype: &str, source: &str| -> Result<PathBuf, MeshError> {
            if let Some(point) = ebpf::first_mount(&mounts, fstype) {
                return Ok(point);
            }
            let point = dir.join(fstype);
            std::fs::create_dir_all(&point).map_err(|source| MeshError::Io {
                what: format!("creating {}", point.display()),
                source,
            })?;
            let out = Command::new("mount")
                .args(["-t", fstype, source])
                .arg(&point)
                .output()
                .map_err(|source| MeshError::Io {
                    what: "running mount".into(),
                    source,
                })?;
            if !out.status.success() {
                return Err(MeshError::Config(format!(
                    "--ebpf: mount -t {fstype} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            mounted.push(point.clone());
            Ok(point)
        };
        let cgroup = find_or_mount("cgroup2", "none")?;
        let bpffs = find_or_mount("bpf", "bpf")?;
        let mut cfg = EbpfConfig::new(cgroup, bpffs);
        cfg.name = format!("weft-bench-{}", std::process::id());
        let accelerated = Accelerated { cfg, mounted };
        ebpf::install(&accelerated.cfg).map_err(|e| MeshError::Config(format!("--ebpf: {e}")))?;
        Ok(accelerated)
    }

    /// Where the programs are attached.
    pub fn cgroup(&self) -> &Path {
        &self.cfg.cgroup
    }

    /// The install, for registering a host for the connect redirect of transparent mode.
    pub fn config(&self) -> &EbpfConfig {
        &self.cfg
    }
}

impl Drop for Accelerated {
    fn drop(&mut self) {
        if let Err(e) = ebpf::uninstall(&self.cfg) {
            eprintln!("weft-bench: removing the eBPF programs: {e}");
        }
        for point in self.mounted.iter().rev() {
            let _ = Command::new("umount").arg(point).status();
            let _ = std::fs::remove_dir(point);
        }
    }
}
