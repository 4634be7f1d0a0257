//! The sidecar topology: two network namespaces joined by a veth pair.
//!
//! ```text
//!  client namespace (10.77.0.1)              server namespace (10.77.0.2)
//!  load generator ── outbound sidecar ══ mTLS ══ inbound sidecar ── upstream app
//!  (CPU 0, in-process)  (CPU 1)                  (CPU 1)            (CPU 1, :8080)
//! ```
//!
//! The generator runs in this process on threads that joined the client
//! namespace; the upstream is `weft-bench serve` (HTTP/1.1 + h2c with a
//! fixed body on :8080, gRPC echo on :8081, TCP echo on :8082) started from this very
//! executable in the server namespace. Every process
//! started here lives in one of the namespaces, so dropping the
//! [`Topology`] kills them all and deletes the namespaces, also on error or
//! panic ([`weft_tests::Net`]).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_tests::{Host, Net, Proc};

use super::MeshError;

/// The upstream app's HTTP/1.1 + h2c port, on every address of the server
/// namespace.
pub const UPSTREAM_PORT: u16 = 8080;

/// The trace collector's port (Zipkin's), in the server namespace: a second `serve` that
/// answers any `POST`, on the generator's CPU at idle priority, like a collector on another
/// machine.
pub const TRACE_SINK_PORT: u16 = 9411;

/// The same collector's OTLP/gRPC port (OTLP's), which takes every export.
pub const OTLP_SINK_PORT: u16 = 4317;

/// The upstream app's gRPC echo port, beside [`UPSTREAM_PORT`].
pub const GRPC_PORT: u16 = 8081;

/// The upstream app's raw TCP echo port (the `tcp` protocol's ping-pong),
/// beside [`UPSTREAM_PORT`].
pub const TCP_ECHO_PORT: u16 = 8082;

/// What the topology needs to know to start.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    /// The `weft-bench` executable that runs the upstream (`serve`).
    pub self_exe: PathBuf,
    /// Response body bytes of the upstream.
    pub body_size: usize,
    /// CPU of the load generator.
    pub generator_cpu: usize,
    /// CPU of the sidecars and the upstream.
    pub sidecar_cpu: usize,
    /// Keep both CPUs awake with a lowest-priority busy loop each.
    pub spin: bool,
}

/// The two namespaces, the upstream app, and a scratch directory for
/// configs, certificates and logs.
pub struct Topology {
    /// Holds the generator and the outbound sidecar.
    pub client: Host,
    /// Holds the inbound sidecar and the upstream app.
    pub server: Host,
    /// The client namespace's address on the veth pair.
    pub client_ip: Ipv4Addr,
    /// The server namespace's address on the veth pair.
    pub server_ip: Ipv4Addr,
    /// What the topology was built with.
    pub opts: TopologyOptions,
    upstream: Proc,
    trace_sink: Proc,
    spinners: Vec<Proc>,
    dir: tempfile::TempDir,
    _net: Net,
}

impl Topology {
    /// Builds the namespaces and starts the upstream (and the CPU
    /// spinners). Needs root.
    pub fn build(opts: TopologyOptions) -> Result<Topology, MeshError> {
        if !weft_tests::is_root() {
            return Err(MeshError::NotRoot);
        }
        let dir = tempfile::Builder::new()
            .prefix("weft-bench-mesh-")
            .tempdir()
            .map_err(|e| MeshError::io("creating a scratch directory", e))?;
        let net = Net::new()?;
        let client = net.host("client")?;
        let server = net.host("server")?;
        let link = net.link(&client, &server)?;
        let mut spinners = Vec::new();
        if opts.spin {
            for cpu in [opts.generator_cpu, opts.sidecar_cpu] {
                spinners.push(spawn_spinner(&client, cpu)?);
            }
        }
        let mut topo_cmd = pinned(opts.sidecar_cpu, &opts.self_exe);
        topo_cmd.args([
            "serve",
            "--http",
            &format!("0.0.0.0:{UPSTREAM_PORT}"),
            "--grpc",
            &format!("0.0.0.0:{GRPC_PORT}"),
            "--tcp",
            &format!("0.0.0.0:{TCP_ECHO_PORT}"),
            "--body-size",
            &opts.body_size.to_string(),
            "--threads",
            "1",
            "--cpu",
            &opts.sidecar_cpu.to_string(),
        ]);
        let upstream = spawn_logged(&server, topo_cmd, dir.path(), "upstream")?;
        // The sidecars' span exports go to a collector of their own, not to the upstream:
        // a collector's work is not the mesh's, and on the sidecars' CPU it would be counted
        // as tracing's cost. It stands for a collector on another machine, so it runs at
        // SCHED_IDLE on the generator's CPU and takes only what the generator leaves: at
        // normal priority, each OTLP batch it decoded (512 spans, some milliseconds) held the
        // generator back, the closed loop stalled, and the sidecars' CPU sat idle for about
        // 1 µs per request, which the benchmark then charged to OTLP tracing.
        let mut sink_cmd = Command::new("chrt");
        sink_cmd
            .args(["--idle", "0", "taskset", "-c"])
            .arg(opts.generator_cpu.to_string())
            .arg(&opts.self_exe);
        sink_cmd.args([
            "serve",
            "--http",
            &format!("0.0.0.0:{TRACE_SINK_PORT}"),
            "--otlp",
            &format!("0.0.0.0:{OTLP_SINK_PORT}"),
            "--body-size",
            "0",
            "--threads",
            "1",
            "--cpu",
            &opts.generator_cpu.to_string(),
        ]);
        let trace_sink = spawn_logged(&server, sink_cmd, dir.path(), "trace-sink")?;
        let topo = Topology {
            client,
            server,
            client_ip: link.a.ip,
            server_ip: link.b.ip,
            opts,
            upstream,
            trace_sink,
            spinners,
            dir,
            _net: net,
        };
        let addr = SocketAddr::from((topo.server_ip, UPSTREAM_PORT));
        let mut topo = topo;
        wait_http_ok(
            &topo.client,
            addr,
            "/",
            Duration::from_secs(10),
            Some(&mut topo.upstream),
        )
        .map_err(|e| topo.start_failure("upstream", &e))?;
        let sink = SocketAddr::from((topo.server_ip, TRACE_SINK_PORT));
        wait_http_ok(
            &topo.client,
            sink,
            "/",
            Duration::from_secs(10),
            Some(&mut topo.trace_sink),
        )
        .map_err(|e| topo.start_failure("trace-sink", &e))?;
        Ok(topo)
    }

