//! eBPF acceleration of local hops (`weft-iptables ebpf`).
//!
//! A sidecar adds two loopback hops to every request: the app to its sidecar, and the peer's
//! sidecar to its app. On each, the payload goes down the sender's TCP/IP stack and up the
//! receiver's: about half of the CPU a sidecar pair costs per request is that kernel work,
//! the same for every proxy, however it parses. The programs in `bpf/local_redirect.bpf.c`
//! (built by `build.rs` with clang) skip it for connections whose two ends are sockets of
//! this host in one network namespace (the same address on both ends, or a loopback address
//! on either): a `sock_ops` program attached to a cgroup records each
//! such socket in a sockhash when it is established, and an `sk_msg` program on that map hands
//! every send straight to the receive queue of the socket at the other end. Handshakes, FIN and
//! RST still take the stack, and so does anything whose other end is not recorded (another
//! host, a NAT'd address, a socket outside the cgroup). Bytes, order, `MSG_PEEK` and
//! half-close are as over the stack; the one difference is the kernel's: a blocking read of
//! a redirected socket can end early with `EAGAIN` when the socket is woken for something
//! else (room to write, after its send buffer was full), which non-blocking readers take as
//! "not yet" and blocking ones that treat `EAGAIN` as an error do not. Hence opt-in. Kuma's
//! eBPF mode (merbridge) does the same job.
//!
//! The programs are loaded and attached with `bpftool`, and stay after it exits: the
//! programs and the map are pinned under `<bpffs>/<name>`, the `sock_ops` program is attached
//! to the cgroup (alongside any others: `multi`) and the `sk_msg` program to the map.
//! [`uninstall`] detaches both and removes the pins; [`install`] over an earlier install
//! replaces it.
//!
//! Only sockets created by processes of the cgroup (or its descendants) are recorded, and a
//! redirect needs both ends recorded: attach it to the pod's cgroup (or the root of the
//! cgroup2 hierarchy, for every process of the host).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// The compiled programs, when this build had clang (`build.rs`).
#[cfg(weft_bpf)]
const OBJECT: Option<&[u8]> = Some(include_bytes!(concat!(
    env!("OUT_DIR"),
    "/local_redirect.bpf.o"
)));
#[cfg(not(weft_bpf))]
const OBJECT: Option<&[u8]> = None;

/// The `sock_ops` program's name in the object.
const SOCKOPS_PROGRAM: &str = "weft_sockops";
/// The `sk_msg` program's name in the object.
const MSG_PROGRAM: &str = "weft_msg";
/// The sockhash's name in the object.
const SOCKET_MAP: &str = "weft_socks";

/// The default name of the pin directory under the bpffs mount.
pub const DEFAULT_NAME: &str = "weft";

/// Where the programs go: the cgroup whose sockets they accelerate, and where they are pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfConfig {
    /// A cgroup v2 directory (it has `cgroup.controllers`).
    pub cgroup: PathBuf,
    /// A mounted bpf filesystem.
    pub bpffs: PathBuf,
    /// The directory under `bpffs` that holds this install's pins; one per cgroup.
    pub name: String,
    /// The `bpftool` binary.
    pub bpftool: PathBuf,
}

impl EbpfConfig {
    /// The configuration for `cgroup`, pinned under `bpffs`/[`DEFAULT_NAME`], with `bpftool`
    /// from `PATH`.
    pub fn new(cgroup: impl Into<PathBuf>, bpffs: impl Into<PathBuf>) -> Self {
        Self {
            cgroup: cgroup.into(),
            bpffs: bpffs.into(),
            name: DEFAULT_NAME.to_string(),
            bpftool: PathBuf::from("bpftool"),
        }
    }

