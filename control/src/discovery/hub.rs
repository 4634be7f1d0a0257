//! The hub: which proxies are connected, what each was last sent and acknowledged, and the
//! shared [`Views`] that every stream builds its snapshots from.
//!
//! One reloader task rebuilds the views when the store changes (debounced, so a burst of
//! writes costs one reload) and publishes them on a `watch` channel; each stream wakes, builds
//! its proxy's snapshot from the new view, and sends it only if its version changed.
//!
//! Which proxy is online where lives in the store too (`Store::claim_proxy` and friends), so
//! that control-plane replicas sharing a store agree: a name online at one replica is refused
//! at another, and a proxy whose stream broke at one replica is offline (its endpoints
//! unhealthy) in every replica's views. Each replica leases its proxies for
//! [`PRESENCE_LEASE`] and renews the leases while it runs; the proxies of a replica that is
//! gone count as offline once their leases run out. With each renewal a replica also publishes
//! its proxies' insights (what [`ProxyStatus`] holds) to the store, so that every replica can
//! answer `dataplanes+insights` for every proxy ([`Hub::insight`]).

use super::snapshot::{self, EncodedSnapshot};
use super::view::{self, MeshView, TrustSource, Views};
use crate::store::{InsightUpdate, PublishedInsight, Store};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use weft_api::DataplaneSpec;
use weft_api::proto::{ProxyStats, Snapshot};

/// How long the reloader waits for more changes before rebuilding the views.
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often the reloader checks the store revision without a notification (another
/// control-plane replica may have written).
pub const POLL: Duration = Duration::from_secs(1);
/// How long a replica's claim on a connected proxy lasts without renewal.
pub const PRESENCE_LEASE: Duration = Duration::from_secs(15);
/// How often a replica renews the leases of its proxies.
pub const PRESENCE_RENEWAL: Duration = Duration::from_secs(5);

/// What the control plane knows about one proxy.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// Whether its stream is open.
    pub online: bool,
    /// When the current (or last) stream opened, RFC 3339.
    pub connected_since: Option<String>,
    /// When the stream was last seen alive, RFC 3339.
    pub last_seen: Option<String>,
    /// The proxy's version string.
    pub proxy_version: String,
    /// The last snapshot version sent.
    pub sent_version: Option<String>,
    /// The last snapshot version the proxy acknowledged.
    pub acked_version: Option<String>,
    /// The last NACK: version and reason.
    pub last_nack: Option<String>,
    /// Snapshots sent on the current stream.
    pub snapshots_sent: u64,
    /// When the proxy's certificate expires, RFC 3339 (set by the identity service).
    pub cert_expiry: Option<String>,
    /// The control-plane replica the proxy is (or was last) connected to (Kuma's name for
    /// it); with one replica, always its own id.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub control_plane_instance_id: String,
    /// The proxy's latest traffic report (kept across reconnects and while offline).
    pub stats: Option<StatsReport>,
    /// Identifies the stream that owns this entry.
    #[serde(skip)]
    pub stream_id: u64,
    /// What the last snapshot sent was built from.
    #[serde(skip)]
    pub last_sent: Option<SentSnapshot>,
}

/// A proxy's traffic totals since it started, as it last reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsReport {
    /// HTTP requests handled (0 from a proxy without an L7 layer).
    pub requests_total: u64,
    /// Of those, 5xx answers and requests that failed without one.
    pub request_errors_total: u64,
    /// Connections accepted, inbound and outbound.
    pub connections_total: u64,
    /// Connections open at the time of the report.
    pub connections_active: u64,
    /// Bytes forwarded downstream to upstream.
    pub bytes_sent: u64,
    /// Bytes forwarded upstream to downstream.
    pub bytes_received: u64,
    /// When the control plane received the report, RFC 3339.
    pub reported_at: String,
}

impl StatsReport {
    /// The report of `stats`, received now.
    pub fn received(stats: &ProxyStats) -> StatsReport {
        StatsReport {
            requests_total: stats.requests_total,
            request_errors_total: stats.request_errors_total,
            connections_total: stats.connections_total,
            connections_active: stats.connections_active,
            bytes_sent: stats.bytes_sent,
            bytes_received: stats.bytes_received,
            reported_at: now_rfc3339(),
        }
    }
}

