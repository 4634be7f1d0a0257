//! What every snapshot of one mesh shares, built once per view: the mesh settings and trust
//! bundle, each service's endpoints, and the outbound services per [`RouteClass`].
//!
//! Every proxy's snapshot lists every service of its mesh with all its endpoints, so
//! building that part per proxy made the work grow with the square of the proxies. Here the
//! endpoints are encoded once per view, and the outbound services once per route class
//! (usually one class for the whole mesh), and proxies share the bytes.

use super::super::view::MeshView;
use super::encoded::{self, Hashed};
use super::mesh::mesh_settings;
use super::routes::{self, RouteClass};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use weft_api::dataplane::PROTOCOL_TAG;
use weft_api::proto as pb;

/// One service of the mesh and its endpoints.
struct Service {
    name: String,
    /// The protocol its endpoints agree on, else `tcp`.
    protocol: String,
    /// The endpoints, for the snapshot as a message (`_config`).
    endpoints: Vec<pb::Endpoint>,
    /// The same, encoded as `OutboundService.endpoints` entries.
    encoded: Bytes,
}

/// The parts of a mesh's snapshots that do not depend on the proxy.
#[derive(Default)]
pub struct MeshParts {
    /// The mesh settings, for the snapshot as a message.
    settings: pb::MeshSettings,
    /// Snapshot fields 4 and 5: the mesh settings and the trust bundle.
    encoded_mesh: Hashed,
    /// Services in name order.
    services: Vec<Service>,
    /// Snapshot field 7 per route class, built on first need. A class's cell is taken
    /// under the lock and filled outside it, so one class is built once while others proceed.
    outbounds: Mutex<HashMap<RouteClass, Arc<OnceLock<Hashed>>>>,
}

impl fmt::Debug for MeshParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshParts")
            .field("mesh", &self.encoded_mesh)
            .field("services", &self.services.len())
            .field(
                "route_classes",
                &self.outbounds.lock().map(|m| m.len()).unwrap_or(0),
            )
            .finish()
    }
}

impl MeshParts {
    /// Builds the shared parts of `mesh` from its view (whose `parts` are not read), and the
    /// outbound services of the class that no routing policy selects.
    pub fn build(mesh: &str, view: &MeshView) -> MeshParts {
        let settings = mesh_settings(mesh, view);
        let encoded_mesh = Hashed::new(encoded::encode_mesh(
            Some(&settings),
            &view.trust_bundle_pem,
        ));
        let mut by_service: BTreeMap<&str, Vec<pb::Endpoint>> = BTreeMap::new();
        for (name, other) in &view.dataplanes {
            for ib in &other.networking.inbound {
                by_service
                    .entry(ib.service())
                    .or_default()
                    .push(pb::Endpoint {
                        address: ib
                            .address
                            .clone()
                            .unwrap_or_else(|| other.networking.address.clone()),
                        port: ib.port,
                        tags: ib.tags.clone(),
                        healthy: !view.offline.contains(name),
                        dataplane: name.clone(),
                    });
            }
        }
        let services = by_service
            .into_iter()
            .map(|(name, endpoints)| Service {
                name: name.to_string(),
                protocol: common_protocol(&endpoints),
                encoded: encoded::encode_endpoints(&endpoints).into(),
                endpoints,
            })
            .collect();
        let parts = MeshParts {
            settings,
            encoded_mesh,
            services,
            outbounds: Mutex::default(),
        };
        let unrouted = RouteClass::default();
        let cell = OnceLock::new();
        let _ = cell.set(parts.build_outbounds(&unrouted, view));
        if let Ok(mut map) = parts.outbounds.lock() {
            map.insert(unrouted, Arc::new(cell));
        }
        parts
    }

    /// Snapshot fields 4 and 5, encoded.
    pub fn encoded_mesh(&self) -> &Hashed {
        &self.encoded_mesh
    }

    /// The mesh settings.
    pub fn settings(&self) -> &pb::MeshSettings {
        &self.settings
    }

    /// Snapshot field 7 for proxies of `class`, encoded; built on first need. `view` must be
    /// the view these parts belong to.
    pub fn encoded_outbounds(&self, class: &RouteClass, view: &MeshView) -> Hashed {
        let cell = match self.outbounds.lock() {
            Ok(mut map) => map.entry(class.clone()).or_default().clone(),
            // A panic while holding the lock cannot leave the map inconsistent (inserts
            // only); build without caching rather than fail.
            Err(_) => Arc::new(OnceLock::new()),
        };
        cell.get_or_init(|| self.build_outbounds(class, view))
            .clone()
    }

    fn build_outbounds(&self, class: &RouteClass, view: &MeshView) -> Hashed {
        let len = self.services.iter().map(|s| s.encoded.len() + 64).sum();
        let mut out = Vec::with_capacity(len);
        for s in &self.services {
            let service = routes::outbound(&s.name, &s.protocol, class, view);
            encoded::encode_outbound(&service, &s.encoded, &mut out);
        }
        Hashed::new(out)
    }

    /// The outbound services for proxies of `class`, as messages.
    pub fn outbounds(&self, class: &RouteClass, view: &MeshView) -> Vec<pb::OutboundService> {
        self.services
            .iter()
            .map(|s| pb::OutboundService {
                endpoints: s.endpoints.clone(),
                ..routes::outbound(&s.name, &s.protocol, class, view)
            })
            .collect()
    }
}

fn common_protocol(endpoints: &[pb::Endpoint]) -> String {
    let mut protocols = endpoints
        .iter()
        .map(|e| e.tags.get(PROTOCOL_TAG).cloned().unwrap_or_default());
    let first = protocols.next().unwrap_or_default();
    if protocols.all(|p| p == first) {
        first
    } else {
        "tcp".into()
    }
}
