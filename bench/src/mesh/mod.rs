//! `weft-bench mesh`: the side-by-side sidecar benchmark of SPEC §8.
//!
//! One run measures every path with the same load, in rounds, and reports
//! medians:
//! - `direct`: the generator calls the upstream, no proxy;
//! - `weft`, `weft-tcp`: a `weft-control` and two `weft-proxy` sidecars,
//!   mTLS between them, the inbound tagged `http` or `tcp` ([`weft`]);
//! - `haproxy`, `haproxy-tcp`, `nginx`, `nginx-tcp`: the same sidecar job
//!   done by the installed peers ([`peers`]), as in the peer baseline;
//! - `direct-h2`, `weft-h2`, `direct-grpc`, `weft-grpc`: the same for h2c
//!   and gRPC unary ([`AppProtocol`]), the weft inbound tagged `http2` or
//!   `grpc` so that it speaks h2c to the upstream;
//! - `direct-echo`, `weft-echo-tcp`, `haproxy-echo-tcp`, `nginx-echo-tcp`:
//!   raw TCP ping-pong against the upstream's TCP echo, through the
//!   proxies in TCP mode only (`weft-tcp` stays HTTP/1.1 over opaque TCP).
//!
//! Paths are grouped by the app's protocol; each group's ratios (× direct,
//! added latency) are to the direct path of the same protocol.
//!
//! [`topology`] builds the two namespaces and the upstream; [`generator`]
//! makes the path's requests (client, probe, load runs); [`procstat`]
//! reads the sidecars' memory and CPU time from `/proc`. Per path and round:
//! start the pair, wait until a request passes, read idle RSS, warm up,
//! then a closed-loop run (throughput; CPU time of both sidecars over it ÷
//! requests; RSS sampled every 100 ms) and an open-loop run at `rate`
//! (latency, corrected for coordinated omission); then stop the pair.
//! Rounds go through all paths in turn, in the listed order in odd rounds and
//! in reverse in even ones, so drift hits every path alike. Ctrl-C or SIGTERM stops the run
//! after the path under way and cleans up ([`interrupt`]).

pub mod ebpf;
pub mod generator;
pub mod interrupt;
pub mod peers;
pub mod procstat;
pub mod topology;
pub mod weft;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use weft_tests::{Host, Proc};

use crate::load::{LoadConfig, LoadError, Measurement, Stop};
use crate::report::{self, MeshReport, MeshSettings, Mode, PathReport, Protocol, Summary};
use crate::stats::ErrorCounts;
use generator::{Target, run_load, wait_request_ok};
use interrupt::Interrupt;
use procstat::Usage;
use topology::{GRPC_PORT, TCP_ECHO_PORT, Topology, TopologyOptions, UPSTREAM_PORT};

/// What can stop a mesh run.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Namespaces need root.
    #[error("weft-bench mesh builds network namespaces and must run as root")]
    NotRoot,
    /// The namespace harness failed.
    #[error(transparent)]
    Net(#[from] weft_tests::Error),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A proxy, the control plane or the upstream did not come up.
    #[error("{what} did not start: {why}{}", if log.is_empty() { String::new() } else { format!("\n--- end of its log ---\n{log}") })]
    Start {
        /// Which process.
        what: String,
        /// What was seen.
        why: String,
        /// The end of its log.
        log: String,
    },
    /// Certificates for the peers could not be made.
    #[error("cannot make certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// The load generator refused its configuration.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The target URL is malformed (a bug).
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    /// The configuration asks for nothing measurable.
    #[error("invalid mesh configuration: {0}")]
    Config(String),
    /// SIGINT or SIGTERM came; the run stopped and cleaned up.
    #[error("interrupted; stopped after cleaning up")]
    Interrupted,
}

impl MeshError {
    fn io(what: impl Into<String>, source: std::io::Error) -> MeshError {
        MeshError::Io {
            what: what.into(),
            source,
        }
    }
}

/// How a proxy pair handles the app's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// The proxies parse HTTP (and pool connections between them).
    Http,
    /// The proxies copy opaque bytes: weft carries each app connection as a CONNECT stream on
    /// its pooled mTLS HTTP/2 connection between the sidecars; HAProxy and nginx open one TLS
    /// connection per app connection.
    Tcp,
}

impl ProxyMode {
    /// `http` or `tcp`.
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Http => "http",
            ProxyMode::Tcp => "tcp",
        }
    }

    /// Parses a `--modes` entry.
    pub fn parse(s: &str) -> Option<ProxyMode> {
        [ProxyMode::Http, ProxyMode::Tcp]
            .into_iter()
            .find(|m| m.name() == s)
    }
}

/// What the app speaks on a path: the generator's requests and the
/// upstream listener they reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// HTTP/1.1 keep-alive, `GET /`, the upstream's fixed body.
    Http1,
    /// HTTP/2 cleartext with prior knowledge (h2c), `GET /`, the same
    /// upstream listener and body.
    H2,
    /// gRPC unary echo (`weft.bench.v1.Echo/Unary`) over h2c, a reply as
    /// large as the HTTP body, from the upstream's gRPC listener.
    Grpc,
    /// Raw TCP ping-pong: write `--body-size` bytes, read them back from
    /// the upstream's TCP echo; one round trip is one request. Proxies
    /// carry it in TCP mode only.
    Tcp,
}

impl AppProtocol {
    /// Every protocol, in report order.
    pub const ALL: [AppProtocol; 4] = [
        AppProtocol::Http1,
        AppProtocol::H2,
        AppProtocol::Grpc,
        AppProtocol::Tcp,
    ];

    /// The default of `--protocols` (also with `--quick`): every protocol,
    /// raw TCP included, as its four paths keep `--quick` under 60 s
    /// ([`MeshConfig::quick`]).
    pub const DEFAULT: [AppProtocol; 4] = AppProtocol::ALL;

    /// `http1`, `h2`, `grpc` or `tcp`: the `--protocols` entry and the
    /// report's `protocol`.
    pub fn name(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::H2 => "h2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        }
    }

