//! The `Discovery.Stream` gRPC service: registration, snapshot push, ACK/NACK, lifecycle.
//!
//! A stream's life: the first message must be a `Register` with the Dataplane; the token in
//! the `authorization` metadata must be for that mesh and name; the name must not be online
//! already. The Dataplane is validated like an apply and upserted, and the stream then gets a
//! snapshot, and another each time its content changes. The proxy ACKs or NACKs each one and
//! reports its traffic totals (`ProxyStats`) now and then; the hub keeps the latest report.
//! A proxy that registered with `keeps_parts` gets, after the first snapshot, only the parts
//! that changed since the previous push ([`Keeps`]).
//! A stream that ends cleanly deregisters the dataplane (graceful exit); one that breaks
//! leaves it offline.

use super::grpc::DiscoveryServer;
use super::hub::{Hub, SentSnapshot, StatsReport, now_rfc3339};
use super::snapshot::{EncodedSnapshot, PartHashes};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_api::parse::parse_documents;
use weft_api::parts;
use weft_api::proto::DiscoveryRequest;
use weft_api::proto::discovery_request::Kind;
use weft_api::{DataplaneSpec, Spec};

/// How long a new stream may take to send its `Register`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Decides whether a token may register or certify a dataplane. May block (it may read the
/// store): the service calls it through `spawn_blocking`.
pub trait DataplaneAuth: Send + Sync + 'static {
    /// `Ok` if `token` (from `authorization: Bearer …`) is valid for dataplane `name` of `mesh`;
    /// otherwise a message for the proxy.
    fn authenticate(&self, token: Option<&str>, mesh: &str, name: &str) -> Result<(), String>;
}

/// The gRPC service.
pub struct DiscoveryService {
    hub: Arc<Hub>,
    auth: Arc<dyn DataplaneAuth>,
    nonce: AtomicU64,
}

impl DiscoveryService {
    /// A service over `hub`, admitting proxies that `auth` accepts.
    pub fn new(hub: Arc<Hub>, auth: Arc<dyn DataplaneAuth>) -> Self {
        DiscoveryService {
            hub,
            auth,
            nonce: AtomicU64::new(1),
        }
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> DiscoveryServer {
        DiscoveryServer::new(self)
    }
}

/// Reads the bearer token of a request's metadata.
pub fn bearer_token<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string())
}

/// The largest `Register.dataplane` accepted, in bytes.
const MAX_REGISTERED_DATAPLANE: usize = 256 << 10;

/// The snapshots a stream sends.
pub type SnapshotStream = Pin<Box<dyn Stream<Item = Result<EncodedSnapshot, Status>> + Send>>;

