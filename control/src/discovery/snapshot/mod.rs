//! Builds one proxy's snapshot from its mesh's [`MeshView`]: the mesh settings, its inbounds
//! with the permissions that apply to each, every service of the mesh with its endpoints, and
//! routes resolved for this proxy as the source. Pure: same inputs, same bytes, same version.
//!
//! - [`shared`]: the parts every proxy of a mesh shares, built once per view ([`MeshParts`]).
//! - [`encoded`]: a snapshot as bytes spliced from those parts and the proxy's own.
//! - [`permissions`], [`routes`], [`mesh`]: what policies and settings mean for a proxy.
//!
//! Per proxy and change, only the proxy's own fields (identity, inbounds with permissions,
//! listeners) are built, encoded and hashed; the rest is shared.

pub mod encoded;
pub mod mesh;
pub mod permissions;
pub mod routes;
pub mod shared;

pub use encoded::{EncodedSnapshot, PartHashes, content_version, seal};
pub use mesh::DEFAULT_CERT_LIFETIME_SECS;
pub use routes::RouteClass;
pub use shared::MeshParts;

use super::view::MeshView;
use weft_api::DataplaneSpec;
use weft_api::dataplane::{PROTOCOL_TAG, SERVICE_TAG};
use weft_api::proto as pb;

/// A proxy's own fields of its snapshot.
struct Own {
    dataplane: pb::DataplaneIdentity,
    inbounds: Vec<pb::InboundConfig>,
    listeners: Vec<pb::OutboundListener>,
    class: RouteClass,
}

fn own(mesh: &str, name: &str, dp: &DataplaneSpec, view: &MeshView) -> Own {
    let tp = dp.networking.transparent_proxying.as_ref();
    Own {
        dataplane: pb::DataplaneIdentity {
            mesh: mesh.into(),
            name: name.into(),
            address: dp.networking.address.clone(),
            redirect_port_inbound: tp
                .map(|t| t.redirect_port_inbound.unwrap_or(15006))
                .unwrap_or(0),
            redirect_port_outbound: tp
                .map(|t| t.redirect_port_outbound.unwrap_or(15001))
                .unwrap_or(0),
        },
        inbounds: dp
            .networking
            .inbound
            .iter()
            .map(|ib| pb::InboundConfig {
                port: ib.port,
                service_address: ib.app_address().to_string(),
                service_port: ib.app_port(),
                service: ib.service().to_string(),
                protocol: ib.tags.get(PROTOCOL_TAG).cloned().unwrap_or_default(),
                tags: ib.tags.clone(),
                permissions: permissions::permissions(name, &ib.tags, view),
            })
            .collect(),
        listeners: dp
            .networking
            .outbound
            .iter()
            .map(|ob| pb::OutboundListener {
                address: ob.address.clone().unwrap_or_else(|| "127.0.0.1".into()),
                port: ob.port,
                service: ob.tags.get(SERVICE_TAG).cloned().unwrap_or_default(),
            })
            .collect(),
        class: RouteClass::of(name, dp, view),
    }
}

/// Builds the snapshot of dataplane `name` in `mesh` as it goes on the wire: the proxy's own
/// fields encoded, the rest shared with the other proxies of the view.
pub fn build(mesh: &str, name: &str, dp: &DataplaneSpec, view: &MeshView) -> EncodedSnapshot {
    let own = own(mesh, name, dp, view);
    EncodedSnapshot::new(
        &own.dataplane,
        &own.inbounds,
        &own.listeners,
        view.parts.encoded_mesh().clone(),
        view.parts.encoded_outbounds(&own.class, view),
    )
}

