//! The inbound proxy's h2c connection to its local app: one multiplexed HTTP/2 connection
//! (prior knowledge), driven through `h2` directly by the same [`MeshSender`] that carries the
//! mesh hop.
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
//! request; a request that did not go out on it goes out on the new one. Its settings and
//! its writes, gathered per turn, are the mesh hop's ([`MeshSender::handshake`]).

use crate::http::body::Body;
use crate::http::mesh_stream::{MeshSender, SendError, StreamGuard};
use crate::listen;
use h2::RecvStream;
use http::{Request, Response};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
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
    /// The connection in use, while it takes new streams.
    current: Mutex<Option<MeshSender>>,
    /// Held while a connection is being opened, so that concurrent requests wait for it
    /// rather than each opening one.
    connecting: tokio::sync::Mutex<()>,
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
    /// bounded by `connect_timeout`. Nothing is opened until the first request.
    pub fn new(upstream: SocketAddr, source: Option<IpAddr>, connect_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                upstream,
                source,
                connect_timeout,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Sends `req` (absolute URI, hop-by-hop headers removed) on a new stream and waits for
    /// the response head. A request body that is not over with the head streams to the app
    /// from a task of its own, as on the mesh hop. The stream counts as open on its
    /// connection as long as the returned guard lives.
    ///
    /// A request the connection in use could no longer take (it had closed under us) goes
    /// out once more on a new connection; one that went out is never sent again.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<(Response<RecvStream>, StreamGuard), H2cError> {
        let upstream = self.inner.upstream;
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
            match sender.send(req).await {
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
            }
        }
    }
}

impl Inner {
    /// A sender on the connection in use, unless there is none or it takes no new streams.
    fn in_use(&self) -> Option<MeshSender> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.as_ref().filter(|s| !s.is_closed()).cloned()
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
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
        Ok(sender)
    }
}
