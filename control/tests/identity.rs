//! Mesh identity end to end: the control plane's Identity service over TLS, the
//! proxy's identity client, and real rustls handshakes over loopback between
//! proxies holding the issued certificates.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::KeyPair;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use weft_api::proto::CertifyRequest;
use weft_control::identity::cp_tls::CpTls;
use weft_control::identity::{
    BackendKind, IdentityService, MemoryStore, MeshMtls, MtlsBackend, MtlsMode,
};
use weft_proxy::identity::{
    Backoff, CertHandle, CertState, Identity, IdentityConfig, IdentityError, TokenSource,
};
use weft_proxy::metrics::Metrics;
use weft_proxy::tls::{client_config, install_default_crypto_provider, server_config};

const DAY: Duration = Duration::from_secs(86_400);

fn builtin(name: &str, lifetime: Option<Duration>) -> MtlsBackend {
    MtlsBackend {
        name: name.into(),
        kind: BackendKind::Builtin {
            ca_expiration: None,
        },
        dp_cert_lifetime: lifetime,
    }
}

fn mtls(backend: &str, lifetime: Option<Duration>) -> MeshMtls {
    MeshMtls {
        enabled_backend: Some(backend.into()),
        backends: vec![builtin("ca-1", lifetime), builtin("ca-2", lifetime)],
        mode: MtlsMode::Strict,
    }
}

/// Meshes `a` and `b` with builtin CAs; dataplanes `web-1` (service web) and
/// `api-1` (service api) in each.
fn populate(store: &MemoryStore, lifetime: Option<Duration>) {
    for mesh in ["a", "b"] {
        store.set_mesh(mesh, mtls("ca-1", lifetime));
        store.set_dataplane(mesh, "web-1", vec!["web".into()]);
        store.set_dataplane(mesh, "api-1", vec!["api".into()]);
    }
}

fn store(lifetime: Option<Duration>) -> Arc<MemoryStore> {
    let s = Arc::new(MemoryStore::new());
    populate(&s, lifetime);
    s
}

/// Certifies `mesh`/`dp` directly through the service and returns the state a
/// proxy would hold.
fn certify_direct(svc: &IdentityService, mesh: &str, dp: &str) -> CertState {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let token = svc.tokens().issue(mesh, dp, DAY).unwrap().token;
    let resp = svc
        .certify(
            Some(&token),
            &CertifyRequest {
                csr: csr.der().to_vec(),
                mesh: mesh.into(),
                dataplane: dp.into(),
            },
        )
        .unwrap();
    CertState::new(
        mesh,
        &resp.backend,
        &resp.cert_chain_pem,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        &resp.trust_bundle_pem,
    )
    .unwrap()
}

/// A state whose certificate and key come from `cert` but which trusts the
/// bundle of `trust` (and checks SPIFFE IDs of `trust`'s mesh).
fn chimera(cert: &CertState, key_of: &KeyPair, trust: &CertState) -> CertState {
    let chain: String = cert.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    CertState::new(
        &trust.mesh,
        "x",
        &chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_of.serialize_der())),
        &trust.trust_bundle_pem,
    )
    .unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

/// Runs one TLS handshake plus a 4-byte echo over loopback. Returns the
/// client's and the server's outcome (server: the client's URI SANs).
async fn handshake(
    client: ClientConfig,
    server: ServerConfig,
) -> (Result<(), String>, Result<Vec<String>, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .map(|c| weft_proxy::tls::uri_sans(&c))
            .unwrap_or_default();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("mesh.invalid").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        if &buf != b"ping" {
            return Err("bad echo".to_string());
        }
        Ok(())
    };
    let client = tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));
    let server = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .map(|r| r.unwrap_or_else(|e| Err(e.to_string())))
        .unwrap_or_else(|_| Err("server timed out".into()));
    (client, server)
}

fn client(state: &CertHandle, service: &str) -> ClientConfig {
    client_config(state, service).unwrap()
}

fn server(state: &CertHandle) -> ServerConfig {
    server_config(state).unwrap()
}

