//! TLS for the control plane's own dataplane gRPC endpoint.
//!
//! The control plane keeps a CA of its own (not a mesh CA) in the data dir:
//! `cp-ca.pem` (handed to proxies as `--ca-cert-file`) and `cp-ca-key.pem`
//! (mode 0600). At each start it signs a fresh server certificate whose SANs are
//! `localhost`, the host name, every address the endpoint listens on (all
//! interface addresses when bound to `0.0.0.0` or `::`), and each extra
//! `--dp-server-san`. The server key lives only in memory. Users who bring their
//! own certificate use [`CpTls::from_files`].

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// File name of the control plane's CA certificate in the data dir.
pub const CA_CERT_FILE: &str = "cp-ca.pem";
/// File name of the control plane's CA key in the data dir (mode 0600).
pub const CA_KEY_FILE: &str = "cp-ca-key.pem";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why the endpoint's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CpTlsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds something unusable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Building a certificate failed.
    #[error("control-plane certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

/// The endpoint's certificate, key and the CA that proxies verify it with.
#[derive(Clone)]
pub struct CpTls {
    /// PEM of the CA proxies should trust (the content of `cp-ca.pem`), empty
    /// when the user provided the server certificate.
    pub ca_pem: String,
    /// The server certificate chain, PEM.
    pub cert_pem: String,
    key_pem: String,
    /// The names and addresses the server certificate carries.
    pub sans: Vec<String>,
}

impl std::fmt::Debug for CpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpTls")
            .field("sans", &self.sans)
            .finish_non_exhaustive()
    }
}

/// A new control-plane CA: its certificate (PEM) and key.
pub fn generate_ca() -> Result<(String, KeyPair), CpTlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, "weft control plane CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + CA_VALIDITY).into();
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key))
}

impl CpTls {
    /// Loads (or creates on first start) the control-plane CA in `data_dir` and
    /// signs a server certificate for `listen` plus `extra_sans` (names or IPs).
    pub fn load_or_create(
        data_dir: &Path,
        listen: &[SocketAddr],
        extra_sans: &[String],
    ) -> Result<Self, CpTlsError> {
        std::fs::create_dir_all(data_dir).map_err(|source| CpTlsError::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let cert_path = data_dir.join(CA_CERT_FILE);
        let key_path = data_dir.join(CA_KEY_FILE);
        let (ca_pem, ca_key) = if cert_path.exists() || key_path.exists() {
            let ca_pem = read_string(&cert_path)?;
            let key_pem = read_string(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| CpTlsError::Invalid {
                path: key_path.clone(),
                reason: format!("not a usable private key: {e}"),
            })?;
            (ca_pem, key)
        } else {
            let (cert_pem, key) = generate_ca()?;
            // Key first: a crash between the writes leaves no CA without its key.
            super::store::write_private(&key_path, key.serialize_pem().as_bytes()).map_err(
                |source| CpTlsError::Io {
                    path: key_path.clone(),
                    source,
                },
            )?;
            std::fs::write(&cert_path, &cert_pem).map_err(|source| CpTlsError::Io {
                path: cert_path.clone(),
                source,
            })?;
            tracing::info!(path = %cert_path.display(), "created control-plane CA");
            (cert_pem, key)
        };
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| CpTlsError::Invalid {
                path: cert_path.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;

        let names = server_names(listen, extra_sans);
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "weft-control");
        params.subject_alt_names = names
            .iter()
            .filter_map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Some(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().ok().map(SanType::DnsName),
            })
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + SERVER_VALIDITY).into();
        let cert = params.signed_by(&server_key, &issuer)?;
        Ok(Self {
            ca_pem,
            cert_pem: cert.pem(),
            key_pem: server_key.serialize_pem(),
            sans: names,
        })
    }

    /// Uses the user's own server certificate chain and key (PEM files).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, CpTlsError> {
        let cert_pem = read_string(cert)?;
        let key_pem = read_string(key)?;
        KeyPair::from_pem(&key_pem).map_err(|e| CpTlsError::Invalid {
            path: key.to_path_buf(),
            reason: format!("not a usable private key: {e}"),
        })?;
        if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(CpTlsError::Invalid {
                path: cert.to_path_buf(),
                reason: "no PEM certificate".into(),
            });
        }
        Ok(Self {
            ca_pem: String::new(),
            cert_pem,
            key_pem,
            sans: Vec::new(),
        })
    }

    /// The server key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A tonic server TLS config serving this certificate.
    pub fn server_tls_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &self.cert_pem,
            &self.key_pem,
        ))
    }
}

/// The names the server certificate carries: `localhost`, the host name, the
/// listen addresses (every interface address for an unspecified one), then
/// `extra`, without duplicates.
pub fn server_names(listen: &[SocketAddr], extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if let Ok(host) = nix::unistd::gethostname()
        && let Some(host) = host.to_str()
        && !host.is_empty()
    {
        names.push(host.to_string());
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for addr in listen {
        if addr.ip().is_unspecified() {
            ips.extend(interface_addresses(addr.is_ipv6()));
        } else {
            ips.push(addr.ip());
        }
    }
    names.extend(ips.iter().map(IpAddr::to_string));
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Addresses of all interfaces: IPv4 ones, plus IPv6 ones when `v6` (a `::`
/// listener is dual-stack on Linux).
fn interface_addresses(v6: bool) -> Vec<IpAddr> {
    let mut out = Vec::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for ifa in addrs {
                let Some(addr) = ifa.address else { continue };
                if let Some(sin) = addr.as_sockaddr_in() {
                    out.push(IpAddr::V4(sin.ip()));
                } else if let Some(sin6) = addr.as_sockaddr_in6()
                    && v6
                {
                    out.push(IpAddr::V6(sin6.ip()));
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list interface addresses"),
    }
    if out.is_empty() {
        out.push(IpAddr::from([127, 0, 0, 1]));
    }
    out
}

fn read_string(path: &Path) -> Result<String, CpTlsError> {
    std::fs::read_to_string(path).map_err(|source| CpTlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

    #[test]
    fn ca_is_persisted_with_private_key_mode_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:5678".parse().unwrap();
        let first = CpTls::load_or_create(dir.path(), &[listen], &["cp.example".into()]).unwrap();
        let second = CpTls::load_or_create(dir.path(), &[listen], &[]).unwrap();
        assert_eq!(first.ca_pem, second.ca_pem);
        assert_ne!(first.cert_pem, second.cert_pem);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap(),
            first.ca_pem
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(first.sans.contains(&"localhost".to_string()));
        assert!(first.sans.contains(&"127.0.0.1".to_string()));
        assert!(first.sans.contains(&"cp.example".to_string()));
    }

    #[test]
    fn unspecified_listener_names_interface_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "0.0.0.0:5678".parse().unwrap();
        let tls = CpTls::load_or_create(dir.path(), &[listen], &["10.9.8.7".into()]).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(tls.cert_pem.as_bytes());
        use rustls_pki_types::pem::PemObject as _;
        let der = der.unwrap();
        let (_, x) = X509Certificate::from_der(&der).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        let names = &san.value.general_names;
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert!(names.contains(&GeneralName::IPAddress(&[10, 9, 8, 7])));
        assert!(!tls.sans.contains(&"0.0.0.0".to_string()));
    }
}
