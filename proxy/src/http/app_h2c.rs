//! The inbound proxy's h2c connections to its local app: multiplexed HTTP/2 connections
//! (prior knowledge), driven through `h2` directly by the same [`MeshSender`] that carries the
//! mesh hop. Requests share the first connection with room under the app's own stream limit
//! (`SETTINGS_MAX_CONCURRENT_STREAMS`); when every one is full, another opens, so that
//! long-lived streams (gRPC streams) do not queue the other requests behind the app's limit.
//!
//! Why not hyper-util's pooled client, which the inbound used before: it is built for many
//! origins, so every request builds and hashes a pool key under the pool's lock and moves a
//! boxed future of some kilobytes, and hyper's HTTP/2 client hands each request to the
//! connection's task over a channel and spawns a task per request to wait for the response
//! head. An inbound has one origin, its app, and one connection to it carries every stream.
//! Here a request clones the sender of the connection in use (a pointer swap under a mutex
//! held for a few instructions) and opens its stream from its own task.
//!
//! A connection that ends (the app closed it, or sent GOAWAY) is replaced on the next
//! request; a request that did not go out on it goes out on the new one. Connections that
//! carried no stream for [`IDLE`] are closed, as the HTTP/1.1 pool closes its idle connections. Its settings and
//! its writes, gathered per turn, are the mesh hop's ([`MeshSender::handshake`]).

use crate::http::app_pool::IDLE;
use crate::http::body::Body;
use crate::http::mesh_stream::{MeshSender, RequestTimeout, SendError, StreamGuard};
use crate::listen;
use h2::RecvStream;
use http::{Request, Response};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

/// Why an h2c request to the app got no response head.
#[derive(Debug, thiserror::Error)]
pub enum H2cError {
    /// The TCP connect to the app failed or timed out.
    #[error("connect to {upstream} failed: {source}")]
    Connect {
        /// The app's address.
        upstream: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP/2 handshake with the app failed.
    #[error("h2c handshake with {upstream} failed: {source}")]
    Handshake {
        /// The app's address.
        upstream: SocketAddr,
        /// Why.
        source: h2::Error,
    },
    /// No response head within the request timeout (a plaintext caller's: mesh callers' own
    /// proxies bound their requests).
    #[error("h2c to {upstream}: no response within the request timeout")]
    TimedOut {
        /// The app's address.
        upstream: SocketAddr,
    },
    /// The stream failed, or the connection took no new stream even when new.
    #[error("h2c to {upstream}: {source}")]
    Stream {
        /// The app's address.
        upstream: SocketAddr,
        /// Why.
        source: h2::Error,
    },
}

/// The h2c connection to one app address, opened on first use. Cheap to clone (the clones
/// share the connection).
#[derive(Clone)]
pub struct H2cClient {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: SocketAddr,
    /// The address connections come from (`127.0.0.6` in transparent mode).
    source: Option<IpAddr>,
    connect_timeout: Duration,
    /// The connections in use, oldest first.
    current: Mutex<Vec<MeshSender>>,
    /// Held while a connection is being opened, so that concurrent requests wait for it
    /// rather than each opening one.
    connecting: tokio::sync::Mutex<()>,
    /// A request came since the reaper last looked.
    used: AtomicBool,
}

impl std::fmt::Debug for H2cClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2cClient")
            .field("upstream", &self.inner.upstream)
            .finish_non_exhaustive()
    }
}

impl H2cClient {
    /// A client for the app at `upstream`, connecting from `source` when given, each connect
    /// bounded by `connect_timeout`. Nothing is opened until the first request. Inside a
    /// tokio runtime it starts the client's reaper, which closes the connection once it has
    /// carried no stream for [`IDLE`], and ends with the client.
    pub fn new(upstream: SocketAddr, source: Option<IpAddr>, connect_timeout: Duration) -> Self {
        Self::with_idle(upstream, source, connect_timeout, IDLE)
    }

    /// [`H2cClient::new`] with another idle time.
    pub fn with_idle(
        upstream: SocketAddr,
        source: Option<IpAddr>,
        connect_timeout: Duration,
        idle: Duration,
    ) -> Self {
        let inner = Arc::new(Inner {
            upstream,
            source,
            connect_timeout,
            current: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            used: AtomicBool::new(false),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&inner), idle));
        }
        Self { inner }
    }

    /// Sends `req` (absolute URI, hop-by-hop headers removed) on a new stream and waits for
    /// the response head. A request body that is not over with the head streams to the app
    /// from a task of its own, as on the mesh hop. The stream counts as open on its
    /// connection as long as the returned guard lives.
    ///
    /// A request the connection in use could no longer take (it had closed under us) goes
    /// out once more on a new connection; one that went out is never sent again. With a
    /// `timeout`, the wait for the response head is bounded as [`RequestTimeout`] says.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        timeout: Option<RequestTimeout>,
    ) -> Result<(Response<RecvStream>, StreamGuard), H2cError> {
        let upstream = self.inner.upstream;
        self.inner.used.store(true, Ordering::Relaxed);
        let mut fresh = false;
        loop {
            let sender = match self.inner.in_use() {
                Some(s) => s,
                None => {
                    fresh = true;
                    // Boxed: opening is rare, and its future would otherwise make every
                    // request's future larger.
                    Box::pin(self.inner.open()).await?
                }
            };
            match sender.send(req, timeout).await {
                Ok(r) => return Ok(r),
                Err(SendError::Unsent { request, source }) if !fresh => {
                    tracing::debug!(%upstream, error = %source,
                        "app h2c connection closed before the request went out; reconnecting");
                    req = *request;
                    fresh = true;
                }
                Err(SendError::Unsent { source, .. } | SendError::Failed(source)) => {
                    return Err(H2cError::Stream { upstream, source });
                }
                Err(SendError::TimedOut) => return Err(H2cError::TimedOut { upstream }),
            }
        }
    }
}