#[tokio::test]
async fn leaves_verify_against_their_mesh_ca_and_fail_against_another_in_both_directions() {
    install_default_crypto_provider();
    let store = store(None);
    let svc = IdentityService::new(store.clone(), store);
    let a_web = certify_direct(&svc, "a", "web-1");
    let b_web = certify_direct(&svc, "b", "web-1");
    let a_api = certify_direct(&svc, "a", "api-1");
    assert_ne!(a_web.trust_bundle_pem, b_web.trust_bundle_pem);
    assert_eq!(a_web.uri_sans, vec!["spiffe://a/web".to_string()]);

    let a_web = CertHandle::with(a_web);
    let a_api = CertHandle::with(a_api);
    let b_web = CertHandle::with(b_web);

    // Same mesh: works, and the server sees the client's identity.
    let (c, s) = handshake(client(&a_api, "web"), server(&a_web)).await;
    c.unwrap();
    assert_eq!(s.unwrap(), vec!["spiffe://a/api".to_string()]);

    // Client of mesh b to server of mesh a: both sides refuse.
    let (c, s) = handshake(client(&b_web, "web"), server(&a_web)).await;
    assert!(c.is_err() && s.is_err(), "{c:?} {s:?}");

    // Server side alone: a client that trusts mesh a's CA but holds mesh b's
    // certificate is rejected by the mesh-a server.
    let b_key_holder = {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let svc_b = certify_with_key(&svc, "b", "api-1", &key);
        (svc_b, key)
    };
    let spy = CertHandle::with(chimera(
        &b_key_holder.0,
        &b_key_holder.1,
        &a_web.load().unwrap(),
    ));
    let (c, s) = handshake(client(&spy, "web"), server(&a_web)).await;
    let s = s.unwrap_err();
    assert!(
        s.contains("UnknownIssuer") || s.contains("unknown issuer"),
        "{s}"
    );
    assert!(c.is_err());

    // Client side alone: a server holding mesh b's certificate but trusting mesh
    // a's CA (so it would accept the client) is rejected by the mesh-a client.
    let impostor = CertHandle::with(chimera(
        &b_key_holder.0,
        &b_key_holder.1,
        &a_web.load().unwrap(),
    ));
    let (c, s) = handshake(client(&a_api, "api"), server(&impostor)).await;
    let c = c.unwrap_err();
    assert!(
        c.contains("UnknownIssuer") || c.contains("unknown issuer"),
        "{c}"
    );
    assert!(s.is_err());

    // Right CA, wrong service: the client wants api but the server is web.
    let (c, _) = handshake(client(&a_api, "api"), server(&a_web)).await;
    let c = c.unwrap_err();
    assert!(c.contains("spiffe://a/api"), "{c}");
}

fn certify_with_key(svc: &IdentityService, mesh: &str, dp: &str, key: &KeyPair) -> CertState {
    let csr = rcgen::CertificateParams::default()
        .serialize_request(key)
        .unwrap();
    let token = svc.tokens().issue(mesh, dp, DAY).unwrap().token;
    let resp = svc
        .certify(
            Some(&token),
            &CertifyRequest {
                csr: csr.der().to_vec(),
                mesh: mesh.into(),
                dataplane: dp.into(),
            },
        )
        .unwrap();
    CertState::new(
        mesh,
        &resp.backend,
        &resp.cert_chain_pem,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        &resp.trust_bundle_pem,
    )
    .unwrap()
}

/// Presents a fixed chain with a fixed (possibly wrong) key, skipping the
/// key-match check that CertState does: what a thief of a certificate has.
#[derive(Debug)]
struct Stolen(Arc<CertifiedKey>);

impl ResolvesServerCert for Stolen {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Stolen {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_certificate_is_useless_with_another_key() {
    install_default_crypto_provider();
    let store = store(None);
    let svc = IdentityService::new(store.clone(), store);
    let victim = certify_direct(&svc, "a", "web-1");
    let peer = CertHandle::with(certify_direct(&svc, "a", "api-1"));
    let thief_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();

    // The proxy itself refuses to hold it.
    let chain: String = victim.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(thief_key.serialize_der()));
    let err = CertState::new(
        "a",
        "ca-1",
        &chain,
        der.clone_key(),
        &victim.trust_bundle_pem,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not for our key"), "{err}");

    let stolen = Arc::new(CertifiedKey::new(
        victim.chain.clone(),
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).unwrap(),
    ));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

