//! The upstream apps of `weft-bench serve`: HTTP/1.1 + h2c with a fixed
//! body, gRPC echo (unary and every streaming kind) and TCP echo, each with
//! an optional per-response delay; and an OTLP/gRPC trace collector that
//! takes every export and keeps nothing (the span sink of `mesh`).
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
use http_body_util::{BodyExt, Full};
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
use crate::grpc::pb::{EchoReply, EchoRequest, Failure, ServerStreamRequest, StreamSummary};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// What to serve, and where.
#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    /// HTTP/1.1 and h2c (prior knowledge) listeners.
    pub http: Vec<SocketAddr>,
    /// gRPC echo listeners.
    pub grpc: Vec<SocketAddr>,
    /// TCP echo listeners.
    pub tcp: Vec<SocketAddr>,
    /// OTLP/gRPC trace collector listeners.
    pub otlp: Vec<SocketAddr>,
    /// HTTP response body size in bytes.
    pub body_size: usize,
    /// Added before every HTTP and gRPC response, each reply of a gRPC stream
    /// included (not TCP echo).
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
    #[error("no listener given (use --http, --grpc, --tcp or --otlp)")]
    Nothing,
}

/// Running upstream apps; dropping it stops them.
#[derive(Debug)]
pub struct Server {
    runtime: Option<Runtime>,
    http: Vec<SocketAddr>,
    grpc: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    otlp: Vec<SocketAddr>,
}

