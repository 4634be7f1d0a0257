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
use crate::copy::Abort;
use crate::datapath::Shared;
use crate::datapath_metrics::INBOUND;
use crate::detect::{Detection, Protocol, detect};
use crate::http::{self, PrefixedIo, inbound::Caller};
use crate::listen;
use crate::mesh_tls::{ALPN_H2, peer_services};
use crate::outbound::{forward_until, forward_with};
use crate::telemetry::Direction;
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
async fn passthrough(shared: &Shared, mut stream: TcpStream, orig: SocketAddr) {
    let source = Some(listen::inbound_source(orig));
    let upstream = match Box::pin(listen::connect(orig, source, shared.opts.connect_timeout)).await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%orig, error = %e, "inbound passthrough connect failed");
            stream.abort();
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
            // A client that speaks first (any HTTP inbound) may be waited for as long as a
            // handshake: a ClientHello delayed past the short detection window (a lost
            // segment waits out a 200 ms retransmission) must not be taken for plaintext.
            // Undeclared or TCP inbounds keep the short window, for protocols whose server
            // speaks first.
            let wait = match inbound.protocol {
                Some(Protocol::Http1 | Protocol::Http2) => shared.opts.handshake_timeout,
                _ => shared.opts.detect_timeout,
            };
            if Box::pin(looks_like_tls(&stream, wait)).await {
                mesh_tls(shared, cfg, inbound, stream, transparent).await;
            } else {
                plaintext(shared, cfg, inbound, stream, transparent).await;
            }
        }
    }
}

/// Peeks at the first byte (waiting at most `wait`): a TLS handshake record?
async fn looks_like_tls(stream: &TcpStream, wait: std::time::Duration) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut first)).await {
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
        stream.abort();
        return;
    };
    let start = std::time::SystemTime::now();
    let began = std::time::Instant::now();
    // Boxed: an idle connection's future must stay small (see `connection_futures_stay_small`).
    let stop = Box::pin(http::inbound::revoked(shared, inbound.port, &[]));
    let (sent, received) = forward_until(shared, INBOUND, stream, up, detection.prefix, stop).await;
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

/// Mesh mTLS from another proxy: one pooled HTTP/2 connection ([`ALPN_H2`]) carrying its
/// requests and its opaque-TCP tunnels ([`crate::http::opaque`]).
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
    let deadline = tokio::time::Instant::now() + shared.opts.handshake_timeout;
    // Boxed, like every set-up step: the TLS state must not sit in each connection's future.
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
}
