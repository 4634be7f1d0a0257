//! Identity on top of the resource store: the store's secrets table holds CA keys, token
//! signing keys and revocations; meshes and dataplanes are read from their resources. Also
//! plugs identity into discovery (trust bundles) and admission (dataplane tokens).

use super::store::{
    BackendKind, DataSource, MeshIdentityLookup, MeshMtls, MtlsBackend, MtlsMode, SecretStore,
    StoreError,
};
use super::{IdentityService, TokenIssuer};
use crate::discovery::{DataplaneAuth, TrustSource};
use crate::store::{ResourceKey, Store};
use std::sync::Arc;
use weft_api::duration::parse_duration;
use weft_api::mesh::{self, CaBackendType, MeshSpec};
use weft_api::{ResourceType, Spec};

/// The resource store seen through identity's traits.
pub struct StoreIdentity(pub Arc<dyn Store>);

impl SecretStore for StoreIdentity {
    fn get_secret(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get_secret(key).map_err(StoreError::new)
    }
    fn create_secret_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.0
            .create_secret_if_absent(key, value)
            .map_err(StoreError::new)
    }
    fn put_secret(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0.put_secret(key, value).map_err(StoreError::new)
    }
    fn delete_secret(&self, key: &str) -> Result<(), StoreError> {
        self.0
            .delete_secret(key)
            .map(|_| ())
            .map_err(StoreError::new)
    }
}

fn data_source(ds: Option<&mesh::DataSource>) -> DataSource {
    match ds {
        Some(mesh::DataSource { file: Some(f), .. }) => DataSource::File(f.into()),
        Some(mesh::DataSource {
            inline: Some(b), ..
        }) => DataSource::Inline(b.clone()),
        Some(mesh::DataSource {
            inline_string: Some(s),
            ..
        }) => DataSource::InlineString(s.clone()),
        // Validation guarantees exactly one source for a provided backend.
        _ => DataSource::InlineString(String::new()),
    }
}

/// Checks the `provided` CAs of a Mesh being written: each must load, be a CA certificate
/// fit to sign (CA:true, keyCertSign) and match its key, as Kuma checks on apply. Without
/// this a bad CA was stored, and the mesh's mTLS then failed for every proxy (no trust
/// bundle, no certificates). The error names the backend's field.
pub fn check_provided_cas(spec: &MeshSpec) -> Result<(), String> {
    for (i, backend) in mesh_mtls(spec).backends.iter().enumerate() {
        let BackendKind::Provided { cert, key } = &backend.kind else {
            continue;
        };
        let field = format!("mtls.backends[{i}]");
        let cert = cert.load().map_err(|e| format!("{field}.conf.cert: {e}"))?;
        let key = key.load().map_err(|e| format!("{field}.conf.key: {e}"))?;
        super::ca::MeshCa::from_provided(&cert, &key)
            .map_err(|e| format!("{field} ({}): {e}", backend.name))?;
    }
    Ok(())
}

/// Identity's view of a mesh's `mtls`.
pub fn mesh_mtls(spec: &MeshSpec) -> MeshMtls {
    let Some(mtls) = &spec.mtls else {
        return MeshMtls::default();
    };
    let dur = |s: Option<&String>| s.and_then(|s| parse_duration(s).ok());
    let backends = mtls
        .backends
        .iter()
        .map(|b| {
            let conf = b.conf.clone().unwrap_or_default();
            MtlsBackend {
                name: b.name.clone(),
                kind: match b.kind {
                    CaBackendType::Builtin => BackendKind::Builtin {
                        ca_expiration: dur(conf
                            .ca_cert
                            .as_ref()
                            .and_then(|c| c.expiration.as_ref())),
                    },
                    CaBackendType::Provided => BackendKind::Provided {
                        cert: data_source(conf.cert.as_ref()),
                        key: data_source(conf.key.as_ref()),
                    },
                },
                dp_cert_lifetime: dur(b
                    .dp_cert
                    .as_ref()
                    .and_then(|d| d.rotation.as_ref())
                    .and_then(|r| r.expiration.as_ref())),
            }
        })
        .collect();
    let mode = match spec.enabled_mtls_backend().map(|b| b.mode()) {
        Some(mesh::MtlsMode::Permissive) => MtlsMode::Permissive,
        _ => MtlsMode::Strict,
    };
    MeshMtls {
        enabled_backend: mtls.enabled_backend.clone(),
        backends,
        mode,
    }
}

impl MeshIdentityLookup for StoreIdentity {
    fn mesh_mtls(&self, mesh: &str) -> Result<Option<MeshMtls>, StoreError> {
        let key = ResourceKey::mesh(mesh);
        Ok(self
            .0
            .get(&key)
            .map_err(StoreError::new)?
            .and_then(|r| match r.resource.spec {
                Spec::Mesh(m) => Some(mesh_mtls(&m)),
                _ => None,
            }))
    }

    fn dataplane_services(
        &self,
        mesh: &str,
        name: &str,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let key = ResourceKey {
            ty: ResourceType::Dataplane,
            mesh: mesh.into(),
            name: name.into(),
        };
        Ok(self
            .0
            .get(&key)
            .map_err(StoreError::new)?
            .and_then(|r| match r.resource.spec {
                Spec::Dataplane(d) => Some(
                    d.networking
                        .inbound
                        .iter()
                        .map(|i| i.service().to_string())
                        .collect(),
                ),
                _ => None,
            }))
    }
}

impl TrustSource for IdentityService {
    fn trust_bundle(&self, mesh: &str, _spec: &MeshSpec) -> Result<String, String> {
        IdentityService::trust_bundle(self, mesh)
            .map(Option::unwrap_or_default)
            .map_err(|e| e.to_string())
    }
}

/// Admits a proxy to discovery only with a valid dataplane token for its mesh and name.
pub struct TokenAuth(pub Arc<TokenIssuer>);

impl DataplaneAuth for TokenAuth {
    fn authenticate(&self, token: Option<&str>, mesh: &str, name: &str) -> Result<(), String> {
        let token = token.ok_or("missing dataplane token: send `authorization: Bearer <token>`")?;
        self.0
            .verify(token, mesh, name)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