impl Inner {
    /// A sender on the first live connection with room for a stream under the app's limit.
    fn in_use(&self) -> Option<MeshSender> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current
            .iter()
            .find(|s| !s.is_closed() && s.has_room())
            .cloned()
    }

    /// The connection another request opened meanwhile, or a new one.
    async fn open(&self) -> Result<MeshSender, H2cError> {
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.in_use() {
            return Ok(s);
        }
        let upstream = self.upstream;
        let tcp = listen::connect(upstream, self.source, self.connect_timeout)
            .await
            .map_err(|source| H2cError::Connect { upstream, source })?;
        let sender = MeshSender::handshake(tcp, upstream, ())
            .await
            .map_err(|source| H2cError::Handshake { upstream, source })?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.retain(|s| !s.is_closed());
        current.push(sender.clone());
        Ok(sender)
    }
}

/// Every quarter of `idle`, looks at the connections in use; once the client has seen no
/// request for `idle`, closes those that carry no stream. Ends with the client. Dropping the
/// client's sender closes a connection: h2 ends a connection whose last handle and stream
/// are gone.
async fn reap(client: Weak<Inner>, idle: Duration) {
    let period = idle / 4;
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = client.upgrade() else {
            return;
        };
        let mut current = inner.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.retain(|s| !s.is_closed());
        let used = inner.used.swap(false, Ordering::Relaxed);
        if used || current.is_empty() {
            quiet = Duration::ZERO;
            continue;
        }
        quiet += period;
        if quiet >= idle {
            let before = current.len();
            current.retain(MeshSender::has_streams);
            if current.len() < before {
                tracing::debug!(upstream = %inner.upstream, closed = before - current.len(),
                    "closing idle app h2c connections");
            }
            quiet = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;

    /// An h2c app on loopback that answers every request with an empty 200, and counts the
    /// connections it was opened and the ones that ended.
    async fn app() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (o, e) = (opened.clone(), ended.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let e = e.clone();
                tokio::spawn(async move {
                    if let Ok(mut conn) = h2::server::handshake(tcp).await {
                        while let Some(Ok((_req, mut reply))) = conn.accept().await {
                            let _ = reply.send_response(Response::new(()), true);
                        }
                    }
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, opened, ended)
    }

    fn get(addr: SocketAddr) -> Request<Body> {
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
        req
    }

    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn requests_share_one_connection_which_closes_when_idle() {
        let (addr, opened, ended) = app().await;
        let idle = Duration::from_millis(200);
        let client = H2cClient::with_idle(addr, None, Duration::from_secs(5), idle);
        for _ in 0..3 {
            let (resp, _open) = client.send(get(addr), None).await.unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1, "one connection for all");
        wait_until("the idle connection closes", || {
            ended.load(Ordering::SeqCst) == 1
        })
        .await;
        let (resp, _open) = client.send(get(addr), None).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(opened.load(Ordering::SeqCst), 2, "a new connection after");
    }

    #[tokio::test]
    async fn a_connection_with_a_stream_open_stays() {
        let (addr, opened, ended) = app().await;
        let idle = Duration::from_millis(100);
        let client = H2cClient::with_idle(addr, None, Duration::from_secs(5), idle);
        let (resp, open) = client.send(get(addr), None).await.unwrap();
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(idle * 5).await;
        assert_eq!(ended.load(Ordering::SeqCst), 0, "closed with a stream open");
        drop((resp, open));
        wait_until("the connection closes once idle", || {
            ended.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }

    /// An app that takes at most two streams per connection: the third concurrent request
    /// opens a second connection instead of waiting for a stream to end.
    #[tokio::test]
    async fn a_full_connection_opens_another_under_the_apps_stream_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let o = opened.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::Builder::new()
                        .max_concurrent_streams(2)
                        .handshake::<_, bytes::Bytes>(tcp)
                        .await
                    else {
                        return;
                    };
                    let mut held = Vec::new();
                    while let Some(Ok((_req, mut reply))) = conn.accept().await {
                        // A head, and a body that stays open: the stream lives on.
                        if let Ok(body) = reply.send_response(Response::new(()), false) {
                            held.push(body);
                        }
                    }
                });
            }
        });
        let client = H2cClient::new(addr, None, Duration::from_secs(5));
        let mut open = Vec::new();
        for i in 0..3 {
            let sent =
                tokio::time::timeout(Duration::from_secs(5), client.send(get(addr), None)).await;
            let (resp, guard) = sent
                .unwrap_or_else(|_| panic!("request {i} waited behind the app's limit"))
                .unwrap();
            assert_eq!(resp.status(), 200);
            open.push((resp, guard));
        }
        assert_eq!(
            opened.load(Ordering::SeqCst),
            2,
            "two streams per connection"
        );
    }

    #[tokio::test]
    async fn an_app_that_is_not_there_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = H2cClient::new(addr, None, Duration::from_secs(5));
        match client.send(get(addr), None).await {
            Err(H2cError::Connect { upstream, .. }) => assert_eq!(upstream, addr),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
