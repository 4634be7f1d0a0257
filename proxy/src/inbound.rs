//! The inbound side: connections from the mesh (or anyone) to this proxy's inbounds.
//!
//! The inbound is found by port: the original destination's for the transparent listener,
//! the listener's own for explicit ones. A transparent connection to a port that is no
//! inbound goes on to that same port unchanged (inbound passthrough).
//!
//! With mTLS on, mesh TLS is terminated: the client's chain must lead to this mesh's CA (a
//! proxy of another mesh fails the handshake), and the services named by its SPIFFE URI SANs
//! are checked against the inbound's permission rules; a denied source is closed and counted
//! in `weft_authz_denied_total`. STRICT refuses plaintext; PERMISSIVE tells TLS from plaintext
//! by peeking for a ClientHello and forwards plaintext unchecked. With mTLS off, everything is
//! plaintext and no permission applies. Traffic then goes to `serviceAddress:servicePort`,
//! from `127.0.0.6` in transparent mode so the iptables loop guard lets it through.

use crate::config::{Authz, Inbound, MtlsMode, ProxyConfig};
use crate::datapath::Shared;
use crate::datapath_metrics::INBOUND;
use crate::detect::{Detection, Protocol, detect};
use crate::http::{self, PrefixedIo, inbound::Caller};
use crate::listen;
use crate::mesh_tls::{ALPN_H2, peer_services};
use crate::outbound::forward_with;
use crate::telemetry::Direction;
use crate::tls_stream;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A connection redirected to the transparent inbound listener.
pub(crate) async fn transparent(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let cfg = shared.config.load_full();
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let orig = match shared.opts.orig_dst.original_dst(&stream) {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "no original destination");
            local
        }
    };
    if orig == local || (cfg.own_ports.contains(&orig.port()) && cfg.is_own_ip(orig.ip())) {
        tracing::warn!(%peer, %orig, "refusing a connection that would loop into the proxy");
        shared.metrics.loop_refused.inc();
        return;
    }
    match cfg.inbounds.get(&orig.port()) {
        Some(inbound) => serve(&shared, &cfg, inbound, stream, true).await,
        None => passthrough(&shared, stream, orig).await,
    }
}

/// A connection to the explicit listener of inbound port `listener.port()`.
pub(crate) async fn explicit(shared: Arc<Shared>, stream: TcpStream, listener: SocketAddr) {
    let cfg = shared.config.load_full();
    let Some(inbound) = cfg.inbounds.get(&listener.port()) else {
        tracing::debug!(%listener, "no inbound on this port any more");
        return;
    };
    serve(&shared, &cfg, inbound, stream, false).await;
}

/// Inbound passthrough: a port nobody meshed goes on unchanged.
async fn passthrough(shared: &Shared, stream: TcpStream, orig: SocketAddr) {
    let source = Some(listen::inbound_source(orig));
    let upstream = match Box::pin(listen::connect(orig, source, shared.opts.connect_timeout)).await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%orig, error = %e, "inbound passthrough connect failed");
            return;
        }
    };
    let _active = shared.metrics.opened(INBOUND, "tcp");
    forward_with(shared, INBOUND, stream, upstream, Vec::new()).await;
}

async fn serve(
    shared: &Arc<Shared>,
    cfg: &Arc<ProxyConfig>,
    inbound: &Inbound,
    stream: TcpStream,
    transparent: bool,
) {
    match cfg.mtls {
        None => plaintext(shared, cfg, inbound, stream, transparent).await,
        Some(MtlsMode::Strict) => mesh_tls(shared, cfg, inbound, stream, transparent).await,
        Some(MtlsMode::Permissive) => {
            if Box::pin(looks_like_tls(shared, &stream)).await {
                mesh_tls(shared, cfg, inbound, stream, transparent).await;
            } else {
                plaintext(shared, cfg, inbound, stream, transparent).await;
            }
        }
    }
}

/// Peeks at the first byte (within the detect timeout): a TLS handshake record?
async fn looks_like_tls(shared: &Shared, stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout(shared.opts.detect_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE_RECORD,
        _ => false,
    }
}

async fn upstream(shared: &Shared, inbound: &Inbound, transparent: bool) -> Option<TcpStream> {
    let source = transparent.then(|| listen::inbound_source(inbound.upstream));
    match listen::connect(inbound.upstream, source, shared.opts.connect_timeout).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(service = %inbound.service, upstream = %inbound.upstream, error = %e,
                "cannot reach the app");
            None
        }
    }
}

