//! Starting the control plane: open the store, create the default mesh on first start, and
//! serve the REST API. Used by the `weft-control` binary and, in-process, by tests.

use crate::discovery::{DiscoveryService, Hub};
use crate::identity::IdentityService;
use crate::identity::adapter::{StoreIdentity, TokenAuth};
use crate::identity::cp_tls::CpTls;
use crate::rest::{ApiState, router};
use crate::store::postgres::{PostgresStore, is_postgres_store};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_api::{Resource, Spec, mesh::MeshSpec};

/// The name of the mesh created on first start.
pub const DEFAULT_MESH: &str = "default";

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where the embedded store and generated files live.
    pub data_dir: PathBuf,
    /// Store URL: `sqlite://PATH` (default: `<data-dir>/weft.db`) or
    /// `postgres://USER:PASSWORD@HOST:PORT/DB` or libpq's key-value form (the store several
    /// replicas share).
    pub store_url: Option<String>,
    /// REST API listen address.
    pub api_address: SocketAddr,
    /// Dataplane gRPC (discovery, identity) listen address.
    pub dp_server_address: SocketAddr,
    /// Extra names or addresses for the dataplane server's certificate.
    pub dp_server_sans: Vec<String>,
    /// The user's own certificate and key for the dataplane server (instead of weft's CA).
    pub dp_server_cert: Option<(PathBuf, PathBuf)>,
    /// Do not create the `default` mesh on first start.
    pub no_default_mesh: bool,
    /// Token that lets non-loopback callers mutate through the API.
    pub admin_token: Option<String>,
    /// How often the dataplane server pings a proxy's connection, and how long it waits for
    /// the answer before it drops the connection ([`DEFAULT_DP_KEEPALIVE`]). A proxy whose
    /// host died or lost its network sends no end of stream; without the pings its name would
    /// stay online, and a restarted proxy of that name be refused, until TCP gave up.
    pub dp_keepalive: Duration,
}

/// The default [`RunConfig::dp_keepalive`]: a silent proxy is dropped within 40 s.
pub const DEFAULT_DP_KEEPALIVE: Duration = Duration::from_secs(20);

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The store could not be opened or initialized.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The dataplane server's TLS could not be set up.
    #[error("dataplane server TLS: {0}")]
    Tls(String),
    /// File-system trouble with the data directory.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The shortest admin token accepted: it is a bearer secret that grants every mutation.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// An admin token must be a real secret: not empty (an unset variable in a deployment
/// template), not short, no whitespace (HTTP/1 trims it, HTTP/2 does not).
fn check_admin_token(token: &str) -> Result<(), RunError> {
    if token.len() < MIN_ADMIN_TOKEN_LEN || token.chars().any(char::is_whitespace) {
        return Err(RunError::Config(format!(
            "--admin-token must be at least {MIN_ADMIN_TOKEN_LEN} characters without \
             whitespace (got {} characters); leave it unset to allow mutations from loopback \
             only",
            token.len()
        )));
    }
    Ok(())
}

/// A running control plane.
pub struct ControlPlane {
    /// Where the REST API listens.
    pub api_address: SocketAddr,
    /// Where the dataplane gRPC server listens.
    pub dp_server_address: SocketAddr,
    /// Discovery state.
    pub hub: Arc<Hub>,
    /// The data directory (holds `cp-ca.pem`).
    pub data_dir: PathBuf,
    /// Mesh identity: CAs and dataplane tokens.
    pub identity: IdentityService,
    /// The store.
    pub store: Arc<dyn Store>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    dp_server: JoinHandle<Result<(), tonic::transport::Error>>,
    reloader: JoinHandle<()>,
}

impl ControlPlane {
    /// Stops serving and waits for in-flight requests.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        // Discovery streams stay open as long as their proxies do; give them a moment to see
        // the shutdown, then cut them (proxies reconnect to the next control plane).
        let mut dp_server = self.dp_server;
        if tokio::time::timeout(Duration::from_secs(1), &mut dp_server)
            .await
            .is_err()
        {
            dp_server.abort();
        }
        self.reloader.abort();
    }

    /// Waits until the server stops (it stops only on error or after [`Self::shutdown`]).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.server).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Asks the server to stop without waiting.
    pub fn trigger_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// Opens the store the configuration names. Blocks (connecting to PostgreSQL): call it