    /// The pin directory of this install.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join(&self.name)
    }

    fn sockops_pin(&self) -> PathBuf {
        self.pin_dir().join("progs").join(SOCKOPS_PROGRAM)
    }

    fn msg_pin(&self) -> PathBuf {
        self.pin_dir().join("progs").join(MSG_PROGRAM)
    }

    fn map_pin(&self) -> PathBuf {
        self.pin_dir().join("maps").join(SOCKET_MAP)
    }

    /// Checks everything [`install`] needs: the name, a cgroup v2 directory to attach to, and
    /// the bpf filesystem.
    fn check(&self) -> Result<()> {
        self.check_name()?;
        if !self.cgroup.join("cgroup.controllers").is_file() {
            return Err(Error::InvalidConfig(format!(
                "--cgroup-path {} is not a cgroup v2 directory (no cgroup.controllers); \
                 mount one with `mount -t cgroup2 none <dir>`",
                self.cgroup.display()
            )));
        }
        self.check_bpffs()
    }

    /// Checks that the pin directory is one directory directly on a bpf filesystem, before
    /// anything is removed with it ([`uninstall`] removes it whole, as root).
    fn check_pins(&self) -> Result<()> {
        self.check_name()?;
        self.check_bpffs()
    }

    /// `--name` is one path component: not empty, `.`, `..` or absolute.
    fn check_name(&self) -> Result<()> {
        let one_component = matches!(
            Path::new(&self.name).components().collect::<Vec<_>>()[..],
            [std::path::Component::Normal(_)]
        );
        if !one_component || self.name.contains('/') {
            return Err(Error::InvalidConfig(format!(
                "--name must be one path component, not {:?}",
                self.name
            )));
        }
        Ok(())
    }

    /// `--bpffs-path` is the real path of a directory on a bpf filesystem.
    fn check_bpffs(&self) -> Result<()> {
        // Checked as given, so it must be the real path: no `..`, no links, absolute.
        match fs::canonicalize(&self.bpffs) {
            Ok(real) if real == self.bpffs => {}
            Ok(real) => {
                return Err(Error::InvalidConfig(format!(
                    "--bpffs-path {} must be an absolute path without `..` or links \
                     (it is {})",
                    self.bpffs.display(),
                    real.display()
                )));
            }
            Err(source) => {
                return Err(Error::Io {
                    what: format!("--bpffs-path {}", self.bpffs.display()),
                    source,
                });
            }
        }
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if mount_point_of(&mounts, "bpf", &self.bpffs).is_none() {
            return Err(Error::InvalidConfig(format!(
                "--bpffs-path {} is not on a bpf filesystem; mount one with \
                 `mount -t bpf bpf {}`",
                self.bpffs.display(),
                self.bpffs.display()
            )));
        }
        Ok(())
    }
}

/// The mount points of the mounts of `fstype` in `mounts` (the text of `/proc/self/mounts`),
/// in its order.
fn mount_points<'a>(mounts: &'a str, fstype: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    mounts.lines().filter_map(move |line| {
        let mut fields = line.split_whitespace();
        let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| PathBuf::from(point.replace("\\040", " ")))
    })
}

/// The mount point of the innermost mount of `fstype` in `mounts` (the text of
/// `/proc/self/mounts`) that is `path` or one of its parents.
pub fn mount_point_of(mounts: &str, fstype: &str, path: &Path) -> Option<PathBuf> {
    mount_points(mounts, fstype)
        .filter(|point| path.starts_with(point))
        .max_by_key(|point| point.as_os_str().len())
}

/// The first mount of `fstype` in `mounts` (the text of `/proc/self/mounts`): where the
/// defaults of `--cgroup-path` (`cgroup2`) and `--bpffs-path` (`bpf`) come from.
pub fn first_mount(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mount_points(mounts, fstype).next()
}

/// Whether this build carries the eBPF programs (it was built where clang was installed).
pub fn available() -> bool {
    OBJECT.is_some()
}

