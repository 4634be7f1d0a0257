//! The data path end to end, in process, on 127.0.0.1: a client-side and a server-side proxy
//! in explicit mode (and a transparent outbound listener with a faked original destination),
//! built from hand-made snapshots and rcgen certificates. No root needed.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_api::proto::{self as pb, mtls::Mode};
use weft_proxy::datapath_metrics::{DataPathMetrics, DirectionLabels};
use weft_proxy::drain::{Drain, DrainOutcome};
use weft_proxy::mesh_tls::{MeshTls, NoMeshTls};
use weft_proxy::{DataPath, DataPathOptions, ProxyConfig};

const MESH: &str = "default";

struct Proxy {
    dp: DataPath,
    metrics: DataPathMetrics,
    drain: Drain,
}

fn start(snap: &pb::Snapshot, tls: Arc<dyn MeshTls>, opts: DataPathOptions) -> Proxy {
    let metrics = DataPathMetrics::new();
    let drain = Drain::new();
    let cfg = ProxyConfig::from_snapshot(snap).expect("valid snapshot");
    let dp = DataPath::start(cfg, tls, metrics.clone(), drain.clone(), opts).expect("listeners");
    Proxy { dp, metrics, drain }
}

fn local_opts() -> DataPathOptions {
    DataPathOptions {
        transparent_ip: "127.0.0.1".parse().unwrap(),
        transparent_ipv6: false,
        ..DataPathOptions::default()
    }
}

fn tls_failures(m: &DataPathMetrics, direction: &'static str) -> u64 {
    m.tls_handshake_failures
        .get_or_create(&DirectionLabels { direction })
        .get()
}

/// A client proxy ("web", outbound listener → "echo") and a server proxy ("echo", inbound →
/// the app), sharing one mesh CA.
struct Pair {
    ca: TestCa,
    client: Proxy,
    server: Proxy,
    client_tls: Arc<TestMeshTls>,
    /// The client proxy's outbound listener: what the client app connects to.
    outbound: SocketAddr,
    /// The server proxy's inbound listener.
    inbound: SocketAddr,
    client_snap: pb::Snapshot,
    server_snap: pb::Snapshot,
}

fn server_snapshot(
    ca: Option<&TestCa>,
    mtls: Option<Mode>,
    inbound_port: u16,
    app: SocketAddr,
    permissions: Vec<pb::PermissionRule>,
) -> pb::Snapshot {
    snapshot(
        ca,
        mesh_settings(MESH, mtls, true),
        "echo-1",
        vec![inbound(inbound_port, "echo", app, permissions)],
        vec![service("echo", &[inbound_port])],
        vec![],
    )
}

async fn pair_with(
    mtls: Option<Mode>,
    app: SocketAddr,
    permissions: Vec<pb::PermissionRule>,
) -> Pair {
    pair_opts(mtls, app, permissions, local_opts()).await
}

async fn pair_opts(
    mtls: Option<Mode>,
    app: SocketAddr,
    permissions: Vec<pb::PermissionRule>,
    opts: DataPathOptions,
) -> Pair {
    let ca = TestCa::new(MESH);
    let inbound_port = free_port();
    let outbound_port = free_port();
    let server_snap = server_snapshot(Some(&ca), mtls, inbound_port, app, permissions);
    let client_snap = snapshot(
        Some(&ca),
        mesh_settings(MESH, mtls, true),
        "web-1",
        vec![],
        vec![service("echo", &[inbound_port])],
        vec![(outbound_port, "echo")],
    );
    let client_tls = TestMeshTls::new(&ca, &["web"]);
    let server_tls = TestMeshTls::new(&ca, &["echo"]);
    let server = start(&server_snap, server_tls, opts.clone());
    let client = start(&client_snap, client_tls.clone(), opts);
    Pair {
        ca,
        client,
        server,
        client_tls,
        outbound: SocketAddr::from(([127, 0, 0, 1], outbound_port)),
        inbound: SocketAddr::from(([127, 0, 0, 1], inbound_port)),
        client_snap,
        server_snap,
    }
}