/// outside the async runtime or through `spawn_blocking`.
pub fn open_store(cfg: &RunConfig) -> Result<Arc<dyn Store>, RunError> {
    let path = match cfg.store_url.as_deref() {
        None => {
            create_private_dir(&cfg.data_dir)?;
            cfg.data_dir.join("weft.db")
        }
        Some(url) if url.starts_with("sqlite:") => {
            let p = url.trim_start_matches("sqlite:").trim_start_matches("//");
            if p.is_empty() {
                return Err(RunError::Config(
                    "--store sqlite:// needs a file path, e.g. sqlite:///var/lib/weft/weft.db"
                        .into(),
                ));
            }
            PathBuf::from(p)
        }
        Some(url) if is_postgres_store(url) => {
            // The data directory still holds the dataplane server's CA.
            create_private_dir(&cfg.data_dir)?;
            return Ok(Arc::new(PostgresStore::open(url)?));
        }
        Some(url) => {
            // Not echoed: a URL may carry a password.
            let scheme = url.split_once("://").map_or("(none)", |(s, _)| s);
            return Err(RunError::Config(format!(
                "--store: unknown scheme {scheme:?}; expected sqlite://PATH or postgres://USER@HOST/DB"
            )));
        }
    };
    Ok(Arc::new(SqliteStore::open(&path)?))
}

/// The store secret that holds the control-plane CA the replicas of a shared store use. No
/// mesh's secrets can collide with it: a mesh name cannot start with `_`.
const CP_CA_SECRET: &str = "_control-plane.ca";

/// The control-plane CA as kept in the store: both PEMs, so they are shared as one.
#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct SharedCpCa {
    cert: String,
    key: String,
}

/// Makes `cp-ca.pem` and `cp-ca-key.pem` in `data_dir` the CA every replica of the shared
/// store uses, so that proxies trust whichever replica they reach with one `--ca-cert-file`.
/// The first replica to start offers its CA (the files it has, or a new one); every other
/// replica writes that one into its data directory. A data directory that already holds
/// another CA is an error: replacing it would cut off the proxies that trust it.
fn share_cp_ca(store: &dyn Store, data_dir: &std::path::Path) -> Result<(), RunError> {
    use crate::identity::cp_tls::{CA_CERT_FILE, CA_KEY_FILE, generate_ca};
    let (cert_path, key_path) = (data_dir.join(CA_CERT_FILE), data_dir.join(CA_KEY_FILE));
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|source| RunError::DataDir {
            path: path.to_path_buf(),
            source,
        })
    };
    let local = if cert_path.exists() || key_path.exists() {
        Some(SharedCpCa {
            cert: read(&cert_path)?,
            key: read(&key_path)?,
        })
    } else {
        None
    };
    let shared = match store.get_secret(CP_CA_SECRET)? {
        Some(bytes) => bytes,
        None => {
            let offer = match &local {
                Some(ca) => serde_json::to_vec(ca),
                None => {
                    let (cert, key) = generate_ca().map_err(|e| RunError::Tls(e.to_string()))?;
                    serde_json::to_vec(&SharedCpCa {
                        cert,
                        key: key.serialize_pem(),
                    })
                }
            }
            .map_err(|e| RunError::Config(e.to_string()))?;
            store.create_secret_if_absent(CP_CA_SECRET, &offer)?
        }
    };
    let shared: SharedCpCa = serde_json::from_slice(&shared).map_err(|e| {
        RunError::Config(format!(
            "the store's control-plane CA ({CP_CA_SECRET}) is unreadable: {e}"
        ))
    })?;
    match local {
        Some(ca) if ca == shared => Ok(()),
        Some(_) => Err(RunError::Config(format!(
            "{} holds a control-plane CA other than the one the replicas of this store share: \
             proxies that trust it would not trust the others. Move cp-ca.pem and \
             cp-ca-key.pem away to use the shared one, or give this replica \
             --dp-server-cert-file/--dp-server-key-file",
            data_dir.display()
        ))),
        None => {
            // Key first, as when the CA is made here: no CA without its key.
            crate::identity::store::write_private(&key_path, shared.key.as_bytes()).map_err(
                |source| RunError::DataDir {
                    path: key_path.clone(),
                    source,
                },
            )?;
            std::fs::write(&cert_path, &shared.cert).map_err(|source| RunError::DataDir {
                path: cert_path.clone(),
                source,
            })
        }
    }
}

/// The file in the data directory that keeps this control plane's replica id.
const REPLICA_ID_FILE: &str = "replica-id";

/// This control plane's id among the replicas sharing its store: read from
/// `<data-dir>/replica-id`, or made and written there on first start, so that a restarted
/// replica is the same replica to its proxies' presence records.
fn replica_id(data_dir: &std::path::Path) -> Result<String, RunError> {
    create_private_dir(&data_dir.to_path_buf())?;
    let path = data_dir.join(REPLICA_ID_FILE);
    let err = |source| RunError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            let valid = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !valid {
                return Err(RunError::Config(format!(
                    "{}: not a replica id (1-64 letters, digits, '-', '_' or '.'); delete it to get a new one",
                    path.display()
                )));
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = crate::discovery::hub::new_replica_id();
            std::fs::write(&path, format!("{id}\n")).map_err(err)?;
            Ok(id)
        }
        Err(e) => Err(err(e)),
    }
}

fn create_private_dir(path: &PathBuf) -> Result<(), RunError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| RunError::DataDir {
        path: path.clone(),
        source,
    };
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(err)?;
    }
    Ok(())
}