/// The same snapshot as [`build`], complete, as a message (for `_config` and tests);
/// `version` and `parts` are set, `nonce` is empty.
pub fn build_message(mesh: &str, name: &str, dp: &DataplaneSpec, view: &MeshView) -> pb::Snapshot {
    let own = own(mesh, name, dp, view);
    let mut snap = pb::Snapshot {
        version: String::new(),
        nonce: String::new(),
        dataplane: Some(own.dataplane),
        mesh: Some(view.parts.settings().clone()),
        trust_bundle_pem: view.trust_bundle_pem.clone(),
        inbounds: own.inbounds,
        outbounds: view.parts.outbounds(&own.class, view),
        outbound_listeners: own.listeners,
        parts: None,
        kept: vec![],
    };
    seal(&mut snap);
    snap
}

#[cfg(test)]
mod tests {
    use super::super::view::{self, TrustSource, Views};
    use super::*;
    use crate::store::Store;
    use crate::store::sqlite::SqliteStore;
    use prost::Message;
    use std::collections::HashMap;
    use weft_api::mesh::MeshSpec;

    struct Pem;

    impl TrustSource for Pem {
        fn trust_bundle(&self, mesh: &str, _: &MeshSpec) -> Result<String, String> {
            Ok(format!("PEM of {mesh}"))
        }
    }

    const MESH: &str = "type: Mesh\nname: m\n";

    fn dataplane(name: &str, service: &str, ip: &str) -> String {
        format!(
            "type: Dataplane\nmesh: m\nname: {name}\nnetworking:\n  address: {ip}\n  inbound:\n  - port: 8080\n    tags: {{kuma.io/service: {service}, kuma.io/protocol: http}}\n  outbound:\n  - port: 10001\n    tags: {{kuma.io/service: backend}}\n"
        )
    }

    const ROUTES: &str = "type: MeshHTTPRoute\nmesh: m\nname: web-to-backend\nspec:\n  targetRef: {kind: MeshService, name: web}\n  to:\n  - targetRef: {kind: MeshService, name: backend}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /api}}]\n      default:\n        backendRefs: [{kind: MeshService, name: backend, weight: 1}]\n---\ntype: TrafficRoute\nmesh: m\nname: canary\nsources: [{match: {kuma.io/service: web}}]\ndestinations: [{match: {kuma.io/service: backend}}]\nconf:\n  destination: {kuma.io/service: backend, version: v1}\n";

    const PERMIT: &str = "type: MeshTrafficPermission\nmesh: m\nname: backend-from-web\nspec:\n  targetRef: {kind: MeshService, name: backend}\n  from:\n  - targetRef: {kind: MeshService, name: web}\n    default: {action: Allow}\n";

    fn load(store: &SqliteStore, yaml: &[&str]) -> Views {
        for doc in yaml {
            for d in weft_api::parse::parse_documents(doc).expect("valid yaml") {
                store.put(&d.resource, None).expect("stored");
            }
        }
        let offline = HashMap::from([("m".to_string(), vec!["backend-2".to_string()])]);
        view::load(store, &Pem, &offline).expect("views")
    }

    fn fleet() -> Vec<String> {
        vec![
            dataplane("web-1", "web", "10.0.0.1"),
            dataplane("web-2", "web", "10.0.0.2"),
            dataplane("backend-1", "backend", "10.0.1.1"),
            dataplane("backend-2", "backend", "10.0.1.2"),
        ]
    }

    /// web-1's outbound for backend, in the fleet with `policy` applied.
    fn web_outbound_to_backend(policy: &str) -> pb::OutboundService {
        let store = SqliteStore::in_memory().expect("store");
        let mut docs = vec![MESH.to_string(), policy.into()];
        docs.extend(fleet());
        let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let views = load(&store, &docs);
        let (_, snap) = built(&views, "web-1");
        snap.outbounds
            .into_iter()
            .find(|o| o.service == "backend")
            .expect("an outbound for backend")
    }

    fn built(views: &Views, name: &str) -> (EncodedSnapshot, pb::Snapshot) {
        let view = &views.meshes["m"];
        let dp = &view.dataplanes[name];
        (
            build("m", name, dp, view),
            build_message("m", name, dp, view),
        )
    }