async fn pair(mtls: Option<Mode>) -> Pair {
    pair_with(mtls, echo_server().await, vec![allow("web")]).await
}

#[tokio::test]
async fn echo_through_both_sidecars_with_mtls() {
    let p = pair(Some(Mode::Strict)).await;
    assert_eq!(
        roundtrip(p.outbound, b"hello mesh").await.unwrap(),
        b"hello mesh"
    );
    let big: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
    assert_eq!(roundtrip(p.outbound, &big).await.unwrap(), big);
    assert_eq!(tls_failures(&p.client.metrics, "outbound"), 0);
    assert_eq!(tls_failures(&p.server.metrics, "inbound"), 0);
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    p.server.metrics.register(&mut registry);
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"weft_connections_total{direction="inbound",protocol="tcp"} 2"#),
        "{text}"
    );
}

/// Opaque TCP rides pooled connections as CONNECT streams. Long-lived tunnels must not queue
/// behind a connection's stream limit (256 at the peer): past 100 per connection the pool
/// opens another, so 300 open connections all carry bytes at once.
#[tokio::test]
async fn more_open_tunnels_than_one_connection_carries_all_flow() {
    const OPEN: usize = 300;
    let p = pair(Some(Mode::Strict)).await;
    let mut conns = Vec::with_capacity(OPEN);
    let opened = async {
        for i in 0..OPEN {
            let mut s = TcpStream::connect(p.outbound).await?;
            // Not the start of an HTTP method: detection decides at once.
            s.write_all(&[0]).await?;
            let mut b = [1u8; 1];
            s.read_exact(&mut b).await?;
            assert_eq!(b[0], 0, "connection {i}");
            conns.push(s);
        }
        std::io::Result::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), opened)
        .await
        .expect("every connection opened within 30 s")
        .expect("every connection echoed");
    // All still open: every one of them carries bytes again.
    let again = async {
        for (i, s) in conns.iter_mut().enumerate() {
            s.write_all(b"again").await?;
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await?;
            assert_eq!(&b, b"again", "connection {i}");
        }
        std::io::Result::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), again)
        .await
        .expect("every connection echoed again within 30 s")
        .expect("every connection echoed again");
    assert_eq!(tls_failures(&p.client.metrics, "outbound"), 0);
}

#[tokio::test]
async fn echo_in_plaintext_when_mtls_is_off() {
    let p = pair(None).await;
    assert_eq!(roundtrip(p.outbound, b"plain").await.unwrap(), b"plain");
    // Without mTLS the inbound takes plaintext from anyone, with no permission check.
    assert_eq!(roundtrip(p.inbound, b"direct").await.unwrap(), b"direct");
}

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_forwards_it() {
    let p = pair(Some(Mode::Strict)).await;
    // The app never sees it: at most a TLS alert comes back.
    let reply = roundtrip(p.inbound, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(
        reply.map(|r| !r.starts_with(b"GET")).unwrap_or(true),
        "STRICT forwarded plaintext"
    );
    assert_eq!(tls_failures(&p.server.metrics, "inbound"), 1);

    let mut permissive = p.server_snap.clone();
    permissive.mesh = Some(mesh_settings(MESH, Some(Mode::Permissive), true));
    p.server
        .dp
        .apply(ProxyConfig::from_snapshot(&permissive).unwrap())
        .unwrap();
    assert_eq!(
        roundtrip(p.inbound, b"plain ok").await.unwrap(),
        b"plain ok"
    );
    // A silent plaintext client is not mistaken for TLS: it waits out the peek and goes on.
    let mut s = TcpStream::connect(p.inbound).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    s.write_all(b"late").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"late");
    // mTLS from the mesh still works under PERMISSIVE.
    assert_eq!(roundtrip(p.outbound, b"mesh ok").await.unwrap(), b"mesh ok");
}

/// Writes `msg` on an open connection and reads it back (the app echoes).
async fn echo_on(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
    assert_eq!(back, msg);
    Ok(())
}

