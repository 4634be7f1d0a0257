//! The proxy's mesh identity: it generates a private key (ECDSA P-256), sends
//! only a CSR and its dataplane token to the control plane's `Identity.Certify`
//! over TLS (verifying the control plane with `--ca-cert-file`), and keeps the
//! signed certificate in memory ([`CertHandle`], read lock-free by every TLS
//! handshake).
//!
//! [`Identity::run`] renews at 4/5 of the certificate's lifetime with a fresh
//! key, retries failures with capped exponential backoff and jitter, and keeps
//! the old certificate in place until a new one arrives. The private key is never
//! written anywhere.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, KeyPair};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;
use weft_api::proto::CertifyRequest;
use weft_api::proto::identity_client::IdentityClient;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::cp::CpChannels;
use crate::metrics::{Metrics, ResultLabel};

/// Why certifying failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The configuration is unusable (bad address, CA file, token file).
    #[error("identity config: {0}")]
    Config(String),
    /// The control plane could not be reached.
    #[error("cannot reach the control plane: {0}")]
    Unreachable(String),
    /// The control plane refused the request; the message is its reason.
    #[error("control plane refused to certify ({code:?}): {message}")]
    Refused {
        /// gRPC status code.
        code: tonic::Code,
        /// The control plane's message.
        message: String,
    },
    /// The control plane's mesh has mTLS off: no certificate is needed.
    #[error("mesh has mTLS disabled: {0}")]
    MtlsDisabled(String),
    /// The answer is unusable (bad PEM, a certificate for another key, ...).
    #[error("bad certificate from the control plane: {0}")]
    BadResponse(String),
    /// Key generation or CSR building failed.
    #[error("generating key or CSR: {0}")]
    Key(#[from] rcgen::Error),
}

/// The shortest wait before renewing a certificate.
pub const MIN_RENEW_AFTER: Duration = Duration::from_secs(1);

/// Where the dataplane token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// The token itself.
    Inline(String),
    /// A file, re-read at every request (so it can be rotated in place).
    File(PathBuf),
}

/// Exponential backoff between failed attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Cap.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before attempt `failures + 1`, after `failures` consecutive
    /// failures (1-based), with ±20% jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        let base = exp.min(self.max);
        let jitter = rand::random_range(0.8..1.2);
        base.mul_f64(jitter).min(self.max)
    }
}

/// What the identity client needs.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The control plane's dataplane endpoint, `https://HOST:PORT`, or several replicas'
    /// endpoints, comma-separated (see [`CpChannels`]).
    pub cp_address: String,
    /// PEM of the CA that signed the control plane's certificate (`--ca-cert-file`).
    pub cp_ca_pem: Vec<u8>,
    /// This dataplane's mesh.
    pub mesh: String,
    /// This dataplane's name.
    pub dataplane: String,
    /// The dataplane token.
    pub token: TokenSource,
    /// Retry policy.
    pub backoff: Backoff,
    /// Deadline of one certify call.
    pub request_timeout: Duration,
}

impl IdentityConfig {
    /// A config with default backoff and timeout.
    pub fn new(
        cp_address: impl Into<String>,
        cp_ca_pem: Vec<u8>,
        mesh: impl Into<String>,
        dataplane: impl Into<String>,
        token: TokenSource,
    ) -> Self {
        Self {
            cp_address: cp_address.into(),
            cp_ca_pem,
            mesh: mesh.into(),
            dataplane: dataplane.into(),
            token,
            backoff: Backoff::default(),
            request_timeout: Duration::from_secs(15),
        }
    }
}

