//! The load generator's side of a path: what it calls ([`Target`]), the
//! client of the path's protocol (HTTP/1.1 or h2c over hyper, gRPC over
//! tonic, raw TCP ping-pong), the probe that waits until a request passes,
//! and load runs. All of it runs in-process on threads that joined the
//! client namespace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::grpc::GrpcClient;
use crate::http::{HttpClient, Version};
use crate::load::{self, Client, LoadConfig, Measurement};
use crate::tcp::PingPongClient;

use super::topology::Topology;
use super::{AppProtocol, MeshError};

/// What the generator calls on a path.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Where the app connects: the upstream, or its sidecar's outbound.
    pub addr: SocketAddr,
    /// What it speaks.
    pub protocol: AppProtocol,
    /// The reply size a gRPC call asks for (the HTTP body's size), and
    /// the size of each raw TCP ping-pong message.
    pub body_size: usize,
}

impl Target {
    /// The HTTP/1.1 or h2c client (resolving the address needs a runtime).
    fn http_client(self, version: Version) -> Result<HttpClient, MeshError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| MeshError::io("starting a runtime", e))?;
        Ok(rt.block_on(HttpClient::new(&format!("http://{}/", self.addr), version))?)
    }

    /// The gRPC echo client: an empty request, a reply of `body_size`
    /// bytes.
    fn grpc_client(self) -> Result<GrpcClient, MeshError> {
        let size = u32::try_from(self.body_size)
            .map_err(|_| MeshError::Config("--body-size too large for a gRPC reply".into()))?;
        if size == 0 {
            return Err(MeshError::Config(
                "gRPC paths need --body-size of at least 1".into(),
            ));
        }
        Ok(GrpcClient::new(self.addr, 0, size))
    }

    /// The raw TCP ping-pong client: `body_size` bytes out, the same bytes
    /// back from the echo; one round trip is one request.
    fn tcp_client(self) -> Result<PingPongClient, MeshError> {
        if self.body_size == 0 {
            return Err(MeshError::Config(
                "tcp paths need --body-size of at least 1 (the ping-pong message)".into(),
            ));
        }
        Ok(PingPongClient::new(self.addr, self.body_size))
    }
}

/// Runs the generator in-process on threads inside the client namespace.
pub fn run_load(
    topo: &Topology,
    target: Target,
    cfg: LoadConfig,
) -> Result<Measurement, MeshError> {
    // Worker threads started from here inherit the namespace.
    topo.client.enter(move || match target.protocol {
        AppProtocol::Http1 => Ok(load::run(
            Arc::new(target.http_client(Version::Http1)?),
            &cfg,
        )?),
        AppProtocol::H2 => Ok(load::run(Arc::new(target.http_client(Version::H2)?), &cfg)?),
        AppProtocol::Grpc => Ok(load::run(Arc::new(target.grpc_client()?), &cfg)?),
        AppProtocol::Tcp => Ok(load::run(Arc::new(target.tcp_client()?), &cfg)?),
    })?
}

/// Polls with one request of the path's protocol, on a fresh connection
/// each time, from inside the client namespace, until one succeeds or
/// `timeout` passes; the error is the last failure seen.
pub fn wait_request_ok(topo: &Topology, target: Target, timeout: Duration) -> Result<(), String> {
    topo.client
        .enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting a runtime: {e}"))?;
            let http = |version| {
                let client = target.http_client(version).map_err(|e| e.to_string())?;
                rt.block_on(first_ok(&client, timeout))
            };
            match target.protocol {
                AppProtocol::Http1 => http(Version::Http1),
                AppProtocol::H2 => http(Version::H2),
                AppProtocol::Grpc => {
                    let client = target.grpc_client().map_err(|e| e.to_string())?;
                    rt.block_on(first_ok(&client, timeout))
                }
                AppProtocol::Tcp => {
                    let client = target.tcp_client().map_err(|e| e.to_string())?;
                    rt.block_on(first_ok(&client, timeout))
                }
            }
        })
        .map_err(|e| e.to_string())?
}

/// One request on a fresh connection, every 100 ms, until one succeeds or
/// `timeout` passes.
async fn first_ok<C: Client>(client: &C, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let mut conn = client.connect().await?;
            client.call(&mut conn).await
        })
        .await;
        let last = match attempt {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(kind)) => format!("{kind:?} error"),
            Err(_) => "no answer within 5 s".to_owned(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("not ready after {timeout:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
