//! The persistence seams of the identity module: [`SecretStore`] for opaque
//! secrets and [`MeshIdentityLookup`] for mesh mTLS settings and dataplane
//! services, with the plain structs they exchange, plus [`MemoryStore`], an
//! in-memory implementation whose secrets can be saved to a file.
//!
//! Secret keys used by this module (mesh names are DNS labels, so `.` separates):
//! - `<mesh>.ca-builtin.<backend>`: builtin CA certificate and key (PEM, concatenated)
//! - `<mesh>.dataplane-token-signing-key`: ES256 signing key (PKCS#8 DER)
//! - `<mesh>.dataplane-token-revoked.<jti>`: present when token `jti` is revoked
//!
//! Deleting a mesh should delete every secret whose key starts with `<mesh>.`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// An error from the backing store (database, file system, ...).
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(#[source] Box<dyn std::error::Error + Send + Sync>);

impl StoreError {
    /// Wraps any error (or message) as a store error.
    pub fn new(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(err.into())
    }
}

/// Opaque, persistent secrets keyed by string. Implementations must be safe to
/// call from several threads and (for a shared database) several control planes.
pub trait SecretStore: Send + Sync {
    /// Returns the secret stored under `key`, if any.
    fn get_secret(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores `value` under `key` unless a secret is already there, and returns
    /// the value that ends up stored: `value`, or the existing one if another
    /// writer got there first (so racing creators agree on one winner).
    fn create_secret_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Stores `value` under `key`, replacing any existing secret.
    fn put_secret(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Deletes the secret under `key`; deleting a missing key is not an error.
    fn delete_secret(&self, key: &str) -> Result<(), StoreError>;
}

/// Read access to what identity needs from the resource store.
pub trait MeshIdentityLookup: Send + Sync {
    /// The mTLS settings of `mesh`, or `None` when the mesh does not exist.
    fn mesh_mtls(&self, mesh: &str) -> Result<Option<MeshMtls>, StoreError>;
    /// The distinct `kuma.io/service` tag values of the inbounds of dataplane
    /// `name` in `mesh`, or `None` when no such dataplane exists.
    fn dataplane_services(&self, mesh: &str, name: &str)
    -> Result<Option<Vec<String>>, StoreError>;
}

/// A mesh's `mtls` section, reduced to what identity uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshMtls {
    /// `mtls.enabledBackend`; `None` (or empty) means mTLS is off.
    pub enabled_backend: Option<String>,
    /// `mtls.backends[]`.
    pub backends: Vec<MtlsBackend>,
    /// `mtls.mode` (Kuma's default is `STRICT`).
    pub mode: MtlsMode,
}

impl MeshMtls {
    /// The enabled backend, or `None` when mTLS is off.
    ///
    /// An `enabledBackend` that names no backend is reported as an error message.
    pub fn enabled(&self) -> Result<Option<&MtlsBackend>, String> {
        match self.enabled_backend.as_deref() {
            None | Some("") => Ok(None),
            Some(name) => self
                .backends
                .iter()
                .find(|b| b.name == name)
                .map(Some)
                .ok_or_else(|| format!("mtls.enabledBackend {name:?} names no backend")),
        }
    }
}

/// `mtls.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtlsMode {
    /// Plaintext is refused on inbounds.
    #[default]
    Strict,
    /// Plaintext is accepted alongside mTLS.
    Permissive,
}

/// One entry of `mtls.backends[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsBackend {
    /// `name`.
    pub name: String,
    /// `type` and its `conf`.
    pub kind: BackendKind,
    /// `dpCert.rotation.expiration`; `None` means the default (24h).
    pub dp_cert_lifetime: Option<Duration>,
}

/// A backend's `type` with its `conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// `type: builtin`; `conf.caCert.expiration` (`None`: 10 years).
    Builtin {
        /// Validity of the generated CA certificate.
        ca_expiration: Option<Duration>,
    },
    /// `type: provided`; `conf.cert` and `conf.key`.
    Provided {
        /// The CA certificate (PEM or DER).
        cert: DataSource,
        /// The CA private key (PEM: PKCS#8, SEC1 or PKCS#1; or DER).
        key: DataSource,
    },
}

/// Kuma's DataSource: where bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// `file: PATH`, read on the control plane's host.
    File(PathBuf),
    /// `inline: BASE64`, exactly as written in the resource.
    Inline(String),
    /// `inlineString: TEXT`.
    InlineString(String),
}

