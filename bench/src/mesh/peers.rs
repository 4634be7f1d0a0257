//! The peer proxies: HAProxy and nginx pairs doing weft's sidecar job, as in
//! `reference/peer-baseline.md`. Plaintext in from the local app, TLS 1.3
//! with mutual authentication between the two sidecars (ECDSA P-256 leaves
//! from one CA made here with rcgen, each side verifying the other against
//! it), plaintext out to the upstream; one worker each, in HTTP mode (the
//! proxy parses HTTP/1.1 and pools its connections to the other side) or TCP
//! mode (one TLS connection per app connection, bytes copied). The inbound
//! side forwards to the upstream's port for the app's protocol: HTTP/1.1 on
//! :8080, raw TCP (TCP mode only) to the echo on :8082.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use super::topology::{Topology, pinned};
use super::{AppProtocol, MeshError, PathKind, ProxyMode, Sidecar, SidecarPair};

/// The DNS name in the inbound sidecar's certificate, checked by the
/// outbound side.
pub const SERVER_NAME: &str = "upstream.bench.mesh";

/// A peer proxy the bench knows how to configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// HAProxy (`haproxy`).
    Haproxy,
    /// nginx (`nginx`; TCP mode needs the stream module).
    Nginx,
}

impl PeerKind {
    /// Every peer, in report order.
    pub const ALL: [PeerKind; 2] = [PeerKind::Haproxy, PeerKind::Nginx];

    /// The name used in `--peers` and in path names.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Haproxy => "haproxy",
            PeerKind::Nginx => "nginx",
        }
    }

    /// Parses a `--peers` entry.
    pub fn parse(s: &str) -> Option<PeerKind> {
        PeerKind::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// An installed peer: its binary and what it can do.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Which proxy.
    pub kind: PeerKind,
    /// Its executable.
    pub binary: PathBuf,
    /// Its version line.
    pub version: String,
    /// nginx's stream module (`load_module` line), when TCP mode needs one.
    pub stream_module: Option<PathBuf>,
    /// Why TCP mode cannot run, if it cannot.
    pub no_tcp: Option<String>,
}

/// Finds `kind` on `PATH` (and in the sbin directories Debian uses); `Err`
/// says why it cannot be measured.
pub fn find(kind: PeerKind) -> Result<Installed, String> {
    let binary = which(kind.name()).ok_or_else(|| {
        format!(
            "{} not installed (Debian: apt-get install {}{})",
            kind.name(),
            kind.name(),
            if kind == PeerKind::Nginx {
                " libnginx-mod-stream"
            } else {
                ""
            }
        )
    })?;
    let flag = match kind {
        PeerKind::Haproxy => "-v",
        PeerKind::Nginx => "-V",
    };
    let out = std::process::Command::new(&binary)
        .arg(flag)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    // nginx prints its version to stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = text.lines().next().unwrap_or_default().trim().to_owned();
    let mut installed = Installed {
        kind,
        binary,
        version,
        stream_module: None,
        no_tcp: None,
    };
    if kind == PeerKind::Nginx {
        match nginx_stream(&text) {
            Ok(module) => installed.stream_module = module,
            Err(why) => installed.no_tcp = Some(why),
        }
    }
    Ok(installed)
}

