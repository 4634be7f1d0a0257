//! The data path as one object: it owns the listeners a config asks for, hands each accepted
//! connection to [`crate::outbound`] or [`crate::inbound`], and swaps configs under
//! established connections, which keep going unless the new rules refuse them.
//!
//! ```no_run
//! # async fn run(snapshot: weft_api::proto::Snapshot) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use weft_proxy::{DataPath, DataPathOptions, ProxyConfig};
//! use weft_proxy::{datapath_metrics::DataPathMetrics, drain::Drain, mesh_tls::NoMeshTls};
//!
//! let metrics = DataPathMetrics::new(); // metrics.register(&mut registry)
//! let drain = Drain::new();
//! let config = ProxyConfig::from_snapshot(&snapshot)?; // Err: NACK with its message
//! let datapath = DataPath::start(config, Arc::new(NoMeshTls), metrics, drain.clone(),
//!     DataPathOptions::default())?;
//! // Later snapshots: datapath.apply(ProxyConfig::from_snapshot(&next)?)?;
//! weft_proxy::drain::shutdown_signal().await?;
//! drain.drain(std::time::Duration::from_secs(30)).await;
//! # Ok(()) }
//! ```

use crate::config::{ListenerKind, ProxyConfig};
use crate::datapath_metrics::DataPathMetrics;
use crate::detect::DEFAULT_DETECT_TIMEOUT;
use crate::drain::Drain;
use crate::listen::{self, OrigDst, OwnSockets, SoOriginalDst};
use crate::mesh_tls::MeshTls;
use crate::{DataPathError, inbound, outbound};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Tunables of the data path that do not come from the control plane.
#[derive(Clone)]
pub struct DataPathOptions {
    /// How long protocol detection (and the PERMISSIVE TLS check) waits for the client's
    /// first bytes.
    pub detect_timeout: Duration,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Mesh TLS handshake timeout.
    pub handshake_timeout: Duration,
    /// How long an HTTP request may wait for its response head (504 after).
    pub request_timeout: Duration,
    /// How long an app's HTTP connection may move no byte before it is closed.
    pub idle_timeout: Duration,
    /// How long a response body from the mesh may bring no frame before its stream is reset
    /// (Kuma's `streamIdleTimeout`).
    pub stream_idle_timeout: Duration,
    /// The address transparent listeners bind (normally `0.0.0.0`).
    pub transparent_ip: IpAddr,
    /// Also bind transparent listeners on `[::]` (v6-only), when the host allows.
    pub transparent_ipv6: bool,
    /// Reads the original destination of redirected connections.
    pub orig_dst: Arc<dyn OrigDst>,
}

impl Default for DataPathOptions {
    fn default() -> Self {
        Self {
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            request_timeout: crate::http::REQUEST_TIMEOUT,
            idle_timeout: crate::http::IDLE_TIMEOUT,
            stream_idle_timeout: crate::http::STREAM_IDLE_TIMEOUT,
            transparent_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            transparent_ipv6: true,
            orig_dst: Arc::new(SoOriginalDst),
        }
    }
}

impl std::fmt::Debug for DataPathOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPathOptions")
            .field("detect_timeout", &self.detect_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("transparent_ip", &self.transparent_ip)
            .field("transparent_ipv6", &self.transparent_ipv6)
            .finish_non_exhaustive()
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) config: ArcSwap<ProxyConfig>,
    pub(crate) tls: Arc<dyn MeshTls>,
    pub(crate) metrics: DataPathMetrics,
    pub(crate) opts: DataPathOptions,
    pub(crate) drain: Drain,
    pub(crate) own: OwnSockets,
    /// Pooled HTTP/2 connections to mesh endpoints.
    pub(crate) pool: crate::http::pool::MeshPool,
    /// Pooled HTTP clients to the local apps.
    pub(crate) app_clients: crate::http::inbound::AppClientRegistry,
    /// What the proxy learned of each endpoint (latency, ejection).
    pub(crate) endpoints: Arc<crate::balance::EndpointStates>,
    /// Bumped each time a config is applied; see [`Shared::revoked`].
    pub(crate) config_changes: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Resolves as soon as the config in force, now or after a later change, no longer
    /// `allows` a connection. An opaque connection is let in once, by the rules of when it
    /// arrived; this is what cuts it when those rules change under it (a revoked permission,
    /// mTLS made STRICT under a plaintext caller, its inbound removed), as requests on an
    /// HTTP connection are each checked again.
    pub(crate) fn revoked<F>(&self, allows: F) -> impl Future<Output = ()> + use<'_, F>
    where
        F: Fn(&ProxyConfig) -> bool,
    {
        let mut changes = self.config_changes.subscribe();
        // The config may have changed since the connection was let in: look at it at once.
        changes.mark_changed();
        async move {
            loop {
                if changes.changed().await.is_err() {
                    // No config can be applied any more.
                    return std::future::pending().await;
                }
                if !allows(&self.config.load()) {
                    return;
                }
            }
        }
    }
}