    /// The protocol's part of a path name: none for HTTP/1.1, `h2`,
    /// `grpc`, and `echo` for raw TCP (not `tcp`, which in a path name
    /// means opaque proxying: `weft-tcp` is HTTP/1.1 through weft in TCP
    /// mode, `weft-echo-tcp` raw TCP through it).
    pub fn path_tag(self) -> Option<&'static str> {
        match self {
            AppProtocol::Http1 => None,
            AppProtocol::H2 => Some("h2"),
            AppProtocol::Grpc => Some("grpc"),
            AppProtocol::Tcp => Some("echo"),
        }
    }

    /// Whether paths of this protocol go through proxies in `mode`:
    /// HTTP/1.1 in both; h2c and gRPC in HTTP mode only (opaque bytes cost
    /// the same whatever the app speaks, and `weft-tcp` measures them);
    /// raw TCP in TCP mode only (there is no HTTP to parse).
    pub fn proxied_in(self, mode: ProxyMode) -> bool {
        match self {
            AppProtocol::Http1 => true,
            AppProtocol::H2 | AppProtocol::Grpc => mode == ProxyMode::Http,
            AppProtocol::Tcp => mode == ProxyMode::Tcp,
        }
    }

    /// Parses a `--protocols` entry.
    pub fn parse(s: &str) -> Option<AppProtocol> {
        AppProtocol::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The protocol as reports name it.
    pub fn report(self) -> Protocol {
        match self {
            AppProtocol::Http1 => Protocol::Http1,
            AppProtocol::H2 => Protocol::H2,
            AppProtocol::Grpc => Protocol::Grpc,
            AppProtocol::Tcp => Protocol::Tcp,
        }
    }

    /// The `kuma.io/protocol` tag of a weft inbound that parses this
    /// protocol (and speaks it to the app); `tcp` for raw TCP.
    pub fn tag(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http",
            AppProtocol::H2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        }
    }

    /// The upstream's port for this protocol.
    pub fn upstream_port(self) -> u16 {
        match self {
            AppProtocol::Http1 | AppProtocol::H2 => UPSTREAM_PORT,
            AppProtocol::Grpc => GRPC_PORT,
            AppProtocol::Tcp => TCP_ECHO_PORT,
        }
    }
}

/// The mesh observability a weft path runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observability {
    /// No backend (the counters still count; nothing serves or exports them).
    Off,
    /// The Prometheus backend on (`:5670/metrics`), not scraped.
    Metrics,
    /// Metrics plus every request traced (100% sampling) to a Zipkin sink.
    Tracing,
    /// The same with an OpenTelemetry (OTLP/gRPC) backend instead of Zipkin.
    TracingOtlp,
}

impl Observability {
    /// The path-name suffix and `--weft-telemetry` entry.
    pub fn name(self) -> &'static str {
        match self {
            Observability::Off => "off",
            Observability::Metrics => "metrics",
            Observability::Tracing => "tracing",
            Observability::TracingOtlp => "tracing-otlp",
        }
    }

    /// Parses a `--weft-telemetry` entry.
    pub fn parse(s: &str) -> Option<Observability> {
        [
            Observability::Metrics,
            Observability::Tracing,
            Observability::TracingOtlp,
        ]
        .into_iter()
        .find(|o| o.name() == s)
    }
}

/// One path through the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// No proxy.
    Direct(AppProtocol),
    /// weft-proxy pair.
    Weft(AppProtocol, ProxyMode),
    /// weft-proxy pair (HTTP/1.1, HTTP mode) with the mesh's observability
    /// backends on.
    WeftObserved(Observability),
    /// A peer's pair (HTTP/1.1 in either mode, raw TCP in TCP mode).
    Peer(peers::PeerKind, AppProtocol, ProxyMode),
}

impl PathKind {
    /// The report name: the proxy (`direct`, `weft`, `haproxy`, `nginx`),
    /// then `-` and the protocol's [`AppProtocol::path_tag`] unless
    /// HTTP/1.1, then `-tcp` for opaque (TCP mode) proxying; `weft+<o>`
    /// for the observed weft paths. So `direct`, `weft`, `weft-tcp`,
    /// `haproxy-tcp` are HTTP/1.1 (`-tcp`: through proxies in TCP mode),
    /// `direct-h2`, `weft-grpc`, `weft-h2-tcp` h2c and gRPC, and
    /// `direct-echo`, `weft-echo-tcp`, `haproxy-echo-tcp`,
    /// `nginx-echo-tcp` raw TCP ping-pong against the upstream's echo.
    pub fn name(self) -> String {
        let (base, protocol, mode) = match self {
            PathKind::Direct(p) => ("direct", p, ProxyMode::Http),
            PathKind::WeftObserved(o) => return format!("weft+{}", o.name()),
            PathKind::Weft(p, m) => ("weft", p, m),
            PathKind::Peer(peer, p, m) => (peer.name(), p, m),
        };
        let mut name = base.to_owned();
        if let Some(tag) = protocol.path_tag() {
            name = format!("{name}-{tag}");
        }
        if mode == ProxyMode::Tcp {
            name.push_str("-tcp");
        }
        name
    }

    /// What the app speaks on this path.
    pub fn protocol(self) -> AppProtocol {
        match self {
            PathKind::Direct(p) | PathKind::Weft(p, _) | PathKind::Peer(_, p, _) => p,
            PathKind::WeftObserved(_) => AppProtocol::Http1,
        }
    }

    fn mode(self) -> Option<ProxyMode> {
        match self {
            PathKind::Direct(_) => None,
            PathKind::WeftObserved(_) => Some(ProxyMode::Http),
            PathKind::Weft(_, m) | PathKind::Peer(_, _, m) => Some(m),
        }
    }
}

/// One sidecar process.
pub struct Sidecar {
    /// `out` (client side) or `in` (server side).
    pub side: &'static str,
    /// The process (group) to read from `/proc` and to stop.
    pub proc: Proc,
    /// Stop with SIGTERM first (so a weft proxy deregisters).
    pub graceful: bool,
}