/// Where nginx's stream module comes from, from `nginx -V`: built in
/// (`None`), a dynamic module file, or missing.
fn nginx_stream(configure: &str) -> Result<Option<PathBuf>, String> {
    let args: Vec<&str> = configure.split_whitespace().collect();
    if args.contains(&"--with-stream") {
        return Ok(None);
    }
    if !args.contains(&"--with-stream=dynamic") {
        return Err("nginx was built without the stream module".into());
    }
    let dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    let module = Path::new(dir).join("ngx_stream_module.so");
    if module.exists() {
        Ok(Some(module))
    } else {
        Err(format!(
            "{} is missing (Debian: apt-get install libnginx-mod-stream)",
            module.display()
        ))
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The files of one mesh of peer sidecars: a CA and a leaf per side.
#[derive(Debug, Clone)]
pub struct Certs {
    /// The CA certificate both sides trust.
    pub ca: PathBuf,
    /// The outbound (client) side's certificate and key.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Certificate then key, one file (HAProxy's `crt`).
    pub client_pem: PathBuf,
    /// The inbound (server) side's certificate.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Certificate then key, one file.
    pub server_pem: PathBuf,
}

impl Certs {
    /// Makes a CA and two leaves (ECDSA P-256, SPIFFE URIs like weft's) and
    /// writes them into `dir`.
    pub fn generate(dir: &Path) -> Result<Certs, MeshError> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "weft-bench peer CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |dns: &str, spiffe: &str| -> Result<(String, String), MeshError> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut p = CertificateParams::new(vec![dns.to_owned()])?;
            p.distinguished_name.push(DnType::CommonName, dns);
            p.subject_alt_names.push(SanType::URI(spiffe.try_into()?));
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (client_cert, client_key) = leaf("client.bench.mesh", "spiffe://bench/client")?;
        let (server_cert, server_key) = leaf(SERVER_NAME, "spiffe://bench/upstream")?;

        let write = |name: &str, text: &str| -> Result<PathBuf, MeshError> {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| MeshError::io(format!("writing {}", path.display()), e))?;
            Ok(path)
        };
        Ok(Certs {
            ca: write("peer-ca.pem", &ca_cert.pem())?,
            client_pem: write("peer-client.pem", &format!("{client_cert}{client_key}"))?,
            client_cert: write("peer-client.crt", &client_cert)?,
            client_key: write("peer-client.key", &client_key)?,
            server_pem: write("peer-server.pem", &format!("{server_cert}{server_key}"))?,
            server_cert: write("peer-server.crt", &server_cert)?,
            server_key: write("peer-server.key", &server_key)?,
        })
    }
}

/// Where one pair listens.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The outbound sidecar's plaintext port on 127.0.0.1 (client side).
    pub outbound: u16,
    /// The inbound sidecar's mTLS port on the server's veth address.
    pub inbound: u16,
}

/// Writes both configs of a pair for the app's `protocol` into the scratch
/// dir and starts the inbound side, then the outbound side, each pinned to
/// the sidecar CPU. Raw TCP needs TCP mode.
pub fn start(
    peer: &Installed,
    protocol: AppProtocol,
    mode: ProxyMode,
    ports: Ports,
    certs: &Certs,
    topo: &Topology,
) -> Result<SidecarPair, MeshError> {
    let path = PathKind::Peer(peer.kind, protocol, mode);
    if !matches!(protocol, AppProtocol::Http1 | AppProtocol::Tcp) || !protocol.proxied_in(mode) {
        return Err(MeshError::Config(format!(
            "no {} path: the peers carry HTTP/1.1, and raw TCP in tcp mode only",
            path.name()
        )));
    }
    // Unique per path (`haproxy-http`, `nginx-tcp`, `nginx-echo-tcp`): the
    // names of its configs, logs, pid and temp files.
    let name = match protocol.path_tag() {
        None => format!("{}-{}", peer.kind.name(), mode.name()),
        Some(_) => path.name(),
    };
    let app_port = protocol.upstream_port();
    let server_addr = SocketAddr::from((topo.server_ip, ports.inbound));
    let server = server_addr.to_string();
    let (out_conf, in_conf) = match peer.kind {
        PeerKind::Haproxy => (
            haproxy_outbound(mode, ports.outbound, &server, certs),
            haproxy_inbound(mode, &server, app_port, certs),
        ),
        PeerKind::Nginx => {
            let dir = topo.dir().display().to_string();
            let module = peer.stream_module.as_deref();
            (
                nginx_outbound(mode, ports.outbound, &server, certs, &dir, &name, module),
                nginx_inbound(mode, &server, app_port, certs, &dir, &name, module),
            )
        }
    };
    let mut pair = Vec::new();
    for (side, conf, host) in [
        ("in", in_conf, &topo.server),
        ("out", out_conf, &topo.client),
    ] {
        let file = topo.dir().join(format!("{name}-{side}.conf"));
        std::fs::write(&file, conf)
            .map_err(|e| MeshError::io(format!("writing {}", file.display()), e))?;
        let mut cmd = pinned(topo.opts.sidecar_cpu, &peer.binary);
        match peer.kind {
            // -db: foreground, no daemon, no master process.
            PeerKind::Haproxy => cmd.arg("-db").arg("-f").arg(&file),
            PeerKind::Nginx => cmd
                .arg("-p")
                .arg(topo.dir())
                .arg("-e")
                .arg(topo.dir().join(format!("{name}-{side}.error.log")))
                .arg("-c")
                .arg(&file),
        };
        let log = format!("{name}-{side}");
        let mut proc = topo.spawn(host, cmd, &log)?;
        // The inbound side must listen before the outbound side's first
        // connection; each waits for its own port.
        let addr = if side == "in" {
            server_addr
        } else {
            SocketAddr::from(([127, 0, 0, 1], ports.outbound))
        };
        super::wait_listening(host, addr, &mut proc)
            .map_err(|why| topo.start_failure(&log, &why))?;
        pair.push(Sidecar {
            side,
            proc,
            graceful: false,
        });
    }
    Ok(SidecarPair::new(pair))
}

