//! The pieces of weft's end-to-end tests: the real binaries (`weft-control`, `weftctl`,
//! `weft-proxy`, `weft-iptables`) run inside network namespaces built by `weft-tests`, plus
//! small in-process apps, a packet capture and an HTTP/1.0 getter for the admin endpoints.
//!
//! Everything here is a guard: processes die with their [`weft_tests::Proc`], apps stop when
//! dropped, namespaces (and the iptables rules inside them) go with the [`Net`], and the
//! working directory with the [`Env`]. When a test panics, [`Env`] prints the tail of every
//! process's log before it goes.
#![allow(dead_code)]

mod app;
mod capture;
pub mod in_host;

use app::connect_in;
pub use app::{App, connect, exchange, http_get, request, request_from};
pub use capture::{Capture, contains};

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use weft_tests::{Host, Lan, Net, Proc};

/// The uid the proxy runs as; the iptables rules exempt it.
pub const PROXY_UID: u32 = 5678;
/// The control plane's REST API, inside its namespace.
pub const API: &str = "127.0.0.1:5681";
/// The control plane's dataplane (gRPC) port.
pub const DP_PORT: u16 = 5678;
/// The proxies' admin endpoint, inside each host's namespace.
pub const ADMIN: &str = "127.0.0.1:9901";
/// How long to wait for anything that should happen "soon".
pub const WAIT: Duration = Duration::from_secs(20);

/// The weft binaries, found next to `weft-proxy` in the target directory.
#[derive(Debug, Clone)]
pub struct Bins {
    pub proxy: PathBuf,
    pub control: PathBuf,
    pub weftctl: PathBuf,
    pub iptables: PathBuf,
}

impl Bins {
    /// Cargo hands integration tests only their own package's binaries, and builds a
    /// package's binaries only for its own integration tests: `cargo test --workspace` builds
    /// all four because `control/`, `iptables/` and `proxy/` each have some (so keep
    /// `iptables/tests/cli.rs`). Otherwise `cargo build --workspace --bins` first. The error
    /// names what is missing.
    pub fn find() -> Result<Bins, String> {
        let proxy = PathBuf::from(env!("CARGO_BIN_EXE_weft-proxy"));
        let dir = proxy.parent().expect("a target directory").to_path_buf();
        let bins = Bins {
            control: dir.join("weft-control"),
            weftctl: dir.join("weftctl"),
            iptables: dir.join("weft-iptables"),
            proxy,
        };
        for b in [&bins.proxy, &bins.control, &bins.weftctl, &bins.iptables] {
            if !b.exists() {
                return Err(format!(
                    "{} is missing: run `cargo test --workspace` or `cargo build --workspace --bins` first",
                    b.display()
                ));
            }
        }
        Ok(bins)
    }
}

/// The three hosts most tests use, on one LAN: the control plane's, a client's and a
/// server's. The LAN goes when this is dropped (before the [`Env`]'s network).
pub struct ThreeHosts {
    pub cp: Host,
    pub client: Host,
    pub server: Host,
    _lan: Lan,
}

impl ThreeHosts {
    pub fn new(env: &Env) -> ThreeHosts {
        let (cp, client, server) = (env.host("cp"), env.host("client"), env.host("server"));
        let lan = env.net.lan(&[&cp, &client, &server]).expect("a LAN");
        ThreeHosts {
            cp,
            client,
            server,
            _lan: lan,
        }
    }
}

/// One test's world: its network, a working directory every process can read, and the
/// logs of the processes it started.
pub struct Env {
    pub net: Net,
    pub bins: Bins,
    dir: tempfile::TempDir,
    logs: Mutex<Vec<PathBuf>>,
    started: Instant,
    name: &'static str,
}

/// Starts a test's [`Env`], or returns from the test with a visible `SKIPPED:` line when it
/// cannot run here (not root, binaries not built).
macro_rules! env_or_skip {
    ($name:expr) => {
        match crate::e2e::Env::new($name) {
            Ok(env) => env,
            Err(why) => {
                weft_tests::skipped(&format!("{}: {why}", $name));
                return;
            }
        }
    };
}

