//! The outbound side: connections from the local app to somewhere else.
//!
//! A transparent connection (redirected to `redirectPortOutbound`) is judged by its original
//! destination: an inbound `address:port` of the mesh takes the mesh path; anything else is
//! passed through as is or closed at once, per the mesh's `passthrough`. An explicit listener
//! (`networking.outbound[]`) always takes the mesh path to its service.
//!
//! The mesh path detects the protocol first. HTTP is handled request by request
//! ([`crate::http::outbound`]). Anything else, with mTLS on, becomes an HTTP/2 CONNECT stream
//! on a pooled mesh mTLS connection to an endpoint ([`crate::http::opaque`]); with mTLS off, a
//! plain TCP connection to the endpoint (the default route's tag subsets by weight, round
//! robin within one).

use crate::config::ProxyConfig;
use crate::copy::{Abort, Ended, ReadReady, copy_until};
use crate::datapath::Shared;
use crate::datapath_metrics::OUTBOUND;
use crate::detect::{Detection, Protocol, detect};
use crate::http::{CONNECT_ATTEMPTS, PrefixedIo};
use crate::listen::{self, OwnSocketEntry};
use crate::telemetry::Direction;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection redirected to the transparent outbound listener.
pub(crate) async fn transparent(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr) {
    let cfg = shared.config.load_full();
    let Ok(local) = client.local_addr() else {
        return;
    };
    let orig = match shared.opts.orig_dst.original_dst(&client) {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "no original destination");
            local
        }
    };
    if orig == local
        || shared.own.contains(&peer)
        || (cfg.own_ports.contains(&orig.port()) && cfg.is_own_ip(orig.ip()))
    {
        tracing::warn!(%peer, %orig, "refusing a connection that would loop into the proxy");
        shared.metrics.loop_refused.inc();
        return;
    }
    if let Some(service) = cfg.mesh_destinations.get(&orig) {
        mesh(&shared, &cfg, client, service).await;
    } else if cfg.passthrough {
        shared.metrics.passthrough(true);
        passthrough(&shared, client, orig).await;
    } else {
        shared.metrics.passthrough(false);
        tracing::debug!(%peer, %orig, "passthrough is off: closing");
    }
}

/// A connection to an explicit outbound listener bound at `listener`.
pub(crate) async fn explicit(shared: Arc<Shared>, client: TcpStream, listener: SocketAddr) {
    let cfg = shared.config.load_full();
    let Some(service) = cfg.outbound_listeners.get(&listener) else {
        tracing::debug!(%listener, "no outbound listener in the config any more");
        return;
    };
    mesh(&shared, &cfg, client, service).await;
}

async fn passthrough(shared: &Shared, mut client: TcpStream, orig: SocketAddr) {
    let upstream = match Box::pin(listen::connect(orig, None, shared.opts.connect_timeout)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%orig, error = %e, "passthrough connect failed");
            // As the destination would have: a reset, not a connection that ends cleanly.
            client.abort();
            return;
        }
    };
    let _own = shared.own.register(&upstream);
    let _active = shared.metrics.opened(OUTBOUND, "tcp");
    forward(shared, client, upstream, Vec::new()).await;
}

/// The mesh path to `service`: HTTP is handled request by request ([`crate::http::outbound`]);
/// anything else is one tunnel (or, with mTLS off, one TCP connection) per app connection,
/// carrying bytes.
async fn mesh(shared: &Arc<Shared>, cfg: &Arc<ProxyConfig>, mut client: TcpStream, service: &str) {
    let Some(svc) = cfg.services.get(service) else {
        tracing::warn!(service, "unknown mesh service: closing");
        return;
    };
    // Detection comes first: an HTTP connection needs no connection of its own to the
    // endpoint. A server-speaks-first client says nothing and is opaque after the timeout.
    //
    // A service declared `kuma.io/protocol: tcp` carries bytes at once. One declared HTTP
    // (`http`, `http2`, `grpc`) is still sniffed: the declaration says how the inbound proxy
    // speaks to that app, while this app may call it in either HTTP version.
    let detection = match svc.protocol {
        Some(Protocol::Opaque) => Detection {
            protocol: Protocol::Opaque,
            timed_out: false,
            prefix: Vec::new(),
        },
        _ => match Box::pin(detect(&mut client, shared.opts.detect_timeout)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(service, error = %e, "client failed during detection");
                return;
            }
        },
    };
    if detection.protocol != Protocol::Opaque {
        let _active = shared.metrics.opened(OUTBOUND, detection.protocol.label());
        let io = PrefixedIo::new(detection.prefix, client);
        Box::pin(crate::http::outbound::serve(
            shared.clone(),
            cfg.clone(),
            io,
            detection.protocol,
            service.to_string(),
        ))
        .await;
        return;
    }
    let _active;
    let start = std::time::SystemTime::now();
    let began = std::time::Instant::now();
    let (sent, received) = if cfg.mtls.is_some() {
        let timeout = shared.opts.connect_timeout;
        let opened = Box::pin(crate::http::opaque::open(
            shared, &cfg.mesh, service, svc, timeout,
        ));
        let tunnel = match opened.await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(service, error = %e, "no mesh tunnel: resetting");
                client.abort();
                return;
            }
        };
        _active = shared.metrics.opened(OUTBOUND, detection.protocol.label());
        forward(shared, client, tunnel, detection.prefix).await
    } else {
        // Boxed: the set-up's state is freed once the connection settles into copying.
        let Some((up, _own)) = Box::pin(connect_endpoint(shared, cfg, service)).await else {
            client.abort();
            return;
        };
        _active = shared.metrics.opened(OUTBOUND, detection.protocol.label());
        forward(shared, client, up, detection.prefix).await
    };
    cfg.telemetry.connection(
        Direction::Outbound,
        service,
        Some(service),
        start,
        began.elapsed(),
        sent,
        received,
    );
}