/// Loads the programs, pins them under [`EbpfConfig::pin_dir`] and attaches them: from then
/// on, local connections of the cgroup's processes that are established skip the TCP/IP
/// stack for their payload. Replaces an earlier install of the same name. On failure, what
/// was done is undone.
pub fn install(cfg: &EbpfConfig) -> Result<()> {
    let Some(object) = OBJECT else {
        return Err(Error::NoEbpfPrograms);
    };
    cfg.check()?;
    if cfg.pin_dir().exists() {
        uninstall(cfg)?;
    }
    // A new file of a random name, only the owner's (root's), opened exclusively: bpftool
    // loads what is in it, so no one else may create, replace or change it first.
    let mut object_file = tempfile::Builder::new()
        .prefix("weft-local-redirect-")
        .suffix(".bpf.o")
        .tempfile()
        .map_err(|source| Error::Io {
            what: "creating a temporary file for the programs".into(),
            source,
        })?;
    object_file
        .write_all(object)
        .and_then(|()| object_file.flush())
        .map_err(|source| Error::Io {
            what: format!("writing {}", object_file.path().display()),
            source,
        })?;
    let done = load_and_attach(cfg, object_file.path());
    drop(object_file);
    if let Err(e) = done {
        let _ = uninstall(cfg);
        return Err(e);
    }
    Ok(())
}

fn load_and_attach(cfg: &EbpfConfig, object_file: &Path) -> Result<()> {
    let pins = cfg.pin_dir();
    fs::create_dir_all(&pins).map_err(|source| Error::Io {
        what: format!("creating {}", pins.display()),
        source,
    })?;
    bpftool(
        cfg,
        &[
            &"prog",
            &"loadall",
            &object_file,
            &pins.join("progs"),
            &"pinmaps",
            &pins.join("maps"),
        ],
    )?;
    bpftool(
        cfg,
        &[
            &"cgroup",
            &"attach",
            &cfg.cgroup,
            &"sock_ops",
            &"pinned",
            &cfg.sockops_pin(),
            &"multi",
        ],
    )?;
    bpftool(
        cfg,
        &[
            &"prog",
            &"attach",
            &"pinned",
            &cfg.msg_pin(),
            &"msg_verdict",
            &"pinned",
            &cfg.map_pin(),
        ],
    )?;
    Ok(())
}

