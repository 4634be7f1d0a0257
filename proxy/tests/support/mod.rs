//! Test helpers: a mesh CA and SPIFFE leaves made with rcgen, a [`MeshTls`] over them with a
//! minimal SPIFFE server verifier, hand-made snapshots, an echo app, and a fake original
//! destination. (The proxy's identity module provides the production `MeshTls`.)
#![allow(dead_code)]

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_api::proto::{self as pb, mtls::Mode, permission_rule::Action};
use weft_proxy::listen::OrigDst;
use weft_proxy::mesh_tls::{MESH_ALPN_PROTOCOLS, MeshTls, peer_services, spiffe_id};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// A mesh's CA.
pub struct TestCa {
    pub mesh: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub cert_der: CertificateDer<'static>,
    pub pem: String,
}

impl TestCa {
    pub fn new(mesh: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{mesh} CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            mesh: mesh.into(),
            pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf with URI SANs `spiffe://<mesh>/<service>` for each service.
    pub fn leaf(
        &self,
        services: &[&str],
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = services
            .iter()
            .map(|s| rcgen::SanType::URI(spiffe_id(&self.mesh, s).try_into().unwrap()))
            .collect();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![cert.der().clone(), self.cert_der.clone()], key_der)
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der.clone()).unwrap();
        Arc::new(roots)
    }
}

/// Checks the chain against the mesh roots, then the URI SAN `spiffe://<mesh>/<service>`.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let (mesh, service) = self
            .expected
            .strip_prefix("spiffe://")
            .and_then(|r| r.split_once('/'))
            .ok_or_else(|| rustls::Error::General("bad expected id".into()))?;
        if peer_services(end_entity.as_ref(), mesh)
            .iter()
            .any(|s| s == service)
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used in the mesh".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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

type ClientKey = (String, &'static [u8]);

/// A [`MeshTls`] with one fixed identity. The certificate can be swapped (renewal).
pub struct TestMeshTls {
    mesh: String,
    roots: Arc<RootCertStore>,
    identity: Mutex<Arc<rustls::sign::CertifiedKey>>,
    server: Mutex<Option<Arc<rustls::ServerConfig>>>,
    clients: Mutex<HashMap<ClientKey, Arc<rustls::ClientConfig>>>,
}

impl TestMeshTls {
    pub fn new(ca: &TestCa, services: &[&str]) -> Arc<Self> {
        let tls = TestMeshTls {
            mesh: ca.mesh.clone(),
            roots: ca.roots(),
            identity: Mutex::new(certified(ca, services)),
            server: Mutex::new(None),
            clients: Mutex::new(HashMap::new()),
        };
        Arc::new(tls)
    }

    /// Replaces the certificate (as a renewal would); new connections use the new one.
    pub fn renew(&self, ca: &TestCa, services: &[&str]) {
        *self.identity.lock().unwrap() = certified(ca, services);
        *self.server.lock().unwrap() = None;
        self.clients.lock().unwrap().clear();
    }

    fn key(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.identity.lock().unwrap().clone()
    }
}

fn certified(ca: &TestCa, services: &[&str]) -> Arc<rustls::sign::CertifiedKey> {
    let (chain, key) = ca.leaf(services);
    Arc::new(rustls::sign::CertifiedKey::from_der(chain, key, &provider()).unwrap())
}

#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl MeshTls for TestMeshTls {
    fn client_config(
        &self,
        mesh: &str,
        service: &str,
        alpn: &'static [u8],
    ) -> Option<Arc<rustls::ClientConfig>> {
        let mut cache = self.clients.lock().unwrap();
        if let Some(c) = cache.get(&(service.to_string(), alpn)) {
            return Some(c.clone());
        }
        let verifier = SpiffeVerifier {
            roots: self.roots.clone(),
            expected: spiffe_id(mesh, service),
            provider: provider(),
        };
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(FixedCert(self.key())));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let cfg = Arc::new(cfg);
        cache.insert((service.to_string(), alpn), cfg.clone());
        Some(cfg)
    }

    fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let mut cached = self.server.lock().unwrap();
        if let Some(c) = cached.as_ref() {
            return Some(c.clone());
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(FixedCert(self.key())));
        cfg.alpn_protocols = MESH_ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
        let cfg = Arc::new(cfg);
        *cached = Some(cfg.clone());
        Some(cfg)
    }
}

