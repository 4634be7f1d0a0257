//! The gRPC unary echo client, and the generated service types (the client
//! and server of `weft.bench.v1.Echo`, whose streaming methods the load
//! client does not call).
//!
//! Each lane owns one tonic `Channel`, i.e. one HTTP/2 connection, and makes
//! one `weft.bench.v1.Echo/Unary` call at a time.

use std::net::SocketAddr;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::load::Client;
use crate::stats::ErrorKind;

/// Types generated from `proto/echo.proto`: the messages, `echo_client::EchoClient`
/// and `echo_server::{Echo, EchoServer}`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("weft.bench.v1");
}

use pb::echo_client::EchoClient;

/// A gRPC load target.
#[derive(Debug, Clone)]
pub struct GrpcClient {
    endpoint: Endpoint,
    payload: Vec<u8>,
    response_size: u32,
}

impl GrpcClient {
    /// Targets the echo service at `addr`; each call sends `request_size`
    /// bytes and asks for `response_size` bytes back (0: echo the request).
    pub fn new(addr: SocketAddr, request_size: usize, response_size: u32) -> GrpcClient {
        let endpoint = Endpoint::from(
            http::Uri::builder()
                .scheme("http")
                .authority(addr.to_string())
                .path_and_query("/")
                .build()
                .unwrap_or_else(|_| unreachable!("a socket address is a valid authority")),
        )
        .tcp_nodelay(true);
        GrpcClient {
            endpoint,
            payload: vec![b'x'; request_size],
            response_size,
        }
    }
}

/// Maps a gRPC status to an error kind: transport failures are I/O, a wrong
/// answer is a status error.
fn classify(status: &Status) -> ErrorKind {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => ErrorKind::Io,
        Code::DeadlineExceeded => ErrorKind::Timeout,
        Code::Internal | Code::DataLoss | Code::Unimplemented => ErrorKind::Protocol,
        _ => ErrorKind::Status,
    }
}

impl Client for GrpcClient {
    type Conn = EchoClient<Channel>;

    async fn connect(&self) -> Result<EchoClient<Channel>, ErrorKind> {
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|_| ErrorKind::Connect)?;
        Ok(EchoClient::new(channel))
    }

    async fn call(&self, conn: &mut EchoClient<Channel>) -> Result<(), ErrorKind> {
        let request = pb::EchoRequest {
            payload: self.payload.clone(),
            response_size: self.response_size,
        };
        let reply = conn.unary(request).await.map_err(|s| classify(&s))?;
        let want = if self.response_size == 0 {
            self.payload.len()
        } else {
            self.response_size as usize
        };
        if reply.get_ref().payload.len() == want {
            Ok(())
        } else {
            Err(ErrorKind::Protocol)
        }
    }
}