    // As a server: the mesh client's signature check fails.
    let thief_server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Stolen(stolen.clone())));
    let (c, _) = handshake(client(&peer, "web"), thief_server).await;
    let c = c.unwrap_err();
    assert!(c.contains("BadSignature"), "{c}");

    // As a client: the mesh server's signature check fails.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(victim.trust_bundle_pem.as_bytes()).unwrap())
        .unwrap();
    let thief_client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_client_cert_resolver(Arc::new(Stolen(stolen)));
    let (_, s) = handshake(thief_client, server(&peer)).await;
    let s = s.unwrap_err();
    assert!(s.contains("BadSignature"), "{s}");
}

/// A verifier that trusts any server (the thief does not care who it talks to).
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn the_ca_survives_a_restart_and_a_backend_switch_changes_it() {
    install_default_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets.json");
    let before = {
        let s = Arc::new(MemoryStore::open(&path).unwrap());
        populate(&s, None);
        let svc = IdentityService::new(s.clone(), s);
        certify_direct(&svc, "a", "web-1")
    };
    // "Restart": a new store over the same file, new service, new caches.
    let s = Arc::new(MemoryStore::open(&path).unwrap());
    populate(&s, None);
    let svc = IdentityService::new(s.clone(), s.clone());
    let after = certify_direct(&svc, "a", "api-1");
    assert_eq!(before.trust_bundle_pem, after.trust_bundle_pem);
    let before = CertHandle::with(before);
    let after_h = CertHandle::with(after);
    let (c, srv) = handshake(client(&after_h, "web"), server(&before)).await;
    c.unwrap();
    srv.unwrap();
    let (c, srv) = handshake(client(&before, "api"), server(&after_h)).await;
    c.unwrap();
    srv.unwrap();

    // Switching mesh a to backend ca-2 means a new CA: old leaves stop verifying.
    s.set_mesh("a", mtls("ca-2", None));
    let switched = certify_direct(&svc, "a", "api-1");
    assert_eq!(switched.backend, "ca-2");
    assert_ne!(
        switched.trust_bundle_pem,
        after_h.load().unwrap().trust_bundle_pem
    );
    let switched = CertHandle::with(switched);
    let (c, _) = handshake(client(&switched, "web"), server(&before)).await;
    assert!(
        c.is_err(),
        "a leaf of the old backend verified against the new CA"
    );
}

/// The control plane's Identity endpoint over TLS on 127.0.0.1:0.
struct Cp {
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    svc: IdentityService,
    task: tokio::task::JoinHandle<()>,
}

async fn start_cp(store: Arc<MemoryStore>, data_dir: &Path) -> Cp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = CpTls::load_or_create(data_dir, &[addr], &[]).unwrap();
    let svc = IdentityService::new(store.clone(), store);
    let server = tonic::transport::Server::builder()
        .tls_config(tls.server_tls_config())
        .unwrap()
        .add_service(svc.clone().into_server());
    let task = tokio::spawn(async move {
        // serve_with_incoming does not apply the builder's TCP_NODELAY; without it
        // each unary call waits ~40 ms on delayed ACKs.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let _ = server.serve_with_incoming(incoming).await;
    });
    let ca_pem = std::fs::read(data_dir.join("cp-ca.pem")).unwrap();
    Cp {
        addr,
        ca_pem,
        svc,
        task,
    }
}

fn proxy(cp: &Cp, mesh: &str, dp: &str, token: String) -> Arc<Identity> {
    proxy_reporting_to(cp, mesh, dp, token, Arc::new(Metrics::new()))
}

