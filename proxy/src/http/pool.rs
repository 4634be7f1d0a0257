//! The pool of mesh connections to endpoints: one multiplexed HTTP/2 connection per endpoint,
//! opened on first use (mesh mTLS with ALPN [`ALPN_H2`], or h2c with mTLS off) and shared by
//! every request to it.
//!
//! The fast path (a live connection exists) takes no lock: connections sit in an `ArcSwap`'d
//! map. Only opening a connection takes the endpoint's async mutex, so concurrent first
//! requests open one connection, not many. A connection that closes (peer gone, GOAWAY,
//! idle too long on the peer's side) is replaced on the next request.

use crate::balance::EndpointState;
use crate::datapath::Shared;
use crate::datapath_metrics::OUTBOUND;
use crate::http::body::Body;
use crate::listen;
use crate::mesh_tls::ALPN_H2;
use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
        source: hyper::Error,
    },
}

struct Entry {
    /// The live connection and the service its peer proved to be.
    current: ArcSwapOption<(Box<str>, SendRequest<Body>)>,
    connecting: tokio::sync::Mutex<()>,
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
        // Forget endpoints whose connection is gone, so the map does not grow forever; keep
        // those being connected, or a concurrent request would open a second connection.
        next.retain(|_, e: &mut Arc<Entry>| {
            e.connecting.try_lock().is_err()
                || e.current.load().as_ref().is_some_and(|c| !c.1.is_closed())
        });
        let e = Arc::new(Entry {
            current: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        });
        next.insert(key, e.clone());
        self.entries.store(Arc::new(next));
        e
    }

    /// A sender on the connection to `endpoint`, which must prove to be `service`; opens the
    /// connection when there is none. Connect outcomes feed the endpoint's ejection state.
    pub(crate) async fn get(
        &self,
        shared: &Shared,
        mesh: &str,
        mtls: bool,
        service: &str,
        endpoint: &EndpointState,
    ) -> Result<SendRequest<Body>, ConnectError> {
        let entry = self.entry((endpoint.addr, mtls));
        let live = |e: &Entry| {
            e.current
                .load()
                .as_ref()
                .filter(|c| !c.1.is_closed() && &*c.0 == service)
                .map(|c| c.1.clone())
        };
        if let Some(s) = live(&entry) {
            return Ok(s);
        }
        let _connecting = entry.connecting.lock().await;
        if let Some(s) = live(&entry) {
            return Ok(s);
        }
        match connect(shared, mesh, mtls, service, endpoint.addr).await {
            Ok(s) => {
                endpoint.connect_succeeded();
                entry
                    .current
                    .store(Some(Arc::new((service.into(), s.clone()))));
                Ok(s)
            }
            Err(e) => {
                endpoint.connect_failed();
                Err(e)
            }
        }
    }
}

async fn connect(
    shared: &Shared,
    mesh: &str,
    mtls: bool,
    service: &str,
    endpoint: SocketAddr,
) -> Result<SendRequest<Body>, ConnectError> {
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
    handshake(tls, own, endpoint).await
}

async fn handshake<I>(
    io: I,
    own: listen::OwnSocketEntry,
    endpoint: SocketAddr,
) -> Result<SendRequest<Body>, ConnectError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Fixed windows: adaptive windows cost a PING per data burst, and the bandwidth-delay
        // product between two sidecars is small.
        .initial_stream_window_size(crate::http::STREAM_WINDOW)
        .initial_connection_window_size(crate::http::CONNECTION_WINDOW)
        .max_header_list_size(crate::http::MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(20))
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| ConnectError::Http2 { endpoint, source })?;
    tokio::spawn(async move {
        let _own = own;
        if let Err(e) = conn.await {
            tracing::debug!(%endpoint, error = %e, "mesh HTTP/2 connection ended");
        }
    });
    Ok(sender)
}