/// A running pair; stopping it (or dropping it) stops both sidecars.
pub struct SidecarPair {
    sidecars: Vec<Sidecar>,
    on_stop: Vec<Box<dyn FnOnce() + Send>>,
}

impl SidecarPair {
    /// Wraps started sidecars, outbound and inbound in any order.
    pub fn new(sidecars: Vec<Sidecar>) -> SidecarPair {
        SidecarPair {
            sidecars,
            on_stop: Vec::new(),
        }
    }

    /// Runs `f` after the sidecars are stopped (e.g. remove iptables rules).
    pub fn on_stop(&mut self, f: Box<dyn FnOnce() + Send>) {
        self.on_stop.push(f);
    }

    /// The sidecars' pids in report order: outbound, then inbound.
    fn pids(&self) -> [u32; 2] {
        let pid = |side| {
            self.sidecars
                .iter()
                .find(|s| s.side == side)
                .map_or(0, |s| s.proc.pid())
        };
        [pid("out"), pid("in")]
    }

    /// Stops both sidecars: SIGTERM and a short wait where graceful, then
    /// SIGKILL of the whole process group.
    pub fn stop(mut self) {
        for s in &mut self.sidecars {
            if s.graceful {
                if let Ok(pid) = i32::try_from(s.proc.pid()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                let _ = s.proc.wait_timeout(Duration::from_secs(3));
            }
            s.proc.kill();
        }
        for f in self.on_stop.drain(..) {
            f();
        }
    }
}

/// Waits until something accepts TCP connections on `addr` inside `host`,
/// failing at once if `proc` exits first.
pub fn wait_listening(host: &Host, addr: SocketAddr, proc: &mut Proc) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let up = host
            .enter(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        if up.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = proc.child().try_wait() {
            return Err(format!("exited ({status}) before listening on {addr}"));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("nothing listens on {addr} after 10 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything a mesh run is told.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Rounds; figures are medians over them.
    pub rounds: u32,
    /// The fixed rate of the latency runs, requests per second.
    pub rate: f64,
    /// Unmeasured load before each run.
    pub warmup: Duration,
    /// Length of each closed-loop (throughput) run.
    pub duration: Duration,
    /// Length of each open-loop (latency) run.
    pub latency_duration: Duration,
    /// Connections of the throughput runs (wrk -c32 in the baseline).
    pub connections: usize,
    /// Connections of the latency runs (oha -c16 in the baseline).
    pub latency_connections: usize,
    /// Upstream response body bytes (HTTP body, gRPC reply payload); the
    /// size of each raw TCP ping-pong message.
    pub body_size: usize,
    /// What the app speaks: one group of paths per protocol. The observed
    /// weft paths are HTTP/1.1 only, the peers HTTP/1.1 and raw TCP (in
    /// TCP mode).
    pub protocols: Vec<AppProtocol>,
    /// Measure the weft paths (when the binaries are found).
    pub weft: bool,
    /// Where `weft-proxy`, `weft-control` and `weftctl` are.
    pub weft_bin_dir: PathBuf,
    /// Run weft with iptables interception instead of explicit ports.
    pub weft_transparent: bool,
    /// Extra weft HTTP paths with the mesh's observability on.
    pub weft_telemetry: Vec<Observability>,
    /// Run every path with weft's eBPF local redirect attached host-wide ([`ebpf`]).
    pub ebpf: bool,
    /// Peers to measure when installed.
    pub peers: Vec<peers::PeerKind>,
    /// Proxy modes to measure.
    pub modes: Vec<ProxyMode>,
    /// The generator's CPU.
    pub generator_cpu: usize,
    /// The sidecars' and upstream's CPU.
    pub sidecar_cpu: usize,
    /// Idle-priority busy loops on both CPUs while measuring.
    pub spin: bool,
    /// The `weft-bench` executable (for the upstream).
    pub self_exe: PathBuf,
}

impl MeshConfig {
    /// The full benchmark: 3 rounds of 10 s throughput and 10 s latency runs.
    pub fn full(self_exe: PathBuf) -> MeshConfig {
        let weft_bin_dir = self_exe
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        MeshConfig {
            rounds: 3,
            rate: 1000.0,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(10),
            latency_duration: Duration::from_secs(10),
            connections: 32,
            latency_connections: 16,
            body_size: 1024,
            protocols: AppProtocol::DEFAULT.to_vec(),
            weft: true,
            weft_bin_dir,
            weft_transparent: false,
            ebpf: false,
            weft_telemetry: vec![
                Observability::Metrics,
                Observability::Tracing,
                Observability::TracingOtlp,
            ],
            peers: peers::PeerKind::ALL.to_vec(),
            modes: vec![ProxyMode::Http, ProxyMode::Tcp],
            generator_cpu: 0,
            sidecar_cpu: 1,
            spin: true,
            self_exe,
        }
    }

    /// The smoke check: one round of 1 s runs, under 60 s for all paths
    /// of all protocols (17 with both peers installed, about 3 s each: the
    /// raw TCP group's four add about 12 s; 53 s in all on a 2-core
    /// machine, debug build, while other tests ran beside it).
    pub fn quick(self_exe: PathBuf) -> MeshConfig {
        MeshConfig {
            rounds: 1,
            warmup: Duration::from_millis(250),
            duration: Duration::from_secs(1),
            latency_duration: Duration::from_secs(1),
            ..MeshConfig::full(self_exe)
        }
    }
}

/// One round of one path.
#[derive(Debug, Clone)]
struct RoundResult {
    closed: Measurement,
    open: Measurement,
    /// Outbound, inbound.
    idle: [Usage; 2],
    /// Peak RSS seen under load, KiB: outbound, inbound.
    load_rss_kib: [u64; 2],
    sidecar_ticks: u64,
    /// The kernel's part of `sidecar_ticks`.
    sidecar_sys_ticks: u64,
    upstream_ticks: u64,
}

/// Runs the benchmark. `log` receives progress lines and notes.
pub fn run(cfg: &MeshConfig, log: &mut dyn FnMut(&str)) -> Result<MeshReport, MeshError> {
    if cfg.rounds == 0 {
        return Err(MeshError::Config("--rounds must be at least 1".into()));
    }
    // Before anything is built: from here on, a signal lets the run clean up.
    let interrupt = Interrupt::watch();
    let mut notes = Vec::new();
    let mut note = |s: String, log: &mut dyn FnMut(&str)| {
        log(&format!("note: {s}"));
        notes.push(s);
    };

    if cfg.protocols.is_empty() {
        return Err(MeshError::Config("no protocol to measure".into()));
    }
    let http1 = cfg.protocols.contains(&AppProtocol::Http1);
    let raw_tcp = cfg.protocols.contains(&AppProtocol::Tcp);
    let weft_bins = if cfg.weft {
        match weft::find(&cfg.weft_bin_dir) {
            Ok(b) => {
                if cfg.weft_transparent {
                    note(
                        "weft paths use transparent interception (weft-iptables)".into(),
                        log,
                    );
                }
                Some(b)
            }
            Err(why) => {
                note(format!("skipping weft: {why}"), log);
                None
            }
        }
    } else {
        None
    };
    let mut installed = Vec::new();
    let mut peer_modes = Vec::new();
    let peer_protocols = http1 || (raw_tcp && cfg.modes.contains(&ProxyMode::Tcp));
    for &kind in cfg.peers.iter().filter(|_| peer_protocols) {
        match peers::find(kind) {
            Ok(p) => {
                for &m in &cfg.modes {
                    if m == ProxyMode::Tcp
                        && let Some(why) = &p.no_tcp
                    {
                        note(format!("skipping {}'s tcp mode: {why}", kind.name()), log);
                        continue;
                    }
                    peer_modes.push((kind, m));
                }
                note(format!("{}: {}", kind.name(), p.version), log);
                installed.push(p);
            }
            Err(why) => note(format!("skipping {}: {why}", kind.name()), log),
        }
    }
    if !peer_protocols && !cfg.peers.is_empty() {
        note(
            "peers measure HTTP/1.1 and raw TCP (in tcp mode) only: none without http1, \
             or tcp with tcp mode"
                .into(),
            log,
        );
    }
    let h2_or_grpc = cfg
        .protocols
        .iter()
        .any(|&p| matches!(p, AppProtocol::H2 | AppProtocol::Grpc));
    if weft_bins.is_some() && h2_or_grpc && !cfg.modes.contains(&ProxyMode::Http) {
        note(
            "h2 and gRPC have weft paths in http mode only: none without it".into(),
            log,
        );
    }
    let proxied = weft_bins.is_some() || !installed.is_empty();
    if raw_tcp && proxied {
        if !cfg.modes.contains(&ProxyMode::Tcp) {
            note(
                "raw TCP has weft and peer paths in tcp mode only: none without it".into(),
                log,
            );
        } else if cfg.modes.contains(&ProxyMode::Http) {
            note(
                "raw TCP is proxied in tcp mode only: no http-mode weft or peer paths for it"
                    .into(),
                log,
            );
        }
    }
    let mut paths = plan_paths(cfg, weft_bins.is_some(), &peer_modes);

    let topo = Topology::build(TopologyOptions {
        self_exe: cfg.self_exe.clone(),
        body_size: cfg.body_size,
        generator_cpu: cfg.generator_cpu,
        sidecar_cpu: cfg.sidecar_cpu,
        spin: cfg.spin,
    })?;
    if cfg.spin && !topo.spinning() {
        note("CPU spinners not running".into(), log);
    }
    let accelerated = if cfg.ebpf {
        let a = ebpf::Accelerated::install(topo.dir())?;
        note(
            format!(
                "eBPF local redirect attached to {} for the whole run: every path's loopback \
                 hops skip the TCP/IP stack",
                a.cgroup().display()
            ),
            log,
        );
        Some(a)
    } else {
        None
    };
    let certs = if installed.is_empty() {
        None
    } else {
        Some(peers::Certs::generate(topo.dir())?)
    };
    let mut failures = Vec::new();
    let cp = match &weft_bins {
        Some(bins) => match weft::ControlPlane::start(bins, &topo) {
            Ok(cp) => Some(cp),
            Err(e) => {
                failures.push(format!("weft: {e}"));
                log(&format!("FAILED weft: {e}"));
                paths.retain(|p| !matches!(p, PathKind::Weft(..) | PathKind::WeftObserved(_)));
                None
            }
        },
        None => None,
    };

    let mut results: Vec<Vec<RoundResult>> = vec![Vec::new(); paths.len()];
    let mut failed = vec![false; paths.len()];
    let mut interrupted = false;
    'rounds: for round in 1..=cfg.rounds {
        for i in round_order(paths.len(), round) {
            let path = paths[i];
            if interrupt.as_ref().is_some_and(Interrupt::requested) {
                interrupted = true;
                break 'rounds;
            }
            if failed[i] {
                continue;
            }
            log(&format!("round {round}/{}: {}", cfg.rounds, path.name()));
            let ports = (15100 + i as u16, 15200 + i as u16);
            let protocol = path.protocol();
            let started = match path {
                PathKind::Direct(p) => {
                    Ok((None, SocketAddr::from((topo.server_ip, p.upstream_port()))))
                }
                PathKind::Weft(..) | PathKind::WeftObserved(_) => {
                    let cp = cp.as_ref().expect("weft paths need the control plane");
                    let p = weft::Ports {
                        outbound: ports.0,
                        inbound: ports.1,
                    };
                    let (mode, observability) = match path {
                        PathKind::WeftObserved(o) => (ProxyMode::Http, o),
                        PathKind::Weft(_, m) => (m, Observability::Off),
                        _ => unreachable!("matched above"),
                    };
                    cp.observe(&topo, observability)
                        .and_then(|()| {
                            let flavour = weft::Flavour { protocol, mode };
                            let ebpf = accelerated.as_ref().map(ebpf::Accelerated::config);
                            weft::start(cp, flavour, p, cfg.weft_transparent, ebpf, &topo)
                        })
                        .and_then(|(pair, url)| {
                            let addr = url_addr(&url)?;
                            Ok((Some(pair), addr))
                        })
                }
                PathKind::Peer(kind, _, mode) => {
                    let peer = installed
                        .iter()
                        .find(|p| p.kind == kind)
                        .expect("only installed peers are measured");
                    let p = peers::Ports {
                        outbound: ports.0,
                        inbound: ports.1,
                    };
                    let certs = certs.as_ref().expect("certificates exist with peers");
                    peers::start(peer, protocol, mode, p, certs, &topo)
                        .map(|pair| (Some(pair), SocketAddr::from(([127, 0, 0, 1], ports.0))))
                }
            };
            let outcome = started.and_then(|(pair, addr)| {
                let target = Target {
                    addr,
                    protocol,
                    body_size: cfg.body_size,
                };
                let r = measure(cfg, &topo, target, pair.as_ref());
                // Read while the sidecars still run: their counters go with them.
                let spans = match path {
                    PathKind::WeftObserved(Observability::Tracing | Observability::TracingOtlp) => {
                        Some(weft::span_counts(&topo))
                    }
                    _ => None,
                };
                if let Some(pair) = pair {
                    pair.stop();
                }
                r.map(|r| (r, spans))
            });
            match outcome {
                Ok((r, spans)) => {
                    log(&format!(
                        "  {:.0} req/s, p50 {:.3} ms at {} req/s, {} errors",
                        r.closed.rps(),
                        Summary::new("", protocol.report(), Mode::Open, 0, None, &r.open).p50_ms,
                        cfg.rate,
                        r.closed.recorder.errors.total() + r.open.recorder.errors.total()
                    ));
                    match spans {
                        Some(Ok(s)) if s.dropped > 0 => note(
                            format!(
                                "{} round {round}: the sidecars dropped {} spans (exported {}): \
                                 this round understates tracing's cost",
                                path.name(),
                                s.dropped,
                                s.exported
                            ),
                            log,
                        ),
                        Some(Ok(s)) => {
                            log(&format!("  {} spans exported, none dropped", s.exported))
                        }
                        Some(Err(e)) => note(
                            format!("{} round {round}: span counters unread: {e}", path.name()),
                            log,
                        ),
                        None => {}
                    }
                    results[i].push(r);
                }
                Err(e) => {
                    log(&format!("FAILED {}: {e}", path.name()));
                    failures.push(format!("{}: {e}", path.name()));
                    failed[i] = true;
                }
            }
        }
    }
    drop(cp);
    drop(topo);
    if interrupted {
        return Err(MeshError::Interrupted);
    }

    let mut measured: Vec<(PathKind, PathReport)> = Vec::new();
    for (path, rounds) in paths.iter().zip(&results) {
        if rounds.is_empty() {
            continue;
        }
        measured.push((*path, aggregate(*path, rounds, cfg)));
    }
    relate_to_direct(&mut measured);
    let reports = measured.into_iter().map(|(_, r)| r).collect();
    Ok(MeshReport {
        date: report::utc_now_rfc3339(),
        machine: report::machine(),
        rounds: cfg.rounds,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        settings: MeshSettings {
            connections: cfg.connections,
            latency_connections: cfg.latency_connections,
            rate: cfg.rate,
            warmup_s: cfg.warmup.as_secs_f64(),
            duration_s: cfg.duration.as_secs_f64(),
            latency_duration_s: cfg.latency_duration.as_secs_f64(),
            body_size: cfg.body_size,
            generator_cpu: cfg.generator_cpu,
            sidecar_cpu: cfg.sidecar_cpu,
            spin: cfg.spin,
            weft_transparent: cfg.weft_transparent,
            ebpf: cfg.ebpf,
        },
        paths: reports,
        notes,
        failures,
    })
}

/// Every path of a run, grouped by protocol (each group's direct path
/// first): per protocol, direct, then weft in each mode (h2 and gRPC in
/// HTTP mode only, raw TCP in TCP mode only), then for HTTP/1.1 the
/// observed weft paths, and for HTTP/1.1 and raw TCP the installed peers
/// in `peer_modes` (raw TCP: TCP mode only).
fn plan_paths(
    cfg: &MeshConfig,
    weft: bool,
    peer_modes: &[(peers::PeerKind, ProxyMode)],
) -> Vec<PathKind> {
    let mut paths = Vec::new();
    for &protocol in &cfg.protocols {
        paths.push(PathKind::Direct(protocol));
        if weft {
            paths.extend(
                cfg.modes
                    .iter()
                    .filter(|&&m| protocol.proxied_in(m))
                    .map(|&m| PathKind::Weft(protocol, m)),
            );
            if protocol == AppProtocol::Http1 && cfg.modes.contains(&ProxyMode::Http) {
                paths.extend(
                    cfg.weft_telemetry
                        .iter()
                        .map(|&o| PathKind::WeftObserved(o)),
                );
            }
        }
        if matches!(protocol, AppProtocol::Http1 | AppProtocol::Tcp) {
            paths.extend(
                peer_modes
                    .iter()
                    .filter(|(_, m)| protocol.proxied_in(*m))
                    .map(|&(k, m)| PathKind::Peer(k, protocol, m)),
            );
        }
    }
    paths
}

/// Sets each path's ratios (× direct, added p50/p99) against the direct
/// path of the same protocol; 0 when that one was not measured.
fn relate_to_direct(paths: &mut [(PathKind, PathReport)]) {
    let directs: Vec<(AppProtocol, Summary)> = paths
        .iter()
        .filter_map(|(k, r)| match k {
            PathKind::Direct(p) => Some((*p, r.summary.clone())),
            _ => None,
        })
        .collect();
    for (kind, p) in paths.iter_mut() {
        let Some((_, direct)) = directs.iter().find(|(proto, _)| *proto == kind.protocol()) else {
            continue;
        };
        p.rps_vs_direct = ratio(p.summary.rps, direct.rps);
        p.added_p50_ms = p.summary.p50_ms - direct.p50_ms;
        p.added_p99_ms = p.summary.p99_ms - direct.p99_ms;
    }
}

fn url_addr(url: &str) -> Result<SocketAddr, MeshError> {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .map_err(|_| {
            crate::target::TargetError::Url(url.to_owned(), "expected http://ip:port/").into()
        })
}

/// The order of the paths in `round` (from 1): as listed in odd rounds, reversed in even
/// ones. A path's place in a round then changes from round to round, so what drifts within a
/// round (the host's load, the namespaces' kernel state) does not always favour the paths
/// measured first, such as `weft` before the `weft+…` paths compared with it.
fn round_order(paths: usize, round: u32) -> impl Iterator<Item = usize> {
    let reversed = round.is_multiple_of(2);
    (0..paths).map(move |i| if reversed { paths - 1 - i } else { i })
}

/// One round of one path whose sidecars (if any) are up.
fn measure(
    cfg: &MeshConfig,
    topo: &Topology,
    target: Target,
    pair: Option<&SidecarPair>,
) -> Result<RoundResult, MeshError> {
    let addr = target.addr;
    wait_request_ok(topo, target, Duration::from_secs(20)).map_err(|why| MeshError::Start {
        what: format!("the {} path to {addr}", target.protocol.name()),
        why: format!("no request got through: {why}"),
        log: String::new(),
    })?;
    let pids = pair.map(SidecarPair::pids);
    std::thread::sleep(Duration::from_millis(200));
    let idle = pids.map_or([Usage::default(); 2], |p| p.map(procstat::usage));

    let closed_cfg = |d: Duration| LoadConfig {
        connections: cfg.connections,
        rate: None,
        warmup: Duration::ZERO,
        stop: Stop::Duration(d),
        timeout: Duration::from_secs(5),
        threads: 1,
        cpus: vec![cfg.generator_cpu],
        progress: false,
    };
    if !cfg.warmup.is_zero() {
        run_load(topo, target, closed_cfg(cfg.warmup))?;
    }
    // CPU over the closed-loop run only: no warm-up in the window, so every
    // request it counts is one the CPU time paid for.
    // (user + system, system) of both sidecars.
    let ticks = |pids: Option<[u32; 2]>| {
        pids.map_or((0, 0), |p| {
            p.iter().fold((0, 0), |(all, sys), &pid| {
                let u = procstat::usage(pid);
                (all + u.cpu_ticks, sys + u.sys_ticks)
            })
        })
    };
    let up_before = procstat::usage(topo.upstream_pid()).cpu_ticks;
    let before = ticks(pids);
    let sampler = pids.map(RssSampler::start);
    let closed = run_load(topo, target, closed_cfg(cfg.duration))?;
    let after = ticks(pids);
    let sidecar_ticks = after.0.saturating_sub(before.0);
    let sidecar_sys_ticks = after.1.saturating_sub(before.1);
    let upstream_ticks = procstat::usage(topo.upstream_pid())
        .cpu_ticks
        .saturating_sub(up_before);
    let load_rss_kib = sampler.map_or([0; 2], RssSampler::finish);

    let open = run_load(
        topo,
        target,
        LoadConfig {
            connections: cfg.latency_connections,
            rate: Some(cfg.rate),
            warmup: cfg.warmup,
            stop: Stop::Duration(cfg.latency_duration),
            ..closed_cfg(cfg.latency_duration)
        },
    )?;
    Ok(RoundResult {
        closed,
        open,
        idle,
        load_rss_kib,
        sidecar_ticks,
        sidecar_sys_ticks,
        upstream_ticks,
    })
}

/// Samples both sidecars' RSS every 100 ms and keeps each one's peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<[u64; 2]>,
}

impl RssSampler {
    fn start(pids: [u32; 2]) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = [0u64; 2];
            while !flag.load(Ordering::Relaxed) {
                for (p, &pid) in peak.iter_mut().zip(&pids) {
                    *p = (*p).max(procstat::usage(pid).rss_kib);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> [u64; 2] {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Medians over rounds; errors are summed over every run of every round.
fn aggregate(path: PathKind, rounds: &[RoundResult], cfg: &MeshConfig) -> PathReport {
    let name = path.name();
    let open: Vec<Summary> = rounds
        .iter()
        .map(|r| {
            Summary::new(
                name.clone(),
                path.protocol().report(),
                Mode::Open,
                cfg.latency_connections,
                Some(cfg.rate),
                &r.open,
            )
        })
        .collect();
    let med = |f: &dyn Fn(&RoundResult) -> f64| median(rounds.iter().map(f).collect());
    let med_open = |f: &dyn Fn(&Summary) -> f64| median(open.iter().map(f).collect());
    let mut errors = ErrorCounts::default();
    let mut requests = 0;
    for r in rounds {
        errors.merge(&r.closed.recorder.errors);
        errors.merge(&r.open.recorder.errors);
        requests += r.closed.recorder.ok + r.open.recorder.ok;
    }
    let mut summary = open[0].clone();
    summary.rps = med(&|r| r.closed.rps());
    summary.p50_ms = med_open(&|s| s.p50_ms);
    summary.p90_ms = med_open(&|s| s.p90_ms);
    summary.p99_ms = med_open(&|s| s.p99_ms);
    summary.p999_ms = med_open(&|s| s.p999_ms);
    summary.max_ms = open.iter().map(|s| s.max_ms).fold(0.0, f64::max);
    summary.mean_ms = med_open(&|s| s.mean_ms);
    summary.stdev_ms = med_open(&|s| s.stdev_ms);
    summary.sched_lag_p99_ms = Some(med_open(&|s| s.sched_lag_p99_ms.unwrap_or(0.0)));
    summary.duration_s = med_open(&|s| s.duration_s);
    summary.errors = errors.total();
    summary.errors_by_kind = errors;
    summary.requests = requests + errors.total();
    // Per answered request: a failure (a refused connection, a timeout) may cost a sidecar
    // almost nothing, and counting it would make the others look cheaper.
    let us_per_req = |ticks: u64, r: &RoundResult| {
        let n = r.closed.recorder.ok;
        if n == 0 {
            0.0
        } else {
            procstat::ticks_to_duration(ticks).as_secs_f64() * 1e6 / n as f64
        }
    };
    let sidecars = path.mode().is_some();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let idle = [med(&|r| r.idle[0].rss_mib()), med(&|r| r.idle[1].rss_mib())];
    let load = [
        med(&|r| mib(r.load_rss_kib[0])),
        med(&|r| mib(r.load_rss_kib[1])),
    ];
    PathReport {
        latency_rps: med_open(&|s| s.rps),
        summary,
        proxy_mode: path.mode().map_or("none", ProxyMode::name).to_owned(),
        rps_vs_direct: 0.0,
        added_p50_ms: 0.0,
        added_p99_ms: 0.0,
        rss_idle_mib: idle[0].max(idle[1]),
        rss_load_mib: load[0].max(load[1]),
        rss_idle_out_mib: idle[0],
        rss_idle_in_mib: idle[1],
        rss_load_out_mib: load[0],
        rss_load_in_mib: load[1],
        cpu_us_per_req: if sidecars {
            med(&|r| us_per_req(r.sidecar_ticks, r))
        } else {
            0.0
        },
        cpu_sys_us_per_req: if sidecars {
            med(&|r| us_per_req(r.sidecar_sys_ticks, r))
        } else {
            0.0
        },
        upstream_cpu_us_per_req: med(&|r| us_per_req(r.upstream_ticks, r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_the_order_of_the_paths() {
        let order = |round| round_order(3, round).collect::<Vec<_>>();
        assert_eq!(order(1), [0, 1, 2]);
        assert_eq!(order(2), [2, 1, 0]);
        assert_eq!(order(3), [0, 1, 2]);
        assert_eq!(round_order(0, 2).count(), 0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn path_names() {
        use AppProtocol::*;
        use peers::PeerKind::*;
        assert_eq!(PathKind::Direct(Http1).name(), "direct");
        assert_eq!(PathKind::Weft(Http1, ProxyMode::Http).name(), "weft");
        assert_eq!(PathKind::Weft(Http1, ProxyMode::Tcp).name(), "weft-tcp");
        assert_eq!(
            PathKind::Peer(Haproxy, Http1, ProxyMode::Http).name(),
            "haproxy"
        );
        assert_eq!(
            PathKind::Peer(Nginx, Http1, ProxyMode::Tcp).name(),
            "nginx-tcp"
        );
        assert_eq!(PathKind::Direct(H2).name(), "direct-h2");
        assert_eq!(PathKind::Weft(H2, ProxyMode::Http).name(), "weft-h2");
        assert_eq!(PathKind::Weft(H2, ProxyMode::Tcp).name(), "weft-h2-tcp");
        assert_eq!(PathKind::Direct(Grpc).name(), "direct-grpc");
        assert_eq!(PathKind::Weft(Grpc, ProxyMode::Http).name(), "weft-grpc");
        assert_eq!(
            PathKind::WeftObserved(Observability::Tracing).name(),
            "weft+tracing"
        );
        // Raw TCP: `echo` names the protocol, `-tcp` still the mode.
        assert_eq!(PathKind::Direct(Tcp).name(), "direct-echo");
        assert_eq!(PathKind::Weft(Tcp, ProxyMode::Tcp).name(), "weft-echo-tcp");
        assert_eq!(
            PathKind::Peer(Haproxy, Tcp, ProxyMode::Tcp).name(),
            "haproxy-echo-tcp"
        );
        assert_eq!(
            PathKind::Peer(Nginx, Tcp, ProxyMode::Tcp).name(),
            "nginx-echo-tcp"
        );
        assert_eq!(PathKind::Peer(Nginx, Tcp, ProxyMode::Tcp).protocol(), Tcp);
        // No two paths share a name.
        let mut all = vec![
            PathKind::WeftObserved(Observability::Metrics),
            PathKind::WeftObserved(Observability::Tracing),
            PathKind::WeftObserved(Observability::TracingOtlp),
        ];
        for p in AppProtocol::ALL {
            all.push(PathKind::Direct(p));
            for m in [ProxyMode::Http, ProxyMode::Tcp] {
                all.push(PathKind::Weft(p, m));
                for peer in peers::PeerKind::ALL {
                    all.push(PathKind::Peer(peer, p, m));
                }
            }
        }
        let mut names: Vec<String> = all.iter().map(|p| p.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "{names:?}");
    }

    #[test]
    fn protocols_parse_and_name_their_reports() {
        for p in AppProtocol::ALL {
            assert_eq!(AppProtocol::parse(p.name()), Some(p));
            let json = serde_json::to_value(p.report()).unwrap();
            assert_eq!(
                json,
                p.name(),
                "the report's protocol is the --protocols name"
            );
        }
        assert_eq!(AppProtocol::parse("http2"), None);
        assert_eq!(AppProtocol::parse("tcp"), Some(AppProtocol::Tcp));
        assert_eq!(AppProtocol::parse("echo"), None);
        assert_eq!(AppProtocol::Tcp.report(), Protocol::Tcp);
        assert_eq!(AppProtocol::Grpc.upstream_port(), GRPC_PORT);
        assert_eq!(AppProtocol::H2.upstream_port(), UPSTREAM_PORT);
        assert_eq!(AppProtocol::Tcp.upstream_port(), TCP_ECHO_PORT);
        assert_eq!(AppProtocol::Tcp.tag(), "tcp");
    }

    fn config() -> MeshConfig {
        MeshConfig::quick(PathBuf::from("weft-bench"))
    }

    fn names(paths: Vec<PathKind>) -> Vec<String> {
        paths.into_iter().map(PathKind::name).collect()
    }

    #[test]
    fn paths_are_grouped_by_protocol_with_direct_first() {
        use peers::PeerKind::*;
        let peers = [(Haproxy, ProxyMode::Http), (Haproxy, ProxyMode::Tcp)];
        assert_eq!(
            names(plan_paths(&config(), true, &peers)),
            [
                "direct",
                "weft",
                "weft-tcp",
                "weft+metrics",
                "weft+tracing",
                "weft+tracing-otlp",
                "haproxy",
                "haproxy-tcp",
                "direct-h2",
                "weft-h2",
                "direct-grpc",
                "weft-grpc",
                "direct-echo",
                "weft-echo-tcp",
                "haproxy-echo-tcp",
            ]
        );

        let cfg = MeshConfig {
            protocols: vec![AppProtocol::Grpc],
            modes: vec![ProxyMode::Tcp],
            ..config()
        };
        assert_eq!(
            names(plan_paths(&cfg, true, &[])),
            ["direct-grpc"],
            "no tcp-mode gRPC path"
        );
        assert_eq!(
            names(plan_paths(&config(), false, &[])),
            ["direct", "direct-h2", "direct-grpc", "direct-echo"]
        );
    }

    #[test]
    fn raw_tcp_is_direct_weft_and_peers_in_tcp_mode_only() {
        use peers::PeerKind::*;
        let peers = [
            (Haproxy, ProxyMode::Http),
            (Haproxy, ProxyMode::Tcp),
            (Nginx, ProxyMode::Http),
            (Nginx, ProxyMode::Tcp),
        ];
        let cfg = MeshConfig {
            protocols: vec![AppProtocol::Tcp],
            ..config()
        };
        let paths = plan_paths(&cfg, true, &peers);
        assert_eq!(
            paths,
            [
                PathKind::Direct(AppProtocol::Tcp),
                PathKind::Weft(AppProtocol::Tcp, ProxyMode::Tcp),
                PathKind::Peer(Haproxy, AppProtocol::Tcp, ProxyMode::Tcp),
                PathKind::Peer(Nginx, AppProtocol::Tcp, ProxyMode::Tcp),
            ]
        );
        assert!(
            paths
                .iter()
                .all(|p| p.mode() != Some(ProxyMode::Http) && p.protocol() == AppProtocol::Tcp),
            "no http-mode path for raw TCP, and no other protocol"
        );
        assert_eq!(
            names(paths),
            [
                "direct-echo",
                "weft-echo-tcp",
                "haproxy-echo-tcp",
                "nginx-echo-tcp"
            ]
        );

        // Without tcp mode, only the direct path is left.
        let http_only = MeshConfig {
            modes: vec![ProxyMode::Http],
            ..cfg.clone()
        };
        let http_peers = [(Haproxy, ProxyMode::Http)];
        assert_eq!(
            names(plan_paths(&http_only, true, &http_peers)),
            ["direct-echo"]
        );
        // Without weft, the peers still run.
        assert_eq!(
            names(plan_paths(&cfg, false, &peers[..2])),
            ["direct-echo", "haproxy-echo-tcp"]
        );
    }

    fn report(kind: PathKind, rps: f64, p50_ms: f64) -> (PathKind, PathReport) {
        let m = Measurement {
            recorder: crate::stats::Recorder::default(),
            elapsed: Duration::from_secs(1),
            threads: 1,
        };
        let mut summary = Summary::new(
            kind.name(),
            kind.protocol().report(),
            Mode::Open,
            16,
            None,
            &m,
        );
        summary.rps = rps;
        summary.p50_ms = p50_ms;
        summary.p99_ms = p50_ms * 2.0;
        let path = PathReport {
            summary,
            proxy_mode: kind.mode().map_or("none", ProxyMode::name).to_owned(),
            latency_rps: 0.0,
            rps_vs_direct: 0.0,
            added_p50_ms: 0.0,
            added_p99_ms: 0.0,
            rss_idle_mib: 0.0,
            rss_load_mib: 0.0,
            rss_idle_out_mib: 0.0,
            rss_idle_in_mib: 0.0,
            rss_load_out_mib: 0.0,
            rss_load_in_mib: 0.0,
            cpu_us_per_req: 0.0,
            cpu_sys_us_per_req: 0.0,
            upstream_cpu_us_per_req: 0.0,
        };
        (kind, path)
    }

    #[test]
    fn ratios_are_to_the_direct_path_of_the_same_protocol() {
        use AppProtocol::*;
        let mut paths = vec![
            report(PathKind::Direct(Http1), 10_000.0, 0.1),
            report(PathKind::Weft(Http1, ProxyMode::Http), 5_000.0, 0.3),
            report(PathKind::Direct(H2), 20_000.0, 0.2),
            report(PathKind::Weft(H2, ProxyMode::Http), 4_000.0, 0.5),
            // No direct-grpc measured: no ratio.
            report(PathKind::Weft(Grpc, ProxyMode::Http), 3_000.0, 0.6),
        ];
        relate_to_direct(&mut paths);
        let r = |i: usize| &paths[i].1;
        assert_eq!(r(0).rps_vs_direct, 1.0);
        assert_eq!(r(1).rps_vs_direct, 0.5);
        assert!((r(1).added_p50_ms - 0.2).abs() < 1e-9);
        assert_eq!(r(3).rps_vs_direct, 0.2, "h2 against direct-h2");
        assert!((r(3).added_p50_ms - 0.3).abs() < 1e-9);
        assert!((r(3).added_p99_ms - 0.6).abs() < 1e-9);
        assert_eq!(r(4).rps_vs_direct, 0.0);
        assert_eq!(r(4).added_p50_ms, 0.0);
    }

    #[test]
    fn urls_give_addresses() {
        assert_eq!(
            url_addr("http://127.0.0.1:15101/").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 15101))
        );
        assert!(url_addr("http://host/").is_err());
    }
}
