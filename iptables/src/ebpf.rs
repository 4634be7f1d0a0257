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
//!
//! In transparent mode the app's hop to its sidecar goes through iptables' `REDIRECT`, so the
//! app's socket names the original destination and has no recorded peer. A network namespace
//! registered with [`register_transparent`] (`weft-iptables ebpf transparent`) has its apps'
//! outbound TCP connections sent to the proxy's outbound port on 127.0.0.1 at `connect` time
//! instead (a `cgroup/connect4` program; the same connections as the iptables rules, by
//! [`TransparentConf`]), and a `cgroup/getsockopt` program answers the proxy's
//! `SO_ORIGINAL_DST` with the destination the app asked for, and a `cgroup/getpeername4`
//! program shows the app that destination as its peer. What differs from iptables: the
//! proxy sees its client at 127.0.0.1 rather than the pod's address, and so does the app
//! see its own end (`getsockname`). The iptables rules stay as the fallback (for IPv6 and
//! IPv4-mapped IPv6 sockets, for a namespace not registered, for sockets bound to a device),
//! and the hop is redirected like any other local one. Namespaces are told
//! apart by their cookie, so one install on the host's root cgroup serves every pod that
//! registers. Kuma's eBPF mode (merbridge) does the same at connect time.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Config;
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
/// The `cgroup/connect4` program's name in the object (transparent mode's connect redirect).
const CONNECT_PROGRAM: &str = "weft_connect4";
/// The `cgroup/getsockopt` program's name in the object (its SO_ORIGINAL_DST).
const GETSOCKOPT_PROGRAM: &str = "weft_getsockopt";
/// The `cgroup/getpeername4` program's name in the object (the app's view of its peer).
const GETPEERNAME_PROGRAM: &str = "weft_getpeername4";
/// The map of registered network namespaces' transparent settings.
const TRANSPARENT_MAP: &str = "weft_transparent";
/// A program attached to the cgroup.
struct CgroupProgram {
    /// Its name in the object.
    program: &'static str,
    /// Its attach type as `bpftool cgroup attach` takes it.
    attach_type: &'static str,
    /// The same as `bpftool cgroup show` prints it: libbpf's name (bpftool 7) or the one it
    /// takes (older bpftool).
    shown_as: [&'static str; 2],
}

/// The programs attached to the cgroup.
const CGROUP_PROGRAMS: [CgroupProgram; 4] = [
    CgroupProgram {
        program: SOCKOPS_PROGRAM,
        attach_type: "sock_ops",
        shown_as: ["cgroup_sock_ops", "sock_ops"],
    },
    CgroupProgram {
        program: CONNECT_PROGRAM,
        attach_type: "connect4",
        shown_as: ["cgroup_inet4_connect", "connect4"],
    },
    CgroupProgram {
        program: GETSOCKOPT_PROGRAM,
        attach_type: "getsockopt",
        shown_as: ["cgroup_getsockopt", "getsockopt"],
    },
    CgroupProgram {
        program: GETPEERNAME_PROGRAM,
        attach_type: "getpeername4",
        shown_as: ["cgroup_inet4_getpeername", "getpeername4"],
    },
];

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

    fn program_pin(&self, program: &str) -> PathBuf {
        self.pin_dir().join("progs").join(program)
    }

    fn map_pin(&self) -> PathBuf {
        self.pin_dir().join("maps").join(SOCKET_MAP)
    }

