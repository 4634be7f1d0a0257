//! A small gRPC service for the tests of gRPC through the mesh, built on weft's own protobuf
//! services (so no build script is needed): `Identity.Certify` echoes the mesh back (unary),
//! or answers `PermissionDenied` for mesh "fail" (a status in trailers); `Discovery.Stream`
//! answers each ack with a snapshot whose version names it (bidirectional streaming).

use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weft_api::proto as pb;
use weft_api::proto::discovery_server::{Discovery, DiscoveryServer};
use weft_api::proto::identity_server::{Identity, IdentityServer};

/// The echo service.
pub struct Echo;

/// Serves both services of [`Echo`] on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(Echo))
        .add_service(DiscoveryServer::new(Echo))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}

#[tonic::async_trait]
impl Identity for Echo {
    async fn certify(
        &self,
        req: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let r = req.into_inner();
        if r.mesh == "fail" {
            return Err(Status::permission_denied("told to fail"));
        }
        Ok(Response::new(pb::CertifyResponse {
            cert_chain_pem: format!("mesh={} csr={}", r.mesh, r.csr.len()),
            ..Default::default()
        }))
    }
}

type SnapStream = Pin<Box<dyn Stream<Item = Result<pb::Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for Echo {
    type StreamStream = SnapStream;

    async fn stream(
        &self,
        req: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<SnapStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                let version = match m.kind {
                    Some(pb::discovery_request::Kind::Ack(a)) => a.version,
                    _ => "other".into(),
                };
                let snap = pb::Snapshot {
                    version: format!("echo-{version}"),
                    ..Default::default()
                };
                if tx.send(Ok(snap)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
