//! The upstream apps of `weft-bench serve`: HTTP/1.1 + h2c with a fixed
//! body, gRPC echo and TCP echo, each with an optional per-response delay.
//!
//! [`Server::start`] binds every listener before it returns (port 0 picks a
//! free port; [`Server::http_addrs`] and friends say which), and runs them on
//! its own runtime until the [`Server`] is dropped. Tests use it in-process.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use crate::cpu;
use crate::grpc::pb::echo_server::{Echo, EchoServer};
use crate::grpc::pb::{EchoReply, EchoRequest};

/// What to serve, and where.
#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    /// HTTP/1.1 and h2c (prior knowledge) listeners.
    pub http: Vec<SocketAddr>,
    /// gRPC echo listeners.
    pub grpc: Vec<SocketAddr>,
    /// TCP echo listeners.
    pub tcp: Vec<SocketAddr>,
    /// HTTP response body size in bytes.
    pub body_size: usize,
    /// Added before every HTTP and gRPC response (not TCP echo).
    pub delay: Duration,
    /// Runtime worker threads (0: one per CPU).
    pub threads: usize,
    /// CPUs to pin runtime threads to; empty: no pinning.
    pub cpus: Vec<usize>,
}

/// The servers could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The runtime could not be built.
    #[error("cannot start the server runtime: {0}")]
    Runtime(std::io::Error),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Nothing to serve.
    #[error("no listener given (use --http, --grpc or --tcp)")]
    Nothing,
}

/// Running upstream apps; dropping it stops them.
#[derive(Debug)]
pub struct Server {
    runtime: Option<Runtime>,
    http: Vec<SocketAddr>,
    grpc: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
}

impl Server {
    /// Binds every listener and starts serving on a new multi-thread runtime.
    pub fn start(cfg: &ServeConfig) -> Result<Server, ServeError> {
        if cfg.http.is_empty() && cfg.grpc.is_empty() && cfg.tcp.is_empty() {
            return Err(ServeError::Nothing);
        }
        let cpus = cfg.cpus.clone();
        let next = Arc::new(AtomicUsize::new(0));
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if cfg.threads > 0 {
            builder.worker_threads(cfg.threads);
        }
        let runtime = builder
            .enable_all()
            .thread_name("weft-bench-serve")
            .on_thread_start(move || {
                if !cpus.is_empty() {
                    let i = next.fetch_add(1, Relaxed);
                    // Best effort: a failed pin leaves the thread unpinned.
                    let _ = cpu::pin_current_thread(cpus[i % cpus.len()]);
                }
            })
            .build()
            .map_err(ServeError::Runtime)?;

        let body = Bytes::from(vec![b'x'; cfg.body_size]);
        let delay = cfg.delay;
        let (http, grpc, tcp) = runtime.block_on(async {
            let http = bind_all(&cfg.http).await?;
            let grpc = bind_all(&cfg.grpc).await?;
            let tcp = bind_all(&cfg.tcp).await?;
            Ok::<_, ServeError>((http, grpc, tcp))
        })?;
        let mut server = Server {
            runtime: None,
            http: Vec::new(),
            grpc: Vec::new(),
            tcp: Vec::new(),
        };
        for l in http {
            server.http.extend(l.local_addr().ok());
            runtime.spawn(accept_loop(l, {
                let body = body.clone();
                move |s| serve_http(s, body.clone(), delay)
            }));
        }
        for l in grpc {
            server.grpc.extend(l.local_addr().ok());
            runtime.spawn(accept_loop(l, move |s| serve_grpc(s, delay)));
        }
        for l in tcp {
            server.tcp.extend(l.local_addr().ok());
            runtime.spawn(accept_loop(l, serve_tcp_echo));
        }
        server.runtime = Some(runtime);
        Ok(server)
    }

    /// Where the HTTP listeners ended up.
    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http
    }

    /// Where the gRPC listeners ended up.
    pub fn grpc_addrs(&self) -> &[SocketAddr] {
        &self.grpc
    }

    /// Where the TCP echo listeners ended up.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// Serves until the process is killed.
    pub fn run_forever(self) -> ! {
        loop {
            std::thread::park();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, ServeError> {
    let mut out = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        out.push(l);
    }
    Ok(out)
}

async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream));
            }
            // Out of file descriptors and the like: back off, keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_http(stream: TcpStream, body: Bytes, delay: Duration) {
    let service = service_fn(move |_req: Request<Incoming>| {
        let body = body.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(body)))
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Largest reply the echo service will build on request.
const MAX_GRPC_RESPONSE: u32 = 16 << 20;

/// The gRPC echo service.
#[derive(Debug, Clone, Copy)]
struct EchoService {
    delay: Duration,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let req = request.into_inner();
        let payload = match req.response_size {
            0 => req.payload,
            n if n > MAX_GRPC_RESPONSE => {
                return Err(tonic::Status::invalid_argument("response_size over 16 MiB"));
            }
            n => vec![b'x'; n as usize],
        };
        Ok(tonic::Response::new(EchoReply { payload }))
    }
}

async fn serve_grpc(stream: TcpStream, delay: Duration) {
    let service = TowerToHyperService::new(EchoServer::new(EchoService { delay }));
    let _ = auto::Builder::new(TokioExecutor::new())
        .http2_only()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn serve_tcp_echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
