//! Networks of Linux network namespaces for end-to-end tests.
//!
//! A [`Net`] owns every namespace it creates. Namespaces are named
//! `weft-<pid>-<n>-<label>`, so parallel tests (threads or processes) never
//! clash, and [`Net::new`] deletes namespaces left behind by test processes
//! that no longer exist. Nothing is ever created in the root namespace: veth
//! ends are created directly inside their namespaces.
//!
//! **Addresses.** Every [`Net::link`] or [`Net::lan`] gets the next subnet
//! `10.77.<k>.0/24` of its `Net` (k = 0, 1, …); on a link the first host is
//! `.1` and the second `.2`, on a LAN the i-th member is `.<i+1>`. Two
//! `Net`s reuse the same addresses without colliding, because each lives in
//! namespaces of its own.
//!
//! **Teardown.** When the `Net` and every [`Host`] and [`Proc`] handle are
//! dropped — also while unwinding from a panic — each [`Proc`] is killed
//! with its whole process group, any other process still inside one of the
//! namespaces is killed, and the namespaces are deleted (which removes the
//! veth pairs and bridges).
//!
//! **Running code inside a namespace.** [`Host::spawn`] and
//! [`Host::output`] start an ordinary [`Command`] from a thread that has
//! joined the namespace, so the child is in it too, and settings such as
//! [`CommandExt::uid`] keep working.
//! [`Host::enter`] and [`Host::thread`] run a closure on a thread inside the
//! namespace: sockets it creates belong to the namespace for their whole
//! life, whichever thread (or tokio runtime) uses them later. For async
//! code, bind a std socket in [`Host::enter`] and hand it to tokio
//! (`set_nonblocking(true)`, then `tokio::net::TcpListener::from_std`), or
//! build a current-thread runtime inside [`Host::thread`].
//!
//! ```no_run
//! use std::net::{TcpListener, TcpStream};
//! use std::process::Command;
//! use weft_tests::Net;
//!
//! # fn main() -> weft_tests::Result<()> {
//! let net = Net::new()?;
//! let (client, server) = (net.host("client")?, net.host("server")?);
//! net.link(&client, &server)?; // client 10.77.0.1, server 10.77.0.2
//!
//! // A real binary inside `server`, killed when `_proc` is dropped.
//! let mut cmd = Command::new("sleep");
//! cmd.arg("30");
//! let _proc = server.spawn(cmd)?;
//!
//! // In-process sockets inside a namespace.
//! let listener = server.enter(|| TcpListener::bind("0.0.0.0:8080"))?.expect("bind");
//! let ip = server.ip();
//! let _stream = client.enter(move || TcpStream::connect((ip, 8080)))?.expect("connect");
//! let _conn = listener.accept().expect("accept");
//!
//! // Shell one-liners, bounded by `TIMEOUT`.
//! println!("{}", client.sh("ip -br addr")?);
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Default bound for commands run with [`Host::sh`] and for [`Proc`] waits.
pub const TIMEOUT: Duration = Duration::from_secs(20);

const NS_PREFIX: &str = "weft-";
const NETNS_DIR: &str = "/run/netns";

/// What can go wrong while building or using a test network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A command or wait did not finish in time.
    #[error("`{cmd}` did not finish within {after:?}")]
    Timeout {
        /// The command line.
        cmd: String,
        /// The bound that was exceeded.
        after: Duration,
    },
    /// Joining a namespace failed.
    #[error("setns into {ns}: {source}")]
    Setns {
        /// The namespace.
        ns: String,
        /// The errno.
        source: nix::Error,
    },
    /// `ip` (iproute2) is not installed.
    #[error("`ip` not found: install the Debian package `iproute2`")]
    NoIproute2,
}

/// The harness's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One test's network: the namespaces it created and how they are joined.
/// Cheap handles ([`Host`], [`Proc`]) keep it alive; the last one dropped
/// tears everything down.
pub struct Net {
    shared: Arc<Shared>,
}

struct Shared {
    id: u32,
    namespaces: Mutex<Vec<String>>,
    next_subnet: AtomicU32,
}

/// One network namespace: a host with its own interfaces, addresses,
/// routes and iptables.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

struct HostInner {
    label: String,
    ns: String,
    ifaces: Mutex<Vec<Iface>>,
    _net: Arc<Shared>,
}

/// One interface of a host, with its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// The host's label, as given to [`Net::host`].
    pub host: String,
    /// The interface name inside the host (`eth0`, `eth1`, …).
    pub name: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// The prefix length of its subnet (24).
    pub prefix: u8,
}

/// A veth pair between two hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The first host's end (`10.77.<k>.1`).
    pub a: Iface,
    /// The second host's end (`10.77.<k>.2`).
    pub b: Iface,
}

/// Hosts joined by a bridge that lives in a namespace of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lan {
    /// The namespace holding the bridge `br0`.
    pub bridge_netns: String,
    /// One interface per member, in the order given.
    pub members: Vec<Iface>,
}