type ListenerKey = (SocketAddr, ListenerKind);

/// The running data path.
pub struct DataPath {
    shared: Arc<Shared>,
    listeners: Mutex<BTreeMap<ListenerKey, (SocketAddr, CancellationToken)>>,
}

impl DataPath {
    /// Binds the listeners `config` asks for and starts serving. Must run inside a tokio
    /// runtime. Fails when a listener cannot be bound.
    pub fn start(
        config: ProxyConfig,
        tls: Arc<dyn MeshTls>,
        metrics: DataPathMetrics,
        drain: Drain,
        opts: DataPathOptions,
    ) -> Result<Self, DataPathError> {
        let desired = desired_listeners(&config, &opts);
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(config),
            tls,
            metrics,
            opts,
            drain,
            own: OwnSockets::default(),
            pool: Default::default(),
            app_clients: Default::default(),
            endpoints: Default::default(),
            config_changes: tokio::sync::watch::Sender::new(0),
        });
        let dp = DataPath {
            shared,
            listeners: Mutex::new(BTreeMap::new()),
        };
        dp.reconcile(desired, None)?;
        Ok(dp)
    }

    /// Applies a new config: new connections use it at once. Established HTTP connections
    /// follow it from their next request; established opaque ones keep going unless it no
    /// longer lets them in (they are then closed).
    /// Listeners the new config adds are bound first; if one cannot be bound, nothing changes
    /// and the error says which. Listeners it drops stop accepting.
    pub fn apply(&self, config: ProxyConfig) -> Result<(), DataPathError> {
        let desired = desired_listeners(&config, &self.shared.opts);
        self.reconcile(desired, Some(config))
    }

    /// The config in use.
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.shared.config.load_full()
    }

    /// The listeners running: (configured address, kind, bound address).
    pub fn listeners(&self) -> Vec<(SocketAddr, ListenerKind, SocketAddr)> {
        self.listeners
            .lock()
            .map(|l| l.iter().map(|((a, k), (b, _))| (*a, *k, *b)).collect())
            .unwrap_or_default()
    }

    /// Endpoint state to build the next config with ([`ProxyConfig::from_snapshot_with`]), so
    /// latency estimates and ejections survive config changes.
    pub fn endpoint_states(&self) -> Arc<crate::balance::EndpointStates> {
        self.shared.endpoints.clone()
    }

    /// The metrics the data path counts into.
    pub fn metrics(&self) -> &DataPathMetrics {
        &self.shared.metrics
    }

    fn reconcile(
        &self,
        desired: Vec<(ListenerKey, bool)>,
        config: Option<ProxyConfig>,
    ) -> Result<(), DataPathError> {
        let mut running = self.listeners.lock().map_err(|_| DataPathError::Poisoned)?;
        // Bind what is new before changing anything.
        let mut bound = Vec::new();
        for ((addr, kind), optional) in &desired {
            if running.contains_key(&(*addr, *kind)) {
                continue;
            }
            match listen::bind(*addr) {
                Ok(l) => bound.push(((*addr, *kind), l)),
                Err(e) if *optional => {
                    tracing::debug!(%addr, error = %e, "optional listener not bound");
                }
                Err(source) => {
                    return Err(DataPathError::Bind {
                        addr: *addr,
                        kind: *kind,
                        source,
                    });
                }
            }
        }
        if let Some(config) = config {
            let config = Arc::new(config);
            self.shared.config.store(config.clone());
            // After the store: a connection accepted under the old config could otherwise
            // put back a client for an app the new one dropped.
            self.shared
                .app_clients
                .retain_upstreams(|up| config.inbounds.values().any(|i| i.upstream == up));
            self.shared
                .config_changes
                .send_modify(|generation| *generation = generation.wrapping_add(1));
        }
        running.retain(|key, (_, stop)| {
            let keep = desired.iter().any(|(k, _)| k == key);
            if !keep {
                tracing::info!(addr = %key.0, kind = ?key.1, "listener stopped");
                stop.cancel();
            }
            keep
        });
        for (key, listener) in bound {
            let stop = CancellationToken::new();
            let local = listener.local_addr().unwrap_or(key.0);
            tracing::info!(addr = %local, kind = ?key.1, "listening");
            running.insert(key, (local, stop.clone()));
            tokio::spawn(accept_loop(
                listener,
                key.1,
                local,
                self.shared.clone(),
                stop,
            ));
        }
        Ok(())
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        if let Ok(l) = self.listeners.lock() {
            for (_, stop) in l.values() {
                stop.cancel();
            }
        }
    }
}