impl Env {
    pub fn new(name: &'static str) -> Result<Env, String> {
        if !weft_tests::is_root() {
            return Err("needs root (network namespaces and iptables)".into());
        }
        let bins = Bins::find()?;
        let net = Net::new().map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("weft-e2e-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // The proxies run as PROXY_UID: they must read their files here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        Ok(Env {
            net,
            bins,
            dir,
            logs: Mutex::new(Vec::new()),
            started: Instant::now(),
            name,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` to `name` in the working directory, readable by everyone.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir().join(name);
        fs::write(&path, text).expect("write a test file");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        path
    }

    /// A log file for a process; its tail is printed if the test fails.
    fn log(&self, name: &str) -> (fs::File, PathBuf) {
        let path = self.dir().join(format!("{name}.log"));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open a log");
        self.logs.lock().unwrap().push(path.clone());
        (file, path)
    }

    /// A host on nothing yet.
    pub fn host(&self, label: &str) -> Host {
        self.net.host(label).expect("create a host")
    }

    /// Runs a command inside `host` to completion; panics with its stderr when it fails.
    pub fn run(&self, host: &Host, cmd: Command) -> String {
        let line = format!("{cmd:?}");
        let out = host.output(cmd, WAIT).expect("run a command");
        assert!(
            out.status.success(),
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut err = std::io::stderr();
            for path in self.logs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let text = fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                let _ = writeln!(
                    err,
                    "----- {}: {} (last 40 lines)",
                    self.name,
                    path.display()
                );
                for l in tail {
                    let _ = writeln!(err, "{l}");
                }
            }
        } else {
            eprintln!("{}: {:.1?}", self.name, self.started.elapsed());
        }
    }
}

/// `weft-control run` inside its own host, with its REST API on the host's loopback (so
/// mutations are accepted) and its dataplane server on the host's LAN address.
pub struct ControlPlane {
    pub host: Host,
    pub data_dir: PathBuf,
    /// `cp-ca.pem`, copied where the proxies can read it.
    pub ca_file: PathBuf,
    bins: Bins,
    proc: Option<Proc>,
    log: PathBuf,
}

impl ControlPlane {
    pub fn start(env: &Env, host: &Host) -> ControlPlane {
        let data_dir = env.dir().join("cp-data");
        let (_, log) = env.log("weft-control");
        let mut cp = ControlPlane {
            host: host.clone(),
            ca_file: env.dir().join("cp-ca.pem"),
            data_dir,
            bins: env.bins.clone(),
            proc: None,
            log,
        };
        cp.spawn();
        fs::copy(cp.data_dir.join("cp-ca.pem"), &cp.ca_file).expect("copy cp-ca.pem");
        fs::set_permissions(&cp.ca_file, fs::Permissions::from_mode(0o644)).expect("chmod");
        cp
    }

    /// `https://<ip>:5678`, as proxies on other hosts reach it.
    pub fn cp_address(&self) -> String {
        format!("https://{}:{DP_PORT}", self.host.ip())
    }

    fn spawn(&mut self) {
        let ip = self.host.ip();
        let log = fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("open the log");
        let mut cmd = Command::new(&self.bins.control);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--api-address", API])
            .args(["--dp-server-address", &format!("{ip}:{DP_PORT}")])
            .args(["--dp-server-san", &ip.to_string()])
            .env("WEFT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        self.proc = Some(self.host.spawn(cmd).expect("start weft-control"));
        let dp = SocketAddr::new(ip.into(), DP_PORT);
        // The dataplane port is bound before its TLS (and `cp-ca.pem`) is ready.
        let ca = self.data_dir.join("cp-ca.pem");
        wait_for("the control plane's API and dataplane server", WAIT, || {
            self.get("/").0 == 200
                && connect_in(&self.host, dp).is_ok()
                && fs::read_to_string(&ca).is_ok_and(|pem| pem.contains("END CERTIFICATE"))
        });
    }

    /// Kills the process outright (no graceful shutdown).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again on the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn weftctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(&self.bins.weftctl);
        cmd.args(["--api-url", &format!("http://{API}")]).args(args);
        self.host.output(cmd, WAIT).expect("run weftctl")
    }

    /// `weftctl apply -f` of `yaml` (written to a file in `dir`).
    pub fn apply(&self, dir: &Path, yaml: &str) {
        let path = dir.join(format!("apply-{}.yaml", unique()));
        fs::write(&path, yaml).expect("write the resources");
        let out = self.weftctl(&["apply", "-f", path.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "weftctl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A dataplane token from `weftctl generate dataplane-token`.
    pub fn token(&self, mesh: &str, name: &str) -> String {
        let out = self.weftctl(&[
            "generate",
            "dataplane-token",
            "--mesh",
            mesh,
            "--name",
            name,
        ]);
        assert!(
            out.status.success(),
            "weftctl generate dataplane-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 token")
    }

    /// `GET path` on the REST API: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.host, API.parse().expect("addr"), path).unwrap_or((0, String::new()))
    }
}

/// A Dataplane in transparent mode with one TCP inbound `port` for `service`.
pub fn dataplane_yaml(mesh: &str, name: &str, ip: Ipv4Addr, service: &str, port: u16) -> String {
    dataplane_yaml_as(mesh, name, ip, service, port, "tcp")
}

/// [`dataplane_yaml`] with the inbound's `kuma.io/protocol`.
pub fn dataplane_yaml_as(
    mesh: &str,
    name: &str,
    ip: Ipv4Addr,
    service: &str,
    port: u16,
    protocol: &str,
) -> String {
    dataplane_yaml_tagged(mesh, name, ip, service, port, protocol, &[])
}

/// [`dataplane_yaml_as`] with more tags on the inbound (e.g. `version: v2`).
pub fn dataplane_yaml_tagged(
    mesh: &str,
    name: &str,
    ip: Ipv4Addr,
    service: &str,
    port: u16,
    protocol: &str,
    tags: &[(&str, &str)],
) -> String {
    let extra: String = tags
        .iter()
        .map(|(k, v)| format!("        {k}: {v}\n"))
        .collect();
    format!(
        "type: Dataplane
mesh: {mesh}
name: {name}
networking:
  address: {ip}
  inbound:
    - port: {port}
      servicePort: {port}
      tags:
        kuma.io/service: {service}
        kuma.io/protocol: {protocol}
{extra}  transparentProxying:
    redirectPortInbound: 15006
    redirectPortOutbound: 15001
"
    )
}

/// A Mesh with a builtin CA, STRICT mTLS, certificates valid for `cert_lifetime`.
pub fn mesh_yaml(name: &str, passthrough: bool, cert_lifetime: &str) -> String {
    format!(
        "type: Mesh
name: {name}
mtls:
  enabledBackend: ca-1
  backends:
    - name: ca-1
      type: builtin
      mode: STRICT
      dpCert:
        rotation:
          expiration: {cert_lifetime}
networking:
  outbound:
    passthrough: {passthrough}
"
    )
}

/// A TrafficPermission from service `from` to service `to`.
pub fn permission_yaml(mesh: &str, name: &str, from: &str, to: &str) -> String {
    format!(
        "type: TrafficPermission
mesh: {mesh}
name: {name}
sources:
  - match:
      kuma.io/service: {from}
destinations:
  - match:
      kuma.io/service: {to}
"
    )
}

/// A transparent sidecar: the host's iptables rules plus `weft-proxy run` as [`PROXY_UID`].
pub struct Sidecar {
    pub host: Host,
    pub mesh: String,
    pub name: String,
    proc: Option<Proc>,
}

impl Sidecar {
    /// Installs the transparent-proxy rules in `host`, registers Dataplane `name` (one TCP
    /// inbound `port` for `service`) and waits until the proxy is ready.
    pub fn start(
        env: &Env,
        cp: &ControlPlane,
        host: &Host,
        mesh: &str,
        name: &str,
        service: &str,
        port: u16,
    ) -> Sidecar {
        Self::start_as(env, cp, host, mesh, name, service, port, "tcp")
    }

    /// [`Sidecar::start`] with the inbound's `kuma.io/protocol`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_as(
        env: &Env,
        cp: &ControlPlane,
        host: &Host,
        mesh: &str,
        name: &str,
        service: &str,
        port: u16,
        protocol: &str,
    ) -> Sidecar {
        Self::start_tagged(env, cp, host, mesh, name, service, port, protocol, &[])
    }

    /// [`Sidecar::start_as`] with more tags on the inbound (e.g. `version: v2`).
    #[allow(clippy::too_many_arguments)]
    pub fn start_tagged(
        env: &Env,
        cp: &ControlPlane,
        host: &Host,
        mesh: &str,
        name: &str,
        service: &str,
        port: u16,
        protocol: &str,
        tags: &[(&str, &str)],
    ) -> Sidecar {
        let mut rules = Command::new(&env.bins.iptables);
        rules.args(["install", "--proxy-uid", &PROXY_UID.to_string()]);
        env.run(host, rules);

        let dp = env.write(
            &format!("dp-{name}.yaml"),
            &dataplane_yaml_tagged(mesh, name, host.ip(), service, port, protocol, tags),
        );
        let token = env.write(&format!("token-{name}"), &cp.token(mesh, name));
        let (log, _) = env.log(&format!("weft-proxy-{name}"));
        let mut cmd = Command::new(&env.bins.proxy);
        cmd.arg("run")
            .args(["--cp-address", &cp.cp_address()])
            .arg("--ca-cert-file")
            .arg(&cp.ca_file)
            .arg("--dataplane-file")
            .arg(&dp)
            .arg("--dataplane-token-file")
            .arg(&token)
            .args(["--admin-address", ADMIN, "--drain-time", "10s"])
            .env("WEFT_LOG", "info")
            .current_dir(env.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .uid(PROXY_UID)
            .gid(PROXY_UID);
        let proc = host.spawn(cmd).expect("start weft-proxy");
        let sidecar = Sidecar {
            host: host.clone(),
            mesh: mesh.into(),
            name: name.into(),
            proc: Some(proc),
        };
        wait_for(&format!("proxy {name} to be ready"), WAIT, || {
            sidecar.admin("/ready").0 == 200
        });
        sidecar
    }

    /// `GET path` on the admin endpoint: (status, body); (0, "") when it does not answer.
    pub fn admin(&self, path: &str) -> (u16, String) {
        http_get(&self.host, ADMIN.parse().expect("addr"), path).unwrap_or((0, String::new()))
    }

    /// One series of `/metrics` (`name` or `name{labels}`), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (status, text) = self.admin("/metrics");
        assert_eq!(status, 200, "/metrics of {}: {text}", self.name);
        metric(&text, series)
    }

    /// `/config` as JSON.
    pub fn config(&self) -> serde_json::Value {
        let (status, body) = self.admin("/config");
        assert_eq!(status, 200, "/config of {}: {body}", self.name);
        serde_json::from_str(&body).expect("/config is JSON")
    }

    /// Serial of the proxy's current certificate.
    pub fn cert_serial(&self) -> String {
        let (status, body) = self.admin("/certs");
        assert_eq!(status, 200, "/certs of {}: {body}", self.name);
        let v: serde_json::Value = serde_json::from_str(&body).expect("/certs is JSON");
        v["certificates"][0]["serial"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The proxy's pid.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("running").pid()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.proc.as_ref().expect("running").pid();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal");
    }

    /// Waits for the proxy to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let status = self
            .proc
            .as_mut()
            .expect("running")
            .wait_timeout(timeout)
            .expect("the proxy exits");
        self.proc = None;
        status
    }
}

/// The value of `series` (`name` or `name{labels}`) in Prometheus/OpenMetrics text; 0 when
/// the series is absent (a labelled counter that was never incremented).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A string no other test run produces.
pub fn unique() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `VmRSS` of a process, in KiB.
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}