/// Waits (at most 5 s) for the far end to close `s`: end of stream or a reset.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn apply(proxy: &Proxy, snap: &pb::Snapshot) {
    proxy
        .dp
        .apply(ProxyConfig::from_snapshot(snap).expect("valid snapshot"))
        .expect("applied");
}

/// An opaque TCP connection is let in by the rules of when it arrived; when they change so
/// that it would be refused (here: PERMISSIVE, which let a plaintext caller in, becomes
/// STRICT), it is closed rather than kept open under rules that no longer hold. A change that
/// still lets it in leaves it alone.
#[tokio::test]
async fn an_open_plaintext_connection_is_closed_once_mtls_is_strict() {
    let p = pair(Some(Mode::Permissive)).await;
    let mut s = TcpStream::connect(p.inbound).await.unwrap();
    echo_on(&mut s, b"let in").await.unwrap();

    let mut still_permissive = p.server_snap.clone();
    still_permissive.inbounds[0].permissions = vec![allow("web"), allow("billing")];
    apply(&p.server, &still_permissive);
    echo_on(&mut s, b"still in").await.unwrap();
    assert_eq!(p.server.metrics.authz_denied.get(), 0);

    let mut strict = still_permissive.clone();
    strict.mesh = Some(mesh_settings(MESH, Some(Mode::Strict), true));
    apply(&p.server, &strict);
    assert!(
        closed_by_peer(&mut s).await,
        "plaintext kept open under STRICT"
    );
    assert_eq!(p.server.metrics.authz_denied.get(), 1);
}

/// The same for a mesh caller's tunnel: revoking its permission closes it, through both
/// sidecars to the client app.
#[tokio::test]
async fn an_open_tunnel_is_closed_once_its_permission_is_revoked() {
    let p = pair(Some(Mode::Strict)).await;
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    echo_on(&mut s, b"allowed").await.unwrap();

    let mut more = p.server_snap.clone();
    more.inbounds[0].permissions = vec![allow("billing"), allow("web")];
    apply(&p.server, &more);
    echo_on(&mut s, b"still allowed").await.unwrap();

    let mut revoked = p.server_snap.clone();
    revoked.inbounds[0].permissions = vec![allow("billing")];
    apply(&p.server, &revoked);
    assert!(
        closed_by_peer(&mut s).await,
        "tunnel kept open without a permission"
    );
    assert_eq!(p.server.metrics.authz_denied.get(), 1);
    // A new connection is refused too.
    let reply = roundtrip(p.outbound, b"knock").await;
    assert!(reply.map(|r| r.is_empty()).unwrap_or(true));
}

/// Kuma's idle timeout (1 h; here 1 s) closes a connection that moved no byte either way
/// for that long, whatever state it is in: an opaque connection through both sidecars (a
/// peer that vanished without a FIN would hold it forever), and an HTTP connection whose
/// request head never finished (a graceful close waits for the exchange in progress). A
/// connection that keeps moving stays open.
#[tokio::test]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    let opts = DataPathOptions {
        idle_timeout: Duration::from_secs(1),
        ..local_opts()
    };
    let p = pair_opts(None, echo_server().await, vec![allow("web")], opts).await;

    let mut busy = TcpStream::connect(p.outbound).await.unwrap();
    for i in 0..12u8 {
        echo_on(&mut busy, &[i]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut quiet = TcpStream::connect(p.outbound).await.unwrap();
    echo_on(&mut quiet, b"then silence").await.unwrap();
    let began = Instant::now();
    assert!(
        closed_by_peer(&mut quiet).await,
        "a silent tunnel was kept open"
    );
    assert!(
        began.elapsed() >= Duration::from_millis(800),
        "closed too early"
    );

    // Plaintext HTTP straight to the inbound (mTLS is off): half a request head.
    let mut half = TcpStream::connect(p.inbound).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_peer(&mut half).await,
        "a half-sent head held its connection"
    );
}