impl Net {
    /// Starts an empty network. Deletes namespaces left behind by earlier
    /// test processes that have exited.
    pub fn new() -> Result<Net> {
        which_ip()?;
        remove_stale_namespaces();
        Ok(Net {
            shared: Arc::new(Shared {
                id: NEXT.fetch_add(1, Ordering::Relaxed),
                namespaces: Mutex::new(Vec::new()),
                next_subnet: AtomicU32::new(0),
            }),
        })
    }

    /// Creates a host (a namespace with `lo` up). `label` names it in
    /// messages and in the namespace name.
    pub fn host(&self, label: &str) -> Result<Host> {
        let ns = self.shared.new_namespace(label)?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(Host {
            inner: Arc::new(HostInner {
                label: label.to_string(),
                ns,
                ifaces: Mutex::new(Vec::new()),
                _net: self.shared.clone(),
            }),
        })
    }

    /// Joins two hosts with a veth pair on the next `10.77.<k>.0/24`: `a`
    /// gets `.1`, `b` gets `.2`. Both ends are up.
    pub fn link(&self, a: &Host, b: &Host) -> Result<Link> {
        let k = self.shared.subnet()?;
        let (a_if, b_if) = (a.next_iface_name(), b.next_iface_name());
        ip(&[
            "link",
            "add",
            &a_if,
            "netns",
            a.netns(),
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            b.netns(),
        ])?;
        let a_end = a.configure(&a_if, Ipv4Addr::new(10, 77, k, 1))?;
        let b_end = b.configure(&b_if, Ipv4Addr::new(10, 77, k, 2))?;
        Ok(Link { a: a_end, b: b_end })
    }

    /// Joins hosts with a bridge in a namespace of its own, on the next
    /// `10.77.<k>.0/24`: the i-th host gets `.<i+1>`.
    pub fn lan(&self, hosts: &[&Host]) -> Result<Lan> {
        assert!(hosts.len() < 250, "a LAN holds at most 249 hosts");
        let k = self.shared.subnet()?;
        let bridge_ns = self.shared.new_namespace(&format!("lan{k}"))?;
        ip(&["-n", &bridge_ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"])?;
        let mut members = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let port = format!("p{i}");
            let name = host.next_iface_name();
            ip(&[
                "link",
                "add",
                &name,
                "netns",
                host.netns(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &bridge_ns,
            ])?;
            ip(&[
                "-n", &bridge_ns, "link", "set", &port, "master", "br0", "up",
            ])?;
            members.push(host.configure(&name, Ipv4Addr::new(10, 77, k, i as u8 + 1))?);
        }
        Ok(Lan {
            bridge_netns: bridge_ns,
            members,
        })
    }
}

impl Shared {
    fn new_namespace(&self, label: &str) -> Result<String> {
        let clean: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        let ns = format!(
            "{NS_PREFIX}{}-{}-{}{clean}",
            std::process::id(),
            self.id,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Registered first, so a half-made namespace is still cleaned up.
        self.namespaces.lock().unwrap().push(ns.clone());
        // The first `ip netns add` on a machine sets up /run/netns and can
        // race with a parallel one; a retry settles it.
        let mut attempt = 0;
        loop {
            match ip(&["netns", "add", &ns]) {
                Ok(_) => return Ok(ns),
                Err(_) if attempt < 3 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(50 * attempt));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn subnet(&self) -> Result<u8> {
        let k = self.next_subnet.fetch_add(1, Ordering::Relaxed);
        u8::try_from(k).map_err(|_| Error::Io {
            what: "allocating a subnet".into(),
            source: std::io::Error::other("a Net has at most 256 links and LANs"),
        })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let namespaces =
            std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|e| e.into_inner()));
        for ns in &namespaces {
            kill_namespace_processes(ns);
        }
        for ns in &namespaces {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("weft-tests: could not delete namespace {ns}: {e}");
            }
        }
    }
}

impl Host {
    /// The label given to [`Net::host`].
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn netns(&self) -> &str {
        &self.inner.ns
    }

    /// The host's first IPv4 address (of its first link or LAN).
    ///
    /// # Panics
    /// When the host is not joined to anything yet.
    pub fn ip(&self) -> Ipv4Addr {
        self.ips()
            .first()
            .copied()
            .unwrap_or_else(|| panic!("host {} has no address: link it first", self.label()))
    }

    /// Every IPv4 address of the host, in the order they were assigned.
    pub fn ips(&self) -> Vec<Ipv4Addr> {
        self.ifaces().iter().map(|i| i.ip).collect()
    }

    /// Every interface of the host, except `lo`.
    pub fn ifaces(&self) -> Vec<Iface> {
        self.inner.ifaces.lock().unwrap().clone()
    }

    /// Sends everything without a more specific route via `gateway`, so
    /// that any "outside" address is routable from this host.
    pub fn default_route(&self, gateway: Ipv4Addr) -> Result<()> {
        ip(&[
            "-n",
            self.netns(),
            "route",
            "replace",
            "default",
            "via",
            &gateway.to_string(),
        ])
        .map(drop)
    }

    /// Runs `script` with `sh -c` inside the namespace, bounded by
    /// [`TIMEOUT`], and returns its stdout; fails when it exits non-zero.
    pub fn sh(&self, script: &str) -> Result<String> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        let out = self.output(cmd, TIMEOUT)?;
        if !out.status.success() {
            return Err(Error::Command {
                cmd: format!("[{}] {script}", self.label()),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `cmd` inside the namespace in a process group of its own.
    /// The returned guard kills the group when dropped.
    pub fn spawn(&self, mut cmd: Command) -> Result<Proc> {
        let line = command_line(&cmd);
        cmd.process_group(0);
        let child = self
            .enter(move || cmd.spawn())?
            .map_err(|source| Error::Io {
                what: format!("spawning `{line}` in {}", self.netns()),
                source,
            })?;
        Ok(Proc {
            child,
            line,
            _host: self.clone(),
        })
    }

    /// Runs `cmd` inside the namespace to completion, capturing its output;
    /// kills it and fails with [`Error::Timeout`] after `timeout`.
    pub fn output(&self, mut cmd: Command, timeout: Duration) -> Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn(cmd)?.wait_with_output(timeout)
    }

    /// Runs `f` on a thread that has joined the namespace, waits for it and
    /// returns its result; a panic in `f` is passed on.
    pub fn enter<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let ns = self.open_ns()?;
        let name = self.netns().to_string();
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| Error::Setns { ns: name, source })?;
                Ok(f())
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `f` on a background thread that has joined the namespace
    /// (e.g. a listener). Joining the handle returns `f`'s result.
    pub fn thread<F, R>(&self, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let ns = self.open_ns()?;
        let name = self.netns().to_string();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.label()))
            .spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {name}: {e}"));
                f()
            })
            .map_err(|source| Error::Io {
                what: "spawning a thread".into(),
                source,
            })
    }

    fn open_ns(&self) -> Result<File> {
        let path = format!("{NETNS_DIR}/{}", self.netns());
        File::open(&path).map_err(|source| Error::Io {
            what: format!("opening {path}"),
            source,
        })
    }

    fn next_iface_name(&self) -> String {
        // Reserve the name now; the address is filled in by `configure`.
        let ifaces = self.inner.ifaces.lock().unwrap();
        format!("eth{}", ifaces.len())
    }

    fn configure(&self, name: &str, addr: Ipv4Addr) -> Result<Iface> {
        let ns = self.netns();
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", name])?;
        ip(&["-n", ns, "link", "set", name, "up"])?;
        let iface = Iface {
            host: self.label().to_string(),
            name: name.to_string(),
            ip: addr,
            prefix: 24,
        };
        self.inner.ifaces.lock().unwrap().push(iface.clone());
        Ok(iface)
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("label", &self.inner.label)
            .field("netns", &self.inner.ns)
            .field("ifaces", &self.ifaces())
            .finish()
    }
}

