//! The pool of mesh connections to endpoints: multiplexed HTTP/2 connections (mesh mTLS with
//! ALPN [`ALPN_H2`], or h2c with mTLS off), opened on first use and shared by every request and
//! every opaque-TCP tunnel ([`crate::http::opaque`]) to the endpoint.
//!
//! Requests use the endpoint's first live connection with room: fewer than
//! [`REQUEST_STREAMS_PER_CONNECTION`] streams open (a request's stream is open until its
//! response body ends, so long-lived gRPC streams, SSE and WebSockets fill a connection); when
//! every connection is that full, another opens, and requests never queue behind the peer's
//! stream limit. A tunnel lives as long as its app connection, so each connection carries at
//! most [`TUNNELS_PER_CONNECTION`] of them and more open another connection.
//!
//! The fast path (a live connection with room exists) takes no lock: connections sit in
//! `ArcSwap`'d lists. Only opening a connection takes the endpoint's async mutex, so
//! concurrent first requests open one connection, not many; when that attempt fails, the
//! requests that waited for it fail at once (and try another endpoint) rather than each
//! trying again in turn, which made the n-th wait n connect timeouts. A connection that closes (peer
//! gone, GOAWAY, idle too long on the peer's side) is replaced on the next request.

use crate::balance::EndpointState;
use crate::datapath::Shared;
use crate::datapath_metrics::OUTBOUND;
use crate::http::mesh_stream::MeshSender;
use crate::listen;
use crate::mesh_tls::ALPN_H2;
use arc_swap::ArcSwap;
use rustls_pki_types::ServerName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

/// Why no connection to an endpoint could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed or timed out.
    #[error("connect to {endpoint} failed: {source}")]
    Connect {
        /// The endpoint.
        endpoint: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The mesh TLS handshake failed or timed out, or no certificate is at hand yet.
    #[error("mesh TLS to {endpoint} ({service}) failed: {reason}")]
    Tls {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The service it had to prove to be.
        service: String,
        /// Why.
        reason: String,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake with {endpoint} failed: {source}")]
    Http2 {
        /// The endpoint.
        endpoint: SocketAddr,
        /// Why.
        source: h2::Error,
    },
    /// The attempt to connect that this request waited for failed: it is not repeated at
    /// once by every request that queued behind it, each waiting its own timeout.
    #[error("connect to {endpoint} failed just now")]
    JustFailed {
        /// The endpoint.
        endpoint: SocketAddr,
    },
    /// A fresh connection had no room for a tunnel (cannot happen unless the limit is 0).
    #[error("no tunnel slot on a new connection to {endpoint}")]
    Exhausted {
        /// The endpoint.
        endpoint: SocketAddr,
    },
}

/// The most opaque-TCP tunnels one pooled connection carries; more open another connection.
/// Requests share the connection's other streams (up to [`MAX_STREAMS_PER_CONNECTION`]).
pub const TUNNELS_PER_CONNECTION: usize = 100;

/// The most concurrent streams a proxy accepts on one mesh connection (`SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The most open streams a connection may have for a request to be put on it: a little under
/// the peer's limit, since the count and the peer's view of it differ by the streams in flight.
pub const REQUEST_STREAMS_PER_CONNECTION: usize = MAX_STREAMS_PER_CONNECTION as usize - 16;

/// One pooled connection: the service its peer proved to be, the sender for its streams,
/// and how many opaque-TCP tunnels hold a stream on it.
struct Conn {
    service: Box<str>,
    sender: MeshSender,
    tunnels: AtomicUsize,
}

impl Conn {
    fn usable_for(&self, service: &str) -> bool {
        !self.sender.is_closed() && &*self.service == service
    }

    /// Takes a tunnel slot when fewer than [`TUNNELS_PER_CONNECTION`] are taken.
    fn take_tunnel(self: &Arc<Self>) -> Option<TunnelSlot> {
        self.tunnels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < TUNNELS_PER_CONNECTION).then_some(n + 1)
            })
            .ok()
            .map(|_| TunnelSlot { conn: self.clone() })
    }
}

/// A tunnel's claim on one stream of a pooled connection; gives the slot back when dropped.
pub(crate) struct TunnelSlot {
    conn: Arc<Conn>,
}

