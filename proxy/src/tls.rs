//! rustls configurations for mesh mTLS on the data path (TLS 1.3 only).
//!
//! Both configs read the proxy's current certificate, key and trust bundle from
//! a [`CertHandle`] at every handshake, so a renewed certificate (or a new trust
//! bundle) applies to the next connection without rebuilding anything and
//! without touching established ones.
//!
//! - [`client_config`]: presents our certificate, and accepts a server only if
//!   its chain ends at the mesh CA **and** it carries the URI SAN
//!   `spiffe://<mesh>/<expected-service>`. rustls's stock verifier cannot do
//!   this (it wants a DNS or IP name and rejects URI-only certificates).
//! - [`server_config`]: requires a client certificate chained to the mesh CA
//!   with a `spiffe://<mesh>/` URI SAN; a proxy of another mesh fails the
//!   handshake.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::identity::CertHandle;

/// Installs aws-lc-rs as rustls's process-wide default crypto provider. Call
/// once at start; later calls are harmless.
pub fn install_default_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The URI SANs of a certificate (empty if it does not parse).
pub fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x509)) = X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_string()),
            _ => None,
        })
        .collect()
}

/// The SPIFFE IDs of `mesh` that a certificate carries (`spiffe://<mesh>/...`).
pub fn mesh_spiffe_ids(cert: &CertificateDer<'_>, mesh: &str) -> Vec<String> {
    let prefix = format!("spiffe://{mesh}/");
    uri_sans(cert)
        .into_iter()
        .filter(|u| u.starts_with(&prefix) && u.len() > prefix.len())
        .collect()
}

/// A client config for a mesh connection to `expected_service`. Set ALPN on a
/// clone if needed. Fails only if the provider lacks TLS 1.3.
pub fn client_config(cert: &CertHandle, expected_service: &str) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = Arc::new(MeshServerVerifier {
        cert: cert.clone(),
        expected_service: expected_service.to_string(),
        provider: provider.clone(),
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentCert(cert.clone()))))
}

/// A server config for mesh inbound connections. Fails only if the provider
/// lacks TLS 1.3.
pub fn server_config(cert: &CertHandle) -> Result<ServerConfig, Error> {
    let provider = provider();
    let verifier = Arc::new(MeshClientVerifier {
        cert: cert.clone(),
        provider: provider.clone(),
    });
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(cert.clone()))))
}

fn no_identity() -> Error {
    Error::General("this proxy holds no mesh certificate yet".into())
}

fn name_error(msg: String) -> Error {
    #[derive(Debug)]
    struct SpiffeMismatch(String);
    impl std::fmt::Display for SpiffeMismatch {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for SpiffeMismatch {}
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        SpiffeMismatch(msg),
    ))))
}

/// Presents the current certificate, on either side of a handshake.
#[derive(Debug)]
struct CurrentCert(CertHandle);

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load().map(|s| s.certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().map(|s| s.certified_key.clone())
    }
}

/// Chain to the mesh CA, then `spiffe://<mesh>/<expected_service>`.
#[derive(Debug)]
struct MeshServerVerifier {
    cert: CertHandle,
    expected_service: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let state = self.cert.load().ok_or_else(no_identity)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &state.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let want = format!("spiffe://{}/{}", state.mesh, self.expected_service);
        let have = uri_sans(end_entity);
        if !have.contains(&want) {
            return Err(name_error(format!(
                "server certificate is not {want} (it names {have:?})"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client certificate required, chained to the mesh CA (webpki's client
/// verifier, rebuilt with each trust bundle), with a `spiffe://<mesh>/` SAN.
#[derive(Debug)]
struct MeshClientVerifier {
    cert: CertHandle,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; our clients have one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let state = self.cert.load().ok_or_else(no_identity)?;
        state
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        if mesh_spiffe_ids(end_entity, &state.mesh).is_empty() {
            return Err(name_error(format!(
                "client certificate has no spiffe://{}/ identity (it names {:?})",
                state.mesh,
                uri_sans(end_entity)
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client configs by (destination service, ALPN).
type ClientConfigCache = std::collections::HashMap<(String, &'static [u8]), Arc<ClientConfig>>;

/// The data path's [`MeshTls`](crate::mesh_tls::MeshTls) backed by the proxy's identity: one
/// client config per (service, ALPN) and one server config, built once and cached. They read
/// the current certificate and trust bundle at each handshake, so renewals need no rebuild.
pub struct IdentityTls {
    cert: CertHandle,
    clients: std::sync::Mutex<ClientConfigCache>,
    server: std::sync::OnceLock<Option<Arc<ServerConfig>>>,
}

/// The most destination services whose client configs are kept at once.
const MAX_CLIENT_CONFIGS: usize = 4096;

impl IdentityTls {
    /// Mesh TLS from the certificate in `cert`.
    pub fn new(cert: CertHandle) -> Self {
        IdentityTls {
            cert,
            clients: Default::default(),
            server: Default::default(),
        }
    }
}

impl crate::mesh_tls::MeshTls for IdentityTls {
    fn client_config(
        &self,
        _mesh: &str,
        service: &str,
        alpn: &'static [u8],
    ) -> Option<Arc<ClientConfig>> {
        self.cert.load()?;
        let mut cache = self.clients.lock().ok()?;
        if let Some(c) = cache.get(&(service.to_string(), alpn)) {
            return Some(c.clone());
        }
        if cache.len() >= MAX_CLIENT_CONFIGS {
            // Services renamed over and over would grow it without end; rebuilding costs a
            // little per destination, once.
            cache.clear();
        }
        let mut config = client_config(&self.cert, service).ok()?;
        config.alpn_protocols = vec![alpn.to_vec()];
        // The data path connects by IP; the identity check is the SPIFFE SAN, not SNI.
        config.enable_sni = false;
        let config = Arc::new(config);
        cache.insert((service.to_string(), alpn), config.clone());
        Some(config)
    }

    fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.cert.load()?;
        self.server
            .get_or_init(|| {
                let mut config = server_config(&self.cert).ok()?;
                config.alpn_protocols = crate::mesh_tls::MESH_ALPN_PROTOCOLS
                    .iter()
                    .map(|p| p.to_vec())
                    .collect();
                Some(Arc::new(config))
            })
            .clone()
    }
}
