//! The seam between the data path and the proxy's identity: where TLS configs come from, the
//! ALPN names of the mesh transport, and reading a peer's SPIFFE identity.
//!
//! The data path asks a [`MeshTls`] for a config each time it opens or accepts a mesh
//! connection, so a renewed certificate applies to the next connection at once and
//! established connections keep the one they started with.

use std::sync::Arc;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// ALPN of the mesh transport: HTTP/2 between proxies, carrying requests and, as CONNECT
/// streams, opaque TCP.
pub const ALPN_H2: &[u8] = b"weft/h2";
/// Every mesh ALPN, in the server's order of preference.
pub const MESH_ALPN_PROTOCOLS: &[&[u8]] = &[ALPN_H2];

/// Where mesh TLS configs come from (the proxy's identity, in production).
///
/// Contract for implementations:
/// - TLS 1.3 only; the proxy's current certificate and key are presented.
/// - [`MeshTls::client_config`]: verifies the server's chain against the mesh trust bundle and
///   requires the URI SAN [`spiffe_id`]`(mesh, service)`; offers exactly `alpn`. The data path
///   connects with the endpoint's IP as server name, so no SNI is sent and the verifier must
///   ignore the name. Implementations should cache configs per `(service, alpn)`.
/// - [`MeshTls::server_config`]: requires a client certificate that chains to the mesh trust
///   bundle and advertises [`MESH_ALPN_PROTOCOLS`].
/// - Both return `None` while the proxy has no certificate; the connection is then refused.
pub trait MeshTls: Send + Sync + 'static {
    /// The client config for a mesh connection to `service` of `mesh`, offering `alpn`.
    fn client_config(
        &self,
        mesh: &str,
        service: &str,
        alpn: &'static [u8],
    ) -> Option<Arc<rustls::ClientConfig>>;

    /// The server config for inbound mesh connections.
    fn server_config(&self) -> Option<Arc<rustls::ServerConfig>>;
}

/// A [`MeshTls`] without certificates, for meshes with mTLS off.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMeshTls;

impl MeshTls for NoMeshTls {
    fn client_config(
        &self,
        _: &str,
        _: &str,
        _: &'static [u8],
    ) -> Option<Arc<rustls::ClientConfig>> {
        None
    }
    fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        None
    }
}

/// The SPIFFE ID of a service: `spiffe://<mesh>/<service>`.
pub fn spiffe_id(mesh: &str, service: &str) -> String {
    format!("spiffe://{mesh}/{service}")
}

/// The services of `mesh` that a certificate (DER) names in its URI SANs. Empty when the
/// certificate does not parse or names no service of this mesh.
pub fn peer_services(cert_der: &[u8], mesh: &str) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    let prefix = format!("spiffe://{mesh}/");
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => uri.strip_prefix(prefix.as_str()),
            _ => None,
        })
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .map(str::to_string)
        .collect()
}