/// The listeners a config asks for, each marked optional (the `[::]` twins of transparent
/// listeners, bound when the host has IPv6).
fn desired_listeners(config: &ProxyConfig, opts: &DataPathOptions) -> Vec<(ListenerKey, bool)> {
    let mut out = Vec::new();
    for (addr, kind) in config.listeners(opts.transparent_ip) {
        out.push(((addr, kind), false));
        let transparent = matches!(
            kind,
            ListenerKind::TransparentInbound | ListenerKind::TransparentOutbound
        );
        if transparent && opts.transparent_ipv6 && opts.transparent_ip == Ipv4Addr::UNSPECIFIED {
            out.push((
                (
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addr.port()),
                    kind,
                ),
                true,
            ));
        }
    }
    out
}

async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    local: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = shared.drain.draining() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let sh = shared.clone();
        let fut = async move {
            match kind {
                ListenerKind::TransparentOutbound => outbound::transparent(sh, stream, peer).await,
                ListenerKind::Outbound => outbound::explicit(sh, stream, local).await,
                ListenerKind::TransparentInbound => inbound::transparent(sh, stream, peer).await,
                ListenerKind::Inbound => inbound::explicit(sh, stream, local).await,
            }
        };
        shared.drain.spawn(fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_futures_stay_small() {
        let snap = weft_api::proto::Snapshot {
            dataplane: Some(weft_api::proto::DataplaneIdentity {
                mesh: "m".into(),
                address: "127.0.0.1".into(),
                ..Default::default()
            }),
            mesh: Some(Default::default()),
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(ProxyConfig::from_snapshot(&snap).unwrap()),
            tls: Arc::new(crate::mesh_tls::NoMeshTls),
            metrics: DataPathMetrics::new(),
            opts: DataPathOptions::default(),
            drain: Drain::new(),
            own: OwnSockets::default(),
            pool: Default::default(),
            app_clients: Default::default(),
            endpoints: Default::default(),
            config_changes: tokio::sync::watch::Sender::new(0),
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let s = || async { tokio::net::TcpStream::connect(a).await.unwrap() };
        // Every idle connection holds its task's future: keep set-up state and TLS sessions
        // boxed so that this stays small (it was 4.3 KiB before they were).
        let sizes = [
            std::mem::size_of_val(&outbound::explicit(shared.clone(), s().await, a)),
            std::mem::size_of_val(&outbound::transparent(shared.clone(), s().await, a)),
            std::mem::size_of_val(&inbound::explicit(shared.clone(), s().await, a)),
            std::mem::size_of_val(&inbound::transparent(shared.clone(), s().await, a)),
        ];
        eprintln!("connection futures: {sizes:?}");
        assert!(
            sizes.iter().all(|s| *s <= 1536),
            "connection futures grew: {sizes:?}"
        );
    }
}
