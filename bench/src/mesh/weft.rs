//! The weft paths: one `weft-control` and, per path, two `weft-proxy`
//! sidecars in mesh `bench` (builtin CA, mTLS STRICT, every service allowed).
//!
//! Explicit mode (the default) needs no iptables: the app calls the client
//! sidecar's outbound port on 127.0.0.1, and the server sidecar's inbound
//! port forwards to the upstream on 127.0.0.1:8080. Transparent mode
//! installs `weft-iptables` rules in both namespaces, runs the proxies as
//! uid 5678, and the app calls the upstream's own address.
//!
//! The inbound is tagged `kuma.io/protocol: http` for path `weft` (HTTP/1.1
//! from the app, carried as HTTP/2 between the proxies), `http2` for
//! `weft-h2` and `grpc` for `weft-grpc` (h2c from the app and to the
//! upstream: the inbound speaks HTTP/2 to the app), and `tcp` for
//! `weft-tcp` (opaque bytes, each app connection a CONNECT stream on the pooled mTLS HTTP/2
//! connection between the sidecars)
//! and `weft-echo-tcp` (raw TCP ping-pong to the upstream's echo, the only
//! weft path of the `tcp` protocol). Each path has its own service,
//! `upstream-<key>`, whose inbound forwards to the upstream's port for the
//! protocol.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_iptables::ebpf::EbpfConfig;
use weft_tests::{Host, Proc};

use super::topology::{
    OTLP_SINK_PORT, TRACE_SINK_PORT, Topology, http_fetch, pinned, wait_http_ok,
};
use super::{AppProtocol, MeshError, Observability, ProxyMode, Sidecar, SidecarPair};

/// The mesh the bench creates.
pub const MESH: &str = "bench";
/// The control plane's REST API, inside the server namespace.
const API: &str = "127.0.0.1:5681";
/// The control plane's dataplane (gRPC over TLS) port.
const DP_PORT: u16 = 5678;
/// The proxies' admin address, inside each namespace.
const ADMIN: &str = "127.0.0.1:9901";
/// The uid transparent proxies run as (exempt from redirection).
const PROXY_UID: u32 = 5678;
/// Transparent redirect ports (SPEC §1).
const REDIRECT_OUTBOUND: u16 = 15001;
const REDIRECT_INBOUND: u16 = 15006;

/// The weft executables.
#[derive(Debug, Clone)]
pub struct WeftBins {
    /// `weft-control`.
    pub control: PathBuf,
    /// `weftctl`.
    pub ctl: PathBuf,
    /// `weft-proxy`.
    pub proxy: PathBuf,
    /// `weft-iptables`, for transparent mode.
    pub iptables: Option<PathBuf>,
}

/// Finds the weft binaries in `dir` (default: beside this executable); `Err`
/// says which one is missing.
pub fn find(dir: &Path) -> Result<WeftBins, String> {
    let get = |name: &str| {
        let p = dir.join(name);
        p.is_file().then_some(p)
    };
    let missing = |name: &str| {
        format!(
            "{name} not found in {}: build it (cargo build --release -p weft-proxy -p weft-control) \
             or pass --weft-bin-dir",
            dir.display()
        )
    };
    Ok(WeftBins {
        proxy: get("weft-proxy").ok_or_else(|| missing("weft-proxy"))?,
        control: get("weft-control").ok_or_else(|| missing("weft-control"))?,
        ctl: get("weftctl").ok_or_else(|| missing("weftctl"))?,
        iptables: get("weft-iptables"),
    })
}

/// A running `weft-control` in the server namespace with mesh `bench`.
pub struct ControlPlane {
    bins: WeftBins,
    ca: PathBuf,
    _proc: Proc,
}

impl ControlPlane {
    /// Starts the control plane pinned to the sidecar CPU (it is idle while
    /// measuring), waits for its API and applies the mesh.
    pub fn start(bins: &WeftBins, topo: &Topology) -> Result<ControlPlane, MeshError> {
        let data = topo.dir().join("weft-control");
        let mut cmd = pinned(topo.opts.sidecar_cpu, &bins.control);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&data)
            .args(["--api-address", API])
            .args(["--dp-server-address", &format!("0.0.0.0:{DP_PORT}")]);
        let mut proc = topo.spawn(&topo.server, cmd, "weft-control")?;
        let api: SocketAddr = API.parse().expect("constant address");
        wait_http_ok(
            &topo.server,
            api,
            "/",
            Duration::from_secs(20),
            Some(&mut proc),
        )
        .map_err(|why| topo.start_failure("weft-control", &why))?;
        let mesh = topo.dir().join("weft-mesh.yaml");
        write(&mesh, &mesh_yaml(Observability::Off, topo))?;
        ctl(
            bins,
            &topo.server,
            &["apply", "-f", &mesh.display().to_string()],
        )
        .map_err(|why| topo.start_failure("weft-control", &why))?;
        // A copy the proxies can read when they run as their own uid (the
        // data dir may be private to the control plane).
        let ca = topo.dir().join("weft-cp-ca.pem");
        std::fs::copy(data.join("cp-ca.pem"), &ca)
            .and_then(|_| std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)))
            .map_err(|e| topo.start_failure("weft-control", &format!("cp-ca.pem: {e}")))?;
        Ok(ControlPlane {
            bins: bins.clone(),
            ca,
            _proc: proc,
        })
    }
}