    fn transparent_map_pin(&self) -> PathBuf {
        self.pin_dir().join("maps").join(TRANSPARENT_MAP)
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
    for p in &CGROUP_PROGRAMS {
        bpftool(
            cfg,
            &[
                &"cgroup",
                &"attach",
                &cfg.cgroup,
                &p.attach_type,
                &"pinned",
                &cfg.program_pin(p.program),
                &"multi",
            ],
        )?;
    }
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
    // Any attachment may be missing after a failed install: detach what is there. A cgroup
    // that is gone took its attachments with it. Whatever cannot be read or detached keeps
    // the pins, so that a later uninstall can still find the programs (a program left
    // attached without them would go on redirecting, with no way to reach it).
    let mut errors = Vec::new();
    let attached = if cfg.cgroup.exists() {
        match attached_programs(cfg) {
            Ok(list) => list,
            Err(e) => return Err(Error::EbpfUninstall(e.to_string())),
        }
    } else {
        String::new()
    };
    for p in &CGROUP_PROGRAMS {
        let pin = cfg.program_pin(p.program);
        let is_attached = if pin.exists() {
            match is_attached_as(cfg, &attached, &pin, p) {
                Ok(a) => a,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            }
        } else {
            false
        };
        if is_attached
            && let Err(e) = bpftool(
                cfg,
                &[
                    &"cgroup",
                    &"detach",
                    &cfg.cgroup,
                    &p.attach_type,
                    &"pinned",
                    &pin,
                ],
            )
        {
            errors.push(e.to_string());
        }
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
    if !errors.is_empty() {
        errors.push(format!("the pins in {} are kept", pins.display()));
    } else if let Err(source) = fs::remove_dir_all(&pins) {
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
    let pin = cfg.sockops_pin();
    if !pin.exists() {
        return Ok(false);
    }
    is_attached_as(cfg, &attached_programs(cfg)?, &pin, &CGROUP_PROGRAMS[0])
}

/// Whether the program pinned at `pin` is among `attached` (what `bpftool cgroup show`
/// printed) as `program`'s attach type.
fn is_attached_as(
    cfg: &EbpfConfig,
    attached: &str,
    pin: &Path,
    program: &CgroupProgram,
) -> Result<bool> {
    let shown = bpftool(cfg, &[&"prog", &"show", &"pinned", &pin])?;
    // `123: sock_ops  name weft_sockops  tag ...`
    let Some(id) = shown
        .split(':')
        .next()
        .map(str::trim)
        .filter(|id| !id.is_empty())
    else {
        return Ok(false);
    };
    Ok(attached.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some(id) && words.next().is_some_and(|t| program.shown_as.contains(&t))
    }))
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

/// The most outbound ports, networks and local addresses one namespace's transparent
/// settings hold (the programs' fixed-size arrays: `MAX_*` in `bpf/local_redirect.bpf.c`).
pub const MAX_EXCLUDED_PORTS: usize = 32;
/// See [`MAX_EXCLUDED_PORTS`].
pub const MAX_EXCLUDED_NETS: usize = 32;
/// See [`MAX_EXCLUDED_PORTS`].
pub const MAX_LOCAL_ADDRS: usize = 16;

/// What `weft_connect4` needs to decide, for one network namespace, which of its apps' TCP
/// connections go to the proxy: the same decision as the iptables rules of
/// [`crate::install`] with the same [`Config`], for IPv4 (IPv6 connections are left to
/// ip6tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransparentConf {
    /// The proxy's uid: its own connections are left alone.
    pub proxy_uid: u32,
    /// The proxy's outbound listener, on 127.0.0.1.
    pub outbound_port: u16,
    /// Destination ports left alone.
    pub excluded_ports: Vec<u16>,
    /// Destination networks left alone (IPv4 ones; IPv6 ones do not apply).
    pub excluded_nets: Vec<ipnet::Ipv4Net>,
    /// The namespace's own addresses: a connection to one stays local, as over `lo` in the
    /// iptables rules.
    pub local_addrs: Vec<std::net::Ipv4Addr>,
}

impl TransparentConf {
    /// The settings for `config` in a namespace whose addresses are `local_addrs`.
    pub fn new(config: &Config, local_addrs: Vec<std::net::Ipv4Addr>) -> Result<Self> {
        let mut excluded_ports = config.exclude_outbound_ports.clone();
        // With the DNS redirect, the rules leave an app's DNS over TCP alone too.
        if config.redirect_dns && !excluded_ports.contains(&53) {
            excluded_ports.push(53);
        }
        let conf = Self {
            proxy_uid: config.proxy_uid,
            outbound_port: config.redirect_outbound_port,
            excluded_ports,
            excluded_nets: config
                .exclude_outbound_ips
                .iter()
                .filter_map(|n| match n {
                    ipnet::IpNet::V4(n) => Some(n.trunc()),
                    ipnet::IpNet::V6(_) => None,
                })
                .collect(),
            local_addrs,
        };
        let too_many = |what: &str, n: usize, max: usize| {
            Err(Error::InvalidConfig(format!(
                "the eBPF connect redirect takes at most {max} {what}, not {n}; leave it to \
                 iptables (without `ebpf transparent`)"
            )))
        };
        if conf.excluded_ports.len() > MAX_EXCLUDED_PORTS {
            return too_many(
                "--exclude-outbound-ports",
                conf.excluded_ports.len(),
                MAX_EXCLUDED_PORTS,
            );
        }
        if conf.excluded_nets.len() > MAX_EXCLUDED_NETS {
            return too_many(
                "IPv4 --exclude-outbound-ips",
                conf.excluded_nets.len(),
                MAX_EXCLUDED_NETS,
            );
        }
        if conf.local_addrs.len() > MAX_LOCAL_ADDRS {
            return too_many(
                "local IPv4 addresses",
                conf.local_addrs.len(),
                MAX_LOCAL_ADDRS,
            );
        }
        if conf.outbound_port == 0 {
            return Err(Error::InvalidConfig(
                "--redirect-outbound-port must not be 0".into(),
            ));
        }
        Ok(conf)
    }