/// [`proxy`], counting into `metrics`.
fn proxy_reporting_to(
    cp: &Cp,
    mesh: &str,
    dp: &str,
    token: String,
    metrics: Arc<Metrics>,
) -> Arc<Identity> {
    let mut cfg = IdentityConfig::new(
        format!("https://127.0.0.1:{}", cp.addr.port()),
        cp.ca_pem.clone(),
        mesh,
        dp,
        TokenSource::Inline(token),
    );
    cfg.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    cfg.request_timeout = Duration::from_secs(5);
    Identity::new(cfg, metrics)
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

#[tokio::test]
async fn proxy_certifies_over_tls_and_admin_shows_it() {
    install_default_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let cp = start_cp(store(None), dir.path()).await;
    let token = cp.svc.tokens().issue("a", "web-1", DAY).unwrap().token;
    let id = proxy(&cp, "a", "web-1", token);
    let metrics = Arc::new(Metrics::new());
    let admin = weft_proxy::admin::Admin::new(id.clone(), metrics.clone());
    let (admin_addr, _admin_task) = admin.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    assert_eq!(http_get(admin_addr, "/live").await.0, 200);
    assert_eq!(http_get(admin_addr, "/ready").await.0, 503);

    let channel = id.channel().unwrap();
    let state = id.certify_once(&channel).await.unwrap();
    assert_eq!(state.uri_sans, vec!["spiffe://a/web".to_string()]);
    assert_eq!(state.backend, "ca-1");
    assert!(id.is_ready());

    let (code, body) = http_get(admin_addr, "/ready").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, body) = http_get(admin_addr, "/certs").await;
    assert_eq!(code, 200);
    let certs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(certs["certificates"][0]["sans"][0], "spiffe://a/web");
    assert_eq!(certs["certificates"][0]["valid"], true);
    // The identity reports into its own Metrics; the admin exposes the one it is given.
    let id_metrics = Arc::new(Metrics::new());
    let token = cp.svc.tokens().issue("a", "web-1", DAY).unwrap().token;
    let id2 = {
        let mut cfg = IdentityConfig::new(
            format!("https://127.0.0.1:{}", cp.addr.port()),
            cp.ca_pem.clone(),
            "a",
            "web-1",
            TokenSource::Inline(token),
        );
        cfg.request_timeout = Duration::from_secs(5);
        Identity::new(cfg, id_metrics.clone())
    };
    let s2 = id2.certify_once(&id2.channel().unwrap()).await.unwrap();
    let text = id_metrics.encode();
    let not_after = s2
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        text.contains(&format!(
            "weft_identity_cert_expiry_timestamp_seconds {not_after}"
        )),
        "{text}"
    );

    // A proxy that does not trust the control plane's CA does not talk to it.
    let other_dir = tempfile::tempdir().unwrap();
    let foreign = CpTls::load_or_create(other_dir.path(), &[cp.addr], &[]).unwrap();
    let mut cfg = IdentityConfig::new(
        format!("https://127.0.0.1:{}", cp.addr.port()),
        foreign.ca_pem.into_bytes(),
        "a",
        "web-1",
        TokenSource::Inline("x.y.z".into()),
    );
    cfg.request_timeout = Duration::from_secs(5);
    let distrustful = Identity::new(cfg, Arc::new(Metrics::new()));
    let err = distrustful
        .certify_once(&distrustful.channel().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::Unreachable(_)), "{err}");
    cp.task.abort();
}

#[tokio::test]
async fn refusals_over_grpc_each_say_why() {
    install_default_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let cp = start_cp(store(None), dir.path()).await;
    let tokens = cp.svc.tokens().clone();
    let good_a = tokens.issue("a", "web-1", DAY).unwrap();
    let expired = tokens
        .issue_at(
            "b",
            "web-1",
            Duration::from_secs(60),
            std::time::SystemTime::now() - DAY,
        )
        .unwrap()
        .token;
    let revoked = tokens.issue("b", "web-1", DAY).unwrap();
    tokens.revoke("b", &revoked.claims.jti).unwrap();
    let forged = {
        let other = weft_control::identity::TokenIssuer::new(Arc::new(MemoryStore::new()));
        other.issue("b", "web-1", DAY).unwrap().token
    };
    let cases = [
        // A token for mesh a, presented for a dataplane in mesh b.
        (
            good_a.token.clone(),
            "b",
            tonic::Code::PermissionDenied,
            "not mesh \"b\"",
        ),
        (expired, "b", tonic::Code::Unauthenticated, "expired"),
        (revoked.token, "b", tonic::Code::Unauthenticated, "revoked"),
        (
            "not-a-jwt".to_string(),
            "b",
            tonic::Code::Unauthenticated,
            "malformed",
        ),
        (
            forged,
            "b",
            tonic::Code::Unauthenticated,
            "signature is invalid",
        ),
    ];
    for (token, mesh, code, text) in cases {
        let id = proxy(&cp, mesh, "web-1", token);
        let err = id.certify_once(&id.channel().unwrap()).await.unwrap_err();
        match err {
            IdentityError::Refused { code: c, message } => {
                assert_eq!(c, code, "{message}");
                assert!(message.contains(text), "{text:?} not in {message:?}");
            }
            other => panic!("{other}"),
        }
        assert!(id.current().is_none());
    }
    // And the good token works for its own dataplane.
    let id = proxy(&cp, "a", "web-1", good_a.token);
    id.certify_once(&id.channel().unwrap()).await.unwrap();
    cp.task.abort();
}