/// The last snapshot sent to a proxy, kept as what it was built from rather than as the
/// snapshot itself. A snapshot lists every endpoint of its mesh, so keeping one per proxy
/// made memory grow with the square of the proxies (about 1 GiB at 1,000 proxies in one
/// mesh); the view is shared by every stream of the mesh, and building is pure, so
/// [`SentSnapshot::snapshot`] gives back the same bytes.
#[derive(Debug, Clone)]
pub struct SentSnapshot {
    /// The mesh.
    pub mesh: String,
    /// The dataplane's name.
    pub name: String,
    /// The Dataplane as registered (the view's copy wins when the view holds one).
    pub registered: Arc<DataplaneSpec>,
    /// The mesh view. Refreshed to the newest view while the content stays the same, so
    /// streams do not keep old views alive.
    pub view: Arc<MeshView>,
    /// The nonce it was sent with.
    pub nonce: String,
}

impl SentSnapshot {
    /// The snapshot as it was sent.
    pub fn snapshot(&self) -> Snapshot {
        let dp = self
            .view
            .dataplanes
            .get(&self.name)
            .unwrap_or(&self.registered);
        let mut snap = snapshot::build_message(&self.mesh, &self.name, dp, &self.view);
        snap.nonce = self.nonce.clone();
        snap
    }
}

/// Shared discovery state.
pub struct Hub {
    pub(crate) store: Arc<dyn Store>,
    trust: Arc<dyn TrustSource>,
    views_tx: watch::Sender<Arc<Views>>,
    reload_tx: watch::Sender<u64>,
    proxies: Mutex<HashMap<(String, String), ProxyStatus>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// This replica's id in the store's presence records.
    replica: String,
    /// The insights this replica last published to the store, as JSON, so that only the
    /// ones that changed are written again.
    published: Mutex<HashMap<(String, String), String>>,
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Now, in Unix milliseconds (the presence leases' clock).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A lease that ends [`PRESENCE_LEASE`] after `now_ms`.
fn lease_end(now_ms: i64) -> i64 {
    now_ms.saturating_add(i64::try_from(PRESENCE_LEASE.as_millis()).unwrap_or(i64::MAX))
}

/// Offline proxies as `view::load` takes them: names by mesh.
fn by_mesh(pairs: Vec<(String, String)>) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (mesh, name) in pairs {
        out.entry(mesh).or_default().push(name);
    }
    out
}

/// A replica id nobody else has: 64 random bits, in hex.
pub fn new_replica_id() -> String {
    let mut bytes = [0u8; 8];
    // The system's generator does not fail on Linux; a zero id would still work alone.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    format!(
        "cp-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

impl Hub {
    /// A hub over `store` that records its proxies' presence as replica `replica` (kept
    /// across restarts, so that a restarted replica takes its proxies back at once); call
    /// [`Hub::spawn_reloader`] to keep its views current.
    pub fn new(store: Arc<dyn Store>, trust: Arc<dyn TrustSource>, replica: String) -> Arc<Hub> {
        let (views_tx, _) = watch::channel(Arc::new(Views::default()));
        let (reload_tx, _) = watch::channel(0);
        Arc::new(Hub {
            store,
            trust,
            views_tx,
            reload_tx,
            proxies: Mutex::new(HashMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            replica,
            published: Mutex::new(HashMap::new()),
        })
    }

    /// This replica's id in the store (`<data-dir>/replica-id`).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Records in the store that (mesh, name) is online here. `Ok(Some(replica))`: it is
    /// online at another replica, and nothing was recorded.
    pub(crate) async fn claim_presence(
        &self,
        mesh: &str,
        name: &str,
    ) -> Result<Option<String>, String> {
        let store = self.store.clone();
        let (mesh, name, replica) = (mesh.to_string(), name.to_string(), self.replica.clone());
        tokio::task::spawn_blocking(move || {
            let now = now_ms();
            store.claim_proxy(&mesh, &name, &replica, now, lease_end(now))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Records in the store that the stream of (mesh, name) here ended.
    pub(crate) async fn release_presence(&self, mesh: &str, name: &str, graceful: bool) {
        let store = self.store.clone();
        let (m, n, replica) = (mesh.to_string(), name.to_string(), self.replica.clone());
        let released =
            tokio::task::spawn_blocking(move || store.release_proxy(&m, &n, &replica, graceful))
                .await;
        match released {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(%mesh, %name, error = %e, "cannot record that the dataplane left")
            }
            Err(e) => {
                tracing::warn!(%mesh, %name, error = %e, "cannot record that the dataplane left")
            }
        }
    }

    /// Asks for the views to be rebuilt (after a write, or a proxy going on- or offline).
    pub fn notify_change(&self) {
        self.reload_tx.send_modify(|v| *v += 1);
    }

    /// The current views, and a receiver that wakes when they change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Views>> {
        self.views_tx.subscribe()
    }

    fn offline_map(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        if let Ok(p) = self.proxies.lock() {
            for ((mesh, name), st) in p.iter() {
                if !st.online {
                    out.entry(mesh.clone()).or_default().push(name.clone());
                }
            }
        }
        out
    }

    /// Rebuilds the views now.
    pub async fn reload(self: &Arc<Self>) {
        let hub = self.clone();
        let local_offline = self.offline_map();
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || {
            // Every replica's word on who is offline; this replica's own alone if the store
            // cannot say.
            let offline = match hub.store.offline_proxies(now_ms()) {
                Ok(pairs) => by_mesh(pairs),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read which proxies are offline; using this replica's own");
                    local_offline
                }
            };
            view::load(hub.store.as_ref(), hub.trust.as_ref(), &offline)
        })
        .await;
        match loaded {
            Ok(Ok(v)) => {
                tracing::debug!(
                    revision = v.revision,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "views reloaded"
                );
                self.views_tx.send_replace(Arc::new(v));
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot load the mesh views; proxies keep their last snapshot")
            }
            Err(e) => tracing::error!(error = %e, "view loader panicked"),
        }
    }

    /// Keeps the views current until the hub is dropped: reloads after notifications
    /// (debounced), when the store revision moves, and when the set of offline proxies
    /// changes (a lease ran out). Renews this replica's presence leases on the way.
    pub fn spawn_reloader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let mut notified = self.reload_tx.subscribe();
        tokio::spawn(async move {
            let mut last_seen = None;
            let mut renewed = tokio::time::Instant::now();
            loop {
                let Some(hub) = weak.upgrade() else { return };
                let seen = hub.store_state().await;
                if seen != last_seen || last_seen.is_none() {
                    hub.reload().await;
                    last_seen = seen;
                }
                if renewed.elapsed() >= PRESENCE_RENEWAL {
                    hub.renew_presence().await;
                    hub.publish_insights().await;
                    renewed = tokio::time::Instant::now();
                }
                drop(hub);
                tokio::select! {
                    r = notified.changed() => {
                        if r.is_err() { return; }
                        tokio::time::sleep(DEBOUNCE).await;
                        notified.borrow_and_update();
                        let Some(hub) = weak.upgrade() else { return };
                        // Read before the reload: a change that lands during it is then
                        // seen as a change at the next tick, not taken for loaded.
                        let seen = hub.store_state().await;
                        hub.reload().await;
                        last_seen = seen;
                    }
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        })
    }

    /// What the reloader watches in the store: its revision, and who is offline now (which
    /// changes without a write when a lease runs out). `None` when the store cannot say.
    async fn store_state(&self) -> Option<(u64, Vec<(String, String)>)> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            Some((
                store.revision().ok()?,
                store.offline_proxies(now_ms()).ok()?,
            ))
        })
        .await
        .ok()
        .flatten()
    }