/// A free port on 127.0.0.1, below Linux's ephemeral range (32768+), so the kernel does not
/// hand it to some other test's outgoing connection between our check and our bind; ports are
/// spread by process id and a counter, so parallel tests rarely try the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919);
    for _ in 0..1000 {
        let n = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(104_729));
        let port = 20_000 + (n % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found below the ephemeral range");
}

/// An echo app: writes back what it reads; on EOF it half-closes too.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `msg`, half-closes, reads the whole reply.
pub async fn roundtrip(addr: SocketAddr, msg: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply"))??;
    Ok(out)
}

/// Mesh settings for a snapshot.
pub fn mesh_settings(mesh: &str, mtls: Option<Mode>, passthrough: bool) -> pb::MeshSettings {
    pb::MeshSettings {
        name: mesh.into(),
        mtls: Some(match mtls {
            Some(mode) => pb::Mtls {
                enabled: true,
                backend: "ca-1".into(),
                backend_type: "builtin".into(),
                mode: mode as i32,
                cert_lifetime_seconds: 86400,
            },
            None => pb::Mtls::default(),
        }),
        passthrough,
        ..Default::default()
    }
}

pub fn allow(source: &str) -> pb::PermissionRule {
    pb::PermissionRule {
        source_service: source.into(),
        action: Action::Allow as i32,
        origin: format!("MeshTrafficPermission/allow-{source}"),
    }
}

pub fn deny(source: &str) -> pb::PermissionRule {
    pb::PermissionRule {
        source_service: source.into(),
        action: Action::Deny as i32,
        origin: format!("MeshTrafficPermission/deny-{source}"),
    }
}

/// A service with endpoints on 127.0.0.1 at `ports`.
pub fn service(name: &str, ports: &[u16]) -> pb::OutboundService {
    pb::OutboundService {
        service: name.into(),
        endpoints: ports
            .iter()
            .map(|p| pb::Endpoint {
                address: "127.0.0.1".into(),
                port: u32::from(*p),
                tags: [("kuma.io/service".to_string(), name.to_string())].into(),
                healthy: true,
                dataplane: format!("{name}-{p}"),
            })
            .collect(),
        ..Default::default()
    }
}

pub fn inbound(
    port: u16,
    service: &str,
    app: SocketAddr,
    permissions: Vec<pb::PermissionRule>,
) -> pb::InboundConfig {
    pb::InboundConfig {
        port: u32::from(port),
        service_address: app.ip().to_string(),
        service_port: u32::from(app.port()),
        service: service.into(),
        protocol: String::new(),
        tags: [("kuma.io/service".to_string(), service.to_string())].into(),
        permissions,
    }
}

pub fn snapshot(
    ca: Option<&TestCa>,
    mesh: pb::MeshSettings,
    name: &str,
    inbounds: Vec<pb::InboundConfig>,
    outbounds: Vec<pb::OutboundService>,
    listeners: Vec<(u16, &str)>,
) -> pb::Snapshot {
    pb::Snapshot {
        version: format!("{name}-1"),
        nonce: String::new(),
        dataplane: Some(pb::DataplaneIdentity {
            mesh: mesh.name.clone(),
            name: name.into(),
            address: "127.0.0.1".into(),
            redirect_port_inbound: 0,
            redirect_port_outbound: 0,
        }),
        mesh: Some(mesh),
        trust_bundle_pem: ca.map(|c| c.pem.clone()).unwrap_or_default(),
        inbounds,
        outbounds,
        outbound_listeners: listeners
            .into_iter()
            .map(|(port, service)| pb::OutboundListener {
                address: "127.0.0.1".into(),
                port: u32::from(port),
                service: service.into(),
            })
            .collect(),
        parts: None,
        kept: vec![],
    }
}

/// A fake original destination: every accepted connection "was headed" to the address set
/// last.
#[derive(Default, Clone)]
pub struct FakeOrigDst(Arc<Mutex<Option<SocketAddr>>>);

impl FakeOrigDst {
    pub fn set(&self, addr: SocketAddr) {
        *self.0.lock().unwrap() = Some(addr);
    }
}

impl OrigDst for FakeOrigDst {
    fn original_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        self.0
            .lock()
            .unwrap()
            .ok_or_else(|| io::Error::other("no original destination set"))
    }
}
