//! Opaque TCP between proxies, as HTTP/2 CONNECT streams on the pooled mesh connections.
//!
//! With mTLS on, an app connection that is not HTTP does not get a mesh TLS connection of its
//! own: the outbound proxy opens one extended CONNECT stream (`:protocol` [`PROTOCOL`]) on a
//! pooled connection to the chosen endpoint (`open`), and the inbound proxy answers it by
//! connecting to its app ([`crate::http::inbound`]). Both then copy bytes between the app's
//! socket and the stream ([`Tunnel`]). Half-close travels as `END_STREAM`.
//!
//! This is ztunnel's HBONE shape, and it is why ten thousand idle connections through a
//! sidecar cost little: an idle tunnel holds an HTTP/2 stream and a task, not TLS keys,
//! record buffers and a handshake's leftovers. The permission check, the endpoint's identity
//! and the mesh's CA are the pooled connection's, so they are the same as for HTTP.

use crate::copy::{Abort, ReadReady};
use crate::datapath::Shared;
use crate::http::CONNECT_ATTEMPTS;
use crate::http::mesh_stream::StreamIo;
use crate::http::pool::TunnelSlot;
use crate::route::Service;
use http::{Method, Request, StatusCode, Uri};
use hyper::ext::Protocol as ConnectProtocol;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::either::Either;

/// The `:protocol` of a tunnel's extended CONNECT. Reserved: an app's own Upgrade to this
/// protocol is refused by the outbound proxy.
pub const PROTOCOL: &str = "weft-tcp";

/// Whether a request from a mesh peer opens an opaque-TCP tunnel.
pub(crate) fn is_tunnel<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<ConnectProtocol>()
            .is_some_and(|p| p.as_str() == PROTOCOL)
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No endpoint of the service is healthy, or none could be reached.
    #[error("no endpoint of {service} reachable")]
    NoEndpoint {
        /// The service.
        service: String,
    },
    /// The inbound proxy refused the tunnel (403: the permissions deny this source).
    #[error("{endpoint} refused the tunnel with {status}")]
    Refused {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The inbound proxy's answer.
        status: StatusCode,
    },
    /// The CONNECT stream failed, or no answer came within the connect timeout.
    #[error("tunnel to {endpoint} failed: {reason}")]
    Stream {
        /// The endpoint.
        endpoint: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// Opens a tunnel to an endpoint of `svc` (named `service`): picks one on the default route,
/// takes a stream slot on a pooled mTLS connection to it (trying other endpoints when the
/// connection cannot be had), and waits for the inbound proxy's `200`.
pub(crate) async fn open(
    shared: &Shared,
    mesh: &str,
    service: &str,
    svc: &Service,
    timeout: Duration,
) -> Result<Tunnel, OpenError> {
    let mut failed: Vec<SocketAddr> = Vec::new();
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(target) = svc.pick(&failed) else {
            break;
        };
        let endpoint = target.endpoint.addr;
        let slot = match shared
            .pool
            .tunnel(shared, mesh, target.service, target.endpoint)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(service, error = %e, "endpoint unusable; trying another");
                failed.push(endpoint);
                continue;
            }
        };
        return request(slot, endpoint, timeout).await;
    }
    Err(OpenError::NoEndpoint {
        service: service.to_string(),
    })
}

async fn request(
    slot: TunnelSlot,
    endpoint: SocketAddr,
    timeout: Duration,
) -> Result<Tunnel, OpenError> {
    let stream_err = |reason: String| OpenError::Stream { endpoint, reason };
    let uri = Uri::builder()
        .scheme("http")
        .authority(endpoint.to_string())
        .path_and_query("/")
        .build()
        .map_err(|e| stream_err(e.to_string()))?;
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static(PROTOCOL));
    let sender = slot.sender();
    let opened = match tokio::time::timeout(timeout, sender.open(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(stream_err(e.to_string())),
        Err(_) => return Err(stream_err("no answer within the connect timeout".into())),
    };
    let status = opened.response.status();
    if status != StatusCode::OK {
        return Err(OpenError::Refused { endpoint, status });
    }
    Ok(Tunnel {
        io: Either::Right(opened.into_io()),
        _slot: Some(slot),
    })
}

/// One end of a tunnel: the byte stream of an HTTP/2 CONNECT stream. On the outbound side it
/// also holds its stream slot on the pooled connection.
pub struct Tunnel {
    /// The stream as the inbound proxy's HTTP/2 server hands it over (an upgrade), or as the
    /// outbound proxy opened it on its pooled connection.
    io: Either<TokioIo<Upgraded>, StreamIo>,
    _slot: Option<TunnelSlot>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

impl Tunnel {
    /// The inbound end: a CONNECT stream that hyper's server upgraded.
    pub(crate) fn upgraded(upgraded: Upgraded) -> Self {
        Self {
            io: Either::Left(TokioIo::new(upgraded)),
            _slot: None,
        }
    }
}

impl Abort for Tunnel {
    fn abort(&mut self) {
        // Dropping a stream that has not ended resets it (RST_STREAM), so the proxy at the
        // other end aborts its app's socket in turn; the outbound end says why, as RFC 9113
        // (8.5) asks of a CONNECT stream whose TCP connection broke.
        if let Either::Right(stream) = &mut self.io {
            stream.reset(h2::Reason::CONNECT_ERROR);
        }
    }
}

impl ReadReady for Tunnel {
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A stream has no readiness apart from a read; the copy then takes a buffer from its
        // per-thread pool and gives it back at once if the read is pending, so an idle
        // tunnel still holds none.
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
