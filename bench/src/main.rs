//! The `weft-bench` command line. See the crate docs of `weft_bench` for how
//! the library is laid out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use weft_bench::load::{self, Client, LoadConfig, Measurement, Stop};
use weft_bench::mesh::{self, AppProtocol, MeshConfig, ProxyMode, peers::PeerKind};
use weft_bench::report::{Mode, Protocol, RunReport, Summary};
use weft_bench::{cpu, discovery, duration, grpc, http, serve, target, tcp};

/// Load generator and mesh benchmark for weft.
#[derive(Debug, Parser)]
#[command(name = "weft-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// HTTP/1.1 (or h2c with --h2) load against a URL.
    Http {
        /// Target, e.g. http://127.0.0.1:8080/
        url: String,
        /// Speak HTTP/2 over cleartext with prior knowledge (h2c).
        #[arg(long)]
        h2: bool,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// gRPC unary echo load (the service of `weft-bench serve --grpc`).
    Grpc {
        /// Target host:port.
        addr: String,
        /// Request payload bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Response payload bytes (0: echo the request).
        #[arg(long, default_value_t = 0)]
        response_size: u32,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Raw TCP against an echo server: ping-pong latency, or --stream throughput.
    Tcp {
        /// Target host:port.
        addr: String,
        /// Bytes per ping (or per write with --stream).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Bulk echo throughput instead of ping-pong (ignores --rate/--requests).
        #[arg(long)]
        stream: bool,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Upstream apps: HTTP/1.1 + h2c, gRPC echo (unary and streaming), TCP echo.
    ///
    /// With no listener flags, serves HTTP on 127.0.0.1:8080, gRPC on :8081
    /// and TCP echo on :8082.
    Serve(ServeArgs),
    /// Side-by-side mesh benchmark in network namespaces: direct, weft,
    /// HAProxy and nginx sidecar pairs, over HTTP/1.1, h2c and gRPC (needs
    /// root).
    Mesh(MeshArgs),
    /// N simulated proxies on discovery streams against a weft-control process: time from
    /// a policy apply to every proxy's ACK, and the control plane's RSS.
    Discovery(DiscoveryArgs),
}

#[derive(Debug, Args)]
struct DiscoveryArgs {
    /// Simulated proxies (discovery streams).
    #[arg(short = 'n', long, default_value_t = 100)]
    proxies: usize,
    /// Services the proxies are spread over.
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Proxies waiting for their first snapshot at once.
    #[arg(long, default_value_t = 100)]
    register_concurrency: usize,
    /// Policy applies to measure.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Quiet time after each round.
    #[arg(long, default_value = "500ms", value_parser = duration::parse)]
    pause: Duration,
    /// Limit for registration, convergence and each round.
    #[arg(long, default_value = "60s", value_parser = duration::parse)]
    timeout: Duration,
    /// The weft-control binary (default: beside weft-bench, else from PATH).
    #[arg(long)]
    control_bin: Option<std::path::PathBuf>,
    /// Proxies ask for complete snapshots every time, as proxies that cannot keep parts do.
    #[arg(long)]
    complete_snapshots: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Options shared by every load-generating subcommand.
#[derive(Debug, Args)]
struct LoadArgs {
    /// Concurrent connections, one request in flight on each.
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: usize,
    /// Open loop: total requests per second, latency corrected for
    /// coordinated omission. Without it: closed loop, maximum throughput.
    #[arg(short = 'r', long)]
    rate: Option<f64>,
    /// Unrecorded warm-up before measuring (e.g. 500ms, 2s).
    #[arg(short = 'w', long, default_value = "1s", value_parser = duration::parse)]
    warmup: Duration,
    /// Measure for this long (e.g. 5s, 1m).
    #[arg(short = 'd', long, value_parser = duration::parse, conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Measure this many requests instead of a duration.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    timeout: Duration,
    /// Worker threads (default: one per CPU in --cpu, or per available CPU).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Pin worker threads to these CPUs, e.g. 0 or 0,1 or 2-3.
    #[arg(long, value_parser = parse_cpus)]
    cpu: Option<CpuList>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(short = 'q', long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// HTTP/1.1 + h2c listen address (repeatable).
    #[arg(long)]
    http: Vec<SocketAddr>,
    /// gRPC echo listen address (repeatable): `weft.bench.v1.Echo`, unary,
    /// server, client and bidirectional streaming.
    #[arg(long)]
    grpc: Vec<SocketAddr>,
    /// TCP echo listen address (repeatable).
    #[arg(long)]
    tcp: Vec<SocketAddr>,
    /// OTLP/gRPC trace collector listen address (repeatable): takes every
    /// `TraceService/Export` and keeps nothing.
    #[arg(long)]
    otlp: Vec<SocketAddr>,
    /// HTTP response body bytes.
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
    /// Delay before every HTTP and gRPC response, each reply of a gRPC stream
    /// (e.g. 20ms).
    #[arg(long, default_value = "0s", value_parser = duration::parse)]
    delay: Duration,
    /// Runtime worker threads (default: one per CPU in --cpu, or per CPU).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Pin server threads to these CPUs.
    #[arg(long, value_parser = parse_cpus)]
    cpu: Option<CpuList>,
}

#[derive(Debug, Args)]
struct MeshArgs {
    /// Smoke check: one round of 1 s runs, under 60 s in all.
    #[arg(long)]
    quick: bool,
    /// Peer proxies to measure beside weft when installed (haproxy, nginx);
    /// `none` for none.
    #[arg(long, value_delimiter = ',', default_value = "haproxy,nginx")]
    peers: Vec<String>,
    /// Proxy modes: http (the pair parses HTTP), tcp (opaque bytes).
    #[arg(long, value_delimiter = ',', default_value = "http,tcp")]
    modes: Vec<String>,
    /// What the app speaks, one group of paths each: http1 (HTTP/1.1
    /// keep-alive), h2 (h2c), grpc (unary echo), tcp (raw TCP ping-pong of
    /// --body-size bytes against an echo: paths direct-echo, weft-echo-tcp,
    /// haproxy-echo-tcp, nginx-echo-tcp, tcp mode only). h2 and grpc are
    /// proxied in http mode only; peers and the telemetry paths are
    /// HTTP/1.1 only, except the peers' tcp mode for tcp.
    #[arg(long, value_delimiter = ',', default_value = "http1,h2,grpc,tcp")]
    protocols: Vec<String>,
    /// Repeated rounds; figures are medians (default 3, 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Fixed rate of the latency runs, req/s.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of each throughput run (default 10s, 1s with --quick).
    #[arg(short = 'd', long, value_parser = duration::parse)]
    duration: Option<Duration>,
    /// Length of each latency run (default 10s, 1s with --quick).
    #[arg(long, value_parser = duration::parse)]
    latency_duration: Option<Duration>,
    /// Unmeasured load before each run (default 1s, 250ms with --quick).
    #[arg(short = 'w', long, value_parser = duration::parse)]
    warmup: Option<Duration>,
    /// Connections of the throughput runs.
    #[arg(short = 'c', long, default_value_t = 32)]
    connections: usize,
    /// Connections of the latency runs.
    #[arg(long, default_value_t = 16)]
    latency_connections: usize,
    /// Upstream response body bytes (HTTP body, gRPC reply), and the size
    /// of each tcp ping-pong message.
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
    /// Skip the weft paths.
    #[arg(long)]
    no_weft: bool,
    /// Where weft-proxy, weft-control and weftctl are (default: beside
    /// this executable).
    #[arg(long)]
    weft_bin_dir: Option<PathBuf>,
    /// Run weft with transparent interception (weft-iptables) instead of
    /// explicit outbound/inbound ports.
    #[arg(long)]
    weft_transparent: bool,
    /// Attach weft's eBPF local redirect (`weft-iptables ebpf`) to the cgroup2 root for the
    /// whole run: every path's loopback hops, weft's and the peers', skip the TCP/IP stack.
    #[arg(long)]
    ebpf: bool,
    /// Also measure weft (HTTP) with the mesh's observability on: `metrics`
    /// (the Prometheus backend), `tracing` (metrics plus 100% sampled traces
    /// to a Zipkin sink) and `tracing-otlp` (the same to an OTLP/gRPC sink),
    /// each as its own path. `none` for none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "metrics,tracing,tracing-otlp"
    )]
    weft_telemetry: Vec<String>,
    /// The load generator's CPU.
    #[arg(long, default_value_t = 0)]
    generator_cpu: usize,
    /// The sidecars' and the upstream's CPU.
    #[arg(long, default_value_t = 1)]
    sidecar_cpu: usize,
    /// Do not keep idle CPUs awake with idle-priority busy loops.
    #[arg(long)]
    no_spin: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Http { url, h2, load } => {
            let version = if h2 {
                http::Version::H2
            } else {
                http::Version::Http1
            };
            let protocol = if h2 { Protocol::H2 } else { Protocol::Http1 };
            let client = small_runtime()?
                .block_on(http::HttpClient::new(&url, version))
                .context("bad target")?;
            run_requests(client, &url, protocol, &load)
        }
        Command::Grpc {
            addr,
            size,
            response_size,
            load,
        } => {
            let resolved = resolve(&addr)?;
            let client = grpc::GrpcClient::new(resolved, size, response_size);
            run_requests(client, &addr, Protocol::Grpc, &load)
        }
        Command::Tcp {
            addr,
            size,
            stream,
            load,
        } => {
            let resolved = resolve(&addr)?;
            if stream {
                run_stream(resolved, &addr, size, &load)
            } else {
                run_requests(
                    tcp::PingPongClient::new(resolved, size),
                    &addr,
                    Protocol::Tcp,
                    &load,
                )
            }
        }
        Command::Serve(args) => run_serve(args),
        Command::Mesh(args) => run_mesh(args),
        Command::Discovery(args) => run_discovery(args),
    }
}

/// A `--cpu` list; a newtype so clap takes it as one value, not many.
#[derive(Debug, Clone)]
struct CpuList(Vec<usize>);

fn parse_cpus(s: &str) -> Result<CpuList, cpu::CpuError> {
    cpu::parse_list(s).map(CpuList)
}

fn small_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    small_runtime()?
        .block_on(target::resolve_authority(addr))
        .context("bad target")
}