/// A certificate the proxy holds, with its key and the mesh trust bundle.
pub struct CertState {
    /// The mesh.
    pub mesh: String,
    /// mTLS backend that signed it.
    pub backend: String,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Chain and signing key, as rustls presents them.
    pub certified_key: Arc<CertifiedKey>,
    /// The mesh CA(s) peers must chain to.
    pub roots: Arc<RootCertStore>,
    /// The trust bundle as received, PEM.
    pub trust_bundle_pem: String,
    /// Subject of the leaf (usually empty: identities are in the SANs).
    pub subject: String,
    /// URI SANs of the leaf.
    pub uri_sans: Vec<String>,
    /// Serial number, hex.
    pub serial: String,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
    /// When the proxy got it.
    pub received_at: SystemTime,
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for CertState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertState")
            .field("mesh", &self.mesh)
            .field("uri_sans", &self.uri_sans)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertState {
    /// Assembles a state from a PEM chain (leaf first), the private key the leaf
    /// was issued for, and the PEM trust bundle. Checks that the leaf matches the
    /// key.
    pub fn new(
        mesh: &str,
        backend: &str,
        chain_pem: &str,
        key: PrivateKeyDer<'static>,
        trust_bundle_pem: &str,
    ) -> Result<Self, IdentityError> {
        let bad = |m: String| IdentityError::BadResponse(m);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("certificate chain PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad("empty certificate chain".into()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes()) {
            let ca = ca.map_err(|e| bad(format!("trust bundle PEM: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| bad(format!("trust bundle certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("empty trust bundle".into()));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| bad(format!("trust bundle: {e}")))?;
        let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(|e| bad(format!("private key: {e}")))?;
        let certified_key = CertifiedKey::new(chain.clone(), signing_key);
        certified_key
            .keys_match()
            .map_err(|e| bad(format!("certificate is not for our key: {e}")))?;

        let (_, x509) =
            X509Certificate::from_der(leaf).map_err(|e| bad(format!("leaf certificate: {e}")))?;
        let unix = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0).unsigned_abs());
        let serial = x509.raw_serial_as_string().replace(':', "");
        let state = Self {
            mesh: mesh.to_string(),
            backend: backend.to_string(),
            subject: x509.subject().to_string(),
            uri_sans: crate::tls::uri_sans(leaf),
            serial,
            not_before: unix(x509.validity().not_before.timestamp()),
            not_after: unix(x509.validity().not_after.timestamp()),
            received_at: SystemTime::now(),
            chain,
            certified_key: Arc::new(certified_key),
            roots,
            trust_bundle_pem: trust_bundle_pem.to_string(),
            client_verifier,
        };
        Ok(state)
    }

    /// Whether the certificate is valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// How long after `received_at` to renew: 4/5 of the lifetime it had when
    /// received (measured from receipt, so a backdated notBefore does not
    /// shorten it).
    /// At least [`MIN_RENEW_AFTER`], so that a certificate that ends very soon (its CA's end
    /// is near) is not renewed in a tight loop.
    pub fn renew_after(&self) -> Duration {
        self.not_after
            .duration_since(self.received_at)
            .unwrap_or_default()
            .mul_f64(0.8)
            .max(MIN_RENEW_AFTER)
    }
}

/// Shared, lock-free access to the current certificate. Cheap to clone.
#[derive(Clone, Default)]
pub struct CertHandle(Arc<ArcSwapOption<CertState>>);

impl std::fmt::Debug for CertHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CertHandle").field(&self.load()).finish()
    }
}

impl CertHandle {
    /// A handle holding `state`.
    pub fn with(state: CertState) -> Self {
        let h = Self::default();
        h.store(state);
        h
    }

    /// The current certificate, if any.
    pub fn load(&self) -> Option<Arc<CertState>> {
        self.0.load_full()
    }

    /// Replaces the current certificate.
    pub fn store(&self, state: CertState) {
        self.0.store(Some(Arc::new(state)));
    }
}