    /// The map value, laid out as `struct transparent_conf` in `bpf/local_redirect.bpf.c`
    /// (native byte order for numbers, network byte order for addresses).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TRANSPARENT_CONF_SIZE);
        out.extend_from_slice(&self.proxy_uid.to_ne_bytes());
        out.extend_from_slice(&self.outbound_port.to_ne_bytes());
        for n in [
            self.excluded_ports.len(),
            self.excluded_nets.len(),
            self.local_addrs.len(),
        ] {
            out.extend_from_slice(&(n as u16).to_ne_bytes());
        }
        for i in 0..MAX_EXCLUDED_PORTS {
            let port = self.excluded_ports.get(i).copied().unwrap_or(0);
            out.extend_from_slice(&port.to_ne_bytes());
        }
        for i in 0..MAX_EXCLUDED_NETS {
            let (net, mask) = self.excluded_nets.get(i).map_or(([0; 4], [0; 4]), |n| {
                (n.network().octets(), n.netmask().octets())
            });
            out.extend_from_slice(&net);
            out.extend_from_slice(&mask);
        }
        for i in 0..MAX_LOCAL_ADDRS {
            let addr = self.local_addrs.get(i).map_or([0; 4], |a| a.octets());
            out.extend_from_slice(&addr);
        }
        out
    }
}

/// `uid` of this process's user namespace as the kernel's initial user namespace sees it,
/// which is what the programs compare (`bpf_get_current_uid_gid`): the same as `uid` outside
/// user namespaces, the mapped uid in a user-namespaced pod. One level of nesting, as
/// `/proc/self/uid_map` gives it.
pub fn kernel_uid(uid: u32) -> Result<u32> {
    let map = fs::read_to_string("/proc/self/uid_map").map_err(|source| Error::Io {
        what: "reading /proc/self/uid_map".into(),
        source,
    })?;
    map_uid(&map, uid).ok_or_else(|| {
        Error::InvalidConfig(format!(
            "--proxy-uid {uid} is not mapped in this user namespace (/proc/self/uid_map: {})",
            map.trim()
        ))
    })
}

/// `uid` through the lines `inside outside count` of a uid map.
fn map_uid(map: &str, uid: u32) -> Option<u32> {
    map.lines().find_map(|line| {
        let mut fields = line.split_whitespace().map(|f| f.parse::<u64>().ok());
        let (inside, outside, count) = (fields.next()??, fields.next()??, fields.next()??);
        let offset = u64::from(uid).checked_sub(inside)?;
        (offset < count)
            .then(|| u32::try_from(outside + offset).ok())
            .flatten()
    })
}

/// The size of `struct transparent_conf`.
const TRANSPARENT_CONF_SIZE: usize =
    12 + 2 * MAX_EXCLUDED_PORTS + 8 * MAX_EXCLUDED_NETS + 4 * MAX_LOCAL_ADDRS;

