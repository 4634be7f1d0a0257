//! Per-mesh certificate authorities and leaf signing.
//!
//! [`MeshCa`] is one CA: a `builtin` one generated here (ECDSA P-256, subject
//! `O=weft, CN=<mesh>`, URI SAN `spiffe://<mesh>`), or a `provided` one loaded
//! from the user's certificate and key and checked to be a CA. [`MeshCa::sign_leaf`]
//! turns a proxy's CSR into a workload certificate whose identity comes only from
//! the control plane (`spiffe://<mesh>/<service>` per service), never from the CSR.
//!
//! [`CaManager`] finds the CA of a (mesh, backend): builtin CAs are created on
//! first need and stored through [`SecretStore`] so they survive restarts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::{FromDer as _, X509Certificate, X509CertificationRequest};

use super::store::{BackendKind, MtlsBackend, SecretStore, StoreError};

/// Validity of a builtin CA when `conf.caCert.expiration` is not set: 10 years.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a workload certificate when `dpCert.rotation.expiration` is not set.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How far back `notBefore` is set, to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(60);

/// Errors from loading CAs and signing leaves.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The user's CA (or a stored one) cannot be used; the message says why.
    #[error("invalid CA: {0}")]
    InvalidCa(String),
    /// A (mesh, backend) CA could not be loaded.
    #[error("mesh {mesh:?}, mTLS backend {backend:?}: {source}")]
    Backend {
        /// The mesh.
        mesh: String,
        /// The backend name.
        backend: String,
        /// What went wrong.
        #[source]
        source: Box<CaError>,
    },
    /// The CSR is unparsable, badly signed or has an unsupported key.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// A service name that cannot be put in a SPIFFE ID.
    #[error("service name {0:?} cannot appear in a SPIFFE ID")]
    BadService(String),
    /// Nothing to certify.
    #[error("the dataplane has no inbound with a kuma.io/service tag")]
    NoServices,
    /// rcgen failed to build or sign a certificate.
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
    /// The secret store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A workload certificate issued by [`MeshCa::sign_leaf`].
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    /// The leaf, PEM.
    pub cert_pem: String,
    /// The leaf, DER.
    pub cert_der: CertificateDer<'static>,
    /// Its `notAfter`.
    pub not_after: SystemTime,
    /// Its serial number, hex.
    pub serial_hex: String,
}

