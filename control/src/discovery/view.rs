//! A read-only picture of every mesh, loaded from the store in one pass and shared (`Arc`) by
//! every proxy's stream: building one proxy's snapshot then needs no store access at all.
//! Each mesh's view also carries the parts of its snapshots that every proxy shares
//! ([`MeshParts`]), built once when the view is loaded.

use super::snapshot::MeshParts;
use crate::store::{Store, StoreResult};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use weft_api::mesh::MeshSpec;
use weft_api::policy::{
    MeshHttpRouteSpec, MeshTrafficPermissionSpec, TrafficPermissionSpec, TrafficRouteSpec,
};
use weft_api::{DataplaneSpec, Spec};

/// Everything in one mesh that snapshots depend on.
#[derive(Debug, Default)]
pub struct MeshView {
    /// The mesh's own settings.
    pub spec: MeshSpec,
    /// Dataplanes by name.
    pub dataplanes: BTreeMap<String, DataplaneSpec>,
    /// Legacy permissions by name.
    pub traffic_permissions: BTreeMap<String, TrafficPermissionSpec>,
    /// When each legacy permission was created (RFC 3339, as stored): of two equally specific
    /// ones, Kuma applies the newer.
    pub traffic_permissions_created: BTreeMap<String, String>,
    /// Legacy routes by name.
    pub traffic_routes: BTreeMap<String, TrafficRouteSpec>,
    /// targetRef permissions by name.
    pub mesh_traffic_permissions: BTreeMap<String, MeshTrafficPermissionSpec>,
    /// targetRef HTTP routes by name.
    pub mesh_http_routes: BTreeMap<String, MeshHttpRouteSpec>,
    /// PEM of the CA this mesh's proxies trust (empty with mTLS off).
    pub trust_bundle_pem: String,
    /// Dataplanes whose proxy was connected and dropped: their endpoints are unhealthy.
    pub offline: std::collections::BTreeSet<String>,
    /// The parts of every snapshot of this mesh that do not depend on the proxy; set by
    /// [`MeshView::seal`].
    pub parts: MeshParts,
}

impl MeshView {
    /// Builds the shared snapshot parts from the rest of the view; call once the view is
    /// complete, before sharing it.
    pub fn seal(mut self, mesh: &str) -> MeshView {
        self.parts = MeshParts::build(mesh, &self);
        self
    }
}

/// Every mesh's view, by mesh name, as of one store revision.
#[derive(Debug, Default)]
pub struct Views {
    /// The store revision the views were read at.
    pub revision: u64,
    /// Views by mesh name.
    pub meshes: HashMap<String, Arc<MeshView>>,
}

/// Supplies a mesh's trust bundle (its CA certificate), creating the CA on first need.
pub trait TrustSource: Send + Sync {
    /// PEM of the CA the mesh's proxies trust, or empty when mTLS is off.
    fn trust_bundle(&self, mesh: &str, spec: &MeshSpec) -> Result<String, String>;
}

/// A [`TrustSource`] for control planes without identity: no trust bundle.
pub struct NoTrust;

impl TrustSource for NoTrust {
    fn trust_bundle(&self, _mesh: &str, _spec: &MeshSpec) -> Result<String, String> {
        Ok(String::new())
    }
}

/// Reads every mesh and the resources in it.
pub fn load(
    store: &dyn Store,
    trust: &dyn TrustSource,
    offline: &HashMap<String, Vec<String>>,
) -> StoreResult<Views> {
    // One consistent read: with a query per type, a resource written with its Mesh between
    // two queries was seen without the Mesh, and got default mesh settings until the next
    // reload.
    let (revision, resources) = store.snapshot()?;
    let mut meshes: HashMap<String, MeshView> = HashMap::new();
    for stored in resources {
        let r = stored.resource;
        let mesh = r.mesh_name().to_string();
        let view = meshes.entry(mesh).or_default();
        match r.spec {
            Spec::Mesh(m) => view.spec = m,
            Spec::Dataplane(d) => {
                view.dataplanes.insert(r.name, d);
            }
            Spec::TrafficPermission(p) => {
                view.traffic_permissions_created
                    .insert(r.name.clone(), stored.meta.creation_time.clone());
                view.traffic_permissions.insert(r.name, p);
            }
            Spec::TrafficRoute(p) => {
                view.traffic_routes.insert(r.name, p);
            }
            Spec::MeshTrafficPermission(p) => {
                view.mesh_traffic_permissions.insert(r.name, p);
            }
            Spec::MeshHttpRoute(p) => {
                view.mesh_http_routes.insert(r.name, p);
            }
        }
    }
    let meshes = meshes
        .into_iter()
        .map(|(name, mut view)| {
            view.trust_bundle_pem = trust.trust_bundle(&name, &view.spec).unwrap_or_else(|e| {
                tracing::warn!(mesh = %name, error = %e, "no trust bundle for mesh");
                String::new()
            });
            if let Some(names) = offline.get(&name) {
                view.offline = names.iter().cloned().collect();
            }
            let view = view.seal(&name);
            (name, Arc::new(view))
        })
        .collect();
    Ok(Views { revision, meshes })
}