/// The IPv4 addresses of this process's network namespace, loopback ones aside.
pub fn local_ipv4_addrs() -> Result<Vec<std::net::Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::Io {
        what: "listing this network namespace's addresses".into(),
        source: e.into(),
    })?;
    let mut out: Vec<std::net::Ipv4Addr> = addrs
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// `SO_NETNS_COOKIE` (Linux 5.14; asm-generic's value, which x86 and arm share).
const SO_NETNS_COOKIE: nix::libc::c_int = 71;

mod netns_cookie {
    // `nix`'s own macro writes the typed `getsockopt` for a `u64` option.
    use nix::libc;
    use nix::{getsockopt_impl, sockopt_impl};
    sockopt_impl!(
        /// The socket's network namespace cookie, the key the programs use.
        NetnsCookie,
        GetOnly,
        libc::SOL_SOCKET,
        super::SO_NETNS_COOKIE,
        u64
    );
}

/// The cookie of this process's network namespace, as `bpf_get_netns_cookie` sees it.
pub fn current_netns_cookie() -> Result<u64> {
    let io = |what: &str, source: std::io::Error| Error::Io {
        what: what.into(),
        source,
    };
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .map_err(|e| io("opening a socket to read the network namespace's cookie", e))?;
    nix::sys::socket::getsockopt(&socket, netns_cookie::NetnsCookie).map_err(|e| {
        io(
            "reading the network namespace's cookie (SO_NETNS_COOKIE)",
            e.into(),
        )
    })
}

/// Registers the current network namespace for the connect redirect of transparent mode:
/// from now on, its apps' outbound TCP connections (those [`TransparentConf`] says go to
/// the proxy) connect straight to the proxy's outbound port on 127.0.0.1, so that the app's
/// hop to the proxy is redirected too. Needs an [`install`] of `cfg` on a cgroup that holds
/// the namespace's apps and proxy. Replaces an earlier registration of the namespace.
pub fn register_transparent(cfg: &EbpfConfig, conf: &TransparentConf) -> Result<()> {
    let map = installed_transparent_map(cfg)?;
    let key = hex_words(&current_netns_cookie()?.to_ne_bytes());
    let value = hex_words(&conf.to_bytes());
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"map", &"update", &"pinned", &map];
    args.push(&"key");
    args.push(&"hex");
    args.extend(key.iter().map(|b| b as &dyn AsRef<std::ffi::OsStr>));
    args.push(&"value");
    args.push(&"hex");
    args.extend(value.iter().map(|b| b as &dyn AsRef<std::ffi::OsStr>));
    bpftool(cfg, &args)?;
    Ok(())
}

/// Takes the current network namespace out of the connect redirect: new connections go
/// through iptables again. Not registered is not an error.
pub fn unregister_transparent(cfg: &EbpfConfig) -> Result<()> {
    let map = installed_transparent_map(cfg)?;
    let key = hex_words(&current_netns_cookie()?.to_ne_bytes());
    if !is_registered(cfg, &map, &key)? {
        return Ok(());
    }
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"map", &"delete", &"pinned", &map];
    args.push(&"key");
    args.push(&"hex");
    args.extend(key.iter().map(|b| b as &dyn AsRef<std::ffi::OsStr>));
    bpftool(cfg, &args)?;
    Ok(())
}

/// Whether the current network namespace is registered for the connect redirect.
pub fn transparent_registered(cfg: &EbpfConfig) -> Result<bool> {
    let map = cfg.transparent_map_pin();
    if !map.exists() {
        return Ok(false);
    }
    let key = hex_words(&current_netns_cookie()?.to_ne_bytes());
    is_registered(cfg, &map, &key)
}

fn is_registered(cfg: &EbpfConfig, map: &Path, key: &[String]) -> Result<bool> {
    // A lookup of a missing key fails (and says so on stdout); a dump lists what is there.
    let dump = bpftool(cfg, &[&"-j", &"map", &"dump", &"pinned", &map])?;
    let words: Vec<String> = key.iter().map(|b| format!("\"0x{b}\"")).collect();
    Ok(dump.contains(&format!("\"key\":[{}]", words.join(","))))
}

