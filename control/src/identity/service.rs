//! The `weft.v1.Identity` gRPC service: authenticates a proxy by its dataplane
//! token and signs its CSR with the CA of its mesh's enabled mTLS backend.
//!
//! Checks, in order: a bearer token is present; it verifies for exactly this
//! mesh and dataplane ([`TokenIssuer::verify`]); the mesh exists and has mTLS
//! enabled; the dataplane exists (its inbounds' `kuma.io/service` tags are the
//! only identities put in the certificate); the CSR's signature verifies.

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};
use weft_api::proto::identity_server::{Identity, IdentityServer};
use weft_api::proto::{CertifyRequest, CertifyResponse};

use super::ca::{CaError, CaManager, DEFAULT_LEAF_LIFETIME};
use super::store::{MeshIdentityLookup, SecretStore, StoreError};
use super::tokens::{TokenError, TokenIssuer};

/// Largest CSR accepted (a P-256 CSR is about 250 bytes).
const MAX_CSR_LEN: usize = 16 * 1024;

/// Why a certify request was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// No `authorization: Bearer <token>` metadata.
    #[error("missing dataplane token (metadata `authorization: Bearer <token>`)")]
    MissingToken,
    /// The token was refused.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// No such mesh.
    #[error("mesh {0:?} does not exist")]
    UnknownMesh(String),
    /// No such dataplane.
    #[error("dataplane {name:?} is not registered in mesh {mesh:?}")]
    UnknownDataplane {
        /// The mesh.
        mesh: String,
        /// The dataplane.
        name: String,
    },
    /// The mesh has mTLS off, so there is nothing to certify.
    #[error("mesh {0:?} has mTLS disabled")]
    MtlsDisabled(String),
    /// The mesh's mTLS section is inconsistent.
    #[error("mesh {mesh:?}: {reason}")]
    BadMeshConfig {
        /// The mesh.
        mesh: String,
        /// What is wrong.
        reason: String,
    },
    /// The request itself is unusable.
    #[error("{0}")]
    BadRequest(String),
    /// Loading the CA or signing failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CertifyError> for Status {
    fn from(err: CertifyError) -> Self {
        let msg = err.to_string();
        match err {
            CertifyError::MissingToken => Status::unauthenticated(msg),
            CertifyError::Token(TokenError::WrongMesh { .. } | TokenError::WrongName { .. }) => {
                Status::permission_denied(msg)
            }
            CertifyError::Token(TokenError::Store(_)) | CertifyError::Store(_) => {
                Status::unavailable(msg)
            }
            CertifyError::Token(TokenError::CorruptKey(_)) => Status::internal(msg),
            CertifyError::Token(_) => Status::unauthenticated(msg),
            CertifyError::UnknownMesh(_) | CertifyError::UnknownDataplane { .. } => {
                Status::not_found(msg)
            }
            CertifyError::MtlsDisabled(_) | CertifyError::BadMeshConfig { .. } => {
                Status::failed_precondition(msg)
            }
            CertifyError::BadRequest(_) => Status::invalid_argument(msg),
            CertifyError::Ca(CaError::Csr(_) | CaError::BadService(_)) => {
                Status::invalid_argument(msg)
            }
            CertifyError::Ca(CaError::NoServices | CaError::Backend { .. }) => {
                Status::failed_precondition(msg)
            }
            CertifyError::Ca(CaError::Store(_)) => Status::unavailable(msg),
            CertifyError::Ca(_) => Status::internal(msg),
        }
    }
}

/// The Identity service. Cheap to clone.
#[derive(Clone)]
pub struct IdentityService {
    tokens: Arc<TokenIssuer>,
    cas: Arc<CaManager>,
    lookup: Arc<dyn MeshIdentityLookup>,
    on_issued: Option<IssueObserver>,
}

/// Told (mesh, dataplane, notAfter) after each certificate issued, e.g. for insights.
pub type IssueObserver = Arc<dyn Fn(&str, &str, std::time::SystemTime) + Send + Sync>;

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService").finish_non_exhaustive()
    }
}

impl IdentityService {
    /// A service keeping CAs, token keys and revocations in `secrets`, and
    /// reading meshes and dataplanes through `lookup`.
    pub fn new(secrets: Arc<dyn SecretStore>, lookup: Arc<dyn MeshIdentityLookup>) -> Self {
        Self::with_parts(
            Arc::new(TokenIssuer::new(secrets.clone())),
            Arc::new(CaManager::new(secrets)),
            lookup,
        )
    }