async fn plaintext(
    shared: &Arc<Shared>,
    cfg: &Arc<ProxyConfig>,
    inbound: &Inbound,
    mut stream: TcpStream,
    transparent: bool,
) {
    let detection = match inbound.protocol {
        Some(protocol) => Detection {
            protocol,
            timed_out: false,
            prefix: Vec::new(),
        },
        None => match Box::pin(detect(&mut stream, shared.opts.detect_timeout)).await {
            Ok(d) => d,
            Err(_) => return,
        },
    };
    let _active = shared.metrics.opened(INBOUND, detection.protocol.label());
    if detection.protocol != Protocol::Opaque {
        // Plaintext HTTP (mTLS off, or PERMISSIVE): no identity, so no permission applies.
        let caller = Caller {
            peer: stream.peer_addr().ok(),
            ..Caller::default()
        };
        let io = PrefixedIo::new(detection.prefix, stream);
        Box::pin(http::inbound::serve(
            shared.clone(),
            cfg.clone(),
            inbound,
            io,
            detection.protocol,
            caller,
            transparent,
        ))
        .await;
        return;
    }
    let Some(up) = Box::pin(upstream(shared, inbound, transparent)).await else {
        return;
    };
    let start = std::time::SystemTime::now();
    let began = std::time::Instant::now();
    let (sent, received) = forward_with(shared, INBOUND, stream, up, detection.prefix).await;
    cfg.telemetry.connection(
        Direction::Inbound,
        &inbound.service,
        None,
        start,
        began.elapsed(),
        sent,
        received,
    );
}

/// Whether the ClientHello waiting on `stream` offers weft's HTTP/2 protocol. Reads it with
/// `MSG_PEEK`, so the handshake that follows sees it whole. A hello that is not there by
/// `deadline`, or does not parse, answers `false`: the opaque path's handshake then fails
/// (or times out) with the usual error.
async fn offers_h2(stream: &TcpStream, deadline: tokio::time::Instant) -> bool {
    // A ClientHello (with a post-quantum key share) is about 1.5 KB; TLS caps a handshake
    // record at 16 KiB plus its header.
    const MAX_HELLO: usize = 16 * 1024 + 5;
    let mut buf = vec![0u8; 2048];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        let mut acceptor = rustls::server::Acceptor::default();
        // One `read_tls` takes at most 4 KiB: feed all that was peeked.
        let mut peeked = &buf[..n];
        while !peeked.is_empty() {
            match acceptor.read_tls(&mut peeked) {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut offered| offered.any(|p| p == ALPN_H2));
            }
            // Not all here yet (split over TCP segments): look again shortly. Peeking does
            // not consume, so readiness stays set and cannot be waited on.
            Ok(None) if n < MAX_HELLO => {
                if n == buf.len() {
                    buf.resize((2 * n).min(MAX_HELLO), 0);
                } else if tokio::time::timeout_at(
                    deadline,
                    tokio::time::sleep(std::time::Duration::from_millis(1)),
                )
                .await
                .is_err()
                {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// A pooled HTTP/2 connection from another proxy: the handshake (tokio-rustls), then its
/// requests.
#[allow(clippy::too_many_arguments)]
async fn pooled_http2(
    shared: &Arc<Shared>,
    cfg: &Arc<ProxyConfig>,
    inbound: &Inbound,
    server: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    deadline: tokio::time::Instant,
    peer: Option<SocketAddr>,
    transparent: bool,
) {
    let accept = tokio_rustls::TlsAcceptor::from(server).accept(stream);
    let tls = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => return handshake_failed(shared, inbound, peer, Some(e)),
        Err(_) => return handshake_failed(shared, inbound, peer, None),
    };
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(ALPN_H2) {
        // It offered h2 but agreed on something else: nothing weft speaks.
        tracing::info!(?peer, "mesh TLS without the HTTP/2 protocol it offered");
        shared.metrics.tls_failure(INBOUND);
        return;
    }
    let sources = peer_sources(conn, cfg);
    serve_http2(shared, cfg, inbound, tls, sources, peer, transparent).await;
}

/// The mesh services a verified client certificate names.
fn peer_sources(conn: &rustls::CommonState, cfg: &ProxyConfig) -> Vec<String> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| peer_services(c.as_ref(), &cfg.mesh))
        .unwrap_or_default()
}

fn handshake_failed(
    shared: &Shared,
    inbound: &Inbound,
    peer: Option<SocketAddr>,
    error: Option<std::io::Error>,
) {
    match error {
        Some(e) => tracing::info!(?peer, service = %inbound.service, error = %e,
            "inbound mesh TLS handshake failed"),
        None => tracing::info!(?peer, service = %inbound.service,
            "inbound mesh TLS handshake timed out"),
    }
    shared.metrics.tls_failure(INBOUND);
}

/// HTTP between proxies from the mesh services `sources`: the permissions' verdict applies to
/// each request (403 when denied).
async fn serve_http2<I>(
    shared: &Arc<Shared>,
    cfg: &Arc<ProxyConfig>,
    inbound: &Inbound,
    tls: I,
    sources: Vec<String>,
    peer: Option<SocketAddr>,
    transparent: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let denied = match inbound.authorize(&sources) {
        Authz::Allow(_) => None,
        Authz::Deny(origin) => Some(origin),
    };
    let _active = shared.metrics.opened(INBOUND, Protocol::Http2.label());
    let caller = Caller {
        sources,
        denied,
        peer,
    };
    http::inbound::serve(
        shared.clone(),
        cfg.clone(),
        inbound,
        tls,
        Protocol::Http2,
        caller,
        transparent,
    )
    .await;
}