/// The pinned map of an install whose programs include the connect redirect.
fn installed_transparent_map(cfg: &EbpfConfig) -> Result<PathBuf> {
    cfg.check_pins()?;
    let map = cfg.transparent_map_pin();
    if !map.exists() {
        return Err(Error::InvalidConfig(format!(
            "no eBPF install named {:?} with the connect redirect under {}: run `weft-iptables \
             ebpf install` (of this version) first",
            cfg.name,
            cfg.bpffs.display()
        )));
    }
    Ok(map)
}

/// `bytes` as bpftool's `hex` words.
fn hex_words(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

    fn conf(ports: usize, nets: usize, addrs: usize) -> Result<TransparentConf> {
        let config = Config {
            exclude_outbound_ports: (1..=ports as u16).collect(),
            exclude_outbound_ips: (0..nets)
                .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
                .chain(["fd00::/8".parse().unwrap()])
                .collect(),
            ..Config::default()
        };
        let addrs = (0..addrs as u8)
            .map(|i| std::net::Ipv4Addr::new(10, 1, 1, i))
            .collect();
        TransparentConf::new(&config, addrs)
    }

    #[test]
    fn the_connect_redirect_settings_are_laid_out_as_the_programs_read_them() {
        let mut c = conf(2, 1, 1).unwrap();
        c.excluded_nets = vec!["10.20.30.0/24".parse().unwrap()];
        let bytes = c.to_bytes();
        assert_eq!(bytes.len(), 396, "sizeof(struct transparent_conf)");
        assert_eq!(bytes[0..4], Config::default().proxy_uid.to_ne_bytes());
        assert_eq!(bytes[4..6], 15001u16.to_ne_bytes());
        assert_eq!(bytes[6..8], 2u16.to_ne_bytes(), "excluded ports");
        assert_eq!(bytes[8..10], 1u16.to_ne_bytes(), "excluded IPv4 networks");
        assert_eq!(bytes[10..12], 1u16.to_ne_bytes(), "local addresses");
        // excluded_ports at 12, excluded_nets at 76, local_addrs at 332.
        assert_eq!(
            bytes[12..16],
            [1u16.to_ne_bytes(), 2u16.to_ne_bytes()].concat()
        );
        assert_eq!(bytes[76..84], [10, 20, 30, 0, 255, 255, 255, 0]);
        assert_eq!(bytes[332..336], [10, 1, 1, 0]);
        assert!(bytes[336..].iter().all(|b| *b == 0));
    }

    #[test]
    fn uids_are_mapped_as_the_kernel_sees_them() {
        assert_eq!(
            map_uid("         0          0 4294967295\n", 5678),
            Some(5678)
        );
        let pod = "0 100000 65536\n";
        assert_eq!(map_uid(pod, 5678), Some(105_678));
        assert_eq!(map_uid(pod, 70_000), None);
        assert_eq!(map_uid("0 1000 1\n5678 200000 10\n", 5678), Some(200_000));
        assert_eq!(map_uid("garbage\n", 0), None);
    }

    #[test]
    fn dns_over_tcp_is_left_alone_with_the_dns_redirect_as_in_the_rules() {
        let config = Config {
            redirect_dns: true,
            exclude_outbound_ports: vec![8080],
            ..Config::default()
        };
        let conf = TransparentConf::new(&config, Vec::new()).unwrap();
        assert_eq!(conf.excluded_ports, [8080, 53]);
        let without = TransparentConf::new(&Config::default(), Vec::new()).unwrap();
        assert!(without.excluded_ports.is_empty());
    }

    #[test]
    fn more_than_the_programs_hold_is_refused_by_name() {
        assert!(conf(MAX_EXCLUDED_PORTS, MAX_EXCLUDED_NETS, MAX_LOCAL_ADDRS).is_ok());
        let err = |r: Result<TransparentConf>| r.unwrap_err().to_string();
        assert!(err(conf(MAX_EXCLUDED_PORTS + 1, 0, 0)).contains("--exclude-outbound-ports"));
        assert!(err(conf(0, MAX_EXCLUDED_NETS + 1, 0)).contains("--exclude-outbound-ips"));
        assert!(err(conf(0, 0, MAX_LOCAL_ADDRS + 1)).contains("local IPv4 addresses"));
    }
}