impl DataSource {
    /// Loads the bytes; the error message names the source.
    pub fn load(&self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        match self {
            DataSource::File(path) => {
                std::fs::read(path).map_err(|e| format!("cannot read file {}: {e}", path.display()))
            }
            DataSource::Inline(b64) => {
                let compact: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact.as_bytes())
                    .map_err(|e| format!("inline is not valid base64: {e}"))
            }
            DataSource::InlineString(s) => Ok(s.as_bytes().to_vec()),
        }
    }
}

/// In-memory [`SecretStore`] and [`MeshIdentityLookup`]. Created with
/// [`MemoryStore::open`], its secrets are also written to a JSON file on every
/// change and read back on open, which is enough to test restarts.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryState>,
    path: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct MemoryState {
    secrets: BTreeMap<String, Vec<u8>>,
    meshes: HashMap<String, MeshMtls>,
    dataplanes: HashMap<(String, String), Vec<String>>,
}

impl MemoryStore {
    /// An empty store that keeps nothing after it is dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose secrets persist in the JSON file `path` (created if missing).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let secrets = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(StoreError::new)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(StoreError::new(e)),
        };
        Ok(Self {
            inner: Mutex::new(MemoryState {
                secrets,
                ..MemoryState::default()
            }),
            path: Some(path.to_path_buf()),
        })
    }

    /// Creates or replaces mesh `mesh` with these mTLS settings.
    pub fn set_mesh(&self, mesh: &str, mtls: MeshMtls) {
        self.lock().meshes.insert(mesh.to_string(), mtls);
    }

    /// Creates or replaces dataplane `mesh`/`name` with these inbound services.
    pub fn set_dataplane(&self, mesh: &str, name: &str, services: Vec<String>) {
        self.lock()
            .dataplanes
            .insert((mesh.to_string(), name.to_string()), services);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding the lock cannot leave the maps half-updated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, state: &MemoryState) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let json = serde_json::to_vec(&state.secrets).map_err(StoreError::new)?;
        let tmp = path.with_extension("tmp");
        write_private(&tmp, &json).map_err(StoreError::new)?;
        std::fs::rename(&tmp, path).map_err(StoreError::new)
    }
}

/// Writes `bytes` to `path` readable by the owner only (mode 0600 on Unix).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl SecretStore for MemoryStore {
    fn get_secret(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().secrets.get(key).cloned())
    }

    fn create_secret_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut state = self.lock();
        if let Some(existing) = state.secrets.get(key) {
            return Ok(existing.clone());
        }
        state.secrets.insert(key.to_string(), value.to_vec());
        self.save(&state)?;
        Ok(value.to_vec())
    }

    fn put_secret(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.secrets.insert(key.to_string(), value.to_vec());
        self.save(&state)
    }

    fn delete_secret(&self, key: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.secrets.remove(key).is_some() {
            self.save(&state)?;
        }
        Ok(())
    }
}

impl MeshIdentityLookup for MemoryStore {
    fn mesh_mtls(&self, mesh: &str) -> Result<Option<MeshMtls>, StoreError> {
        Ok(self.lock().meshes.get(mesh).cloned())
    }

    fn dataplane_services(
        &self,
        mesh: &str,
        name: &str,
    ) -> Result<Option<Vec<String>>, StoreError> {
        Ok(self
            .lock()
            .dataplanes
            .get(&(mesh.to_string(), name.to_string()))
            .cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_if_absent_keeps_the_first_value_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.json");
        {
            let s = MemoryStore::open(&path).unwrap();
            assert_eq!(s.create_secret_if_absent("k", b"one").unwrap(), b"one");
            assert_eq!(s.create_secret_if_absent("k", b"two").unwrap(), b"one");
        }
        let s = MemoryStore::open(&path).unwrap();
        assert_eq!(s.get_secret("k").unwrap().as_deref(), Some(&b"one"[..]));
        s.delete_secret("k").unwrap();
        assert_eq!(s.get_secret("k").unwrap(), None);
    }

    #[test]
    fn data_sources_load() {
        assert_eq!(
            DataSource::Inline("aGVs\nbG8=".into()).load().unwrap(),
            b"hello"
        );
        assert_eq!(DataSource::InlineString("x".into()).load().unwrap(), b"x");
        let err = DataSource::File("/nonexistent/ca.pem".into())
            .load()
            .unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(DataSource::Inline("!!".into()).load().is_err());
    }
}