impl DiscoveryService {
    /// `Discovery.Stream`: registers the proxy, then pushes its snapshots.
    pub async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let token = bearer_token(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within 10s"))??
            .ok_or_else(|| Status::invalid_argument("stream closed before Register"))?;
        let Some(Kind::Register(register)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be a Register",
            ));
        };
        // Parsed before the token can be checked (the token is checked against the mesh and
        // name the Dataplane gives): bounded, so an unauthenticated client cannot make the
        // parse costly. A Dataplane is a few KiB.
        if register.dataplane.len() > MAX_REGISTERED_DATAPLANE {
            return Err(Status::invalid_argument(format!(
                "Register.dataplane is {} bytes; a Dataplane may be at most {} KiB",
                register.dataplane.len(),
                MAX_REGISTERED_DATAPLANE >> 10
            )));
        }
        let mut docs = parse_documents(&register.dataplane)
            .map_err(|e| Status::invalid_argument(format!("invalid Dataplane: {e}")))?;
        if docs.len() != 1 {
            return Err(Status::invalid_argument(format!(
                "Register needs exactly one Dataplane, found {} documents",
                docs.len()
            )));
        }
        let resource = docs.remove(0).resource;
        let Spec::Dataplane(dp) = resource.spec.clone() else {
            return Err(Status::invalid_argument(format!(
                "Register needs a Dataplane, found a {}",
                resource.resource_type()
            )));
        };
        let mesh = resource.mesh_name().to_string();
        let name = resource.name.clone();
        // Checking a token reads the store (the mesh's signing key, revocations): a blocking
        // call, kept off the runtime like every other store access.
        let auth = Arc::clone(&self.auth);
        let (m, n) = (mesh.clone(), name.clone());
        tokio::task::spawn_blocking(move || auth.authenticate(token.as_deref(), &m, &n))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::unauthenticated)?;
        let stream_id = self
            .hub
            .claim(&mesh, &name, &register.proxy_version)
            .map_err(Status::already_exists)?;

        match self.hub.claim_presence(&mesh, &name).await {
            Ok(None) => {}
            Ok(Some(replica)) => {
                self.hub.forget(&mesh, &name, stream_id);
                return Err(Status::already_exists(format!(
                    "dataplane {name:?} of mesh {mesh:?} is already online at control-plane replica {replica}; a second proxy cannot register the same name"
                )));
            }
            Err(e) => {
                self.hub.forget(&mesh, &name, stream_id);
                return Err(Status::unavailable(format!(
                    "cannot record the dataplane as online: {e}"
                )));
            }
        }
        let store = self.hub.store.clone();
        let upsert = resource.clone();
        let stored = tokio::task::spawn_blocking(move || store.put(&upsert, None)).await;
        let refused = match stored {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(Status::failed_precondition(e.to_string())),
            Err(e) => Some(Status::internal(e.to_string())),
        };
        if let Some(status) = refused {
            self.hub.forget(&mesh, &name, stream_id);
            self.hub.release_presence(&mesh, &name, true).await;
            return Err(status);
        }
        tracing::info!(%mesh, %name, "dataplane registered");
        self.hub.notify_change();
        // The registration was just written; wait for the views to include it, so the first
        // snapshot already lists this proxy's own inbounds as endpoints.
        let mut views = self.hub.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            views.wait_for(|v| {
                v.meshes
                    .get(&mesh)
                    .is_some_and(|m| m.dataplanes.contains_key(&name))
            }),
        )
        .await;

        let (tx, rx) = mpsc::channel(4);
        let hub = self.hub.clone();
        let nonce_base = self.nonce.fetch_add(1, Ordering::Relaxed) << 32;
        let keeps = Keeps::new(&register.keeps_parts);
        tokio::spawn(serve_stream(
            hub, mesh, name, stream_id, dp, inbound, tx, views, nonce_base, keeps,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Which parts a stream's proxy holds, so that a push can leave out the unchanged ones.
///
/// The base is the previous push on the stream, ACKed or not: the proxy applies pushes in
/// order and NACKs any it refuses, so when a push arrives, the proxy holds the one before
/// unless it NACKed something, and a NACK drops the base (the next push is complete). The
/// proxy checks each kept part's version against its own, so a push built on a base it
/// did not apply is refused rather than misapplied.
struct Keeps {
    /// The parts the proxy said it can keep (bit `i`: `parts::ALL[i]`).
    can: u8,
    /// The part hashes of the previous push, while it can serve as a base.
    base: Option<PartHashes>,
    /// The nonce of the previous push if it left parts out.
    partial: Option<String>,
}

impl Keeps {
    fn new(keeps_parts: &[i32]) -> Keeps {
        let can = parts::ALL
            .iter()
            .enumerate()
            .filter(|(_, p)| keeps_parts.contains(&(**p as i32)))
            .fold(0, |bits, (i, _)| bits | 1 << i);
        Keeps {
            can,
            base: None,
            partial: None,
        }
    }

    /// Leaves out of `snap` the parts the proxy can keep from the previous push, and makes
    /// `snap` the base of the next.
    fn prepare(&mut self, snap: &mut EncodedSnapshot) {
        let hashes = *snap.part_hashes();
        if let Some(base) = &self.base {
            let same = |i: usize| self.can & (1 << i) != 0 && base[i] == hashes[i];
            snap.keep(|p| parts::ALL.iter().position(|q| *q == p).is_some_and(same));
        }
        self.partial = snap.kept().next().map(|_| snap.nonce().to_string());
        self.base = Some(hashes);
    }

    /// After a NACK of a push: the next push is complete. `true` when the latest push left
    /// parts out, whichever push was refused: it is worth resending complete now. The
    /// refused push may be an earlier one, answered after the latest went out; the latest
    /// was then built on a base the proxy does not hold, and it will be refused too (its NACK
    /// would find nothing left to resend, and the proxy would wait for the next change).
    fn nacked(&mut self) -> bool {
        self.base = None;
        self.partial.take().is_some()
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_stream(
    hub: Arc<Hub>,
    mesh: String,
    name: String,
    stream_id: u64,
    registered: DataplaneSpec,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<EncodedSnapshot, Status>>,
    mut views: tokio::sync::watch::Receiver<Arc<super::view::Views>>,
    nonce_base: u64,
    mut keeps: Keeps,
) {
    let registered = Arc::new(registered);
    let mut sent_version = String::new();
    let mut pushes: u64 = 0;
    let mut dirty = true;
    // Whether a view of this stream held the mesh: once one has, a view without it means the
    // mesh was deleted (before, a replica may not have read a new mesh yet).
    let mut mesh_seen = false;
    let mut mesh_gone = false;
    let graceful = loop {
        if dirty {
            dirty = false;
            let current = views.borrow_and_update().clone();
            let view = current.meshes.get(&mesh).cloned();
            if view.is_some() {
                mesh_seen = true;
            } else if mesh_seen {
                // Deleted: the proxy's registration, certificate and token went with it. A
                // mesh of the same name created later is another mesh, which this stream
                // must not serve; the proxy registers again, with a token of that mesh.
                tracing::warn!(%mesh, %name, "mesh deleted; ending the dataplane's stream");
                let _ = tx
                    .send(Err(Status::not_found(format!(
                        "mesh {mesh:?} was deleted; register again"
                    ))))
                    .await;
                mesh_gone = true;
                break false;
            }
            match (view, Hub::snapshot_for(&current, &mesh, &name, &registered)) {
                (Some(view), Some(mut snap)) if snap.version() != sent_version => {
                    pushes += 1;
                    snap.set_nonce(format!("{:x}", nonce_base + pushes));
                    keeps.prepare(&mut snap);
                    sent_version = snap.version().to_string();
                    let sent = SentSnapshot {
                        mesh: mesh.clone(),
                        name: name.clone(),
                        registered: registered.clone(),
                        view,
                        nonce: snap.nonce().to_string(),
                    };
                    let version = sent_version.clone();
                    let mut old = None;
                    hub.update(&mesh, &name, stream_id, |st| {
                        st.sent_version = Some(version);
                        st.snapshots_sent += 1;
                        old = st.last_sent.replace(sent);
                    });
                    // Possibly the last reference to an old view: free it outside the lock.
                    drop(old);
                    if tx.send(Ok(snap)).await.is_err() {
                        break false;
                    }
                }
                (Some(view), Some(_)) => {
                    // Same content: rebuilding from the newest view gives the same snapshot,
                    // and the older view can be freed.
                    let mut old = None;
                    hub.update(&mesh, &name, stream_id, |st| {
                        if let Some(sent) = &mut st.last_sent {
                            old = Some(std::mem::replace(&mut sent.view, view));
                        }
                    });
                    drop(old);
                }
                _ => tracing::warn!(%mesh, %name, "mesh is gone; no snapshot to send"),
            }
        }
        tokio::select! {
            changed = views.changed() => {
                if changed.is_err() { break false; }
                dirty = true;
            }
            msg = inbound.message() => match msg {
                Ok(Some(DiscoveryRequest { kind: Some(Kind::Ack(ack)) })) => {
                    hub.update(&mesh, &name, stream_id, |st| {
                        st.acked_version = Some(ack.version);
                        st.last_seen = Some(now_rfc3339());
                    });
                }
                Ok(Some(DiscoveryRequest { kind: Some(Kind::Nack(nack)) })) => {
                    tracing::warn!(%mesh, %name, version = %nack.version, reason = %nack.reason, "proxy rejected a snapshot");
                    hub.update(&mesh, &name, stream_id, |st| {
                        st.last_nack = Some(format!("version {}: {}", nack.version, nack.reason));
                        st.last_seen = Some(now_rfc3339());
                    });
                    if keeps.nacked() {
                        sent_version.clear();
                        dirty = true;
                    }
                }
                Ok(Some(DiscoveryRequest { kind: Some(Kind::Stats(stats)) })) => {
                    let report = StatsReport::received(&stats);
                    hub.update(&mesh, &name, stream_id, |st| {
                        st.last_seen = Some(report.reported_at.clone());
                        st.stats = Some(report);
                    });
                }
                Ok(Some(DiscoveryRequest { kind: Some(Kind::Register(_)) })) => {
                    let _ = tx.send(Err(Status::invalid_argument("a stream registers once; only Ack, Nack and ProxyStats may follow Register"))).await;
                    break false;
                }
                Ok(Some(DiscoveryRequest { kind: None })) => {
                    // A kind this control plane does not know, from a newer proxy.
                    tracing::debug!(%mesh, %name, "ignoring an unknown discovery request");
                }
                Ok(None) => break true,
                Err(status) => {
                    tracing::info!(%mesh, %name, %status, "dataplane stream broke");
                    break false;
                }
            },
            _ = tx.closed() => break false,
        }
    };
    if mesh_gone {
        // Nothing of it is left to keep or to delete.
        if hub.forget(&mesh, &name, stream_id) {
            hub.release_presence(&mesh, &name, true).await;
        }
    } else if graceful {
        if hub.forget(&mesh, &name, stream_id) {
            hub.release_presence(&mesh, &name, true).await;
            let store = hub.store.clone();
            let key = crate::store::ResourceKey {
                ty: weft_api::ResourceType::Dataplane,
                mesh: mesh.clone(),
                name: name.clone(),
            };
            match tokio::task::spawn_blocking(move || store.delete(&key, false)).await {
                Ok(Ok(_)) => tracing::info!(%mesh, %name, "dataplane deregistered"),
                Ok(Err(e)) => tracing::warn!(%mesh, %name, error = %e, "deregistration failed"),
                Err(e) => tracing::warn!(%mesh, %name, error = %e, "deregistration failed"),
            }
        }
    } else {
        let owned = hub.update(&mesh, &name, stream_id, |st| {
            st.online = false;
            st.last_seen = Some(now_rfc3339());
        });
        if owned {
            hub.release_presence(&mesh, &name, false).await;
        }
        tracing::info!(%mesh, %name, "dataplane offline");
    }
    hub.notify_change();
}