async fn mesh_tls(
    shared: &Arc<Shared>,
    cfg: &Arc<ProxyConfig>,
    inbound: &Inbound,
    stream: TcpStream,
    transparent: bool,
) {
    let peer = stream.peer_addr().ok();
    let Some(server) = shared.tls.server_config() else {
        tracing::warn!(service = %inbound.service, "no mesh certificate yet: closing");
        shared.metrics.tls_failure(INBOUND);
        return;
    };
    // The pooled HTTP/2 connections between proxies are few, long-lived and busy: tokio-rustls,
    // whose buffered I/O suits h2's many small frames. An opaque TCP connection gets one of
    // its own per app connection, most of them idle: `tls_stream`, which holds no buffer
    // while idle. The ALPN the client offers decides, read from its ClientHello unconsumed.
    let deadline = tokio::time::Instant::now() + shared.opts.handshake_timeout;
    if Box::pin(offers_h2(&stream, deadline)).await {
        // Boxed, like every set-up step: the TLS state must not sit in each connection's
        // future.
        let http2 = pooled_http2(
            shared,
            cfg,
            inbound,
            server,
            stream,
            deadline,
            peer,
            transparent,
        );
        Box::pin(http2).await;
        return;
    }
    // Not tokio-rustls: its TLS connection keeps a read buffer for life; see tls_stream.
    let accept = tls_stream::accept(server, stream);
    let tls = match Box::pin(tokio::time::timeout_at(deadline, accept)).await {
        // Boxed: the TLS state is large and must not be copied into each future layer.
        Ok(Ok(s)) => Box::new(s),
        Ok(Err(e)) => return handshake_failed(shared, inbound, peer, Some(e)),
        Err(_) => return handshake_failed(shared, inbound, peer, None),
    };
    let conn = tls.common();
    let sources = peer_sources(conn, cfg);
    if conn.alpn_protocol() == Some(ALPN_H2) {
        Box::pin(serve_http2(
            shared,
            cfg,
            inbound,
            tls,
            sources,
            peer,
            transparent,
        ))
        .await;
        return;
    }
    let protocol = Protocol::Opaque;
    match inbound.authorize(&sources) {
        Authz::Allow(origin) => {
            tracing::trace!(?peer, ?sources, %origin, "allowed");
        }
        Authz::Deny(origin) => {
            tracing::info!(?peer, ?sources, service = %inbound.service, ?origin,
                "denied by the mesh's permissions");
            shared.metrics.authz_denied.inc();
            return;
        }
    }
    let Some(up) = Box::pin(upstream(shared, inbound, transparent)).await else {
        return;
    };
    let _active = shared.metrics.opened(INBOUND, protocol.label());
    let start = std::time::SystemTime::now();
    let began = std::time::Instant::now();
    let (sent, received) = forward_with(shared, INBOUND, tls, up, Vec::new()).await;
    cfg.telemetry.connection(
        Direction::Inbound,
        &inbound.service,
        sources.first().map(String::as_str),
        start,
        began.elapsed(),
        sent,
        received,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A real ClientHello offering `alpn`.
    fn client_hello(alpn: &[u8]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = rustls_pki_types::ServerName::try_from("backend").expect("a name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a client");
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).expect("the hello");
        hello
    }

    /// What `offers_h2` says of `bytes` sent in two parts, the second after `pause`.
    async fn offered(bytes: &[u8], pause: Duration, within: Duration) -> bool {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (first, rest) = bytes.split_at(bytes.len() / 2);
        let (first, rest) = (first.to_vec(), rest.to_vec());
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(&first).await.expect("write");
            tokio::time::sleep(pause).await;
            let _ = s.write_all(&rest).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let (s, _) = l.accept().await.expect("accept");
        let offered = offers_h2(&s, tokio::time::Instant::now() + within).await;
        // Peeking consumed nothing: the whole hello is still there for the handshake.
        if offered {
            let mut all = vec![0u8; bytes.len()];
            let n = s.peek(&mut all).await.expect("peek");
            assert_eq!(&all[..n], bytes);
        }
        client.abort();
        offered
    }

    #[tokio::test]
    async fn the_alpn_is_read_from_the_client_hello_without_consuming_it() {
        let h2 = client_hello(ALPN_H2);
        let tcp = client_hello(crate::mesh_tls::ALPN_TCP);
        let second = Duration::from_secs(1);
        assert!(offered(&h2, Duration::ZERO, second).await);
        assert!(!offered(&tcp, Duration::ZERO, second).await);
        // Split over two segments: it waits for the rest.
        assert!(offered(&h2, Duration::from_millis(30), second).await);
        // Not TLS: answered at once, not at the deadline.
        let started = tokio::time::Instant::now();
        assert!(!offered(b"GET / HTTP/1.1\r\n\r\n", Duration::ZERO, second).await);
        assert!(started.elapsed() < Duration::from_millis(500));
        // Half a hello that never completes: `false` at the deadline.
        let half = &h2[..h2.len() / 2];
        assert!(!offered(half, Duration::from_secs(5), Duration::from_millis(100)).await);
    }
}
