//! Mesh identity on the control plane: per-mesh CAs, dataplane tokens, the
//! control plane's own TLS, and the `Identity` gRPC service that signs proxies' CSRs.
//!
//! The module reads and writes persistent state only through the two traits in
//! [`store`]: [`SecretStore`] (opaque secrets: CA keys, token signing keys,
//! revocations) and [`MeshIdentityLookup`] (what it needs to know about meshes and
//! dataplanes). The resource store implements both; [`MemoryStore`] is an
//! in-memory (optionally file-backed) implementation for tests and benchmarks.
//!
//! Wiring, in short:
//! ```no_run
//! # use std::sync::Arc;
//! # use weft_control::identity::{MemoryStore, service::IdentityService};
//! let store = Arc::new(MemoryStore::new());
//! let service = IdentityService::new(store.clone(), store);
//! let _grpc = service.into_server(); // add to a tonic Server with the cp_tls config
//! ```

pub mod adapter;
pub mod ca;
pub mod cp_tls;
pub mod service;
pub mod store;
pub mod tokens;

pub use ca::{CaError, CaManager, IssuedLeaf, MeshCa};
pub use service::{CertifyError, IdentityService};
pub use store::{
    BackendKind, DataSource, MemoryStore, MeshIdentityLookup, MeshMtls, MtlsBackend, MtlsMode,
    SecretStore, StoreError,
};
pub use tokens::{DataplaneClaims, IssuedToken, TokenError, TokenIssuer};