    /// The scratch directory (configs, certificates, logs); deleted on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The upstream app's process id.
    pub fn upstream_pid(&self) -> u32 {
        self.upstream.pid()
    }

    /// Whether the CPU spinners are running.
    pub fn spinning(&self) -> bool {
        !self.spinners.is_empty()
    }

    /// Starts `cmd` in `host`, its output going to `<dir>/<name>.log`.
    pub fn spawn(&self, host: &Host, cmd: Command, name: &str) -> Result<Proc, MeshError> {
        spawn_logged(host, cmd, self.dir(), name)
    }

    /// A [`MeshError::Start`] for `what`, with the end of its log.
    pub fn start_failure(&self, what: &str, why: &str) -> MeshError {
        let log = self.dir().join(format!("{what}.log"));
        let tail = std::fs::read_to_string(&log)
            .map(|s| {
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(8)..].join("\n")
            })
            .unwrap_or_default();
        MeshError::Start {
            what: what.to_owned(),
            why: why.to_owned(),
            log: tail,
        }
    }
}

/// `taskset -c <cpu> <program>`: the program and every thread it starts
/// run on `cpu` only.
pub fn pinned(cpu: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpu.to_string()).arg(program);
    cmd
}

fn spawn_logged(host: &Host, mut cmd: Command, dir: &Path, name: &str) -> Result<Proc, MeshError> {
    let path = dir.join(format!("{name}.log"));
    let log = File::create(&path)
        .map_err(|e| MeshError::io(format!("creating {}", path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| MeshError::io("duplicating a log file", e))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    Ok(host.spawn(cmd)?)
}

/// A `SCHED_IDLE` busy loop on `cpu`: an idle vCPU wakes slowly, which
/// would add tens of microseconds to every request of a latency run. The
/// loop only runs when nothing else wants the CPU, and it is no sidecar, so
/// its CPU time is never counted.
fn spawn_spinner(host: &Host, cpu: usize) -> Result<Proc, MeshError> {
    let mut cmd = Command::new("chrt");
    cmd.args(["--idle", "0", "taskset", "-c", &cpu.to_string()])
        .args(["sh", "-c", "while :; do :; done"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(host.spawn(cmd)?)
}

/// `GET path` over a fresh HTTP/1.1 connection from inside `host`; returns
/// the status once the whole response has been read.
pub fn http_get(host: &Host, addr: SocketAddr, path: &str) -> Result<u16, String> {
    http_fetch(host, addr, path).map(|(code, _)| code)
}

/// `GET path` from inside `host`'s namespace: the status code and the body
/// (read to the end; the request asks the server to close).
pub fn http_fetch(host: &Host, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let path = path.to_owned();
    host.enter(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .map_err(|e| format!("write to {addr}: {e}"))?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        let head = String::from_utf8_lossy(&resp[..resp.len().min(64)]).into_owned();
        let code = head
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| head.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("no HTTP response from {addr}: {head:?}"))?;
        let text = String::from_utf8_lossy(&resp);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((code, body.to_owned()))
    })
    .map_err(|e| e.to_string())?
}

/// Polls `GET path` until it answers 200 or `timeout` passes; the error is
/// the last failure seen. Gives up at once if `proc` exits.
pub fn wait_http_ok(
    host: &Host,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    mut proc: Option<&mut Proc>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get(host, addr, path) {
            Ok(200) => return Ok(()),
            Ok(code) => format!("GET http://{addr}{path} answered {code}"),
            Err(e) => e,
        };
        if let Some(Ok(Some(status))) = proc.as_mut().map(|p| p.child().try_wait()) {
            return Err(format!("exited ({status}); last probe: {last}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {timeout:?}: {last}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