    /// Kuma applies one TrafficPermission per inbound, the most specific by destination: a
    /// permission for backend alone replaces the mesh-wide allow-all for backend's inbound,
    /// and the allow-all still holds for the others.
    #[test]
    fn the_most_specific_traffic_permission_alone_applies_to_an_inbound() {
        let store = SqliteStore::in_memory().expect("store");
        let allow_all = "type: TrafficPermission\nmesh: m\nname: allow-all\nsources: [{match: {kuma.io/service: '*'}}]\ndestinations: [{match: {kuma.io/service: '*'}}]\n";
        let web_only = "type: TrafficPermission\nmesh: m\nname: web-to-backend\nsources: [{match: {kuma.io/service: web}}]\ndestinations: [{match: {kuma.io/service: backend}}]\n";
        let mut docs = vec![MESH.to_string(), allow_all.into(), web_only.into()];
        docs.extend(fleet());
        let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let views = load(&store, &docs);
        let allowed = |name: &str| -> Vec<(String, String)> {
            let (_, snap) = built(&views, name);
            snap.inbounds[0]
                .permissions
                .iter()
                .map(|p| (p.source_service.clone(), p.origin.clone()))
                .collect()
        };
        assert_eq!(
            allowed("backend-1"),
            [(
                "web".to_string(),
                "TrafficPermission/web-to-backend".to_string()
            )]
        );
        assert_eq!(
            allowed("web-1"),
            [("*".to_string(), "TrafficPermission/allow-all".to_string())]
        );

        // Of two equally specific ones, the newer applies, whatever the names.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let newer = "type: TrafficPermission\nmesh: m\nname: zz-api-to-backend\nsources: [{match: {kuma.io/service: api}}]\ndestinations: [{match: {kuma.io/service: backend}}]\n";
        let views = load(&store, &[newer]);
        let (_, snap) = built(&views, "backend-1");
        let origins: Vec<&str> = snap.inbounds[0]
            .permissions
            .iter()
            .map(|p| p.origin.as_str())
            .collect();
        assert_eq!(origins, ["TrafficPermission/zz-api-to-backend"]);
    }

    /// MeshHTTPRoute rules go to the proxy in Gateway API's precedence, whatever order they
    /// were written in: an exact path, then the longer prefix, then the catch-all.
    #[test]
    fn mesh_http_route_rules_go_most_precise_first() {
        let route = "type: MeshHTTPRoute\nmesh: m\nname: r\nspec:\n  targetRef: {kind: Mesh}\n  to:\n  - targetRef: {kind: MeshService, name: backend}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /}}]\n      default: {backendRefs: [{kind: MeshServiceSubset, name: backend, tags: {version: v0}}]}\n    - matches: [{path: {type: PathPrefix, value: /api}}]\n      default: {backendRefs: [{kind: MeshServiceSubset, name: backend, tags: {version: v1}}]}\n    - matches: [{path: {type: Exact, value: /api/health}}]\n      default: {backendRefs: [{kind: MeshServiceSubset, name: backend, tags: {version: v2}}]}\n";
        let backend = web_outbound_to_backend(route);
        let versions: Vec<&str> = backend
            .http_rules
            .iter()
            .map(|r| r.destinations[0].tags["version"].as_str())
            .collect();
        assert_eq!(versions, ["v2", "v1", "v0"]);
    }

    /// Kuma's `route-all` (`*` to `*`) routes each service to itself, and a TrafficRoute
    /// applies where no MeshHTTPRoute targets the same traffic.
    #[test]
    fn route_all_sends_each_service_to_itself() {
        let route_all = "type: TrafficRoute\nmesh: m\nname: route-all\nsources: [{match: {kuma.io/service: '*'}}]\ndestinations: [{match: {kuma.io/service: '*'}}]\nconf:\n  loadBalancer: {roundRobin: {}}\n  split:\n  - weight: 100\n    destination: {kuma.io/service: '*', version: '*'}\n";
        let backend = web_outbound_to_backend(route_all);
        let tags: Vec<(&str, &str)> = backend.default_route[0]
            .tags
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(tags, [("kuma.io/service", "backend")]);
        assert_eq!(
            backend.load_balancer.as_ref().map(|lb| lb.kind),
            Some(pb::load_balancer::Kind::RoundRobin as i32)
        );
    }

