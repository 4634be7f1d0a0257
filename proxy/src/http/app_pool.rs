//! Connections from the inbound proxy to its local app: [`AppConnector`] makes them (for
//! this pool and for hyper-util's client), [`Http1Pool`] keeps the HTTP/1.1 ones alive.
//!
//! Why not hyper-util's pooled client, which the inbound used before for every request (and
//! still uses for tunnels): it is built for many origins, so each request builds and
//! hashes a pool key under the pool's lock, and each HTTP/1.1 connection goes back to the pool
//! through a task spawned per request that waits for the connection to be ready. An inbound
//! has one origin, its app. Here the pool is a stack of idle connections behind a mutex held
//! for a few instructions; a connection is lent to one request, spoken to by weft's own
//! HTTP/1.1 client ([`crate::http::app_http1`]), and put back by the response body the moment
//! it has read the response's last byte: no task and no key per request.
//!
//! A connection is only reused once its request went out whole and its response was read to
//! the end, so a request never queues behind another one. A connection the app closed is
//! dropped when it is next looked at; one idle for [`IDLE`] is closed by the pool's reaper. A
//! request that dies with a reused connection is sent again on a new one when that is safe
//! (see [`Http1Pool::send`]).

use crate::http::app_http1::{AppBody, Conn, ExchangeError, Home, Outgoing, SendFailed};
use crate::http::body::Body;
use crate::listen;
use http::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How long an idle connection to the app stays in the pool.
pub const IDLE: Duration = Duration::from_secs(90);

/// The most idle connections kept; more are closed when their request ends.
pub const MAX_IDLE: usize = 1024;