    /// A service sharing its token issuer and CA manager with the rest of the
    /// control plane (the REST API issues tokens, discovery sends trust bundles).
    pub fn with_parts(
        tokens: Arc<TokenIssuer>,
        cas: Arc<CaManager>,
        lookup: Arc<dyn MeshIdentityLookup>,
    ) -> Self {
        Self {
            tokens,
            cas,
            lookup,
            on_issued: None,
        }
    }

    /// Calls `observer` after every certificate issued.
    pub fn with_issue_observer(mut self, observer: IssueObserver) -> Self {
        self.on_issued = Some(observer);
        self
    }

    /// The token issuer.
    pub fn tokens(&self) -> &Arc<TokenIssuer> {
        &self.tokens
    }

    /// The CA manager.
    pub fn cas(&self) -> &Arc<CaManager> {
        &self.cas
    }

    /// The tonic server to add to a `tonic::transport::Server`.
    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    /// The PEM trust bundle of `mesh` (its enabled backend's CA), or `None` when
    /// mTLS is off. Creates the builtin CA if needed.
    pub fn trust_bundle(&self, mesh: &str) -> Result<Option<String>, CertifyError> {
        let mtls = self
            .lookup
            .mesh_mtls(mesh)?
            .ok_or_else(|| CertifyError::UnknownMesh(mesh.to_string()))?;
        let backend = mtls
            .enabled()
            .map_err(|reason| CertifyError::BadMeshConfig {
                mesh: mesh.to_string(),
                reason,
            })?;
        match backend {
            None => Ok(None),
            Some(b) => Ok(Some(self.cas.ca_for(mesh, b)?.cert_pem().to_string())),
        }
    }

    /// Checks `token` and signs `req`'s CSR: the whole of `Certify` without gRPC.
    pub fn certify(
        &self,
        token: Option<&str>,
        req: &CertifyRequest,
    ) -> Result<CertifyResponse, CertifyError> {
        let token = token.ok_or(CertifyError::MissingToken)?;
        if req.csr.len() > MAX_CSR_LEN {
            return Err(CertifyError::BadRequest(format!(
                "CSR is {} bytes, more than {MAX_CSR_LEN}",
                req.csr.len()
            )));
        }
        let mesh = req.mesh.as_str();
        let name = req.dataplane.as_str();
        // The token first: say nothing about meshes or dataplanes to strangers.
        self.tokens.verify(token, mesh, name)?;
        let mtls = self
            .lookup
            .mesh_mtls(mesh)?
            .ok_or_else(|| CertifyError::UnknownMesh(mesh.to_string()))?;
        let backend = mtls
            .enabled()
            .map_err(|reason| CertifyError::BadMeshConfig {
                mesh: mesh.to_string(),
                reason,
            })?
            .ok_or_else(|| CertifyError::MtlsDisabled(mesh.to_string()))?;
        let mut services = self.lookup.dataplane_services(mesh, name)?.ok_or_else(|| {
            CertifyError::UnknownDataplane {
                mesh: mesh.to_string(),
                name: name.to_string(),
            }
        })?;
        let mut seen = std::collections::HashSet::new();
        services.retain(|s| seen.insert(s.clone()));
        let ca = self.cas.ca_for(mesh, backend)?;
        let lifetime = backend.dp_cert_lifetime.unwrap_or(DEFAULT_LEAF_LIFETIME);
        let leaf = ca.sign_leaf(&req.csr, mesh, &services, lifetime)?;
        let not_after_unix = leaf
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(CertifyResponse {
            cert_chain_pem: leaf.cert_pem,
            trust_bundle_pem: ca.cert_pem().to_string(),
            not_after_unix: i64::try_from(not_after_unix).unwrap_or(i64::MAX),
            backend: backend.name.clone(),
        })
    }
}

