//! weft-proxy: the sidecar data plane of the weft service mesh.
//!
//! The proxy takes its identity and configuration from the control plane and
//! carries the application's traffic over mesh mTLS. Modules, one concern each:
//! - [`identity`]: key generation, `Identity.Certify`, renewal; the current
//!   certificate lives in a lock-free [`identity::CertHandle`].
//! - [`tls`]: rustls client/server configs for mesh mTLS (TLS 1.3, SPIFFE checks).
//! - [`admin`]: the loopback admin endpoint (`/live`, `/ready`, `/certs`, `/metrics`).
//! - [`metrics`]: the Prometheus registry and every metric.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod identity;
pub mod metrics;
pub mod tls;