/// Under PERMISSIVE, a mesh peer's ClientHello that comes later than the detection window
/// (100 ms; a lost first segment waits out a 200 ms retransmission) is still mesh TLS on an
/// inbound that declares HTTP, whose clients always speak first.
#[tokio::test]
async fn a_late_client_hello_is_still_tls_on_a_permissive_http_inbound() {
    let p = pair(Some(Mode::Permissive)).await;
    let mut snap = p.server_snap.clone();
    snap.inbounds[0].protocol = "http".into();
    apply(&p.server, &snap);
    let client = TestMeshTls::new(&p.ca, &["web"]);
    let cfg = client
        .client_config(MESH, "echo", weft_proxy::mesh_tls::ALPN_H2)
        .unwrap();
    let tcp = TcpStream::connect(p.inbound).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let name = rustls::pki_types::ServerName::IpAddress(p.inbound.ip().into());
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("the handshake ends in time");
    let tls = tls.expect("a late ClientHello is answered as mesh TLS");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(weft_proxy::mesh_tls::ALPN_H2)
    );
}

#[tokio::test]
async fn a_proxy_of_another_mesh_fails_the_handshake() {
    let p = pair(Some(Mode::Strict)).await;
    // A client proxy whose certificate comes from another CA (same mesh name).
    let other = TestCa::new(MESH);
    let port = free_port();
    let mut snap = p.client_snap.clone();
    snap.trust_bundle_pem = other.pem.clone();
    snap.outbound_listeners[0].port = u32::from(port);
    let intruder = start(&snap, TestMeshTls::new(&other, &["web"]), local_opts());
    let reply = roundtrip(SocketAddr::from(([127, 0, 0, 1], port)), b"let me in").await;
    assert!(reply.map(|r| r.is_empty()).unwrap_or(true));
    assert_eq!(tls_failures(&intruder.metrics, "outbound"), 1);

    // The server side checks the client's chain too: a client that trusts this mesh's CA but
    // presents another mesh's certificate is refused by the inbound.
    // (The intruder proxy's aborted handshakes may still be counted by the server meanwhile.)
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = tls_failures(&p.server.metrics, "inbound");
    let forged = TestMeshTls::new(&other, &["web"]);
    let genuine = TestMeshTls::new(&p.ca, &["web"]);
    let mut cfg = (*genuine
        .client_config(MESH, "echo", weft_proxy::mesh_tls::ALPN_H2)
        .unwrap())
    .clone();
    cfg.client_auth_cert_resolver = forged
        .client_config(MESH, "echo", weft_proxy::mesh_tls::ALPN_H2)
        .unwrap()
        .client_auth_cert_resolver
        .clone();
    let tcp = TcpStream::connect(p.inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(p.inbound.ip().into());
    let result = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        tls.write_all(b"x").await?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await?;
        std::io::Result::Ok(())
    }
    .await;
    assert!(result.is_err(), "a forged client certificate got through");
    // The failure is counted once the server task has seen it.
    for _ in 0..50 {
        if tls_failures(&p.server.metrics, "inbound") > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(tls_failures(&p.server.metrics, "inbound") > before);
    drop(intruder);
}

#[tokio::test]
async fn a_denied_source_is_refused_and_counted() {
    let p = pair_with(
        Some(Mode::Strict),
        echo_server().await,
        vec![deny("web"), allow("*")],
    )
    .await;
    let reply = roundtrip(p.outbound, b"knock").await;
    assert!(reply.map(|r| r.is_empty()).unwrap_or(true));
    for _ in 0..50 {
        if p.server.metrics.authz_denied.get() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.server.metrics.authz_denied.get(), 1);

    // No rule for the source: denied as well (mTLS is on).
    let mut snap = p.server_snap.clone();
    snap.inbounds[0].permissions = vec![allow("billing")];
    p.server
        .dp
        .apply(ProxyConfig::from_snapshot(&snap).unwrap())
        .unwrap();
    let reply = roundtrip(p.outbound, b"knock").await;
    assert!(reply.map(|r| r.is_empty()).unwrap_or(true));
    // And allowed once a rule names it.
    snap.inbounds[0].permissions = vec![allow("web")];
    p.server
        .dp
        .apply(ProxyConfig::from_snapshot(&snap).unwrap())
        .unwrap();
    assert_eq!(roundtrip(p.outbound, b"knock").await.unwrap(), b"knock");
}

#[tokio::test]
async fn transparent_outbound_passthrough_mesh_and_loop_guard() {
    let p = pair(Some(Mode::Strict)).await;
    let external = echo_server().await;
    let redirect = free_port();
    let orig = FakeOrigDst::default();
    let mut snap = p.client_snap.clone();
    snap.outbound_listeners.clear();
    snap.dataplane.as_mut().unwrap().redirect_port_outbound = u32::from(redirect);
    let opts = DataPathOptions {
        orig_dst: Arc::new(orig.clone()),
        ..local_opts()
    };
    let proxy = start(&snap, p.client_tls.clone(), opts);
    let listener = SocketAddr::from(([127, 0, 0, 1], redirect));

    // A non-mesh destination with passthrough on: connected as it is.
    orig.set(external);
    assert_eq!(roundtrip(listener, b"out").await.unwrap(), b"out");
    assert_eq!(proxy.metrics.passthrough_count("allowed"), 1);

    // A mesh destination: the mesh path through the server proxy.
    orig.set(p.inbound);
    assert_eq!(roundtrip(listener, b"meshed").await.unwrap(), b"meshed");
    assert_eq!(proxy.metrics.passthrough_count("allowed"), 1);

    // Passthrough off: closed at once and counted.
    snap.mesh = Some(mesh_settings(MESH, Some(Mode::Strict), false));
    proxy
        .dp
        .apply(ProxyConfig::from_snapshot(&snap).unwrap())
        .unwrap();
    orig.set(external);
    let reply = roundtrip(listener, b"out").await;
    assert!(reply.map(|r| r.is_empty()).unwrap_or(true));
    assert_eq!(proxy.metrics.passthrough_count("blocked"), 1);

    // A connection "headed" to the proxy's own listener is not proxied again.
    orig.set(listener);
    let reply = roundtrip(listener, b"loop").await;
    assert!(reply.map(|r| r.is_empty()).unwrap_or(true));
    assert_eq!(proxy.metrics.loop_refused.get(), 1);
}

/// An app that reads until EOF, then answers with the byte count: it only answers if the
/// client's half-close made it through both sidecars, and the answer travels after it.
async fn count_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut n = 0usize;
                let mut buf = [0u8; 8192];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                let _ = s.write_all(format!("got {n}").as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn half_close_travels_through_both_sidecars() {
    for mtls in [Some(Mode::Strict), None] {
        let p = pair_with(mtls, count_server().await, vec![allow("web")]).await;
        let reply = roundtrip(p.outbound, &[1u8; 100_000]).await.unwrap();
        assert_eq!(reply, b"got 100000", "mtls {mtls:?}");
    }
}

/// What a client read until its connection ended: the bytes, and whether it ended with a
/// reset (`ECONNRESET`) rather than a clean end of stream.
async fn read_to_end_or_reset(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) => return (got, false),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Ok(Err(e)) => panic!("read: {e}"),
            Err(_) => panic!("the connection neither ended nor reset"),
        }
    }
}