/// Threads: explicit, else one per pinned CPU, else one per available CPU.
fn threads(explicit: Option<usize>, cpus: &Option<CpuList>) -> usize {
    explicit
        .or_else(|| cpus.as_ref().map(|c| c.0.len()))
        .unwrap_or_else(cpu::available)
        .max(1)
}

fn load_config(args: &LoadArgs) -> LoadConfig {
    LoadConfig {
        connections: args.connections,
        rate: args.rate,
        warmup: args.warmup,
        stop: match (args.requests, args.duration) {
            (Some(n), _) => Stop::Requests(n),
            (None, Some(d)) => Stop::Duration(d),
            (None, None) => Stop::Duration(Duration::from_secs(10)),
        },
        timeout: args.timeout,
        threads: threads(args.threads, &args.cpu),
        cpus: args.cpu.clone().map(|c| c.0).unwrap_or_default(),
        progress: !args.quiet,
    }
}

fn run_requests<C: Client>(
    client: C,
    name: &str,
    protocol: Protocol,
    args: &LoadArgs,
) -> Result<()> {
    let cfg = load_config(args);
    let m = load::run(Arc::new(client), &cfg)?;
    let mode = if cfg.rate.is_some() {
        Mode::Open
    } else {
        Mode::Closed
    };
    print_result(
        Summary::new(name, protocol, mode, cfg.connections, cfg.rate, &m),
        &m,
        args,
    )
}