/// One mesh certificate authority, able to sign leaves.
pub struct MeshCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Generates a builtin CA for `mesh` valid for `validity`. Returns the CA and
    /// its persisted form (certificate PEM followed by key PEM) for
    /// [`MeshCa::from_persisted`].
    pub fn generate_builtin(mesh: &str, validity: Duration) -> Result<(Self, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "weft");
        dn.push(DnType::CommonName, mesh);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{mesh}")
                .try_into()
                .map_err(|_| CaError::BadService(mesh.to_string()))?,
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - Duration::from_secs(10)).into();
        params.not_after = not_after(now, validity)?.into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let persisted = format!("{}{}", cert.pem(), key.serialize_pem());
        let ca = Self::from_parts(cert.der().clone(), key)?;
        Ok((ca, persisted))
    }

    /// Loads a CA stored by [`MeshCa::generate_builtin`].
    pub fn from_persisted(pem: &[u8]) -> Result<Self, CaError> {
        let cert = CertificateDer::from_pem_slice(pem)
            .map_err(|e| CaError::InvalidCa(format!("stored certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| CaError::InvalidCa(format!("stored key: {e}")))?;
        let key =
            KeyPair::try_from(&key).map_err(|e| CaError::InvalidCa(format!("stored key: {e}")))?;
        Self::from_parts(cert, key)
    }

    /// Loads a user-provided CA: `cert` is PEM or DER (the first certificate is the
    /// CA), `key` is PEM (PKCS#8, SEC1 or PKCS#1) or DER. The certificate must be a
    /// CA (basicConstraints CA:true), allow keyCertSign, not allow keyAgreement,
    /// be currently valid, and match the key.
    pub fn from_provided(cert: &[u8], key: &[u8]) -> Result<Self, CaError> {
        let cert_der = if looks_like_pem(cert) {
            CertificateDer::from_pem_slice(cert)
                .map_err(|e| CaError::InvalidCa(format!("cert is not a PEM certificate: {e}")))?
        } else {
            CertificateDer::from(cert.to_vec())
        };
        let key_der = if looks_like_pem(key) {
            PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| CaError::InvalidCa(format!("key is not a PEM private key: {e}")))?
        } else {
            PrivateKeyDer::try_from(key.to_vec())
                .map_err(|e| CaError::InvalidCa(format!("key is not a DER private key: {e}")))?
        };
        let key = KeyPair::try_from(&key_der).map_err(|e| {
            CaError::InvalidCa(format!("key: unsupported or malformed private key: {e}"))
        })?;

        let (_, x509) = X509Certificate::from_der(&cert_der)
            .map_err(|e| CaError::InvalidCa(format!("cert is not an X.509 certificate: {e}")))?;
        let bc = x509
            .basic_constraints()
            .map_err(|e| CaError::InvalidCa(format!("cert basicConstraints: {e}")))?;
        if !bc.is_some_and(|bc| bc.value.ca) {
            return Err(CaError::InvalidCa(
                "cert is not a CA certificate (basicConstraints CA:true is missing)".into(),
            ));
        }
        let ku = x509
            .key_usage()
            .map_err(|e| CaError::InvalidCa(format!("cert keyUsage: {e}")))?;
        match ku {
            Some(ku) if ku.value.key_cert_sign() && !ku.value.key_agreement() => {}
            Some(ku) if ku.value.key_agreement() => {
                return Err(CaError::InvalidCa(
                    "cert keyUsage must not include keyAgreement".into(),
                ));
            }
            _ => {
                return Err(CaError::InvalidCa(
                    "cert keyUsage does not include keyCertSign".into(),
                ));
            }
        }
        if !x509.validity().is_valid() {
            return Err(CaError::InvalidCa(format!(
                "cert is not valid now (valid from {} to {})",
                x509.validity().not_before,
                x509.validity().not_after
            )));
        }
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(CaError::InvalidCa(
                "key does not match the certificate's public key".into(),
            ));
        }
        drop(x509);
        Self::from_parts(cert_der, key)
    }

    fn from_parts(cert_der: CertificateDer<'static>, key: KeyPair) -> Result<Self, CaError> {
        let (_, x509) = X509Certificate::from_der(&cert_der)
            .map_err(|e| CaError::InvalidCa(format!("certificate: {e}")))?;
        let not_after = asn1_to_system_time(x509.validity().not_after.timestamp());
        drop(x509);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CaError::InvalidCa(format!("certificate: {e}")))?;
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        Ok(Self {
            cert_der,
            cert_pem,
            issuer,
            not_after,
        })
    }

    /// The CA certificate, PEM (the mesh's trust bundle).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate's `notAfter`.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Verifies the CSR's signature and issues a leaf for its public key with one
    /// URI SAN `spiffe://<mesh>/<service>` per service, EKU serverAuth+clientAuth,
    /// valid for `lifetime` (capped at the CA's own expiry). The CSR's subject,
    /// SANs and extensions are ignored. `csr` is DER or PEM; its key must be
    /// ECDSA P-256 or Ed25519.
    pub fn sign_leaf(
        &self,
        csr: &[u8],
        mesh: &str,
        services: &[String],
        lifetime: Duration,
    ) -> Result<IssuedLeaf, CaError> {
        let public_key = verified_csr_key(csr)?;
        if services.is_empty() {
            return Err(CaError::NoServices);
        }
        let mut sans = Vec::with_capacity(services.len());
        for service in services {
            if !weft_api::dataplane::is_service_name(service) {
                return Err(CaError::BadService(service.clone()));
            }
            let uri = format!("spiffe://{mesh}/{service}");
            sans.push(SanType::URI(
                uri.try_into()
                    .map_err(|_| CaError::BadService(service.clone()))?,
            ));
        }
        let now = SystemTime::now();
        // A leaf never outlives its CA, however long a lifetime it is given.
        let not_after = not_after(now, lifetime).map_or(self.not_after, |t| t.min(self.not_after));
        let serial = random_serial();
        let mut params = CertificateParams::default();
        // Empty subject: the identity is in the SANs (rcgen then marks them critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(&public_key, &self.issuer)?;
        // X.509 times have whole seconds.
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            );
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            not_after,
            serial_hex: hex(&serial.to_bytes()),
        })
    }
}

/// The public key of a CSR whose signature checked out.
struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