/// What [`resetting_server`] tells a test that resets its client: that the first bytes
/// arrived, then whether the connection ended with a reset.
type ResetReport = (
    tokio::sync::mpsc::Sender<()>,
    tokio::sync::mpsc::Sender<bool>,
);

/// An app that answers a connection's first bytes with `partial`, then resets it; or, with
/// `reset_by_client`, says when the first bytes arrived, reads until the connection ends and
/// reports whether it was reset.
async fn resetting_server(reset_by_client: Option<ResetReport>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let report = reset_by_client.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                match report {
                    None => {
                        let _ = s.write_all(b"partial").await;
                        s.set_zero_linger().unwrap();
                    }
                    Some((arrived, report)) => {
                        let _ = arrived.send(()).await;
                        let (_, reset) = read_to_end_or_reset(&mut s).await;
                        let _ = report.send(reset).await;
                    }
                }
            });
        }
    });
    addr
}

/// A reset is passed on as a reset: an app whose peer broke off must not take it for a clean
/// end of stream (a protocol that ends its data with the close would take a truncation for
/// the whole). Both ways in plaintext; through the tunnel between the proxies, the client's
/// reset (the outbound proxy resets the tunnel's stream with CONNECT_ERROR). The server's
/// reset through the tunnel still arrives as a clean end: the inbound proxy's end of the
/// tunnel is hyper's upgraded stream, which can only end with END_STREAM (README, "not yet").
#[tokio::test]
async fn a_reset_travels_through_both_sidecars_as_a_reset() {
    for mtls in [None, Some(Mode::Strict)] {
        if mtls.is_none() {
            // The server app resets.
            let p = pair_with(mtls, resetting_server(None).await, vec![allow("web")]).await;
            let mut c = TcpStream::connect(p.outbound).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            let (got, reset) = read_to_end_or_reset(&mut c).await;
            assert_eq!(got, b"partial");
            assert!(reset, "the client saw a clean end, not the server's reset");
        }

        // The client app resets.
        let (arrived_tx, mut arrived) = tokio::sync::mpsc::channel(1);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let server = resetting_server(Some((arrived_tx, tx))).await;
        let p = pair_with(mtls, server, vec![allow("web")]).await;
        let mut c = TcpStream::connect(p.outbound).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        // Past detection and through both proxies before the reset.
        let first = tokio::time::timeout(Duration::from_secs(5), arrived.recv()).await;
        assert_eq!(
            first.ok().flatten(),
            Some(()),
            "mtls {mtls:?}: nothing arrived"
        );
        c.set_zero_linger().unwrap();
        drop(c);
        let reset = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(
            reset.ok().flatten(),
            Some(true),
            "mtls {mtls:?}: the server saw a clean end, not the client's reset"
        );
    }
}