impl ControlPlane {
    /// Sets mesh `bench`'s observability backends (before a pair starts, so
    /// its proxies get them in their first snapshot).
    pub fn observe(&self, topo: &Topology, o: Observability) -> Result<(), MeshError> {
        let mesh = topo.dir().join(format!("weft-mesh-{}.yaml", o.name()));
        write(&mesh, &mesh_yaml(o, topo))?;
        ctl(
            &self.bins,
            &topo.server,
            &["apply", "-f", &mesh.display().to_string()],
        )
        .map(|_| ())
        .map_err(|why| topo.start_failure("weftctl apply (observability)", &why))
    }
}

/// Runs `weftctl --api-url http://API <args>` in the server namespace and
/// returns its stdout.
fn ctl(bins: &WeftBins, server: &Host, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(&bins.ctl);
    cmd.args(["--api-url", &format!("http://{API}")]).args(args);
    let out = server
        .output(cmd, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "weftctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write(path: &Path, text: &str) -> Result<(), MeshError> {
    std::fs::write(path, text).map_err(|e| MeshError::io(format!("writing {}", path.display()), e))
}

/// Mesh `bench`: builtin CA, STRICT mTLS, every service may call every
/// service; with `o`, the Prometheus backend and (for tracing) a Zipkin or
/// OpenTelemetry backend at 100% sampling whose collector is the topology's
/// trace sink (it takes every export, on the generator's CPU).
fn mesh_yaml(o: Observability, topo: &Topology) -> String {
    let metrics = if o == Observability::Off {
        String::new()
    } else {
        "metrics:\n  enabledBackend: prom-1\n  backends:\n    - name: prom-1\n      type: prometheus\n      \
         conf:\n        port: 5670\n        path: /metrics\n"
            .to_string()
    };
    let tracing = match o {
        Observability::Tracing => format!(
            "tracing:\n  defaultBackend: zipkin-1\n  backends:\n    - name: zipkin-1\n      type: zipkin\n      \
             sampling: 100.0\n      conf:\n        url: http://{}:{TRACE_SINK_PORT}/api/v2/spans\n",
            topo.server_ip
        ),
        Observability::TracingOtlp => format!(
            "tracing:\n  defaultBackend: otlp-1\n  backends:\n    - name: otlp-1\n      type: opentelemetry\n      \
             sampling: 100.0\n      conf:\n        endpoint: {}:{OTLP_SINK_PORT}\n",
            topo.server_ip
        ),
        Observability::Off | Observability::Metrics => String::new(),
    };
    format!(
        "type: Mesh\nname: {MESH}\nmtls:\n  enabledBackend: ca-1\n  backends:\n    - name: ca-1\n      \
         type: builtin\n      mode: STRICT\n{metrics}{tracing}---\ntype: TrafficPermission\nmesh: {MESH}\nname: allow-all\n\
         sources:\n  - match:\n      kuma.io/service: '*'\ndestinations:\n  - match:\n      kuma.io/service: '*'\n"
    )
}

/// Where one weft pair listens in explicit mode.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The client sidecar's outbound port on 127.0.0.1.
    pub outbound: u16,
    /// The server sidecar's inbound port on the server's address.
    pub inbound: u16,
}

/// What a weft pair carries: the app's protocol and how the proxies
/// handle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flavour {
    /// What the app speaks.
    pub protocol: AppProtocol,
    /// Parsed (HTTP) or opaque (TCP).
    pub mode: ProxyMode,
}

impl Flavour {
    /// Names the pair's dataplanes and service: `http`, `tcp`, `h2`,
    /// `grpc`, `h2-tcp`, `echo-tcp` (raw TCP), ...: the protocol's
    /// [`AppProtocol::path_tag`] and the mode, as in the path names.
    fn key(self) -> String {
        match (self.protocol.path_tag(), self.mode) {
            (None, m) => m.name().to_owned(),
            (Some(tag), ProxyMode::Http) => tag.to_owned(),
            (Some(tag), ProxyMode::Tcp) => format!("{tag}-tcp"),
        }
    }