impl Server {
    /// Binds every listener and starts serving on a new multi-thread runtime.
    pub fn start(cfg: &ServeConfig) -> Result<Server, ServeError> {
        if cfg.http.is_empty() && cfg.grpc.is_empty() && cfg.tcp.is_empty() && cfg.otlp.is_empty() {
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
        let (http, grpc, tcp, otlp) = runtime.block_on(async {
            let http = bind_all(&cfg.http).await?;
            let grpc = bind_all(&cfg.grpc).await?;
            let tcp = bind_all(&cfg.tcp).await?;
            let otlp = bind_all(&cfg.otlp).await?;
            Ok::<_, ServeError>((http, grpc, tcp, otlp))
        })?;
        let mut server = Server {
            runtime: None,
            http: Vec::new(),
            grpc: Vec::new(),
            tcp: Vec::new(),
            otlp: Vec::new(),
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
        for l in otlp {
            server.otlp.extend(l.local_addr().ok());
            runtime.spawn(accept_loop(l, serve_otlp));
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

    /// Where the OTLP collector listeners ended up.
    pub fn otlp_addrs(&self) -> &[SocketAddr] {
        &self.otlp
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
    let service = service_fn(move |req: Request<Incoming>| {
        let body = body.clone();
        async move {
            // Read the request body to its end, as a real server (or span collector) does:
            // hyper closes a connection whose request body was left unread, so a client that
            // posts (the sidecars' span exports) would pay a new connection per request.
            let mut request_body = req.into_body();
            while let Some(Ok(_)) = request_body.frame().await {}
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

/// Most replies one `ServerStream` call may ask for.
const MAX_STREAM_REPLIES: u32 = 1 << 20;

/// Replies a streaming call buffers ahead of a slow reader.
const STREAM_BUFFER: usize = 16;

/// The replies of a streaming call: OK messages, then possibly one error status.
type ReplyStream = tokio_stream::wrappers::ReceiverStream<Result<EchoReply, tonic::Status>>;

/// The gRPC echo service (`weft.bench.v1.Echo`): unary, server, client and
/// bidirectional streaming. See `proto/echo.proto` for what each method answers.
#[derive(Debug, Clone, Copy)]
struct EchoService {
    /// Added before every reply (each reply of a stream; not `ClientStream`'s
    /// reading).
    delay: Duration,
}

impl EchoService {
    /// Waits the configured delay, if any.
    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

/// The payload of a reply: `payload` itself (moved, not copied: `Unary` is
/// the load path), or `response_size` bytes when that is non-zero; over
/// [`MAX_GRPC_RESPONSE`] is an invalid argument.
fn reply_payload(payload: Vec<u8>, response_size: u32) -> Result<Vec<u8>, tonic::Status> {
    match response_size {
        0 => Ok(payload),
        n if n > MAX_GRPC_RESPONSE => {
            Err(tonic::Status::invalid_argument("response_size over 16 MiB"))
        }
        n => Ok(vec![b'x'; n as usize]),
    }
}

/// The status a `ServerStream` request's `fail` asks for: its code (which
/// must not be OK; an unknown number is `Unknown`) and message.
fn failure_status(fail: &Failure) -> Result<tonic::Status, tonic::Status> {
    match tonic::Code::from(fail.code) {
        tonic::Code::Ok => Err(tonic::Status::invalid_argument(
            "fail.code 0 (OK) is not a failure",
        )),
        code => Ok(tonic::Status::new(code, fail.message.clone())),
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        self.pause().await;
        let req = request.into_inner();
        let payload = reply_payload(req.payload, req.response_size)?;
        Ok(tonic::Response::new(EchoReply { payload, seq: 0 }))
    }

    type ServerStreamStream = ReplyStream;

    /// Checks the request whole before answering, so a bad one, or a failure
    /// after 0 replies, is a trailers-only response; then a task sends the
    /// replies, each after the delay, until they are done or the client goes.
    async fn server_stream(
        &self,
        request: tonic::Request<ServerStreamRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let req = request.into_inner();
        if req.count > MAX_STREAM_REPLIES {
            return Err(tonic::Status::invalid_argument(format!(
                "count over {MAX_STREAM_REPLIES}"
            )));
        }
        let payload = reply_payload(req.payload, req.response_size)?;
        let (replies, end) = match &req.fail {
            None => (req.count, None),
            Some(fail) => (req.count.min(fail.after), Some(failure_status(fail)?)),
        };
        if replies == 0
            && let Some(status) = end
        {
            self.pause().await;
            return Err(status);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let service = *self;
        tokio::spawn(async move {
            for seq in 0..replies {
                service.pause().await;
                let reply = EchoReply {
                    payload: payload.clone(),
                    seq,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return; // the client went away
                }
            }
            if let Some(status) = end {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(tonic::Response::new(ReplyStream::new(rx)))
    }

    /// Counts the requests and their payload bytes until the client's side
    /// ends; a broken request stream ends the call with its status.
    async fn client_stream(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<StreamSummary>, tonic::Status> {
        let mut requests = request.into_inner();
        let mut summary = StreamSummary { count: 0, bytes: 0 };
        while let Some(req) = requests.message().await? {
            summary.count += 1;
            summary.bytes += req.payload.len() as u64;
        }
        self.pause().await;
        Ok(tonic::Response::new(summary))
    }

    type BidiStreamStream = ReplyStream;

    /// A task answers each request as it comes, in order; a request asking
    /// for too large a reply, or a broken request stream, ends the call with
    /// that status, and the client going away ends the task.
    async fn bidi_stream(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let service = *self;
        tokio::spawn(async move {
            let mut seq = 0u32;
            loop {
                let reply = match requests.message().await {
                    Ok(None) => return,
                    Ok(Some(req)) => reply_payload(req.payload, req.response_size)
                        .map(|payload| EchoReply { payload, seq }),
                    Err(status) => Err(status),
                };
                let last = reply.is_err();
                service.pause().await;
                if tx.send(reply).await.is_err() || last {
                    return;
                }
                seq = seq.wrapping_add(1);
            }
        });
        Ok(tonic::Response::new(ReplyStream::new(rx)))
    }
}

async fn serve_grpc(stream: TcpStream, delay: Duration) {
    let service = TowerToHyperService::new(EchoServer::new(EchoService { delay }));
    let _ = auto::Builder::new(TokioExecutor::new())
        .http2_only()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The OTLP trace collector: decodes every export, as a collector does, and keeps nothing.
#[derive(Debug, Clone, Copy)]
struct SpanSink;

#[tonic::async_trait]
impl TraceService for SpanSink {
    async fn export(
        &self,
        _request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn serve_otlp(stream: TcpStream) {
    let service = TowerToHyperService::new(TraceServiceServer::new(SpanSink));
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