/// A connection whose destination cannot be reached ends with a reset, as the destination's
/// own refusal would, not with a clean end: in plaintext (the inbound resets, and the outbound
/// passes it on) and through the tunnel (the inbound refuses it, the outbound resets).
#[tokio::test]
async fn an_unreachable_app_is_a_reset() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    for mtls in [None, Some(Mode::Strict)] {
        let p = pair_with(mtls, closed, vec![allow("web")]).await;
        let mut c = TcpStream::connect(p.outbound).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let (got, reset) = read_to_end_or_reset(&mut c).await;
        assert!(got.is_empty(), "mtls {mtls:?}: {got:?}");
        assert!(
            reset,
            "mtls {mtls:?}: a clean end for an app that is not there"
        );
    }
}

/// An app that speaks first.
async fn banner_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 ready\r\n").await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_server_speaks_first_protocol_does_not_stall() {
    let p = pair_with(
        Some(Mode::Permissive),
        banner_server().await,
        vec![allow("web")],
    )
    .await;
    let start = Instant::now();
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    let mut buf = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .expect("banner within the detect timeout")
        .unwrap();
    assert_eq!(&buf, b"220 ready\r\n");
    assert!(
        start.elapsed() < Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_cert_changes_during_a_stream_of_connections_lose_nothing() {
    let p = Arc::new(pair(Some(Mode::Strict)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let p = p.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut c = p.client_snap.clone();
                c.version = format!("c{i}");
                p.client
                    .dp
                    .apply(ProxyConfig::from_snapshot(&c).unwrap())
                    .unwrap();
                let mut s = p.server_snap.clone();
                s.version = format!("s{i}");
                if i.is_multiple_of(2) {
                    s.inbounds[0].permissions = vec![allow("billing"), allow("web")];
                }
                p.server
                    .dp
                    .apply(ProxyConfig::from_snapshot(&s).unwrap())
                    .unwrap();
                if i.is_multiple_of(5) {
                    p.client_tls.renew(&p.ca, &["web"]);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            i
        })
    };
    let mut tasks = Vec::new();
    for t in 0..4 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let msg = format!("conn {t}/{i}");
                let reply = roundtrip(p.outbound, msg.as_bytes()).await.unwrap();
                assert_eq!(reply, msg.as_bytes());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.await.unwrap();
    assert!(swaps > 2, "only {swaps} swaps happened");
}

#[tokio::test]
async fn drain_lets_an_in_flight_connection_finish() {
    let p = pair(Some(Mode::Strict)).await;
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"first half, ").await.unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();

    let drain = p.client.drain.clone();
    let draining = tokio::spawn(async move { drain.drain(Duration::from_secs(5)).await });
    // New connections are refused once the listener has stopped.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(p.outbound).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener still accepts while draining");
    // The in-flight connection carries on to its end.
    s.write_all(b"second half").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"second half");
    assert_eq!(draining.await.unwrap(), DrainOutcome::Drained);
}