fn verified_csr_key(csr: &[u8]) -> Result<CsrKey, CaError> {
    let der = if looks_like_pem(csr) {
        CertificateSigningRequestDer::from_pem_slice(csr)
            .map_err(|e| CaError::Csr(format!("not a PEM CSR: {e}")))?
    } else {
        CertificateSigningRequestDer::from(csr)
    };
    let (_, req) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::Csr(format!("not a PKCS#10 request: {e}")))?;
    req.verify_signature()
        .map_err(|e| CaError::Csr(format!("signature does not verify: {e}")))?;
    let spki = &req.certification_request_info.subject_pki;
    let alg: &'static SignatureAlgorithm = if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
    {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if curve.as_ref() != Some(&OID_EC_P256) {
            return Err(CaError::Csr("EC keys must be on curve P-256".into()));
        }
        &rcgen::PKCS_ECDSA_P256_SHA256
    } else if spki.algorithm.algorithm == OID_SIG_ED25519 {
        &rcgen::PKCS_ED25519
    } else {
        return Err(CaError::Csr(format!(
            "unsupported key algorithm {} (use ECDSA P-256 or Ed25519)",
            spki.algorithm.algorithm
        )));
    };
    Ok(CsrKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

type CachedCa = (Vec<u8>, Arc<MeshCa>);

/// Finds (and for builtin backends, creates on first need) the CA of each
/// (mesh, backend), keeping parsed CAs in memory. The store stays the source of
/// truth: every call re-reads the stored secret (or the provided files), so a
/// deleted mesh or a changed provided CA is noticed.
pub struct CaManager {
    store: Arc<dyn SecretStore>,
    /// (mesh, backend) -> (the bytes it was parsed from, the CA).
    cache: Mutex<HashMap<(String, String), CachedCa>>,
}

impl std::fmt::Debug for CaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaManager").finish_non_exhaustive()
    }
}

impl CaManager {
    /// A manager keeping builtin CAs in `store`.
    pub fn new(store: Arc<dyn SecretStore>) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The secret key under which the builtin CA of (mesh, backend) is stored.
    pub fn builtin_secret_key(mesh: &str, backend: &str) -> String {
        format!("{mesh}.ca-builtin.{backend}")
    }

    /// The CA of `backend` in `mesh`, created and stored on first need for builtin
    /// backends, loaded from its data sources for provided ones.
    pub fn ca_for(&self, mesh: &str, backend: &MtlsBackend) -> Result<Arc<MeshCa>, CaError> {
        self.load(mesh, backend).map_err(|e| match e {
            CaError::Store(_) => e,
            other => CaError::Backend {
                mesh: mesh.to_string(),
                backend: backend.name.clone(),
                source: Box::new(other),
            },
        })
    }

    fn load(&self, mesh: &str, backend: &MtlsBackend) -> Result<Arc<MeshCa>, CaError> {
        match &backend.kind {
            BackendKind::Builtin { ca_expiration } => {
                let key = Self::builtin_secret_key(mesh, &backend.name);
                let stored = match self.store.get_secret(&key)? {
                    Some(bytes) => bytes,
                    None => {
                        let validity = ca_expiration.unwrap_or(DEFAULT_CA_VALIDITY);
                        let (_, persisted) = MeshCa::generate_builtin(mesh, validity)?;
                        tracing::info!(mesh, backend = %backend.name, "created builtin mesh CA");
                        self.store
                            .create_secret_if_absent(&key, persisted.as_bytes())?
                    }
                };
                self.cached(mesh, &backend.name, stored, MeshCa::from_persisted)
            }
            BackendKind::Provided { cert, key } => {
                let cert = cert
                    .load()
                    .map_err(|e| CaError::InvalidCa(format!("cert: {e}")))?;
                let key = key
                    .load()
                    .map_err(|e| CaError::InvalidCa(format!("key: {e}")))?;
                let mut source = cert.clone();
                source.push(0);
                source.extend_from_slice(&key);
                self.cached(mesh, &backend.name, source, |_| {
                    MeshCa::from_provided(&cert, &key)
                })
            }
        }
    }

    fn cached(
        &self,
        mesh: &str,
        backend: &str,
        source: Vec<u8>,
        parse: impl FnOnce(&[u8]) -> Result<MeshCa, CaError>,
    ) -> Result<Arc<MeshCa>, CaError> {
        let id = (mesh.to_string(), backend.to_string());
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((src, ca)) = cache.get(&id)
                && *src == source
            {
                return Ok(ca.clone());
            }
        }
        let ca = Arc::new(parse(&source)?);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (source, ca.clone()));
        Ok(ca)
    }
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN"))
}