    /// The inbound's `kuma.io/protocol` tag.
    fn tag(self) -> &'static str {
        match self.mode {
            ProxyMode::Http => self.protocol.tag(),
            ProxyMode::Tcp => "tcp",
        }
    }
}

/// The `Dataplane` of the server side: one inbound in front of the upstream.
fn server_dataplane(f: Flavour, address: &str, inbound: u16, transparent: bool) -> String {
    let mut s = format!(
        "type: Dataplane\nmesh: {MESH}\nname: server-{k}\nnetworking:\n  address: {address}\n  inbound:\n    \
         - port: {inbound}\n      servicePort: {app}\n      serviceAddress: 127.0.0.1\n      tags:\n        \
         kuma.io/service: upstream-{k}\n        kuma.io/protocol: {tag}\n",
        k = f.key(),
        app = f.protocol.upstream_port(),
        tag = f.tag(),
    );
    if transparent {
        s.push_str(&transparent_yaml());
    }
    s
}

/// The `Dataplane` of the client side: an inbound (every dataplane has
/// one) and, in explicit mode, the outbound the app calls.
fn client_dataplane(f: Flavour, address: &str, outbound: u16, transparent: bool) -> String {
    let mut s = format!(
        "type: Dataplane\nmesh: {MESH}\nname: client-{k}\nnetworking:\n  address: {address}\n  inbound:\n    \
         - port: 15099\n      servicePort: 9\n      tags:\n        kuma.io/service: bench-client\n",
        k = f.key(),
    );
    if transparent {
        s.push_str(&transparent_yaml());
    } else {
        s.push_str(&format!(
            "  outbound:\n    - port: {outbound}\n      tags:\n        kuma.io/service: upstream-{}\n",
            f.key()
        ));
    }
    s
}

fn transparent_yaml() -> String {
    format!(
        "  transparentProxying:\n    redirectPortInbound: {REDIRECT_INBOUND}\n    \
         redirectPortOutbound: {REDIRECT_OUTBOUND}\n"
    )
}