    /// Extends the leases of this replica's proxies.
    async fn renew_presence(&self) {
        let store = self.store.clone();
        let replica = self.replica.clone();
        let renewed =
            tokio::task::spawn_blocking(move || store.renew_proxies(&replica, lease_end(now_ms())))
                .await;
        match renewed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the proxies' presence leases"),
            Err(e) => tracing::warn!(error = %e, "cannot renew the proxies' presence leases"),
        }
    }

    /// Publishes to the store the insights of this replica's proxies that changed since the
    /// last time, for the other replicas to show (see [`Hub::insight`]).
    async fn publish_insights(&self) {
        let updates: Vec<InsightUpdate> = {
            let (Ok(proxies), Ok(mut published)) = (self.proxies.lock(), self.published.lock())
            else {
                return;
            };
            published.retain(|key, _| proxies.contains_key(key));
            proxies
                .iter()
                .filter_map(|(key, status)| {
                    let insight = serde_json::to_string(status).ok()?;
                    if published.get(key) == Some(&insight) {
                        return None;
                    }
                    published.insert(key.clone(), insight.clone());
                    Some(InsightUpdate {
                        mesh: key.0.clone(),
                        name: key.1.clone(),
                        insight,
                    })
                })
                .collect()
        };
        if updates.is_empty() {
            return;
        }
        let store = self.store.clone();
        let replica = self.replica.clone();
        let keys: Vec<_> = updates
            .iter()
            .map(|u| (u.mesh.clone(), u.name.clone()))
            .collect();
        let done = tokio::task::spawn_blocking(move || {
            store.publish_insights(&replica, now_ms(), &updates)
        })
        .await;
        let error = match done {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(%error, "cannot publish the proxies' insights; trying again in {PRESENCE_RENEWAL:?}");
        // Not published: send them again next time.
        if let Ok(mut published) = self.published.lock() {
            for key in keys {
                published.remove(&key);
            }
        }
    }

    /// The insight to show for dataplane (mesh, name): this replica's own status when the
    /// proxy is online here, else what the replica it is (or was last) connected to
    /// published, with `online` from its presence record, else this replica's status.
    /// `None` when no replica ever had the proxy connected.
    pub fn insight(
        &self,
        mesh: &str,
        name: &str,
        published: Option<&PublishedInsight>,
    ) -> Option<serde_json::Value> {
        let local = self.status(mesh, name);
        if let Some(status) = &local
            && status.online
        {
            return serde_json::to_value(status).ok();
        }
        // This replica's own status is fresher than what it published.
        let published = published.filter(|p| p.replica != self.replica || local.is_none());
        if let Some(p) = published
            && let Ok(mut insight) = serde_json::from_str::<serde_json::Value>(&p.insight)
            && let Some(fields) = insight.as_object_mut()
        {
            fields.insert("online".into(), p.online.into());
            return Some(insight);
        }
        local.and_then(|status| serde_json::to_value(status).ok())
    }

    /// Builds the snapshot for a proxy from the given views; the dataplane as stored wins over
    /// the registered copy once the views hold it.
    pub fn snapshot_for(
        views: &Views,
        mesh: &str,
        name: &str,
        registered: &DataplaneSpec,
    ) -> Option<EncodedSnapshot> {
        let view = views.meshes.get(mesh)?;
        let dp = view.dataplanes.get(name).unwrap_or(registered);
        Some(snapshot::build(mesh, name, dp, view))
    }

    /// Claims (mesh, name) for a new stream; refuses a name that is online.
    pub(crate) fn claim(&self, mesh: &str, name: &str, proxy_version: &str) -> Result<u64, String> {
        let mut p = self
            .proxies
            .lock()
            .map_err(|_| "registry lock poisoned".to_string())?;
        let key = (mesh.to_string(), name.to_string());
        if let Some(st) = p.get(&key)
            && st.online
        {
            return Err(format!(
                "dataplane {name:?} of mesh {mesh:?} is already online (connected since {}); a second proxy cannot register the same name",
                st.connected_since.clone().unwrap_or_default()
            ));
        }
        let id = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = now_rfc3339();
        let (cert_expiry, stats) = p
            .get(&key)
            .map(|s| (s.cert_expiry.clone(), s.stats.clone()))
            .unwrap_or_default();
        p.insert(
            key,
            ProxyStatus {
                online: true,
                connected_since: Some(now.clone()),
                last_seen: Some(now),
                proxy_version: proxy_version.into(),
                control_plane_instance_id: self.replica.clone(),
                stream_id: id,
                cert_expiry,
                stats,
                ..Default::default()
            },
        );
        Ok(id)
    }

    /// Updates the entry of (mesh, name) if `stream_id` still owns it; says whether it did.
    pub(crate) fn update(
        &self,
        mesh: &str,
        name: &str,
        stream_id: u64,
        f: impl FnOnce(&mut ProxyStatus),
    ) -> bool {
        if let Ok(mut p) = self.proxies.lock()
            && let Some(st) = p.get_mut(&(mesh.to_string(), name.to_string()))
            && st.stream_id == stream_id
        {
            f(st);
            return true;
        }
        false
    }

    /// Forgets (mesh, name) if `stream_id` owns it (graceful deregistration).
    pub(crate) fn forget(&self, mesh: &str, name: &str, stream_id: u64) -> bool {
        let Ok(mut p) = self.proxies.lock() else {
            return false;
        };
        let key = (mesh.to_string(), name.to_string());
        if p.get(&key).is_some_and(|s| s.stream_id == stream_id) {
            p.remove(&key);
            return true;
        }
        false
    }

    /// Records a certificate issued to (mesh, name).
    pub fn record_certificate(&self, mesh: &str, name: &str, expiry: SystemTime) {
        if let Ok(mut p) = self.proxies.lock() {
            let st = p.entry((mesh.to_string(), name.to_string())).or_default();
            st.cert_expiry = Some(humantime::format_rfc3339_seconds(expiry).to_string());
        }
    }

    /// The status of (mesh, name), if a proxy ever connected for it.
    pub fn status(&self, mesh: &str, name: &str) -> Option<ProxyStatus> {
        self.proxies
            .lock()
            .ok()?
            .get(&(mesh.to_string(), name.to_string()))
            .cloned()
    }
}
