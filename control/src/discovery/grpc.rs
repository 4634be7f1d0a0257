//! The `weft.v1.Discovery` gRPC service, wired by hand instead of generated: the generated
//! server would take a [`Snapshot`](weft_api::proto::Snapshot) message per push, and building
//! one means copying every endpoint of the mesh into it, for every proxy. This one sends
//! [`EncodedSnapshot`]s, whose shared parts are written straight from the bytes built once
//! per view. On the wire nothing changes: same path, same messages, and the proxies use the
//! generated client.

use super::server::{DiscoveryService, SnapshotStream};
use super::snapshot::EncodedSnapshot;
use std::convert::Infallible;
use std::sync::Arc;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstDecoder;
use weft_api::proto::DiscoveryRequest;

/// The method's path.
pub const STREAM_PATH: &str = "/weft.v1.Discovery/Stream";

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
        if req.uri().path() != STREAM_PATH {
            return Box::pin(async {
                Ok(Status::unimplemented("no such method of weft.v1.Discovery").into_http())
            });
        }
        let method = StreamMethod(self.inner.clone());
        Box::pin(async move { Ok(Grpc::new(SnapshotCodec).streaming(method, req).await) })
    }
}

struct StreamMethod(Arc<DiscoveryService>);

impl StreamingService<DiscoveryRequest> for StreamMethod {
    type Response = EncodedSnapshot;
    type ResponseStream = SnapshotStream;
    type Future = BoxFuture<Response<SnapshotStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.stream(request).await })
    }
}

/// Decodes requests with prost; encodes snapshots from their parts.
struct SnapshotCodec;

impl Codec for SnapshotCodec {
    type Encode = EncodedSnapshot;
    type Decode = DiscoveryRequest;
    type Encoder = SnapshotEncoder;
    type Decoder = ProstDecoder<DiscoveryRequest>;

    fn encoder(&mut self) -> SnapshotEncoder {
        SnapshotEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<DiscoveryRequest> {
        ProstDecoder::new(BufferSettings::default())
    }
}

/// Writes an [`EncodedSnapshot`]'s bytes into tonic's frame buffer.
struct SnapshotEncoder;

impl Encoder for SnapshotEncoder {
    type Item = EncodedSnapshot;
    type Error = Status;

    fn encode(&mut self, item: EncodedSnapshot, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst);
        Ok(())
    }
}