/// The end of a validity of `lifetime` from `now`, or an error when it lies past what a
/// certificate can say (the year 9999). The resources' validation keeps lifetimes to 100
/// years; this guards what an older store may hold.
fn not_after(now: SystemTime, lifetime: Duration) -> Result<SystemTime, CaError> {
    // 9999-12-31T23:59:59Z.
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    now.checked_add(lifetime)
        .filter(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .is_ok_and(|d| d <= LAST)
        })
        .ok_or_else(|| {
            CaError::InvalidCa(format!(
                "a validity of {}s from now ends past the year 9999",
                lifetime.as_secs()
            ))
        })
}

/// A positive random 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // aws-lc's RNG fails only if the OS has no entropy source at all.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = nanos.to_be_bytes();
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn asn1_to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH
    }
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::store::{DataSource, MemoryStore};
    use x509_parser::prelude::GeneralName;

    fn csr(key: &KeyPair) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "spoofed");
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn builtin(name: &str) -> MtlsBackend {
        MtlsBackend {
            name: name.into(),
            kind: BackendKind::Builtin {
                ca_expiration: None,
            },
            dp_cert_lifetime: None,
        }
    }

    #[test]
    fn builtin_ca_shape() {
        let (ca, _) = MeshCa::generate_builtin("demo", Duration::from_secs(3600)).unwrap();
        let (_, x) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert!(x.basic_constraints().unwrap().unwrap().value.ca);
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(x.subject().to_string(), "O=weft, CN=demo");
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://demo")]
        );
        let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert!((3600..=3615).contains(&life), "{life}");
        assert_eq!(
            x.public_key().algorithm.algorithm,
            OID_KEY_TYPE_EC_PUBLIC_KEY
        );
    }

    #[test]
    fn lifetimes_past_the_year_9999_are_an_error_for_a_ca_and_the_ca_s_end_for_a_leaf() {
        let millennia = Duration::from_secs(8000 * 365 * 24 * 3600);
        assert!(matches!(
            MeshCa::generate_builtin("demo", millennia),
            Err(CaError::InvalidCa(_))
        ));
        let (ca, _) = MeshCa::generate_builtin("demo", DEFAULT_CA_VALIDITY).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let services = vec!["web".to_string()];
        // A leaf ends with its CA.
        let leaf = ca
            .sign_leaf(&csr(&key), "demo", &services, millennia)
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(&leaf.cert_der).unwrap();
        let (_, issuer) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert_eq!(leaf.validity().not_after, issuer.validity().not_after);
    }

    #[test]
    fn leaf_ignores_csr_names_and_carries_spiffe_ids() {
        let (ca, _) = MeshCa::generate_builtin("demo", DEFAULT_CA_VALIDITY).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let services = vec!["web".to_string(), "api_v2".to_string()];
        let leaf = ca
            .sign_leaf(&csr(&key), "demo", &services, DEFAULT_LEAF_LIFETIME)
            .unwrap();
        let (_, x) = X509Certificate::from_der(&leaf.cert_der).unwrap();
        assert_eq!(x.subject().to_string(), "");
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
        assert_eq!(
            san.value.general_names,
            vec![
                GeneralName::URI("spiffe://demo/web"),
                GeneralName::URI("spiffe://demo/api_v2")
            ]
        );
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!x.basic_constraints().unwrap().is_some_and(|b| b.value.ca));
        assert_eq!(x.public_key().raw, key.subject_public_key_info());
        let life = x.validity().not_after.timestamp()
            - SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
        assert!((86_390..=86_400).contains(&life), "{life}");
        x.verify_signature(Some(
            X509Certificate::from_der(ca.cert_der())
                .unwrap()
                .1
                .public_key(),
        ))
        .unwrap();
        // Serial numbers are random.
        let again = ca
            .sign_leaf(&csr(&key), "demo", &services, DEFAULT_LEAF_LIFETIME)
            .unwrap();
        assert_ne!(leaf.serial_hex, again.serial_hex);
    }

    #[test]
    fn tampered_or_garbage_csr_is_refused() {
        let (ca, _) = MeshCa::generate_builtin("demo", DEFAULT_CA_VALIDITY).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr(&key);
        // Flip a bit inside the signed request info (the CN "spoofed").
        let pos = der.windows(7).position(|w| w == b"spoofed").unwrap();
        der[pos] ^= 0x01;
        let svc = vec!["web".to_string()];
        let err = ca
            .sign_leaf(&der, "demo", &svc, DEFAULT_LEAF_LIFETIME)
            .unwrap_err();
        assert!(
            matches!(err, CaError::Csr(ref m) if m.contains("signature")),
            "{err}"
        );
        let err = ca
            .sign_leaf(b"junk", "demo", &svc, DEFAULT_LEAF_LIFETIME)
            .unwrap_err();
        assert!(matches!(err, CaError::Csr(_)), "{err}");
        let err = ca
            .sign_leaf(&csr(&key), "demo", &["a/b".into()], DEFAULT_LEAF_LIFETIME)
            .unwrap_err();
        assert!(matches!(err, CaError::BadService(_)), "{err}");
        let err = ca
            .sign_leaf(&csr(&key), "demo", &[], DEFAULT_LEAF_LIFETIME)
            .unwrap_err();
        assert!(matches!(err, CaError::NoServices), "{err}");
    }

    #[test]
    fn pem_csr_is_accepted() {
        let (ca, _) = MeshCa::generate_builtin("demo", DEFAULT_CA_VALIDITY).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        ca.sign_leaf(
            pem.as_bytes(),
            "demo",
            &["web".into()],
            DEFAULT_LEAF_LIFETIME,
        )
        .unwrap();
    }

    #[test]
    fn provided_ca_is_checked() {
        let (_, persisted) = MeshCa::generate_builtin("x", DEFAULT_CA_VALIDITY).unwrap();
        let cert = CertificateDer::from_pem_slice(persisted.as_bytes()).unwrap();
        let cert_pem = pem_encode("CERTIFICATE", &cert);
        let key_pem = persisted[cert_pem.len()..].to_string();
        MeshCa::from_provided(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap();
        // DER works too.
        MeshCa::from_provided(&cert, key_pem.as_bytes()).unwrap();

        // Not a CA.
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let err = MeshCa::from_provided(leaf.pem().as_bytes(), leaf_key.serialize_pem().as_bytes())
            .unwrap_err();
        assert!(err.to_string().contains("CA:true"), "{err}");

        // A CA without keyCertSign.
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let nocs = params.self_signed(&leaf_key).unwrap();
        let err = MeshCa::from_provided(nocs.pem().as_bytes(), leaf_key.serialize_pem().as_bytes())
            .unwrap_err();
        assert!(err.to_string().contains("keyCertSign"), "{err}");

        // Key from elsewhere.
        let err = MeshCa::from_provided(cert_pem.as_bytes(), leaf_key.serialize_pem().as_bytes())
            .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        // Garbage.
        let err = MeshCa::from_provided(b"nope", b"nope").unwrap_err();
        assert!(matches!(err, CaError::InvalidCa(_)), "{err}");
    }

    #[test]
    fn manager_creates_once_per_mesh_and_backend_and_loads_provided() {
        let store = Arc::new(MemoryStore::new());
        let m = CaManager::new(store.clone());
        let a1 = m.ca_for("a", &builtin("ca-1")).unwrap();
        let a1_again = m.ca_for("a", &builtin("ca-1")).unwrap();
        assert_eq!(a1.cert_der(), a1_again.cert_der());
        let a2 = m.ca_for("a", &builtin("ca-2")).unwrap();
        let b1 = m.ca_for("b", &builtin("ca-1")).unwrap();
        assert_ne!(a1.cert_der(), a2.cert_der());
        assert_ne!(a1.cert_der(), b1.cert_der());
        // A second manager on the same store (another replica, or a restart) agrees.
        let other = CaManager::new(store.clone());
        assert_eq!(
            other.ca_for("a", &builtin("ca-1")).unwrap().cert_der(),
            a1.cert_der()
        );

        let stored = store
            .get_secret(&CaManager::builtin_secret_key("a", "ca-1"))
            .unwrap()
            .unwrap();
        let stored = String::from_utf8(stored).unwrap();
        let cert_pem = a1.cert_pem().to_string();
        let provided = MtlsBackend {
            name: "mine".into(),
            kind: BackendKind::Provided {
                cert: DataSource::InlineString(cert_pem.clone()),
                key: DataSource::Inline({
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .encode(&stored.as_bytes()[cert_pem.len()..])
                }),
            },
            dp_cert_lifetime: None,
        };
        let p = m.ca_for("c", &provided).unwrap();
        assert_eq!(p.cert_der(), a1.cert_der());

        let broken = MtlsBackend {
            kind: BackendKind::Provided {
                cert: DataSource::File("/nonexistent/ca.crt".into()),
                key: DataSource::InlineString(String::new()),
            },
            ..provided
        };
        let err = m.ca_for("c", &broken).unwrap_err().to_string();
        assert!(
            err.contains("\"c\"") && err.contains("mine") && err.contains("/nonexistent/ca.crt"),
            "{err}"
        );
    }
}