/// The identity client: certifies, renews, and publishes the certificate.
pub struct Identity {
    config: IdentityConfig,
    cert: CertHandle,
    metrics: Arc<Metrics>,
    renew_now: Notify,
    updates: watch::Sender<u64>,
    not_required: AtomicBool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("mesh", &self.config.mesh)
            .field("dataplane", &self.config.dataplane)
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A client for `config`, reporting into `metrics`. Nothing runs until
    /// [`Identity::run`] (or [`Identity::certify_once`]).
    pub fn new(config: IdentityConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            config,
            cert: CertHandle::default(),
            metrics,
            renew_now: Notify::new(),
            updates: watch::channel(0).0,
            not_required: AtomicBool::new(false),
        })
    }

    /// The handle TLS configs read the certificate from.
    pub fn cert(&self) -> &CertHandle {
        &self.cert
    }

    /// The current certificate, if any.
    pub fn current(&self) -> Option<Arc<CertState>> {
        self.cert.load()
    }

    /// True once the proxy holds a valid certificate, or the control plane said
    /// the mesh has mTLS off.
    pub fn is_ready(&self) -> bool {
        self.not_required.load(Ordering::Relaxed)
            || self
                .current()
                .is_some_and(|c| c.is_valid_at(SystemTime::now()))
    }

    /// Asks the running loop to re-certify now (e.g. the mesh's mTLS backend or
    /// this dataplane's services changed).
    pub fn renew_now(&self) {
        self.renew_now.notify_one();
    }

    /// A receiver that changes (counts up) each time a new certificate is held.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }

    /// Lazily connecting TLS channels to the control plane's replicas (`cp_address` may list
    /// several, comma-separated; see [`CpChannels`]).
    pub fn channels(&self) -> Result<CpChannels, IdentityError> {
        CpChannels::new(
            &self.config.cp_address,
            &self.config.cp_ca_pem,
            self.config.request_timeout,
        )
        .map_err(|e| IdentityError::Config(e.to_string()))
    }

    /// A lazily connecting TLS channel to the control plane: to its first replica.
    pub fn channel(&self) -> Result<Channel, IdentityError> {
        Ok(self.channels()?.current().1)
    }

    fn token(&self) -> Result<String, IdentityError> {
        let token = match &self.config.token {
            TokenSource::Inline(t) => t.clone(),
            TokenSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
                IdentityError::Config(format!("dataplane token file {}: {e}", path.display()))
            })?,
        };
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(IdentityError::Config("the dataplane token is empty".into()));
        }
        Ok(token)
    }

    /// Generates a key, certifies it once over `channel`, and on success
    /// installs and returns the new certificate.
    pub async fn certify_once(&self, channel: &Channel) -> Result<Arc<CertState>, IdentityError> {
        let result = self.certify_inner(channel).await;
        let label = ResultLabel {
            result: if result.is_ok() { "ok" } else { "error" },
        };
        self.metrics.certify.get_or_create(&label).inc();
        let state = result?;
        let not_after = state
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.metrics
            .cert_expiry
            .set(i64::try_from(not_after).unwrap_or(i64::MAX));
        self.not_required.store(false, Ordering::Relaxed);
        self.cert.0.store(Some(state.clone()));
        self.updates.send_modify(|v| *v += 1);
        Ok(state)
    }

    async fn certify_inner(&self, channel: &Channel) -> Result<Arc<CertState>, IdentityError> {
        let token = self.token()?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = CertificateParams::default().serialize_request(&key)?;
        let mut request = tonic::Request::new(CertifyRequest {
            csr: csr.der().to_vec(),
            mesh: self.config.mesh.clone(),
            dataplane: self.config.dataplane.clone(),
        });
        let auth = format!("Bearer {token}").parse().map_err(|_| {
            IdentityError::Config("the dataplane token has invalid characters".into())
        })?;
        request.metadata_mut().insert("authorization", auth);
        let response = IdentityClient::new(channel.clone())
            .certify(request)
            .await
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    IdentityError::Unreachable(status.message().to_string())
                }
                tonic::Code::FailedPrecondition if status.message().contains("mTLS disabled") => {
                    IdentityError::MtlsDisabled(status.message().to_string())
                }
                code => IdentityError::Refused {
                    code,
                    message: status.message().to_string(),
                },
            })?
            .into_inner();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let state = CertState::new(
            &self.config.mesh,
            &response.backend,
            &response.cert_chain_pem,
            key_der,
            &response.trust_bundle_pem,
        )?;
        // Already expired (the mesh's CA has expired, which caps its leaves, or the clocks
        // disagree by more than a lifetime): a failure, retried with backoff, and the
        // certificate in place stays. Taken, it would be renewed at once, in a loop.
        if state.not_after <= SystemTime::now() {
            return Err(IdentityError::BadResponse(format!(
                "the certificate expired at {} (has the mesh's CA expired?)",
                humantime::format_rfc3339_seconds(state.not_after)
            )));
        }
        Ok(Arc::new(state))
    }

    /// Certifies, then renews forever: at 4/5 of each certificate's lifetime,
    /// on [`Identity::renew_now`], and after failures with backoff. The current
    /// certificate stays in place until a new one arrives.
    pub async fn run(self: Arc<Self>) {
        let replicas = loop {
            match self.channels() {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(error = %e, "identity client cannot start; retrying");
                    tokio::time::sleep(self.config.backoff.max).await;
                }
            }
        };
        let mut failures: u32 = 0;
        loop {
            let (replica, channel) = replicas.current();
            let certified = self.certify_once(&channel).await;
            if let Err(IdentityError::Unreachable(_)) = &certified {
                replicas.failed(replica);
            }
            let wait = match certified {
                Ok(state) => {
                    failures = 0;
                    tracing::info!(sans = ?state.uri_sans, serial = %state.serial,
                        not_after = ?state.not_after, "holding a new mesh certificate");
                    state.renew_after()
                }
                Err(IdentityError::MtlsDisabled(msg)) => {
                    tracing::info!(%msg, "no certificate needed");
                    self.not_required.store(true, Ordering::Relaxed);
                    failures = 0;
                    self.config.backoff.max
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = self.config.backoff.delay(failures);
                    let valid = self
                        .current()
                        .is_some_and(|c| c.is_valid_at(SystemTime::now()));
                    tracing::warn!(error = %e, retry_in = ?delay, keeping_old_certificate = valid,
                        "certify failed");
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.renew_now.notified() => {}
            }
        }
    }

    /// Spawns [`Identity::run`] on the current runtime.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().run())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        };
        for (failures, base) in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0)] {
            let d = b.delay(failures).as_secs_f64();
            assert!(d >= base * 0.8 && d <= base * 1.2, "{failures}: {d}");
        }
        assert!(b.delay(10) <= Duration::from_secs(30));
        assert!(b.delay(u32::MAX) <= Duration::from_secs(30));
        assert!(b.delay(10) >= Duration::from_secs(24));
    }

    fn self_issued(lifetime: Duration) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://m/web".to_string().try_into().unwrap(),
        )];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + lifetime).into();
        (params.self_signed(&key).unwrap().pem(), key)
    }

    fn der(key: &KeyPair) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
    }

    #[test]
    fn renewal_is_due_at_four_fifths_of_the_lifetime() {
        let (pem, key) = self_issued(Duration::from_secs(1000));
        let s = CertState::new("m", "b", &pem, der(&key), &pem).unwrap();
        let r = s.renew_after().as_secs_f64();
        assert!((799.0..=800.0).contains(&r), "{r}");
        assert!(s.is_valid_at(SystemTime::now()));
        assert!(!s.is_valid_at(SystemTime::now() + Duration::from_secs(1001)));
        assert_eq!(s.uri_sans, vec!["spiffe://m/web".to_string()]);
    }

    #[test]
    fn a_certificate_for_another_key_is_rejected() {
        let (pem, _) = self_issued(Duration::from_secs(60));
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let err = CertState::new("m", "b", &pem, der(&other), &pem).unwrap_err();
        assert!(err.to_string().contains("not for our key"), "{err}");
        let err = CertState::new("m", "b", "junk", der(&other), &pem).unwrap_err();
        assert!(matches!(err, IdentityError::BadResponse(_)), "{err}");
    }
}
