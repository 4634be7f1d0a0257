//! The `weft.v1.Discovery` gRPC service, wired by hand instead of generated.
//!
//! A generated server takes a [`Snapshot`](weft_api::proto::Snapshot) message per push and
//! encodes it into a buffer per stream. Both cost too much at a thousand proxies: building
//! the message copies every endpoint of the mesh, and tonic's per-stream encode buffer keeps
//! the size of the largest message for the stream's life (a thousand streams held about
//! 100 MiB of idle buffers). Here a push is an [`EncodedSnapshot`], and the response body
//! hands its parts to HTTP/2 as [`Bytes`] chunks: the parts every proxy of the mesh shares
//! go out without a copy, and nothing stays allocated between pushes.
//!
//! On the wire nothing changes: the same path, gRPC framing, messages and trailers, so proxies
//! keep the generated client. Requests are decoded by tonic's [`Streaming`] with prost.

use super::server::{DiscoveryService, SnapshotStream};
use super::snapshot::EncodedSnapshot;
use bytes::Bytes;
use futures::Stream;
use http_body::Frame;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use tonic::codec::{BufferSettings, Streaming};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::metadata::GRPC_CONTENT_TYPE;
use tonic::server::NamedService;
use tonic::{Request, Status};
use tonic_prost::ProstDecoder;
use weft_api::proto::DiscoveryRequest;

/// The method's path.
pub const STREAM_PATH: &str = "/weft.v1.Discovery/Stream";
/// The largest request a proxy may send (tonic's default).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// A stream's request buffer to start with. Requests are small (ACKs, stats; a Register with
/// its Dataplane grows it once), and the buffer lives as long as the stream; tonic's default
/// is 8 KiB, 8 MiB of allocations at a thousand proxies (mostly untouched pages: the
/// benchmark's RSS moved by less than its noise).
const REQUEST_BUFFER: usize = 1024;

/// The discovery service as a tonic server, for `Server::add_service`.
#[derive(Clone)]
pub struct DiscoveryServer {
    inner: Arc<DiscoveryService>,
}

impl DiscoveryServer {
    /// Serves `service`.
    pub fn new(service: DiscoveryService) -> DiscoveryServer {
        DiscoveryServer {
            inner: Arc::new(service),
        }
    }
}

impl NamedService for DiscoveryServer {
    const NAME: &'static str = "weft.v1.Discovery";
}

impl<B> Service<http::Request<B>> for DiscoveryServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let service = self.inner.clone();
        Box::pin(async move { Ok(respond(service, req).await) })
    }
}

async fn respond<B>(
    service: Arc<DiscoveryService>,
    req: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    if req.uri().path() != STREAM_PATH {
        return Status::unimplemented(format!("no method {} here", req.uri().path())).into_http();
    }
    // No compression is offered, so a compressed request cannot be read.
    if let Some(enc) = req.headers().get("grpc-encoding")
        && enc.as_bytes() != b"identity"
    {
        return Status::unimplemented(format!(
            "request compression {enc:?} is not supported; send uncompressed"
        ))
        .into_http();
    }
    let req = req.map(|body| {
        Streaming::new_request(
            // The yield threshold only matters when encoding; tonic's default.
            ProstDecoder::<DiscoveryRequest>::new(BufferSettings::new(REQUEST_BUFFER, 32 * 1024)),
            body,
            None,
            Some(MAX_REQUEST_BYTES),
        )
    });
    match service.stream(Request::from_http(req)).await {
        Ok(resp) => {
            let (metadata, snapshots, _) = resp.into_parts();
            let mut resp =
                http::Response::new(tonic::body::Body::new(SnapshotBody::new(snapshots)));
            *resp.headers_mut() = metadata.into_headers();
            resp.headers_mut()
                .insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
            resp
        }
        Err(status) => status.into_http(),
    }
}

/// A response body of gRPC-framed snapshots, each as a few [`Bytes`] chunks, ending with
/// the status in trailers.
struct SnapshotBody {
    snapshots: SnapshotStream,
    chunks: VecDeque<Bytes>,
    done: bool,
}

impl SnapshotBody {
    fn new(snapshots: SnapshotStream) -> SnapshotBody {
        SnapshotBody {
            snapshots,
            chunks: VecDeque::new(),
            done: false,
        }
    }
}

/// Appends a gRPC message frame: the uncompressed flag and the big-endian length, then the
/// message.
fn frame(snap: &EncodedSnapshot, out: &mut VecDeque<Bytes>) -> Result<(), Status> {
    let len = u32::try_from(snap.encoded_len())
        .map_err(|_| Status::resource_exhausted("snapshot larger than 4 GiB"))?;
    let mut header = [0u8; 5];
    header[1..].copy_from_slice(&len.to_be_bytes());
    snap.chunks(&header, out);
    Ok(())
}

impl Body for SnapshotBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(chunk) = this.chunks.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let status = match Pin::new(&mut this.snapshots).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(snap))) => match frame(&snap, &mut this.chunks) {
                    Ok(()) => continue,
                    Err(status) => status,
                },
                Poll::Ready(Some(Err(status))) => status,
                Poll::Ready(None) => Status::ok(""),
            };
            this.done = true;
            let mut trailers = http::HeaderMap::new();
            if let Err(e) = status.add_header(&mut trailers) {
                tracing::warn!(error = %e, "cannot write a discovery stream's status");
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.chunks.is_empty()
    }
}