#[tokio::test]
async fn drain_cuts_what_outlives_the_window() {
    let p = pair(None).await;
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    s.read_exact(&mut buf).await.unwrap();
    let outcome = p.client.drain.drain(Duration::from_millis(200)).await;
    assert_eq!(outcome, DrainOutcome::TimedOut { cut: 1 });
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).await.unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn no_certificate_yet_refuses_mesh_traffic() {
    let app = echo_server().await;
    let port = free_port();
    let ca = TestCa::new(MESH);
    let snap = server_snapshot(Some(&ca), Some(Mode::Strict), port, app, vec![allow("*")]);
    let proxy = start(&snap, Arc::new(NoMeshTls), local_opts());
    let reply = roundtrip(SocketAddr::from(([127, 0, 0, 1], port)), b"x").await;
    assert!(reply.map(|r| r.is_empty()).unwrap_or(true));
    assert_eq!(tls_failures(&proxy.metrics, "inbound"), 1);
}

#[tokio::test]
async fn transparent_inbound_by_original_port_and_inbound_passthrough() {
    let p = pair(Some(Mode::Strict)).await;
    // A second server-side proxy in transparent mode for the same inbound.
    let redirect = free_port();
    let orig = FakeOrigDst::default();
    let mut snap = p.server_snap.clone();
    snap.dataplane.as_mut().unwrap().redirect_port_inbound = u32::from(redirect);
    let opts = DataPathOptions {
        orig_dst: Arc::new(orig.clone()),
        ..local_opts()
    };
    let server_tls = TestMeshTls::new(&p.ca, &["echo"]);
    let proxy = start(&snap, server_tls, opts);
    let inbound_listener = SocketAddr::from(([127, 0, 0, 1], redirect));
    // No explicit inbound listener in transparent mode.
    assert_eq!(proxy.dp.listeners().len(), 1);

    // The client proxy's mesh connection "to" the inbound port lands on the redirect port.
    let mut client_snap = p.client_snap.clone();
    let port = free_port();
    client_snap.outbound_listeners[0].port = u32::from(port);
    client_snap.outbounds = vec![service("echo", &[redirect])];
    let client = start(&client_snap, p.client_tls.clone(), local_opts());
    orig.set(p.inbound);
    let out = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(roundtrip(out, b"via 15006").await.unwrap(), b"via 15006");

    // A port that is no inbound goes on unchanged, from the loop-guard source address.
    let seen = Arc::new(std::sync::Mutex::new(None));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = l.local_addr().unwrap();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let (mut s, peer) = l.accept().await.unwrap();
        *seen2.lock().unwrap() = Some(peer.ip());
        s.write_all(b"ssh banner").await.unwrap();
    });
    orig.set(other);
    let mut s = TcpStream::connect(inbound_listener).await.unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ssh banner");
    assert_eq!(
        *seen.lock().unwrap(),
        Some("127.0.0.6".parse::<std::net::IpAddr>().unwrap())
    );
    drop(client);
}