impl TunnelSlot {
    /// The sender of the connection the slot is on.
    pub(crate) fn sender(&self) -> MeshSender {
        self.conn.sender.clone()
    }
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.conn.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Entry {
    /// The live connections, oldest first. Requests use the first with room; tunnels spread
    /// over as many as they need.
    conns: ArcSwap<Vec<Arc<Conn>>>,
    connecting: tokio::sync::Mutex<()>,
    /// Failed attempts to connect so far: a request that waited for `connecting` while an
    /// attempt failed fails too, instead of trying again after it.
    failures: AtomicU64,
}

impl Entry {
    /// The first live connection with room for a request.
    fn first_with_room(&self, service: &str) -> Option<Arc<Conn>> {
        self.conns
            .load()
            .iter()
            .find(|c| c.usable_for(service) && c.sender.streams() < REQUEST_STREAMS_PER_CONNECTION)
            .cloned()
    }

    fn tunnel_slot(&self, service: &str) -> Option<TunnelSlot> {
        self.conns
            .load()
            .iter()
            .filter(|c| c.usable_for(service))
            .find_map(Conn::take_tunnel)
    }

    /// Opens a connection unless one opened (then `None`), or an attempt failed, while this
    /// request waited its turn; the caller holds `connecting`.
    async fn open_after_wait(
        &self,
        failures_before: u64,
        shared: &Shared,
        mesh: &str,
        mtls: bool,
        service: &str,
        endpoint: &EndpointState,
    ) -> Result<Arc<Conn>, ConnectError> {
        if self.failures.load(Ordering::Acquire) != failures_before {
            return Err(ConnectError::JustFailed {
                endpoint: endpoint.addr,
            });
        }
        match open(shared, mesh, mtls, service, endpoint).await {
            Ok(conn) => {
                self.add(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    fn is_live(&self) -> bool {
        self.conns.load().iter().any(|c| !c.sender.is_closed())
    }

    /// Adds a new connection and forgets closed ones.
    fn add(&self, conn: Arc<Conn>) {
        let mut next: Vec<Arc<Conn>> = self
            .conns
            .load()
            .iter()
            .filter(|c| !c.sender.is_closed())
            .cloned()
            .collect();
        next.push(conn);
        self.conns.store(Arc::new(next));
    }
}

/// Pooled HTTP/2 connections to mesh endpoints, keyed by endpoint and whether mTLS is on.
#[derive(Default)]
pub struct MeshPool {
    entries: ArcSwap<HashMap<(SocketAddr, bool), Arc<Entry>>>,
    insert: Mutex<()>,
}

impl std::fmt::Debug for MeshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshPool")
            .field("endpoints", &self.entries.load().len())
            .finish()
    }
}

impl MeshPool {
    fn entry(&self, key: (SocketAddr, bool)) -> Arc<Entry> {
        if let Some(e) = self.entries.load().get(&key) {
            return e.clone();
        }
        let _g = self.insert.lock();
        let map = self.entries.load_full();
        if let Some(e) = map.get(&key) {
            return e.clone();
        }
        let mut next: HashMap<_, _> = (*map).clone();
        // Forget endpoints whose connections are gone, so the map does not grow forever; keep
        // those being connected, or a concurrent request would open a second connection.
        next.retain(|_, e: &mut Arc<Entry>| e.connecting.try_lock().is_err() || e.is_live());
        let e = Arc::new(Entry {
            conns: ArcSwap::from_pointee(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            failures: AtomicU64::new(0),
        });
        next.insert(key, e.clone());
        self.entries.store(Arc::new(next));
        e
    }

    /// A sender on the connection to `endpoint`, which must prove to be `service`; opens the
    /// connection when there is none. Connect outcomes feed the endpoint's ejection state.
    pub(crate) async fn get(
        &self,
        shared: &Arc<Shared>,
        mesh: &str,
        mtls: bool,
        service: &str,
        endpoint: &Arc<EndpointState>,
    ) -> Result<MeshSender, ConnectError> {
        let entry = self.entry((endpoint.addr, mtls));
        if let Some(c) = entry.first_with_room(service) {
            return Ok(c.sender.clone());
        }
        // In a task of its own, which also keeps opening (a future of some kilobytes) out of
        // every request's future: the attempt runs to its end, and records its outcome
        // (ejection, and the failure the requests queued behind it take), even when the
        // request that started it gives up first (its deadline).
        let failures = entry.failures.load(Ordering::Acquire);
        let addr = endpoint.addr;
        let (shared, endpoint) = (Arc::clone(shared), Arc::clone(endpoint));
        let (mesh, service) = (mesh.to_string(), service.to_string());
        let opening = tokio::spawn(async move {
            let _connecting = entry.connecting.lock().await;
            if let Some(c) = entry.first_with_room(&service) {
                return Ok(c.sender.clone());
            }
            let conn = entry
                .open_after_wait(failures, &shared, &mesh, mtls, &service, &endpoint)
                .await?;
            Ok(conn.sender.clone())
        });
        opening
            .await
            .unwrap_or(Err(ConnectError::JustFailed { endpoint: addr }))
    }

    /// A stream slot for an opaque-TCP tunnel to `endpoint`: on a connection with fewer than
    /// [`TUNNELS_PER_CONNECTION`] tunnels, or on a new one. Long-lived tunnels must not wait
    /// for each other to end, so they never queue behind a connection's stream limit.
    pub(crate) async fn tunnel(
        &self,
        shared: &Shared,
        mesh: &str,
        service: &str,
        endpoint: &EndpointState,
    ) -> Result<TunnelSlot, ConnectError> {
        let entry = self.entry((endpoint.addr, true));
        if let Some(slot) = entry.tunnel_slot(service) {
            return Ok(slot);
        }
        let failures = entry.failures.load(Ordering::Acquire);
        let _connecting = entry.connecting.lock().await;
        if let Some(slot) = entry.tunnel_slot(service) {
            return Ok(slot);
        }
        let conn = entry
            .open_after_wait(failures, shared, mesh, true, service, endpoint)
            .await?;
        conn.take_tunnel().ok_or(ConnectError::Exhausted {
            endpoint: endpoint.addr,
        })
    }
}

/// Opens a connection and records the outcome in the endpoint's ejection state.
async fn open(
    shared: &Shared,
    mesh: &str,
    mtls: bool,
    service: &str,
    endpoint: &EndpointState,
) -> Result<Arc<Conn>, ConnectError> {
    match connect(shared, mesh, mtls, service, endpoint.addr).await {
        Ok(sender) => {
            endpoint.connect_succeeded();
            Ok(Arc::new(Conn {
                service: service.into(),
                sender,
                tunnels: AtomicUsize::new(0),
            }))
        }
        Err(e) => {
            endpoint.connect_failed();
            Err(e)
        }
    }
}

async fn connect(
    shared: &Shared,
    mesh: &str,
    mtls: bool,
    service: &str,
    endpoint: SocketAddr,
) -> Result<MeshSender, ConnectError> {
    let tcp = listen::connect(endpoint, None, shared.opts.connect_timeout)
        .await
        .map_err(|source| ConnectError::Connect { endpoint, source })?;
    let own = shared.own.register(&tcp);
    if !mtls {
        return handshake(tcp, own, endpoint).await;
    }
    let tls_err = |reason: String| ConnectError::Tls {
        endpoint,
        service: service.to_string(),
        reason,
    };
    let Some(config) = shared.tls.client_config(mesh, service, ALPN_H2) else {
        shared.metrics.tls_failure(OUTBOUND);
        return Err(tls_err("no mesh certificate yet".into()));
    };
    let name = ServerName::IpAddress(endpoint.ip().into());
    let connecting = TlsConnector::from(config).connect(name, tcp);
    let tls = match tokio::time::timeout(shared.opts.handshake_timeout, connecting).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.metrics.tls_failure(OUTBOUND);
            return Err(tls_err(e.to_string()));
        }
        Err(_) => {
            shared.metrics.tls_failure(OUTBOUND);
            return Err(tls_err("handshake timed out".into()));
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
        return Err(tls_err(
            "the peer does not speak the mesh's HTTP/2 transport".into(),
        ));
    }
    // Boxed: hyper's per-request task is an enum sized like its connection task, which holds
    // the I/O inline, and a TLS stream is over a kilobyte. Behind a box, every request's task
    // is 1.1 KB smaller to allocate and move (2,528 → 1,432 bytes in a release build).
    handshake(Box::new(tls), own, endpoint).await
}

async fn handshake<I>(
    io: I,
    own: listen::OwnSocketEntry,
    endpoint: SocketAddr,
) -> Result<MeshSender, ConnectError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    MeshSender::handshake(io, endpoint, own)
        .await
        .map_err(|source| ConnectError::Http2 { endpoint, source })
}
