//! Resource types: the [`Resource`] envelope (type, mesh, name, labels) around a typed
//! [`Spec`], and the universal JSON form the REST API and the store exchange.
//!
//! `mesh`, `dataplane` and `policy` hold the bodies; the envelope lives here.

pub mod dataplane;
pub mod mesh;
pub mod policy;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

pub use dataplane::DataplaneSpec;
pub use mesh::MeshSpec;
pub use policy::{
    MeshHttpRouteSpec, MeshTrafficPermissionSpec, TrafficPermissionSpec, TrafficRouteSpec,
};

/// The resource types weft stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ResourceType {
    /// `Mesh`.
    Mesh,
    /// `Dataplane`.
    Dataplane,
    /// `TrafficPermission` (legacy).
    TrafficPermission,
    /// `TrafficRoute` (legacy).
    TrafficRoute,
    /// `MeshTrafficPermission`.
    MeshTrafficPermission,
    /// `MeshHTTPRoute`.
    #[serde(rename = "MeshHTTPRoute")]
    MeshHttpRoute,
}

impl ResourceType {
    /// Every type, parents first (the order in which a cascade must not delete them).
    pub const ALL: [ResourceType; 6] = [
        ResourceType::Mesh,
        ResourceType::Dataplane,
        ResourceType::TrafficPermission,
        ResourceType::TrafficRoute,
        ResourceType::MeshTrafficPermission,
        ResourceType::MeshHttpRoute,
    ];

    /// The `type:` / `kind:` name, e.g. `MeshHTTPRoute`.
    pub fn name(self) -> &'static str {
        match self {
            ResourceType::Mesh => "Mesh",
            ResourceType::Dataplane => "Dataplane",
            ResourceType::TrafficPermission => "TrafficPermission",
            ResourceType::TrafficRoute => "TrafficRoute",
            ResourceType::MeshTrafficPermission => "MeshTrafficPermission",
            ResourceType::MeshHttpRoute => "MeshHTTPRoute",
        }
    }

    /// The REST collection name, e.g. `traffic-permissions` (Kuma's paths).
    pub fn plural(self) -> &'static str {
        match self {
            ResourceType::Mesh => "meshes",
            ResourceType::Dataplane => "dataplanes",
            ResourceType::TrafficPermission => "traffic-permissions",
            ResourceType::TrafficRoute => "traffic-routes",
            ResourceType::MeshTrafficPermission => "meshtrafficpermissions",
            ResourceType::MeshHttpRoute => "meshhttproutes",
        }
    }

    /// Looks a type up by its `type:` name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Looks a type up by REST plural, `type:` name, or the lower-case singular a CLI user
    /// types (`dataplane`, `traffic-route`, `meshhttproute`).
    pub fn from_any_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        Self::ALL.into_iter().find(|t| {
            t.plural() == lower
                || t.name().to_ascii_lowercase() == lower
                || t.plural().trim_end_matches('s') == lower
                || (*t == ResourceType::Mesh && lower == "mesh")
        })
    }

    /// Whether the type lives inside a mesh (everything but `Mesh`).
    pub fn is_mesh_scoped(self) -> bool {
        self != ResourceType::Mesh
    }

    /// Whether the body sits under `spec:` in the universal form (targetRef policies).
    pub fn has_spec_envelope(self) -> bool {
        matches!(
            self,
            ResourceType::MeshTrafficPermission | ResourceType::MeshHttpRoute
        )
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The typed body of a resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// A mesh.
    Mesh(MeshSpec),
    /// A proxy.
    Dataplane(DataplaneSpec),
    /// A legacy permission.
    TrafficPermission(TrafficPermissionSpec),
    /// A legacy route.
    TrafficRoute(TrafficRouteSpec),
    /// A targetRef permission.
    MeshTrafficPermission(MeshTrafficPermissionSpec),
    /// A targetRef HTTP route.
    MeshHttpRoute(MeshHttpRouteSpec),
}

impl Spec {
    /// The type of this body.
    pub fn resource_type(&self) -> ResourceType {
        match self {
            Spec::Mesh(_) => ResourceType::Mesh,
            Spec::Dataplane(_) => ResourceType::Dataplane,
            Spec::TrafficPermission(_) => ResourceType::TrafficPermission,
            Spec::TrafficRoute(_) => ResourceType::TrafficRoute,
            Spec::MeshTrafficPermission(_) => ResourceType::MeshTrafficPermission,
            Spec::MeshHttpRoute(_) => ResourceType::MeshHttpRoute,
        }
    }