fn haproxy_global(mode: ProxyMode) -> String {
    let mode = match mode {
        ProxyMode::Http => "http",
        ProxyMode::Tcp => "tcp",
    };
    format!(
        "global\n  nbthread 1\n  maxconn 4096\n  tune.ssl.default-dh-param 2048\n\
         defaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  \
         timeout http-keep-alive 60s\n"
    )
}

fn haproxy_outbound(mode: ProxyMode, port: u16, server: &str, c: &Certs) -> String {
    let mut s = haproxy_global(mode);
    let _ = write!(
        s,
        "frontend outbound\n  bind 127.0.0.1:{port}\n  default_backend mesh\n\
         backend mesh\n  server inbound {server} ssl ssl-min-ver TLSv1.3 verify required \
         ca-file {ca} crt {crt} verifyhost {SERVER_NAME} sni str({SERVER_NAME})\n",
        ca = c.ca.display(),
        crt = c.client_pem.display(),
    );
    s
}

fn haproxy_inbound(mode: ProxyMode, server: &str, app_port: u16, c: &Certs) -> String {
    let mut s = haproxy_global(mode);
    let _ = write!(
        s,
        "frontend inbound\n  bind {server} ssl ssl-min-ver TLSv1.3 crt {crt} verify required ca-file {ca}\n  \
         default_backend app\n\
         backend app\n  server app 127.0.0.1:{app_port}\n",
        ca = c.ca.display(),
        crt = c.server_pem.display(),
    );
    s
}

/// The part every nginx config shares: foreground, one worker, everything
/// (pid, temp files, logs) in the scratch dir.
fn nginx_main(dir: &str, name: &str, side: &str, module: Option<&Path>) -> String {
    let mut s = String::new();
    if let Some(m) = module {
        let _ = writeln!(s, "load_module {};", m.display());
    }
    let _ = write!(
        s,
        "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\n\
         pid {dir}/{name}-{side}.pid;\nerror_log {dir}/{name}-{side}.error.log warn;\n\
         events {{ worker_connections 20000; }}\n"
    );
    s
}

fn nginx_http_common(dir: &str, name: &str, side: &str) -> String {
    format!(
        "  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
         client_body_temp_path {dir}/{name}-{side}-body;\n  proxy_temp_path {dir}/{name}-{side}-proxy;\n\
         fastcgi_temp_path {dir}/{name}-{side}-fcgi;\n  uwsgi_temp_path {dir}/{name}-{side}-uwsgi;\n\
         scgi_temp_path {dir}/{name}-{side}-scgi;\n"
    )
}

fn nginx_outbound(
    mode: ProxyMode,
    port: u16,
    server: &str,
    c: &Certs,
    dir: &str,
    name: &str,
    module: Option<&Path>,
) -> String {
    let mut s = nginx_main(dir, name, "out", module.filter(|_| mode == ProxyMode::Tcp));
    let tls = format!(
        "proxy_ssl_protocols TLSv1.3;\n    proxy_ssl_certificate {};\n    \
         proxy_ssl_certificate_key {};\n    proxy_ssl_trusted_certificate {};\n    \
         proxy_ssl_verify on;\n    proxy_ssl_name {SERVER_NAME};\n    proxy_ssl_server_name on;\n    \
         proxy_ssl_session_reuse on;\n",
        c.client_cert.display(),
        c.client_key.display(),
        c.ca.display()
    );
    match mode {
        ProxyMode::Http => {
            let _ = write!(
                s,
                "http {{\n{common}  upstream mesh {{ server {server}; keepalive 256; keepalive_requests 10000000; }}\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n    proxy_pass https://mesh;\n    \
                 proxy_http_version 1.1;\n    proxy_set_header Connection \"\";\n    {tls}    }}\n  }}\n}}\n",
                common = nginx_http_common(dir, name, "out"),
            );
        }
        ProxyMode::Tcp => {
            let _ = write!(
                s,
                "stream {{\n  server {{\n    listen 127.0.0.1:{port};\n    proxy_pass {server};\n    \
                 proxy_ssl on;\n    {tls}  }}\n}}\n"
            );
        }
    }
    s
}