    #[test]
    fn the_wire_bytes_are_the_message_encoded() {
        let store = SqliteStore::in_memory().expect("store");
        let mut docs = vec![MESH, ROUTES, PERMIT];
        let fleet = fleet();
        docs.extend(fleet.iter().map(String::as_str));
        let views = load(&store, &docs);
        for name in ["web-1", "backend-1", "backend-2"] {
            let (mut wire, mut message) = built(&views, name);
            wire.set_nonce("2a".into());
            message.nonce = "2a".into();
            assert_eq!(wire.version(), message.version, "{name}");
            assert_eq!(wire.to_vec(), message.encode_to_vec(), "{name}");
        }
        let (_, web) = built(&views, "web-1");
        assert_eq!(web.trust_bundle_pem, "PEM of m");
        let backend = web
            .outbounds
            .iter()
            .find(|o| o.service == "backend")
            .expect("backend outbound");
        assert_eq!(backend.endpoints.len(), 2);
        assert!(!backend.endpoints[1].healthy, "backend-2 is offline");
        // The MeshHTTPRoute's rule alone: it takes priority over the TrafficRoute, as in Kuma.
        assert_eq!(backend.http_rules.len(), 1, "{backend:?}");
        assert!(backend.http_rules[0].origin.starts_with("MeshHTTPRoute/"));
        assert!(!backend.default_route[0].tags.contains_key("version"));
        let (_, be) = built(&views, "backend-1");
        let backend = &be.outbounds[0];
        assert!(
            backend.http_rules.is_empty() && !backend.default_route[0].tags.contains_key("version")
        );
        assert_eq!(be.inbounds[0].permissions[0].source_service, "web");
    }

    #[test]
    fn proxies_routed_alike_share_their_outbounds() {
        let store = SqliteStore::in_memory().expect("store");
        let mut docs = vec![MESH, ROUTES];
        let fleet = fleet();
        docs.extend(fleet.iter().map(String::as_str));
        let views = load(&store, &docs);
        let view = &views.meshes["m"];
        let class = |name: &str| RouteClass::of(name, &view.dataplanes[name], view);
        assert_eq!(class("web-1"), class("web-2"));
        assert_eq!(class("backend-1"), RouteClass::default());
        assert_ne!(class("web-1"), class("backend-1"));
        let outbounds = |name: &str| view.parts.encoded_outbounds(&class(name), view);
        assert_eq!(
            outbounds("web-1").bytes.as_ptr(),
            outbounds("web-2").bytes.as_ptr(),
            "one copy for both web proxies"
        );
        assert_ne!(outbounds("web-1"), outbounds("backend-1"));
        assert_eq!(
            outbounds("backend-1").bytes.as_ptr(),
            outbounds("backend-2").bytes.as_ptr()
        );
    }

    #[test]
    fn a_change_moves_only_the_versions_it_touches() {
        let store = SqliteStore::in_memory().expect("store");
        let mut docs = vec![MESH];
        let fleet = fleet();
        docs.extend(fleet.iter().map(String::as_str));
        let before = load(&store, &docs);
        let after = load(&store, &[PERMIT]);
        let version = |views: &Views, name: &str| built(views, name).0.version().to_string();
        assert_eq!(version(&before, "web-1"), version(&after, "web-1"));
        assert_ne!(version(&before, "backend-1"), version(&after, "backend-1"));
        let moved = load(&store, &[&dataplane("web-2", "web", "10.0.0.99")]);
        assert_ne!(
            version(&after, "backend-1"),
            version(&moved, "backend-1"),
            "an endpoint moved"
        );
    }
}