#[tokio::test]
async fn renews_at_four_fifths_and_keeps_the_old_certificate_when_the_cp_is_gone() {
    install_default_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    // 3 s certificates: renewal due after ~2.4 s (notAfter has whole seconds).
    let st = store(Some(Duration::from_secs(3)));
    let cp = start_cp(st.clone(), dir.path()).await;
    let token = cp.svc.tokens().issue("a", "web-1", DAY).unwrap().token;
    let id = proxy(&cp, "a", "web-1", token);
    let mut updates = id.subscribe();
    let task = id.spawn();

    tokio::time::timeout(Duration::from_secs(5), updates.changed())
        .await
        .unwrap()
        .unwrap();
    let first = id.current().unwrap();
    let t0 = Instant::now();
    let due = first.renew_after();
    tokio::time::timeout(Duration::from_secs(5), updates.changed())
        .await
        .unwrap()
        .unwrap();
    let waited = t0.elapsed();
    let second = id.current().unwrap();
    assert_ne!(first.serial, second.serial);
    assert!(
        waited + Duration::from_millis(50) >= due && waited <= due + Duration::from_millis(700),
        "renewed after {waited:?}, due {due:?}"
    );
    // A fresh key each time.
    assert_ne!(
        first.certified_key.end_entity_cert().unwrap(),
        second.certified_key.end_entity_cert().unwrap()
    );

    // The control plane now refuses (the mesh's backend is misconfigured):
    // renewals fail, the current certificate stays.
    st.set_mesh(
        "a",
        MeshMtls {
            enabled_backend: Some("gone".into()),
            ..mtls("ca-1", None)
        },
    );
    id.renew_now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = id.current().unwrap();
    assert_eq!(held.serial, second.serial);
    assert!(id.is_ready());
    task.abort();
    cp.task.abort();
}

/// Once the mesh's CA has expired, the control plane can only hand out leaves that end with
/// it, already expired: the proxy takes that as a failure and backs off, keeping what it has,
/// rather than renewing again at once, in a loop.
#[tokio::test]
async fn an_expired_certificate_is_a_failure_with_backoff_not_a_renewal_loop() {
    install_default_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    store.set_mesh(
        "a",
        MeshMtls {
            enabled_backend: Some("ca-1".into()),
            backends: vec![MtlsBackend {
                name: "ca-1".into(),
                kind: BackendKind::Builtin {
                    ca_expiration: Some(Duration::from_secs(2)),
                },
                dp_cert_lifetime: None,
            }],
            mode: MtlsMode::Strict,
        },
    );
    store.set_dataplane("a", "web-1", vec!["web".into()]);
    let cp = start_cp(store, dir.path()).await;
    let token = cp.svc.tokens().issue("a", "web-1", DAY).unwrap().token;
    let metrics = Arc::new(Metrics::new());
    let id = proxy_reporting_to(&cp, "a", "web-1", token, metrics.clone());
    let first = id.certify_once(&id.channel().unwrap()).await.unwrap();
    let until = first
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(until + Duration::from_millis(200)).await;

    let err = id
        .certify_once(&id.channel().unwrap())
        .await
        .expect_err("an expired certificate is refused");
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(
        id.current().unwrap().serial,
        first.serial,
        "the old one stays"
    );

    // The renewal task retries with backoff (100 ms, doubling, capped at 1 s): a handful of
    // attempts in two seconds, not thousands.
    let task = id.spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    task.abort();
    let text = metrics.encode();
    let attempts: f64 = text
        .lines()
        .filter(|l| l.starts_with("weft_identity_certify_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        (2.0..=15.0).contains(&attempts),
        "{attempts} certify attempts in 2 s:\n{text}"
    );
    cp.task.abort();
}