fn nginx_inbound(
    mode: ProxyMode,
    server: &str,
    app_port: u16,
    c: &Certs,
    dir: &str,
    name: &str,
    module: Option<&Path>,
) -> String {
    let mut s = nginx_main(dir, name, "in", module.filter(|_| mode == ProxyMode::Tcp));
    let tls = format!(
        "ssl_protocols TLSv1.3;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    \
         ssl_client_certificate {};\n    ssl_verify_client on;\n",
        c.server_cert.display(),
        c.server_key.display(),
        c.ca.display()
    );
    match mode {
        ProxyMode::Http => {
            let _ = write!(
                s,
                "http {{\n{common}  upstream app {{ server 127.0.0.1:{app_port}; keepalive 256; \
                 keepalive_requests 10000000; }}\n  server {{\n    listen {server} ssl;\n    {tls}    \
                 location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      \
                 proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
                common = nginx_http_common(dir, name, "in"),
            );
        }
        ProxyMode::Tcp => {
            let _ = write!(
                s,
                "stream {{\n  server {{\n    listen {server} ssl;\n    {tls}    \
                 proxy_pass 127.0.0.1:{app_port};\n  }}\n}}\n"
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nginx_stream_module() {
        assert_eq!(
            nginx_stream("configure arguments: --with-stream --x"),
            Ok(None)
        );
        assert!(nginx_stream("configure arguments: --with-http_ssl_module").is_err());
        let missing = nginx_stream("--with-stream=dynamic --modules-path=/nonexistent");
        assert!(missing.unwrap_err().contains("libnginx-mod-stream"));
    }

    #[test]
    fn certificates_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let c = Certs::generate(dir.path()).unwrap();
        let pem = std::fs::read_to_string(&c.server_pem).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE") && pem.contains("PRIVATE KEY"));
        assert!(
            std::fs::read_to_string(&c.ca)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
    }

    fn certs() -> Certs {
        Certs {
            ca: "/d/ca.pem".into(),
            client_cert: "/d/c.crt".into(),
            client_key: "/d/c.key".into(),
            client_pem: "/d/c.pem".into(),
            server_cert: "/d/s.crt".into(),
            server_key: "/d/s.key".into(),
            server_pem: "/d/s.pem".into(),
        }
    }

    #[test]
    fn configs_do_mutual_tls_13() {
        let c = certs();
        let out = haproxy_outbound(ProxyMode::Http, 15001, "10.77.0.2:15006", &c);
        assert!(
            out.contains("mode http")
                && out.contains("verify required")
                && out.contains("crt /d/c.pem")
        );
        let inb = haproxy_inbound(ProxyMode::Tcp, "10.77.0.2:15006", 8080, &c);
        assert!(
            inb.contains("mode tcp")
                && inb.contains("ssl-min-ver TLSv1.3")
                && inb.contains("verify required")
                && inb.contains("server app 127.0.0.1:8080\n")
        );
        let out = nginx_outbound(
            ProxyMode::Tcp,
            15001,
            "10.77.0.2:15006",
            &c,
            "/d",
            "n",
            Some(Path::new("/m.so")),
        );
        assert!(out.starts_with("load_module /m.so;") && out.contains("proxy_ssl on;"));
        let inb = nginx_inbound(
            ProxyMode::Http,
            "10.77.0.2:15006",
            8080,
            &c,
            "/d",
            "n",
            None,
        );
        assert!(inb.contains("ssl_verify_client on;") && inb.contains("worker_processes 1;"));
        assert!(inb.contains("server 127.0.0.1:8080;"));
    }

    #[test]
    fn inbounds_forward_to_the_protocols_upstream_port() {
        let c = certs();
        let port = AppProtocol::Tcp.upstream_port();
        assert_eq!(port, super::super::topology::TCP_ECHO_PORT);
        let h = haproxy_inbound(ProxyMode::Tcp, "10.77.0.2:15006", port, &c);
        assert!(h.contains("mode tcp") && h.contains("server app 127.0.0.1:8082\n"));
        let n = nginx_inbound(ProxyMode::Tcp, "10.77.0.2:15006", port, &c, "/d", "n", None);
        assert!(n.contains("stream {") && n.contains("proxy_pass 127.0.0.1:8082;"));
    }
}