/// Connects to an endpoint of `service`, trying others on connect errors; an endpoint that
/// cannot be reached is ejected for a while.
async fn connect_endpoint(
    shared: &Shared,
    cfg: &ProxyConfig,
    service: &str,
) -> Option<(TcpStream, OwnSocketEntry)> {
    let svc = cfg.services.get(service)?;
    let mut failed = Vec::new();
    for attempt in 1..=CONNECT_ATTEMPTS {
        let Some(target) = svc.pick(&failed) else {
            tracing::warn!(service, "no healthy endpoint: closing");
            return None;
        };
        let endpoint = target.endpoint.addr;
        match listen::connect(endpoint, None, shared.opts.connect_timeout).await {
            Ok(s) => {
                target.endpoint.connect_succeeded();
                let own = shared.own.register(&s);
                return Some((s, own));
            }
            Err(e) => {
                target.endpoint.connect_failed();
                failed.push(endpoint);
                tracing::debug!(service, %endpoint, attempt, error = %e, "endpoint connect failed");
            }
        }
    }
    tracing::warn!(service, "no endpoint reachable: closing");
    None
}

/// Sends `prefix` upstream (and frees it), then copies both ways; counts the bytes and
/// returns them (sent upstream, received from upstream).
///
/// Not an `async fn` of its own: that would hold the streams twice in an idle connection's
/// future, its own arguments beside `forward_until`'s.
pub(crate) fn forward_with<D, U>(
    shared: &Shared,
    direction: &'static str,
    down: D,
    up: U,
    prefix: Vec<u8>,
) -> impl Future<Output = (u64, u64)>
where
    D: AsyncRead + AsyncWrite + ReadReady + Abort + Unpin,
    U: AsyncRead + AsyncWrite + ReadReady + Abort + Unpin,
{
    forward_until(shared, direction, down, up, prefix, std::future::pending())
}

/// [`forward_with`], cut when `stop` resolves or when nothing has moved either way for the
/// idle timeout (Kuma's 1 h): both streams are closed at once, and the bytes moved until
/// then are counted and returned. A stream that breaks (a reset, a stream error) has the
/// other one aborted in turn ([`Abort`]): its app sees a reset, not a clean end.
pub(crate) async fn forward_until<D, U, S>(
    shared: &Shared,
    direction: &'static str,
    mut down: D,
    mut up: U,
    prefix: Vec<u8>,
    stop: S,
) -> (u64, u64)
where
    D: AsyncRead + AsyncWrite + ReadReady + Abort + Unpin,
    U: AsyncRead + AsyncWrite + ReadReady + Abort + Unpin,
    S: Future<Output = ()>,
{
    let prefix_len = prefix.len() as u64;
    if !prefix.is_empty()
        && let Err(e) = up.write_all(&prefix).await
    {
        tracing::debug!(error = %e, "upstream write failed");
        down.abort();
        return (0, 0);
    }
    drop(prefix);
    let idle = Some(shared.opts.idle_timeout);
    match copy_until(&mut down, &mut up, stop, idle).await {
        Ok(copied) => {
            if copied.ended == Ended::Idle {
                tracing::debug!("closing an idle connection");
            }
            let (sent, received) = (copied.a_to_b + prefix_len, copied.b_to_a);
            shared.metrics.bytes(direction, sent, received);
            (sent, received)
        }
        Err(e) => {
            tracing::debug!(error = %e, "connection ended with an error: resetting both sides");
            down.abort();
            up.abort();
            (0, 0)
        }
    }
}

async fn forward<U>(shared: &Shared, client: TcpStream, up: U, prefix: Vec<u8>) -> (u64, u64)
where
    U: AsyncRead + AsyncWrite + ReadReady + Abort + Unpin,
{
    forward_with(shared, OUTBOUND, client, up, prefix).await
}
