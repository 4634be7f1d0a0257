//! Connections from the inbound proxy to its local app: [`AppConnector`] makes them (for
//! this pool and for hyper-util's clients), [`Http1Pool`] keeps the HTTP/1.1 ones alive.
//!
//! Why not hyper-util's pooled client, which the inbound used before for every request (and
//! still uses for tunnels and h2c): it is built for many origins, so each request builds and
//! hashes a pool key under the pool's lock, and each HTTP/1.1 connection goes back to the pool
//! through a task spawned per request that waits for the connection to be ready. An inbound
//! has one origin, its app. Here the pool is a stack of idle senders behind a mutex held for a
//! few instructions, and a connection is lent to one request and handed back when that
//! response's body ends ([`Lent`], which the response's [`crate::http::body::Body`] holds):
//! no task and no key per request.
//!
//! A lent connection is only reused once hyper says it is ready (its request body fully sent,
//! its response fully read), so a request never queues behind another one. A connection the
//! app closed is dropped when it is next looked at; one idle for [`IDLE`] is closed by the
//! pool's reaper. A request that hyper could not start on a reused connection (the app closed
//! it in the meantime) is retried once on a new connection.

use crate::http::body::Body;
use crate::http::coalesce::Coalesce;
use crate::listen;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
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
    /// The HTTP/1.1 exchange failed (handshake, write, or the app's response).
    #[error("HTTP/1.1 to {upstream}: {source}")]
    Http {
        /// The app's address.
        upstream: SocketAddr,
        /// Why.
        source: hyper::Error,
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

/// [`AppConnector`] for h2c: the connections it makes write once per turn of their HTTP/2
/// task ([`Coalesce`]), so the requests of one turn reach the app in one `writev`. Only for
/// h2c: the HTTP/1.1 client's tunnels copy bytes in loops whose flushes must not wait.
#[derive(Debug, Clone)]
pub struct H2cConnector(pub AppConnector);

impl tower::Service<Uri> for H2cConnector {
    type Response = TokioIo<Coalesce<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let c = self.0.clone();
        Box::pin(async move { c.connect().await.map(|s| TokioIo::new(Coalesce::new(s))) })
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
    sender: SendRequest<Body>,
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

/// A pooled connection lent to one request. [`Lent::give_back`] returns it once the
/// response has ended; dropping it instead closes the connection when no request uses it.
pub struct Lent {
    sender: SendRequest<Body>,
    pool: Weak<Inner>,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent").finish_non_exhaustive()
    }
}

impl Lent {
    /// Returns the connection to its pool (the response it carried ended cleanly).
    pub fn give_back(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.sender);
        }
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

    /// Sends `req` (origin-form URI, `Host` set) on a pooled connection, or on a new one when
    /// none is ready. Returns the response head and the connection, which goes back to the
    /// pool when [`Lent::give_back`] is called at the end of the response body.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Lent), AppRequestError> {
        if let Some(mut sender) = self.inner.take_ready() {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.lend(sender))),
                Err(mut e) => match e.take_message() {
                    // Not started: the app closed the connection meanwhile. A new one.
                    Some(r) => req = r,
                    None => return Err(self.inner.http_error(e.into_error())),
                },
            }
        }
        let mut sender = self.inner.connect().await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok((resp, self.lend(sender))),
            Err(e) => Err(self.inner.http_error(e)),
        }
    }

    fn lend(&self, sender: SendRequest<Body>) -> Lent {
        Lent {
            sender,
            pool: Arc::downgrade(&self.inner),
        }
    }
}

impl Inner {
    fn http_error(&self, source: hyper::Error) -> AppRequestError {
        AppRequestError::Http {
            upstream: self.connector.upstream,
            source,
        }
    }

    /// The warmest idle connection that can take a request now. Drops closed ones on the
    /// way; leaves the ones still busy finishing a request, and leaves expiry to the reaper.
    fn take_ready(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().ok()?;
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let sender = &idle[i].sender;
            if sender.is_closed() {
                idle.remove(i);
            } else if sender.is_ready() {
                return Some(idle.remove(i).sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops the connections idle for [`IDLE`] (closing them) and the closed ones.
    fn reap(&self) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let now = Instant::now();
        idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < IDLE);
    }

    async fn connect(&self) -> Result<SendRequest<Body>, AppRequestError> {
        let upstream = self.connector.upstream;
        let tcp = self
            .connector
            .connect()
            .await
            .map_err(|source| AppRequestError::Connect { upstream, source })?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| self.http_error(e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%upstream, error = %e, "app connection ended with an error");
            }
        });
        Ok(sender)
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
                    let svc = service_fn(move |_req: Request<Incoming>| async move {
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

    /// One request: its body read to the end, then the connection given back.
    async fn exchange(pool: &Http1Pool, addr: SocketAddr) -> String {
        let (resp, lent) = pool.send(get(addr)).await.expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        lent.give_back();
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
        for (resp, lent) in held {
            resp.into_body().collect().await.expect("body");
            lent.give_back();
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
    async fn a_connection_not_given_back_is_not_reused() {
        let (addr, accepted) = app(Closing::Never).await;
        let pool = pool_for(addr);
        let (resp, lent) = pool.send(get(addr)).await.expect("response");
        drop(lent);
        drop(resp);
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
