//! Request-level handling of HTTP mesh traffic (the L7 path).
//!
//! When detection (or `kuma.io/protocol`) says a connection carries HTTP, the proxies handle it
//! request by request with hyper instead of moving bytes:
//!
//! - [`outbound`] serves the app's HTTP/1.1 or HTTP/2 connection, matches each request against
//!   the service's rules ([`crate::route`]), picks an endpoint ([`crate::balance`]) and sends
//!   the request as one HTTP/2 stream over a pooled, multiplexed mesh connection ([`pool`];
//!   the streams are driven through `h2` directly, [`mesh_stream`]), with the connect and
//!   request timeouts, header limits and hop-by-hop rules of this module.
//! - [`inbound`] serves those HTTP/2 streams (ALPN [`crate::mesh_tls::ALPN_H2`]) or a plaintext
//!   HTTP client, checks the source's permission per request (403 when denied), and speaks to
//!   the app in the app's own protocol: HTTP/1.1 or h2c, per `kuma.io/protocol` or, without
//!   it, the protocol the calling app used (carried in [`DOWNSTREAM_PROTOCOL`]). HTTP/1.1
//!   connections to the app are kept alive in [`app_pool`] and spoken to by weft's own
//!   HTTP/1.1 client, [`app_http1`]; h2c goes over one multiplexed connection, [`app_h2c`].
//! - [`opaque`] carries TCP that is not HTTP, with mTLS on: one CONNECT stream per app
//!   connection on the same pooled connections.
//! - [`tunnel`] carries Upgrade (WebSocket) and CONNECT: an extended CONNECT stream between the
//!   proxies (RFC 8441's shape), an Upgrade or CONNECT again towards the app.
//!
//! Bodies are streamed frame by frame ([`body::Body`]), never buffered whole; trailers pass
//! through. Under every HTTP/2 connection, served or pooled, [`coalesce`] gathers the frames
//! of each turn of the connection into one write.

pub mod app_h2c;
pub mod app_http1;
pub mod app_pool;
pub mod body;
pub mod coalesce;
pub mod idle;
pub mod inbound;
pub mod mesh_stream;
pub mod opaque;
pub mod outbound;
pub mod pool;
pub mod tunnel;

use crate::http::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When a request that began at `began` times out after `limit` (as good as never when the
/// sum does not fit an instant).
pub(crate) fn request_deadline(began: std::time::Instant, limit: Duration) -> tokio::time::Instant {
    began.checked_add(limit).map_or_else(
        || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365),
        tokio::time::Instant::from_std,
    )
}

/// Kuma's default idle timeout: a connection with no byte moving for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Kuma's default stream idle timeout: a response body that brings no frame for this long
/// has its stream reset, so that an app that stalls mid-body does not hold the stream, its
/// slot on the mesh connection and the endpoint's load count forever.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Kuma's default request timeout: the response head must arrive within it (504 otherwise).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The most header fields a request may carry (431 beyond).
pub const MAX_HEADERS: usize = 100;
/// The most header fields the outbound proxy adds to a request on its way to the peer
/// (`weft-downstream-protocol`, `traceparent`): the inbound allows the app's limit plus these.
pub const MESH_ADDED_HEADERS: usize = 2;
/// The most bytes of request head (HTTP/1.1) or header list (HTTP/2) (431 beyond).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// HTTP/2 flow-control window per stream between proxies (and towards apps).
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 flow-control window per connection: room for a full stream window on as many
/// streams as a connection carries tunnels, and more. Data a reader leaves unread holds its
/// share of the connection's window too, so a smaller one would let a few stalled tunnels
/// (apps that stop reading) starve every other stream on the connection. It is credit, not
/// memory: only unread data takes memory, at most [`STREAM_WINDOW`] per stream.
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * (pool::TUNNELS_PER_CONNECTION as u32 + 28);
/// How many endpoints a request or an opaque connection tries to connect to before it fails.
pub const CONNECT_ATTEMPTS: usize = 3;

