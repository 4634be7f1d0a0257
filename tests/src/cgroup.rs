//! Guards for tests of the eBPF local redirect: a filesystem mounted for one test
//! ([`Mount`]: a bpf filesystem to pin programs in, or a second mount of the cgroup2
//! hierarchy) and a cgroup of the test's own that holds the test process ([`TestCgroup`]), so
//! that programs attached to it see only the sockets of the test and of the processes it
//! starts.
//!
//! Moving the process moves all of its threads: keep a test that enters a [`TestCgroup`] alone
//! in its test binary, or the binary's other tests run inside the cgroup too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{Error, Result};

/// Tells apart the mounts of one process.
static NEXT_MOUNT: AtomicU32 = AtomicU32::new(0);

/// An I/O error that names what was being done.
fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// A filesystem mounted on a directory of its own under the temporary directory; unmounted,
/// and the directory removed, on drop.
#[derive(Debug)]
pub struct Mount {
    dir: PathBuf,
}

impl Mount {
    /// Mounts `fstype` from `source` (`mount -t fstype source <dir>`), e.g. `("bpf", "bpf")`
    /// or `("cgroup2", "none")`: mounting cgroup2 again shows the one cgroup2 hierarchy the
    /// host already has, wherever (or whether) it is mounted.
    pub fn new(fstype: &str, source: &str) -> Result<Mount> {
        let dir = std::env::temp_dir().join(format!(
            "weft-{fstype}-{}-{}",
            std::process::id(),
            NEXT_MOUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let cmd = format!("mount -t {fstype} {source} {}", dir.display());
        let out = Command::new("mount")
            .args(["-t", fstype, source])
            .arg(&dir)
            .output()
            .map_err(io(cmd.clone()));
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(Error::Command {
                cmd,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(Mount { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A child cgroup holding this whole process (every thread), and every process it starts
/// from now on. On drop the process goes back to the cgroup it came from and the child is
/// removed (which needs the processes started inside it to be gone by then: drop their
/// guards first).
#[derive(Debug)]
pub struct TestCgroup {
    dir: PathBuf,
    home: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2_root>/<name>-<pid>` and moves this process into it. `cgroup2_root`
    /// is a mount of the cgroup2 hierarchy.
    pub fn enter(cgroup2_root: &Path, name: &str) -> Result<TestCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io("read /proc/self/cgroup".into()))?;
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/');
        let home = cgroup2_root.join(relative);
        let dir = cgroup2_root.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let cgroup = TestCgroup { dir, home };
        let procs = cgroup.dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(io(format!("move this process into {}", procs.display())))?;
        Ok(cgroup)
    }

    /// The cgroup's directory, to attach programs to.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}