fn run_stream(addr: SocketAddr, name: &str, size: usize, args: &LoadArgs) -> Result<()> {
    let cfg = tcp::StreamConfig {
        addr,
        connections: args.connections,
        chunk: size,
        warmup: args.warmup,
        duration: args.duration.unwrap_or(Duration::from_secs(10)),
        threads: threads(args.threads, &args.cpu),
        cpus: args.cpu.clone().map(|c| c.0).unwrap_or_default(),
        progress: !args.quiet,
    };
    let m = tcp::stream(&cfg)?;
    print_result(
        Summary::new(name, Protocol::Tcp, Mode::Stream, cfg.connections, None, &m),
        &m,
        args,
    )
}

fn print_result(summary: Summary, m: &Measurement, args: &LoadArgs) -> Result<()> {
    if args.json {
        let report = RunReport::new(summary, args.warmup, m.threads);
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", summary.to_text());
    }
    Ok(())
}

fn run_discovery(args: DiscoveryArgs) -> Result<()> {
    let cfg = discovery::Config {
        proxies: args.proxies,
        services: args.services,
        streams_per_connection: args.streams_per_connection,
        register_concurrency: args.register_concurrency,
        rounds: args.rounds,
        pause: args.pause,
        timeout: args.timeout,
        progress: !args.quiet,
        keep_parts: !args.complete_snapshots,
    };
    let bin = args
        .control_bin
        .unwrap_or_else(discovery::control::default_binary);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let report = runtime.block_on(async {
        let cp = discovery::control::Process::start(&bin).await?;
        discovery::run(&cfg, cp.target()).await
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> Result<()> {
    let mut cfg = serve::ServeConfig {
        http: args.http,
        grpc: args.grpc,
        tcp: args.tcp,
        otlp: args.otlp,
        body_size: args.body_size,
        delay: args.delay,
        threads: threads(args.threads, &args.cpu),
        cpus: args.cpu.map(|c| c.0).unwrap_or_default(),
    };
    if cfg.http.is_empty() && cfg.grpc.is_empty() && cfg.tcp.is_empty() && cfg.otlp.is_empty() {
        cfg.http.push(SocketAddr::from(([127, 0, 0, 1], 8080)));
        cfg.grpc.push(SocketAddr::from(([127, 0, 0, 1], 8081)));
        cfg.tcp.push(SocketAddr::from(([127, 0, 0, 1], 8082)));
    }
    let server = serve::Server::start(&cfg)?;
    for a in server.http_addrs() {
        eprintln!("http (HTTP/1.1 + h2c) on {a}, body {} bytes", cfg.body_size);
    }
    for a in server.grpc_addrs() {
        eprintln!("grpc echo on {a}");
    }
    for a in server.otlp_addrs() {
        eprintln!("otlp trace collector on {a}");
    }
    for a in server.tcp_addrs() {
        eprintln!("tcp echo on {a}");
    }
    server.run_forever()
}

fn mesh_config(args: &MeshArgs) -> Result<MeshConfig> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut cfg = if args.quick {
        MeshConfig::quick(exe)
    } else {
        MeshConfig::full(exe)
    };
    cfg.peers = Vec::new();
    for p in args.peers.iter().filter(|p| p.as_str() != "none") {
        match PeerKind::parse(p) {
            Some(k) => cfg.peers.push(k),
            None => bail!("unknown peer {p:?} (known: haproxy, nginx)"),
        }
    }
    cfg.modes = Vec::new();
    for m in &args.modes {
        match ProxyMode::parse(m) {
            Some(m) => cfg.modes.push(m),
            None => bail!("unknown mode {m:?} (known: http, tcp)"),
        }
    }
    cfg.protocols = Vec::new();
    for p in &args.protocols {
        match AppProtocol::parse(p) {
            Some(p) if !cfg.protocols.contains(&p) => cfg.protocols.push(p),
            Some(_) => {}
            None => bail!("unknown protocol {p:?} (known: http1, h2, grpc, tcp)"),
        }
    }
    cfg.rounds = args.rounds.unwrap_or(cfg.rounds);
    cfg.rate = args.rate;
    cfg.duration = args.duration.unwrap_or(cfg.duration);
    cfg.latency_duration = args.latency_duration.unwrap_or(cfg.latency_duration);
    cfg.warmup = args.warmup.unwrap_or(cfg.warmup);
    cfg.connections = args.connections;
    cfg.latency_connections = args.latency_connections;
    cfg.body_size = args.body_size;
    cfg.weft = !args.no_weft;
    if let Some(dir) = &args.weft_bin_dir {
        cfg.weft_bin_dir = dir.clone();
    }
    cfg.weft_transparent = args.weft_transparent;
    cfg.ebpf = args.ebpf;
    cfg.weft_telemetry = Vec::new();
    for t in args.weft_telemetry.iter().filter(|t| t.as_str() != "none") {
        match mesh::Observability::parse(t) {
            Some(o) => cfg.weft_telemetry.push(o),
            None => anyhow::bail!(
                "--weft-telemetry: unknown {t:?} (metrics, tracing, tracing-otlp, none)"
            ),
        }
    }
    cfg.generator_cpu = args.generator_cpu;
    cfg.sidecar_cpu = args.sidecar_cpu;
    cfg.spin = !args.no_spin;
    Ok(cfg)
}

fn run_mesh(args: MeshArgs) -> Result<()> {
    let cfg = mesh_config(&args)?;
    let report = mesh::run(&cfg, &mut |line| eprintln!("{line}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    if !report.failures.is_empty() {
        bail!(
            "{} path(s) failed: {}",
            report.failures.len(),
            report.failures.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("weft-bench").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn every_option_parses() {
        let Command::Http { h2, load, .. } = parse(&[
            "http",
            "--h2",
            "-c",
            "8",
            "--rate",
            "1000",
            "-w",
            "500ms",
            "-d",
            "5s",
            "--timeout",
            "2s",
            "-t",
            "2",
            "--cpu",
            "0-1",
            "--json",
            "-q",
            "http://127.0.0.1:8080/",
        ])
        .command
        else {
            panic!("not http");
        };
        assert!(h2);
        let cfg = load_config(&load);
        assert_eq!(cfg.connections, 8);
        assert_eq!(cfg.rate, Some(1000.0));
        assert_eq!(cfg.warmup, Duration::from_millis(500));
        assert_eq!(cfg.stop, Stop::Duration(Duration::from_secs(5)));
        assert_eq!(cfg.cpus, vec![0, 1]);
        assert!(!cfg.progress);

        let Command::Tcp { load, .. } = parse(&["tcp", "-n", "100", "--cpu", "1", "h:1"]).command
        else {
            panic!("not tcp");
        };
        let cfg = load_config(&load);
        assert_eq!(cfg.stop, Stop::Requests(100));
        assert_eq!(cfg.threads, 1);

        let Command::Serve(s) = parse(&[
            "serve",
            "--http",
            "127.0.0.1:1",
            "--grpc",
            "127.0.0.1:2",
            "--tcp",
            "127.0.0.1:3",
            "--delay",
            "20ms",
            "--cpu",
            "1",
        ])
        .command
        else {
            panic!("not serve");
        };
        assert_eq!(s.delay, Duration::from_millis(20));
        assert_eq!(s.cpu.map(|c| c.0), Some(vec![1]));

        assert!(
            Cli::try_parse_from(["weft-bench", "http", "-d", "5s", "-n", "3", "http://x/"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["weft-bench", "http", "-d", "5 parsecs", "http://x/"]).is_err()
        );
    }

    fn mesh_args(args: &[&str]) -> MeshArgs {
        let Command::Mesh(m) = parse(&[&["mesh"], args].concat()).command else {
            panic!("not mesh");
        };
        m
    }

    #[test]
    fn mesh_protocols_parse() {
        let all = mesh_config(&mesh_args(&["--quick"])).unwrap();
        assert_eq!(all.protocols, AppProtocol::DEFAULT);
        let full = mesh_config(&mesh_args(&[])).unwrap();
        assert_eq!(full.protocols, AppProtocol::DEFAULT);
        let tcp = mesh_config(&mesh_args(&["--protocols", "tcp"])).unwrap();
        assert_eq!(tcp.protocols, [AppProtocol::Tcp]);
        let some = mesh_config(&mesh_args(&["--protocols", "grpc,h2,grpc"])).unwrap();
        assert_eq!(some.protocols, [AppProtocol::Grpc, AppProtocol::H2]);
        let err = mesh_config(&mesh_args(&["--protocols", "http3"])).unwrap_err();
        assert!(err.to_string().contains("unknown protocol"), "{err}");
    }
}