/// The bearer token in `authorization` metadata, if any.
fn bearer(meta: &tonic::metadata::MetadataMap) -> Option<&str> {
    let value = meta.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let token = bearer(request.metadata()).map(str::to_owned);
        let req = request.into_inner();
        // Certify reads and may write the store (a CA on first need): keep it off the runtime.
        let this = self.clone();
        let (req, result) = tokio::task::spawn_blocking(move || {
            let result = IdentityService::certify(&this, token.as_deref(), &req);
            (req, result)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        match result {
            Ok(resp) => {
                tracing::info!(mesh = %req.mesh, dataplane = %req.dataplane,
                    not_after = resp.not_after_unix, "certified dataplane");
                if let Some(observe) = &self.on_issued {
                    let not_after = std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(
                            u64::try_from(resp.not_after_unix).unwrap_or(0),
                        );
                    observe(&req.mesh, &req.dataplane, not_after);
                }
                Ok(Response::new(resp))
            }
            Err(err) => {
                tracing::warn!(mesh = %req.mesh, dataplane = %req.dataplane,
                    error = %err, "refused certify request");
                Err(err.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::store::{BackendKind, MemoryStore, MeshMtls, MtlsBackend, MtlsMode};
    use std::time::Duration;

    fn setup() -> (Arc<MemoryStore>, IdentityService) {
        let store = Arc::new(MemoryStore::new());
        for mesh in ["a", "b"] {
            store.set_mesh(
                mesh,
                MeshMtls {
                    enabled_backend: Some("ca-1".into()),
                    backends: vec![MtlsBackend {
                        name: "ca-1".into(),
                        kind: BackendKind::Builtin {
                            ca_expiration: None,
                        },
                        dp_cert_lifetime: Some(Duration::from_secs(3600)),
                    }],
                    mode: MtlsMode::Strict,
                },
            );
            store.set_dataplane(mesh, "dp-1", vec!["web".into(), "web".into()]);
        }
        store.set_mesh("off", MeshMtls::default());
        store.set_dataplane("off", "dp-1", vec!["web".into()]);
        let svc = IdentityService::new(store.clone(), store.clone());
        (store, svc)
    }

    fn csr() -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    fn req(mesh: &str, dp: &str) -> CertifyRequest {
        CertifyRequest {
            csr: csr(),
            mesh: mesh.into(),
            dataplane: dp.into(),
        }
    }

    #[test]
    fn certifies_and_maps_refusals_to_statuses() {
        let (_, svc) = setup();
        let day = Duration::from_secs(86_400);
        let tok_a = svc.tokens().issue("a", "dp-1", day).unwrap().token;
        let resp = svc.certify(Some(&tok_a), &req("a", "dp-1")).unwrap();
        assert_eq!(resp.cert_chain_pem.matches("BEGIN CERTIFICATE").count(), 1);
        assert_eq!(
            resp.trust_bundle_pem,
            svc.trust_bundle("a").unwrap().unwrap()
        );
        assert_eq!(resp.backend, "ca-1");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((resp.not_after_unix - now - 3600).abs() <= 2);

        let code = |r: Result<CertifyResponse, CertifyError>| Status::from(r.unwrap_err()).code();
        use tonic::Code;
        assert_eq!(
            code(svc.certify(None, &req("a", "dp-1"))),
            Code::Unauthenticated
        );
        assert_eq!(
            code(svc.certify(Some(&tok_a), &req("b", "dp-1"))),
            Code::PermissionDenied
        );
        assert_eq!(
            code(svc.certify(Some("x.y.z"), &req("a", "dp-1"))),
            Code::Unauthenticated
        );
        let tok_ghost = svc.tokens().issue("a", "ghost", day).unwrap().token;
        assert_eq!(
            code(svc.certify(Some(&tok_ghost), &req("a", "ghost"))),
            Code::NotFound
        );
        let tok_off = svc.tokens().issue("off", "dp-1", day).unwrap().token;
        assert_eq!(
            code(svc.certify(Some(&tok_off), &req("off", "dp-1"))),
            Code::FailedPrecondition
        );
        let mut bad = req("a", "dp-1");
        bad.csr = b"not a csr".to_vec();
        assert_eq!(code(svc.certify(Some(&tok_a), &bad)), Code::InvalidArgument);
        assert_eq!(svc.trust_bundle("off").unwrap(), None);
    }

    #[test]
    fn bearer_parsing() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&m), None);
        m.insert("authorization", "Bearer abc.def.ghi".parse().unwrap());
        assert_eq!(bearer(&m), Some("abc.def.ghi"));
        m.insert("authorization", "Basic xyz".parse().unwrap());
        assert_eq!(bearer(&m), None);
    }
}