/// Detaches the programs of an install and removes its pins. Nothing installed is not an
/// error. Connections already redirected keep their redirect until they close (the map lives
/// as long as its sockets hold it); new ones take the stack again.
pub fn uninstall(cfg: &EbpfConfig) -> Result<()> {
    cfg.check_pins()?;
    let pins = cfg.pin_dir();
    if !pins.exists() {
        return Ok(());
    }
    // Either attachment may be missing after a failed install: detach what is there.
    let mut errors = Vec::new();
    if cfg.sockops_pin().exists()
        && is_attached(cfg).unwrap_or(false)
        && let Err(e) = bpftool(
            cfg,
            &[
                &"cgroup",
                &"detach",
                &cfg.cgroup,
                &"sock_ops",
                &"pinned",
                &cfg.sockops_pin(),
            ],
        )
    {
        errors.push(e.to_string());
    }
    if cfg.msg_pin().exists() && cfg.map_pin().exists() {
        // Fails when it was never attached; the map goes with its pin either way.
        let _ = bpftool(
            cfg,
            &[
                &"prog",
                &"detach",
                &"pinned",
                &cfg.msg_pin(),
                &"msg_verdict",
                &"pinned",
                &cfg.map_pin(),
            ],
        );
    }
    if let Err(source) = fs::remove_dir_all(&pins) {
        errors.push(format!("removing {}: {source}", pins.display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::EbpfUninstall(errors.join("; ")))
    }
}

/// Whether this install's `sock_ops` program (the one pinned under its name, not another
/// install's of the same name) is attached to its cgroup.
pub fn is_attached(cfg: &EbpfConfig) -> Result<bool> {
    if !cfg.sockops_pin().exists() {
        return Ok(false);
    }
    let shown = bpftool(cfg, &[&"prog", &"show", &"pinned", &cfg.sockops_pin()])?;
    // `123: sock_ops  name weft_sockops  tag ...`
    let Some(id) = shown
        .split(':')
        .next()
        .map(str::trim)
        .filter(|id| !id.is_empty())
    else {
        return Ok(false);
    };
    Ok(attached_programs(cfg)?
        .lines()
        .any(|line| line.split_whitespace().next() == Some(id) && line.contains("sock_ops")))
}

/// What `bpftool cgroup show` prints for the cgroup: the programs attached to it.
pub fn attached_programs(cfg: &EbpfConfig) -> Result<String> {
    bpftool(cfg, &[&"cgroup", &"show", &cfg.cgroup])
}

fn bpftool(cfg: &EbpfConfig, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<String> {
    let out = Command::new(&cfg.bpftool)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::NoBpftool,
            _ => Error::Spawn {
                program: cfg.bpftool.clone(),
                source,
            },
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // bpftool's notice about libbpf's strict mode is not the error.
        let stderr: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("strict mode") && !l.contains("--legacy option"))
            .collect();
        let args: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into())
            .collect();
        return Err(Error::Command {
            program: PathBuf::from(format!("{} {}", cfg.bpftool.display(), args.join(" "))),
            status: out.status.to_string(),
            stderr: stderr.join("\n").trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
bpf /run/my\\040bpf bpf rw 0 0
";

    #[test]
    fn the_defaults_are_the_first_cgroup2_and_bpf_mounts() {
        assert_eq!(
            first_mount(MOUNTS, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            first_mount(MOUNTS, "bpf"),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
        assert_eq!(first_mount(MOUNTS, "tracefs"), None);
    }

    #[test]
    fn a_path_is_on_the_longest_mount_that_holds_it() {
        assert_eq!(
            mount_point_of(MOUNTS, "bpf", Path::new("/sys/fs/bpf/weft")),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
        assert_eq!(
            mount_point_of(MOUNTS, "bpf", Path::new("/run/my bpf")),
            Some(PathBuf::from("/run/my bpf"))
        );
        assert_eq!(
            mount_point_of(MOUNTS, "bpf", Path::new("/sys/fs/bpfx")),
            None
        );
        assert_eq!(mount_point_of(MOUNTS, "bpf", Path::new("/tmp")), None);
    }

    #[test]
    fn names_that_leave_the_pin_directory_are_refused() {
        for name in ["", "a/b", "..", ".", "/", "/etc", "a/../.."] {
            let mut cfg = EbpfConfig::new("/sys/fs/cgroup/unified", "/sys/fs/bpf");
            cfg.name = name.into();
            let e = cfg.check().unwrap_err().to_string();
            assert!(e.contains("--name"), "{name:?}: {e}");
            // Uninstall, which removes the pin directory whole, checks the same.
            let e = uninstall(&cfg).unwrap_err().to_string();
            assert!(e.contains("--name"), "uninstall {name:?}: {e}");
        }
    }

    #[test]
    fn a_bpffs_path_that_is_not_the_real_path_or_not_bpf_is_refused() {
        let dir = std::env::temp_dir();
        // Not a bpf filesystem: uninstall refuses before removing anything.
        let cfg = EbpfConfig::new("/sys/fs/cgroup/unified", &dir);
        let e = uninstall(&cfg).unwrap_err().to_string();
        assert!(e.contains("--bpffs-path"), "{e}");
        // A path through `..` is refused as given, whatever it resolves to.
        let cfg = EbpfConfig::new("/sys/fs/cgroup/unified", dir.join("..").join("tmp"));
        let e = uninstall(&cfg).unwrap_err().to_string();
        assert!(e.contains("--bpffs-path"), "{e}");
    }

    #[test]
    fn a_cgroup_v1_directory_is_refused_with_a_hint() {
        let dir = std::env::temp_dir();
        let cfg = EbpfConfig::new(&dir, "/sys/fs/bpf");
        let e = cfg.check().unwrap_err().to_string();
        assert!(
            e.contains("not a cgroup v2 directory") && e.contains("mount -t cgroup2"),
            "{e}"
        );
    }
}