/// Internal header from the outbound to the inbound proxy: the calling app spoke HTTP/1.x, so
/// an inbound without `kuma.io/protocol` speaks HTTP/1.1 to its app. Removed by the inbound
/// proxy and never accepted from an app.
pub const DOWNSTREAM_PROTOCOL: HeaderName = HeaderName::from_static("weft-downstream-protocol");

/// The value of [`DOWNSTREAM_PROTOCOL`] for HTTP/1.x callers.
pub const DOWNSTREAM_HTTP1: HeaderValue = HeaderValue::from_static("http1");

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1), besides those the
/// `Connection` header names. `Trailer` is end to end and stays: it announces the trailer
/// fields, and an HTTP/1.1 hop (hyper's encoder) sends only the trailers it announces.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers. `TE: trailers` is kept (gRPC needs it; HTTP/2 allows only it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names decides: most messages carry none of these, and a removal
    // that misses still hashes the name and probes the map, ten times over.
    if !headers
        .keys()
        .any(|n| n == header::TE || HOP_BY_HOP.contains(n))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The version a response goes back to the app with: what the app spoke.
pub fn downstream_version(http1: bool) -> http::Version {
    if http1 {
        http::Version::HTTP_11
    } else {
        http::Version::HTTP_2
    }
}

/// A response the proxy makes itself, with a short text body naming the reason.
pub fn local_response(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::text(reason));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.extensions_mut().insert(LocalReply(reason));
    r
}

/// Marks a [`local_response`], with its reason, so that it can be answered in the caller's
/// terms ([`for_grpc_caller`]).
#[derive(Debug, Clone, Copy)]
struct LocalReply(&'static str);

/// Whether a request is a gRPC call (`content-type: application/grpc[+proto|...]`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    // `application/grpc-web*` is another protocol, whose callers read another shape.
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .strip_prefix(b"application/grpc")
            .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
    })
}

/// A [`local_response`] as a gRPC caller expects it, as Envoy answers gRPC calls locally: a
/// trailers-only response, HTTP 200 with `grpc-status` (the HTTP status mapped as gRPC's
/// HTTP-to-gRPC table maps it: 503 and 504 are UNAVAILABLE, 403 PERMISSION_DENIED, ...) and
/// the reason in `grpc-message`. A gRPC client reads the status from there; a 5xx with a
/// text body leaves it to guess (431, for one, came out as UNKNOWN without a message). Any
/// other response is returned as it is.
pub(crate) fn for_grpc_caller(resp: Response<Body>) -> Response<Body> {
    let Some(LocalReply(reason)) = resp.extensions().get::<LocalReply>().copied() else {
        return resp;
    };
    let code: u16 = match resp.status().as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    };
    let mut r = Response::new(Body::empty());
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    // The reasons are short ASCII texts: only the line end needs to go.
    if let Ok(message) = HeaderValue::from_str(reason.trim_end()) {
        headers.insert("grpc-message", message);
    }
    r.extensions_mut().insert(LocalReply(reason));
    r
}

/// An I/O stream that first yields bytes already read from it (by protocol detection).
#[derive(Debug)]
pub struct PrefixedIo<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> PrefixedIo<T> {
    /// `inner`, with `prefix` read back first.
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let rest = &this.prefix[this.at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_told_from_grpc_web_by_its_content_type() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grpc-web+proto"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_and_trailer_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::HOST, HeaderValue::from_static("api"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "te", "trailer"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in HOP_BY_HOP.iter().chain([&header::TE]) {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("api"));
            h.insert(name.clone(), HeaderValue::from_static("gzip"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} stayed");
        }
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[tokio::test]
    async fn prefixed_io_replays_then_reads_on() {
        use tokio::io::AsyncReadExt;
        let rest: &[u8] = b" world";
        let mut io = PrefixedIo::new(b"hello".to_vec(), rest);
        let mut s = String::new();
        io.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