/// Creates the `default` mesh if this is the store's first start.
pub fn initialize_store(store: &dyn Store, no_default_mesh: bool) -> Result<bool, StoreError> {
    store.initialize_once(&|s| {
        if !no_default_mesh {
            let mesh = Resource {
                name: DEFAULT_MESH.into(),
                mesh: None,
                labels: Default::default(),
                spec: Spec::Mesh(MeshSpec::default()),
            };
            s.put(&mesh, Some(0)).map(|_| ()).or_else(|e| match e {
                StoreError::Conflict { .. } => Ok(()),
                e => Err(e),
            })?;
            tracing::info!("created mesh {DEFAULT_MESH:?} (first start)");
        }
        Ok(())
    })
}

/// Starts the control plane and returns once it listens.
pub async fn start(cfg: RunConfig) -> Result<ControlPlane, RunError> {
    if let Some(token) = &cfg.admin_token {
        check_admin_token(token)?;
    }
    let store = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open_store(&cfg))
            .await
            .map_err(|e| RunError::Config(e.to_string()))??
    };
    {
        let store = store.clone();
        let no_default = cfg.no_default_mesh;
        tokio::task::spawn_blocking(move || initialize_store(store.as_ref(), no_default))
            .await
            .map_err(|e| RunError::Config(e.to_string()))??;
    }
    let listener = TcpListener::bind(cfg.api_address)
        .await
        .map_err(|source| RunError::Bind {
            addr: cfg.api_address,
            source,
        })?;
    let api_address = listener.local_addr().map_err(|source| RunError::Bind {
        addr: cfg.api_address,
        source,
    })?;
    let store_identity = Arc::new(StoreIdentity(store.clone()));
    let identity = IdentityService::new(store_identity.clone(), store_identity);
    let hub = Hub::new(
        store.clone(),
        Arc::new(identity.clone()),
        replica_id(&cfg.data_dir)?,
    );
    let observed = Arc::downgrade(&hub);
    let identity =
        identity.with_issue_observer(Arc::new(move |mesh: &str, name: &str, not_after| {
            if let Some(hub) = observed.upgrade() {
                hub.record_certificate(mesh, name, not_after);
            }
        }));
    let reloader = hub.spawn_reloader();
    let state = Arc::new(ApiState {
        store: store.clone(),
        admin_token: cfg.admin_token.clone(),
        hub: hub.clone(),
        identity: identity.clone(),
    });
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    // The CA file exists, and the dataplane port is bound, before either port answers: a
    // proxy or script that sees the REST API (or the dataplane port) can read `cp-ca.pem`.
    // Several replicas share a PostgreSQL store, and then their CA too.
    if cfg.dp_server_cert.is_none() && cfg.store_url.as_deref().is_some_and(is_postgres_store) {
        let (store, dir) = (store.clone(), cfg.data_dir.clone());
        tokio::task::spawn_blocking(move || share_cp_ca(store.as_ref(), &dir))
            .await
            .map_err(|e| RunError::Config(e.to_string()))??;
    }
    let tls = match &cfg.dp_server_cert {
        Some((cert, key)) => CpTls::from_files(cert, key),
        None => CpTls::load_or_create(&cfg.data_dir, &[cfg.dp_server_address], &cfg.dp_server_sans),
    }
    .map_err(|e| RunError::Tls(e.to_string()))?;
    let dp_listener = TcpListener::bind(cfg.dp_server_address)
        .await
        .map_err(|source| RunError::Bind {
            addr: cfg.dp_server_address,
            source,
        })?;
    let dp_server_address = dp_listener.local_addr().map_err(|source| RunError::Bind {
        addr: cfg.dp_server_address,
        source,
    })?;
    let (shutdown, stop) = watch::channel(false);
    let mut api_stop = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|s| *s).await;
            })
            .await
    });
    tracing::info!(%api_address, "REST API listening");

    let discovery =
        DiscoveryService::new(hub.clone(), Arc::new(TokenAuth(identity.tokens().clone())));
    let mut dp_stop = stop;
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(cfg.dp_keepalive))
        .http2_keepalive_timeout(Some(cfg.dp_keepalive))
        .tls_config(tls.server_tls_config())
        .map_err(|e| RunError::Tls(e.to_string()))?
        .add_service(discovery.into_server())
        .add_service(identity.clone().into_server());
    let dp_server = tokio::spawn(
        grpc.serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(dp_listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(cfg.dp_keepalive)),
            async move {
                let _ = dp_stop.wait_for(|s| *s).await;
            },
        ),
    );
    tracing::info!(%dp_server_address, "dataplane gRPC server listening");
    Ok(ControlPlane {
        api_address,
        dp_server_address,
        hub,
        data_dir: cfg.data_dir.clone(),
        identity,
        store,
        shutdown,
        server,
        dp_server,
        reloader,
    })
}