/// A child process started inside a namespace. Dropping the guard kills
/// its whole process group and reaps it.
pub struct Proc {
    child: Child,
    line: String,
    _host: Host,
}

impl Proc {
    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying [`Child`], e.g. to take its stdin or stdout.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.child.try_wait().map_err(|source| Error::Io {
                what: format!("waiting for `{}`", self.line),
                source,
            })?;
            if let Some(status) = status {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Error::Timeout {
                    cmd: self.line.clone(),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `timeout` for the process to exit and collects what it
    /// wrote to its (piped) stdout and stderr.
    pub fn wait_with_output(mut self, timeout: Duration) -> Result<Output> {
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = drain(self.child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(self.child.stderr.take().map(|p| Box::new(p) as _));
        let status = self.wait_timeout(timeout)?;
        // The group is killed so that grandchildren holding the pipes
        // cannot keep the readers waiting.
        self.kill();
        Ok(Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }

    /// Kills the process group (SIGKILL) and reaps the child.
    pub fn kill(&mut self) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn which_ip() -> Result<()> {
    let found = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    if found {
        Ok(())
    } else {
        Err(Error::NoIproute2)
    }
}

/// Runs `ip <args>` in the root namespace, returning stdout.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Io {
            what: "running `ip`".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kills (SIGKILL) every process whose network namespace is `ns`, except
/// this test process itself.
fn kill_namespace_processes(ns: &str) {
    let me = std::process::id();
    let Ok(pids) = ip(&["netns", "pids", ns]) else {
        return;
    };
    let pids: HashSet<i32> = pids
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p as u32 != me)
        .collect();
    for pid in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Deletes `weft-<pid>-…` namespaces whose test process has exited.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_namespace_processes(&name);
        let _ = ip(&["netns", "del", &name]);
    }
}