/// Starts the pair for `flavour`: server side first (its endpoint must be
/// known before the client asks for it), each proxy waited for on
/// `/ready`. Returns the pair and the URL the app calls. In transparent mode
/// with `ebpf` (the run's eBPF install), the client host is also registered
/// for the connect redirect while the pair runs, so the generator's hop to
/// its sidecar is redirected as in explicit mode.
pub fn start(
    cp: &ControlPlane,
    flavour: Flavour,
    ports: Ports,
    transparent: bool,
    ebpf: Option<&EbpfConfig>,
    topo: &Topology,
) -> Result<(SidecarPair, String), MeshError> {
    if transparent {
        let Some(ipt) = &cp.bins.iptables else {
            return Err(MeshError::Start {
                what: "weft-iptables".into(),
                why: "not found beside weft-proxy".into(),
                log: String::new(),
            });
        };
        // The tempdir is 0700; the proxies run as their own uid.
        std::fs::set_permissions(topo.dir(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| MeshError::io("opening the scratch dir to the proxy uid", e))?;
        for (host, name) in [(&topo.server, "server"), (&topo.client, "client")] {
            let mut cmd = Command::new(ipt);
            cmd.args([
                "install",
                "--redirect-outbound-port",
                &REDIRECT_OUTBOUND.to_string(),
                "--redirect-inbound-port",
                &REDIRECT_INBOUND.to_string(),
                "--proxy-uid",
                &PROXY_UID.to_string(),
                "--exclude-inbound-ports",
                &DP_PORT.to_string(),
            ]);
            let out = host.output(cmd, Duration::from_secs(20))?;
            if !out.status.success() {
                return Err(MeshError::Start {
                    what: format!("weft-iptables install ({name})"),
                    why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    log: String::new(),
                });
            }
        }
    }
    let m = flavour.key();
    let server_ip = topo.server_ip.to_string();
    let app_port = flavour.protocol.upstream_port();
    let inbound = if transparent { app_port } else { ports.inbound };
    let sides = [
        (
            "in",
            &topo.server,
            format!("server-{m}"),
            server_dataplane(flavour, &server_ip, inbound, transparent),
        ),
        (
            "out",
            &topo.client,
            format!("client-{m}"),
            client_dataplane(
                flavour,
                &topo.client_ip.to_string(),
                ports.outbound,
                transparent,
            ),
        ),
    ];
    let mut pair = Vec::new();
    for (side, host, name, dataplane) in sides {
        let dp_file = topo.dir().join(format!("weft-{name}.yaml"));
        write(&dp_file, &dataplane)?;
        let token = ctl(
            &cp.bins,
            &topo.server,
            &[
                "generate",
                "dataplane-token",
                "--mesh",
                MESH,
                "--name",
                &name,
            ],
        )
        .map_err(|why| topo.start_failure("weft-control", &why))?;
        let token_file = topo.dir().join(format!("weft-{name}.token"));
        write(&token_file, token.trim())?;
        if transparent {
            for f in [&dp_file, &token_file] {
                let _ = std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644));
            }
        }
        // The server side reaches the control plane over loopback: with
        // iptables, the proxy's own calls to its host's address are sent to
        // its inbound (as in Kuma's rules).
        let cp_host = if side == "in" {
            "127.0.0.1".to_owned()
        } else {
            server_ip.clone()
        };
        let cp_address = format!("https://{cp_host}:{DP_PORT}");
        let mut cmd = pinned(topo.opts.sidecar_cpu, &cp.bins.proxy);
        cmd.arg("run")
            .args(["--cp-address", &cp_address])
            .arg("--ca-cert-file")
            .arg(&cp.ca)
            .arg("--dataplane-file")
            .arg(&dp_file)
            .arg("--dataplane-token-file")
            .arg(&token_file)
            .args(["--admin-address", ADMIN, "--drain-time", "1s"])
            // One data-path worker, like the peers' one worker each.
            .env("TOKIO_WORKER_THREADS", "1");
        if transparent {
            cmd.uid(PROXY_UID).gid(PROXY_UID);
        }
        let log = format!("weft-proxy-{name}");
        let mut proc = topo.spawn(host, cmd, &log)?;
        let admin: SocketAddr = ADMIN.parse().expect("constant address");
        wait_http_ok(
            host,
            admin,
            "/ready",
            Duration::from_secs(20),
            Some(&mut proc),
        )
        .map_err(|why| topo.start_failure(&log, &why))?;
        pair.push(Sidecar {
            side,
            proc,
            graceful: true,
        });
    }
    let url = if transparent {
        format!("http://{server_ip}:{app_port}/")
    } else {
        format!("http://127.0.0.1:{}/", ports.outbound)
    };
    let mut pair = SidecarPair::new(pair);
    if transparent {
        let ipt = cp.bins.iptables.clone();
        let hosts = [topo.server.clone(), topo.client.clone()];
        pair.on_stop(Box::new(move || {
            for host in hosts {
                if let Some(ipt) = &ipt {
                    let mut cmd = Command::new(ipt);
                    cmd.arg("uninstall");
                    let _ = host.output(cmd, Duration::from_secs(20));
                }
            }
        }));
        if let Some(ebpf) = ebpf {
            register_connect_redirect(ebpf, &topo.client)?;
            let (ebpf, client) = (ebpf.clone(), topo.client.clone());
            pair.on_stop(Box::new(move || {
                let _ = client.enter(|| weft_iptables::ebpf::unregister_transparent(&ebpf));
            }));
        }
    }
    Ok((pair, url))
}

/// Registers `host` for the connect redirect of transparent mode, with the settings of its
/// iptables rules: its apps' outbound connections go straight to the outbound sidecar.
fn register_connect_redirect(ebpf: &EbpfConfig, host: &Host) -> Result<(), MeshError> {
    let config = weft_iptables::Config {
        redirect_outbound_port: REDIRECT_OUTBOUND,
        redirect_inbound_port: REDIRECT_INBOUND,
        proxy_uid: PROXY_UID,
        ..weft_iptables::Config::default()
    };
    host.enter(|| {
        let addrs = weft_iptables::ebpf::local_ipv4_addrs()?;
        let conf = weft_iptables::ebpf::TransparentConf::new(&config, addrs)?;
        weft_iptables::ebpf::register_transparent(ebpf, &conf)
    })?
    .map_err(|e| MeshError::Config(format!("--ebpf: registering the client host: {e}")))
}

/// What the two sidecars of a traced path did with their spans so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpanCounts {
    /// `weft_trace_spans_exported_total`, both sidecars.
    pub exported: u64,
    /// `weft_trace_spans_dropped_total`, every reason, both sidecars.
    pub dropped: u64,
}