    /// The body as universal JSON fields (targetRef policies nest it under `spec`).
    pub fn to_body(&self) -> Value {
        let inner = match self {
            Spec::Mesh(s) => serde_json::to_value(s),
            Spec::Dataplane(s) => serde_json::to_value(s),
            Spec::TrafficPermission(s) => serde_json::to_value(s),
            Spec::TrafficRoute(s) => serde_json::to_value(s),
            Spec::MeshTrafficPermission(s) => serde_json::to_value(s),
            Spec::MeshHttpRoute(s) => serde_json::to_value(s),
        }
        // Serializing these plain structs into a JSON value cannot fail.
        .unwrap_or(Value::Null);
        if self.resource_type().has_spec_envelope() {
            let mut m = Map::new();
            m.insert("spec".into(), inner);
            Value::Object(m)
        } else {
            inner
        }
    }

    /// Parses a universal body (the fields besides type/name/mesh/labels) of type `ty`.
    /// The error carries the path of the offending field within the body.
    pub fn from_body(ty: ResourceType, body: Value) -> Result<Spec, (String, String)> {
        fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
            serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                (if path == "." { String::new() } else { path }, inner)
            })
        }
        let body = if ty.has_spec_envelope() {
            let Value::Object(mut m) = body else {
                return Err((String::new(), "expected a mapping".into()));
            };
            let spec = m
                .remove("spec")
                .ok_or_else(|| ("spec".to_string(), "missing field `spec`".to_string()))?;
            if let Some(extra) = m.keys().next() {
                return Err((
                    extra.clone(),
                    format!("unknown field `{extra}`, expected `spec`"),
                ));
            }
            spec
        } else {
            body
        };
        let prefix = if ty.has_spec_envelope() { "spec" } else { "" };
        let result = match ty {
            ResourceType::Mesh => typed(body).map(Spec::Mesh),
            ResourceType::Dataplane => typed(body).map(Spec::Dataplane),
            ResourceType::TrafficPermission => typed(body).map(Spec::TrafficPermission),
            ResourceType::TrafficRoute => typed(body).map(Spec::TrafficRoute),
            ResourceType::MeshTrafficPermission => typed(body).map(Spec::MeshTrafficPermission),
            ResourceType::MeshHttpRoute => typed(body).map(Spec::MeshHttpRoute),
        };
        result.map_err(|(path, msg)| (join_path(prefix, &path), msg))
    }
}

/// Joins two field paths with a dot, skipping empty parts.
pub(crate) fn join_path(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ if b.starts_with('[') => format!("{a}{b}"),
        _ => format!("{a}.{b}"),
    }
}

/// A resource: its identity and its typed body.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// Name, unique per (type, mesh).
    pub name: String,
    /// The owning mesh; `None` only for a `Mesh`.
    pub mesh: Option<String>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// The body.
    pub spec: Spec,
}

impl Resource {
    /// The resource's type.
    pub fn resource_type(&self) -> ResourceType {
        self.spec.resource_type()
    }

    /// The mesh a resource belongs to; a `Mesh` belongs to itself.
    pub fn mesh_name(&self) -> &str {
        self.mesh.as_deref().unwrap_or(&self.name)
    }

    /// The universal JSON form, with store metadata when given.
    pub fn to_universal(&self, meta: Option<&ResourceMeta>) -> Value {
        let mut m = Map::new();
        m.insert(
            "type".into(),
            Value::String(self.resource_type().name().into()),
        );
        if let Some(mesh) = &self.mesh {
            m.insert("mesh".into(), Value::String(mesh.clone()));
        }
        m.insert("name".into(), Value::String(self.name.clone()));
        if !self.labels.is_empty() {
            m.insert(
                "labels".into(),
                serde_json::to_value(&self.labels).unwrap_or(Value::Null),
            );
        }
        if let Some(meta) = meta {
            m.insert(
                "creationTime".into(),
                Value::String(meta.creation_time.clone()),
            );
            m.insert(
                "modificationTime".into(),
                Value::String(meta.modification_time.clone()),
            );
            m.insert("version".into(), Value::from(meta.version));
        }
        if let Value::Object(body) = self.spec.to_body() {
            m.extend(body);
        }
        Value::Object(m)
    }
}

/// What the store keeps beside a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceMeta {
    /// Incremented on every write; a PUT carrying an older version is refused (409).
    pub version: u64,
    /// RFC 3339 time of creation.
    pub creation_time: String,
    /// RFC 3339 time of the last write.
    pub modification_time: String,
}