/// Why a request to the app failed before its response head arrived.
#[derive(Debug, thiserror::Error)]
pub enum AppRequestError {
    /// The TCP connect to the app failed or timed out.
    #[error("connect to {upstream} failed: {source}")]
    Connect {
        /// The app's address.
        upstream: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP/1.1 exchange failed (writing the request, or the app's response head).
    #[error("HTTP/1.1 to {upstream}: {source}")]
    Exchange {
        /// The app's address.
        upstream: SocketAddr,
        /// Why.
        source: ExchangeError,
    },
}

/// Connects to one app address, whatever the request's URI says (the URI keeps the caller's
/// authority, which HTTP/2 sends as `:authority`).
#[derive(Debug, Clone)]
pub struct AppConnector {
    upstream: SocketAddr,
    /// The address connections come from (`127.0.0.6` in transparent mode).
    source: Option<IpAddr>,
    timeout: Duration,
}

impl AppConnector {
    /// Connects to `upstream`, from `source` when given, each connect bounded by `timeout`.
    pub fn new(upstream: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Self {
        Self {
            upstream,
            source,
            timeout,
        }
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        listen::connect(self.upstream, self.source, self.timeout).await
    }
}

impl tower::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let c = self.clone();
        Box::pin(async move { c.connect().await.map(TokioIo::new) })
    }
}

/// Pooled HTTP/1.1 connections to one app address. Cheap to clone (the clones share the pool).
#[derive(Clone)]
pub struct Http1Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: AppConnector,
    /// Oldest first; requests take from the end (the warmest connection).
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool")
            .field("upstream", &self.inner.connector.upstream)
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

/// The pool takes back a connection whose response has ended cleanly.
impl Home for Inner {
    fn put(&self, conn: Conn) {
        Inner::put(self, conn);
    }
}

impl Http1Pool {
    /// A pool of the connections `connector` makes. Inside a tokio runtime it starts the
    /// pool's reaper, which closes connections idle for [`IDLE`] and ends with the pool.
    pub fn new(connector: AppConnector) -> Self {
        let inner = Arc::new(Inner {
            connector,
            idle: Mutex::new(Vec::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// How many connections wait in the pool.
    pub fn idle_count(&self) -> usize {
        self.inner.idle.lock().map_or(0, |idle| idle.len())
    }

    /// Sends `req` (origin-form URI, `Host` set, hop-by-hop headers removed) on a pooled
    /// connection, or on a new one when none is idle, and returns the response head. The
    /// connection goes back to the pool when the response body has been read to its end.
    ///
    /// A request that dies with a reused connection (the app closed it as the request went
    /// out) is sent again on a new one when nothing of it can have been acted on: it was not
    /// written whole, or it is idempotent and no byte of an answer came back.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<AppBody>, AppRequestError> {
        let upstream = self.inner.connector.upstream;
        let exchange = |source| AppRequestError::Exchange { upstream, source };
        let mut out = Outgoing::new(req).map_err(exchange)?;
        if let Some(conn) = self.inner.take_usable() {
            match out.send_on(conn, self.back()).await {
                Ok(resp) => return Ok(resp),
                Err(SendFailed {
                    retry: Some(again),
                    error,
                }) => {
                    tracing::debug!(%upstream, %error, "reused app connection failed; retrying");
                    out = again;
                }
                Err(SendFailed { error, .. }) => return Err(exchange(error)),
            }
        }
        let conn = self.inner.connect().await?;
        out.send_on(conn, self.back())
            .await
            .map_err(|f| exchange(f.error))
    }

    fn back(&self) -> Weak<dyn Home> {
        Arc::downgrade(&self.inner) as Weak<dyn Home>
    }
}

impl Inner {
    /// The warmest idle connection the app has not closed. Drops closed ones on the way;
    /// leaves expiry to the reaper.
    fn take_usable(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(Idle { conn, .. }) = idle.pop() {
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Drops the connections idle for [`IDLE`] (closing them) and the ones the app closed.
    fn reap(&self) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let now = Instant::now();
        idle.retain(|c| c.conn.is_usable() && now.duration_since(c.since) < IDLE);
    }

    async fn connect(&self) -> Result<Conn, AppRequestError> {
        let upstream = self.connector.upstream;
        let tcp = self
            .connector
            .connect()
            .await
            .map_err(|source| AppRequestError::Connect { upstream, source })?;
        Ok(Conn::new(tcp))
    }
}

/// Closes idle connections every quarter of [`IDLE`] until the pool is gone.
async fn reap(pool: Weak<Inner>) {
    loop {
        tokio::time::sleep(IDLE / 4).await;
        match pool.upgrade() {
            Some(pool) => pool.reap(),
            None => return,
        }
    }
}

/// `uri` in origin form (`/path?query`), as an HTTP/1.1 request to an origin server is
/// written.
pub fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => Uri::from(pq.clone()),
        _ => Uri::from_static("/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// How the test app ends its connections.
    #[derive(Clone, Copy, PartialEq)]
    enum Closing {
        /// Keeps them open.
        Never,
        /// Answers `Connection: close`.
        WithHeader,
        /// Drops each one 100 ms after accepting it, without a word (as an app whose
        /// keep-alive timeout expires does).
        Silently,
    }

    /// An app answering `hello`, counting the connections it accepts.
    async fn app(closing: Closing) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                        let mut resp = Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"hello"),
                        ));
                        if closing == Closing::WithHeader {
                            resp.headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().expect("v"));
                        }
                        Ok::<_, Infallible>(resp)
                    });
                    let serve = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc);
                    if closing == Closing::Silently {
                        let _ = tokio::time::timeout(Duration::from_millis(100), serve).await;
                    } else {
                        let _ = serve.await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: SocketAddr) -> Request<Body> {
        Request::get("/")
            .header(http::header::HOST, addr.to_string())
            .body(Body::empty())
            .expect("request")
    }

    /// A pool of connections to the test app at `addr`.
    fn pool_for(addr: SocketAddr) -> Http1Pool {
        Http1Pool::new(AppConnector::new(addr, None, Duration::from_secs(5)))
    }

    /// One request, its body read to the end (which puts the connection back).
    async fn exchange(pool: &Http1Pool, addr: SocketAddr) -> String {
        let resp = pool.send(get(addr)).await.expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = app(Closing::Never).await;
        let pool = pool_for(addr);
        for _ in 0..20 {
            assert_eq!(exchange(&pool, addr).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_are_then_reused() {
        let (addr, accepted) = app(Closing::Never).await;
        let pool = pool_for(addr);
        // Four in flight at once: none can wait for another's connection.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(pool.send(get(addr)).await.expect("response"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        for resp in held {
            resp.into_body().collect().await.expect("body");
        }
        assert_eq!(pool.idle_count(), 4);
        for _ in 0..8 {
            assert_eq!(exchange(&pool, addr).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn connections_the_app_closes_are_not_reused() {
        let (addr, accepted) = app(Closing::WithHeader).await;
        let pool = pool_for(addr);
        for _ in 0..5 {
            assert_eq!(exchange(&pool, addr).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn connections_the_app_drops_while_idle_are_replaced() {
        let (addr, accepted) = app(Closing::Silently).await;
        let pool = pool_for(addr);
        for round in 1..=3 {
            assert_eq!(exchange(&pool, addr).await, "hello");
            // The app drops the idle connection meanwhile; the next request needs a new one.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
        assert_eq!(
            pool.idle_count(),
            1,
            "the last connection waits, until looked at"
        );
        assert_eq!(exchange(&pool, addr).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted) = app(Closing::Never).await;
        let pool = pool_for(addr);
        let resp = pool.send(get(addr)).await.expect("response");
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(exchange(&pool, addr).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_names_the_app() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = pool_for(addr);
        let err = pool.send(get(addr)).await.expect_err("nothing listens");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        let abs: Uri = "http://app.local:8080/a/b?x=1".parse().expect("uri");
        assert_eq!(origin_form(&abs), "/a/b?x=1");
        let root: Uri = "http://app.local".parse().expect("uri");
        assert_eq!(origin_form(&root), "/");
    }
}