/// Reads [`SpanCounts`] from both running sidecars' admin `/metrics`: a traced path's cost is
/// only the cost of tracing if the spans were exported, not dropped.
pub fn span_counts(topo: &Topology) -> Result<SpanCounts, String> {
    let admin: SocketAddr = ADMIN.parse().map_err(|e| format!("{ADMIN}: {e}"))?;
    let mut total = SpanCounts::default();
    for host in [&topo.client, &topo.server] {
        let (code, body) = http_fetch(host, admin, "/metrics")?;
        if code != 200 {
            return Err(format!("GET /metrics answered {code}"));
        }
        let c = parse_span_counts(&body);
        total.exported += c.exported;
        total.dropped += c.dropped;
    }
    Ok(total)
}

/// Sums the span counters in a Prometheus text exposition.
fn parse_span_counts(text: &str) -> SpanCounts {
    let mut c = SpanCounts::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or_default();
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        // Counters are whole numbers well below 2^53.
        let value = value as u64;
        match name {
            "weft_trace_spans_exported_total" => c.exported += value,
            "weft_trace_spans_dropped_total" => c.dropped += value,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_counters_are_summed_over_reasons() {
        let text = "# HELP weft_trace_spans_exported Spans exported.\n\
                    # TYPE weft_trace_spans_exported counter\n\
                    weft_trace_spans_exported_total 1024\n\
                    weft_trace_spans_dropped_total{reason=\"queue_full\"} 3\n\
                    weft_trace_spans_dropped_total{reason=\"export_failed\"} 2\n\
                    weft_trace_spans_dropped_total{reason=\"closed\"} 0\n\
                    weft_requests_total{direction=\"inbound\",service=\"a\",code=\"200\"} 9\n";
        assert_eq!(
            parse_span_counts(text),
            SpanCounts {
                exported: 1024,
                dropped: 5
            }
        );
    }

    fn flavour(protocol: AppProtocol, mode: ProxyMode) -> Flavour {
        Flavour { protocol, mode }
    }

    #[test]
    fn dataplanes_follow_the_spec_shape() {
        let http = flavour(AppProtocol::Http1, ProxyMode::Http);
        let s = server_dataplane(
            flavour(AppProtocol::Http1, ProxyMode::Tcp),
            "10.77.0.2",
            15206,
            false,
        );
        assert!(s.contains("name: server-tcp") && s.contains("kuma.io/protocol: tcp"));
        assert!(s.contains("port: 15206") && s.contains("servicePort: 8080"));
        let c = client_dataplane(http, "10.77.0.1", 15101, false);
        assert!(c.contains("outbound:") && c.contains("kuma.io/service: upstream-http"));
        let t = client_dataplane(http, "10.77.0.1", 15101, true);
        assert!(t.contains("redirectPortOutbound: 15001") && !t.contains("outbound:\n"));
    }

    #[test]
    fn h2_and_grpc_inbounds_speak_http2_to_the_app() {
        let h2 = server_dataplane(
            flavour(AppProtocol::H2, ProxyMode::Http),
            "10.77.0.2",
            15207,
            false,
        );
        assert!(h2.contains("name: server-h2") && h2.contains("kuma.io/protocol: http2"));
        assert!(h2.contains("servicePort: 8080") && h2.contains("upstream-h2\n"));
        let grpc = flavour(AppProtocol::Grpc, ProxyMode::Http);
        let s = server_dataplane(grpc, "10.77.0.2", 15208, false);
        assert!(s.contains("name: server-grpc") && s.contains("kuma.io/protocol: grpc"));
        assert!(s.contains("servicePort: 8081"));
        let c = client_dataplane(grpc, "10.77.0.1", 15108, false);
        assert!(c.contains("name: client-grpc") && c.contains("kuma.io/service: upstream-grpc\n"));
        assert_eq!(flavour(AppProtocol::H2, ProxyMode::Tcp).key(), "h2-tcp");
        assert_eq!(flavour(AppProtocol::H2, ProxyMode::Tcp).tag(), "tcp");
    }

    #[test]
    fn raw_tcp_inbound_is_tagged_tcp_and_forwards_to_the_echo() {
        let echo = flavour(AppProtocol::Tcp, ProxyMode::Tcp);
        assert_eq!(echo.key(), "echo-tcp");
        let s = server_dataplane(echo, "10.77.0.2", 15209, false);
        assert!(s.contains("name: server-echo-tcp") && s.contains("kuma.io/protocol: tcp"));
        assert!(s.contains("servicePort: 8082") && s.contains("upstream-echo-tcp\n"));
        let c = client_dataplane(echo, "10.77.0.1", 15109, false);
        assert!(c.contains("kuma.io/service: upstream-echo-tcp\n"));
    }

    #[test]
    fn missing_binaries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = find(dir.path()).unwrap_err();
        assert!(err.contains("weft-proxy not found"), "{err}");
    }
}
