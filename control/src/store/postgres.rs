//! The PostgreSQL store (`--store postgres://…`): the store several control-plane replicas
//! share.
//!
//! Same tables and same rules as the SQLite store: resources as their universal JSON, parsed
//! and validated again when read; a version per resource; a store-wide revision that every
//! write moves, which each replica polls to rebuild its proxies' snapshots.
//!
//! Every write transaction starts by moving the revision (`UPDATE store_meta … 'revision'`),
//! which locks that one row until the transaction ends. Writers from every replica therefore
//! run one after another, and each statement of a write (PostgreSQL's default READ COMMITTED)
//! sees everything committed before it: a versioned write, the mesh-exists check, a cascade
//! delete and a create-if-absent are as serial as over SQLite's `BEGIN IMMEDIATE`. A write
//! that ends in an error rolls back, so the revision moves only with a change. The control
//! plane writes a few times per change of a resource, so one lock is no bottleneck; reads
//! take no lock.
//!
//! Up to [`MAX_CONNECTIONS`] connections per store, each behind a mutex (the store's callers
//! block, as over SQLite): a call takes an idle one, opens another when all are busy, and a
//! connection that broke is opened again on its next use.
//!
//! TLS (rustls, through `tokio-postgres-rustls`): the server's certificate is always verified,
//! chain and host name, against the PEM file the URL names with `sslrootcert=PATH`, else the
//! system's roots. `sslmode` picks when TLS is used: `disable` (and `allow`) never;
//! `prefer`, the default, when the server offers it; `require`, `verify-ca` and `verify-full`
//! always. So weft's `require` checks what libpq's `verify-full` checks: a mesh's store holds
//! its CA keys, and an unverified TLS connection would hand them to whoever sits in between.
//! `sslcert` and `sslkey` name a client certificate and its key (readable by its owner only)
//! for the server's `cert` authentication. All of these are read from the URL's query and
//! from the key-value form alike.

use super::{
    InsightUpdate, PublishedInsight, ResourceKey, Store, StoreError, StoreResult, StoredResource,
    mesh_secret_prefix,
};
use postgres::config::SslMode;
use postgres::{Client, Config, NoTls, Transaction};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::os::unix::fs::MetadataExt as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, SystemTime};
use tokio_postgres_rustls::MakeRustlsConnect;
use weft_api::{Resource, ResourceMeta, ResourceType, parse};

/// The advisory lock key of schema creation (any constant; "weft" in ASCII).
const SCHEMA_LOCK: i64 = 0x7765_6674;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the connection waits on a silent server before it counts as broken (unless the
/// URL sets `tcp_user_timeout`/`keepalives_idle`).
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// The most connections one store keeps open. A call takes the first idle one and opens
/// another only when all open ones are busy, so a replica that makes one call at a time keeps
/// one connection.
pub const MAX_CONNECTIONS: usize = 4;

/// A [`Store`] on a PostgreSQL database.
pub struct PostgresStore {
    config: Config,
    /// The TLS connector, unless `sslmode` says never to use TLS.
    tls: Option<MakeRustlsConnect>,
    /// [`MAX_CONNECTIONS`] slots, each `None` until a call needs it or after its connection
    /// broke. Several, so that one slow call (a view load, a wait on a row lock) does not hold
    /// up the others: the lease renewals above all, which must not stall for
    /// [`crate::discovery::hub::PRESENCE_LEASE`].
    clients: Vec<Mutex<Option<Client>>>,
    /// Where a call waits when every slot is busy (rotates, to spread the waiters).
    next_wait: AtomicUsize,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Closing a connection runs the client's own small runtime, which panics on a
        // thread that drives tokio (as when the control plane drops its store at shutdown):
        // there, the connections are closed on a thread of their own.
        let clients: Vec<Client> = self
            .clients
            .iter_mut()
            .filter_map(|slot| match slot.get_mut() {
                Ok(client) => client.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            })
            .collect();
        if !clients.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::Builder::new()
                .name("postgres-close".into())
                .spawn(move || drop(clients));
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration holds the password: name the database only.
        f.debug_struct("PostgresStore")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// A failed call, with the server's own message when it sent one (`postgres::Error` alone
/// says only "db error").
fn backend(e: postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => {
            let detail = db.detail().map(|d| format!(": {d}")).unwrap_or_default();
            StoreError::Backend(format!(
                "postgres: {} {}{detail} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            ))
        }
        None => {
            // The cause says what went wrong ("error performing TLS handshake" alone does
            // not): the whole chain, as `anyhow` would print it.
            let mut message = format!("postgres: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            StoreError::Backend(message)
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Whether `url` is a PostgreSQL URL (`postgres://` or `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Whether `store` names a PostgreSQL store: a PostgreSQL URL, or libpq's key-value form
/// (`host=db.example dbname=weft …`: no scheme, and `=` in it).
pub fn is_postgres_store(store: &str) -> bool {
    is_postgres_url(store) || (!store.contains("://") && store.contains('='))
}

/// What the URL says about TLS, taken out of it before `postgres` parses the rest (which
/// knows neither `sslrootcert`, `sslcert`, `sslkey` nor the `verify-*` modes).
#[derive(Debug, Default, PartialEq)]
struct TlsParams {
    /// `sslmode`, as written (`None`: absent, which means `prefer`).
    mode: Option<String>,
    /// `sslrootcert`: the CA certificates (PEM) that must vouch for the server.
    root_cert: Option<String>,
    /// `sslcert`: the client certificate chain (PEM) to present, for `cert` authentication.
    client_cert: Option<String>,
    /// `sslkey`: the client certificate's private key (PEM).
    client_key: Option<String>,
}

impl TlsParams {
    /// Takes `key=value` if it is one of the TLS parameters; says whether it was.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root_cert,
            "sslcert" => &mut self.client_cert,
            "sslkey" => &mut self.client_key,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Splits the TLS parameters ([`TlsParams`]) off a `postgres://` URL's query, or off the
/// key-value form (`host=… dbname=… sslmode=…`); the rest is left for `postgres` to parse.
fn split_tls_params(url: &str) -> (String, TlsParams) {
    if !is_postgres_url(url) {
        return split_key_value_tls_params(url);
    }
    let mut params = TlsParams::default();
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), params);
    };
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let taken = pair
            .split_once('=')
            .is_some_and(|(k, v)| params.take(k, decode(v)));
        if !taken {
            kept.push(pair);
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, params)
}

/// [`split_tls_params`] for the key-value form, read as libpq reads it: `key = value` pairs
/// apart by white space, a value in single quotes when it holds spaces, `\` escaping the next
/// character. Text that is not of that form is returned whole, for `postgres` to refuse with
/// its own message.
fn split_key_value_tls_params(text: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let mut kept: Vec<&str> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i == bytes.len() {
            break;
        }
        let pair_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &text[pair_start..i];
        i = skip_space(i);
        if key.is_empty() || bytes.get(i) != Some(&b'=') {
            return (text.to_string(), TlsParams::default());
        }
        i = skip_space(i + 1);
        let quoted = bytes.get(i) == Some(&b'\'');
        if quoted {
            i += 1;
        }
        let mut value = Vec::new();
        let mut closed = !quoted;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if i + 1 < bytes.len() => {
                    value.push(bytes[i + 1]);
                    i += 2;
                    continue;
                }
                b'\'' if quoted => {
                    closed = true;
                    i += 1;
                    break;
                }
                b if !quoted && b.is_ascii_whitespace() => break,
                b => value.push(b),
            }
            i += 1;
        }
        if !closed {
            return (text.to_string(), TlsParams::default());
        }
        let value = String::from_utf8_lossy(&value).into_owned();
        if !params.take(key, value) {
            kept.push(&text[pair_start..i]);
        }
    }
    (kept.join(" "), params)
}

/// The roots a server certificate must chain to: the `sslrootcert` file, else the system's.
fn root_store(root_cert: Option<&str>) -> StoreResult<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let bad =
                |why: String| StoreError::Backend(format!("--store: sslrootcert={path}: {why}"));
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in it".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => {
            // Unreadable system certificates are skipped: the ones that load still verify.
            let system = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(system.certs);
        }
    }
    Ok(roots)
}

/// A client certificate chain and its key, for PostgreSQL's `cert` authentication.
type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate that `sslcert` and `sslkey` name, if they do. The key must be
/// readable by its owner only (libpq's rule: also group-readable when root owns it), as the
/// key of a proxy's certificate is.
fn client_identity(tls: &TlsParams) -> StoreResult<Option<ClientIdentity>> {
    let (cert, key) = match (&tls.client_cert, &tls.client_key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(StoreError::Backend(
                "--store: sslcert without sslkey: name the certificate's private key with \
                 sslkey=PATH"
                    .into(),
            ));
        }
        (None, Some(_)) => {
            return Err(StoreError::Backend(
                "--store: sslkey without sslcert: name the client certificate with sslcert=PATH"
                    .into(),
            ));
        }
    };
    let bad = |what: &str, path: &str, why: String| {
        StoreError::Backend(format!("--store: {what}={path}: {why}"))
    };
    let meta = std::fs::metadata(key).map_err(|e| bad("sslkey", key, e.to_string()))?;
    let open_to = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if meta.mode() & open_to != 0 {
        return Err(bad(
            "sslkey",
            key,
            format!(
                "the private key is readable by others (mode {:o}); make it 0600",
                meta.mode() & 0o777
            ),
        ));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("sslcert", cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("sslcert", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad("sslcert", cert, "no PEM certificate in it".into()));
    }
    let private_key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| bad("sslkey", key, e.to_string()))?;
    Ok(Some((chain, private_key)))
}

/// The TLS connector for `roots`, presenting `client` when given, on the workspace's crypto
/// provider.
fn connector(
    roots: rustls::RootCertStore,
    client: Option<ClientIdentity>,
) -> StoreResult<MakeRustlsConnect> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Backend(format!("TLS to PostgreSQL: {e}")))?
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            StoreError::Backend(format!(
                "--store: sslcert/sslkey: not a certificate and its key: {e}"
            ))
        })?,
    };
    Ok(MakeRustlsConnect::new(config))
}

/// Opens a connection, over TLS when a connector is given.
fn connect(config: &Config, tls: Option<&MakeRustlsConnect>) -> Result<Client, postgres::Error> {
    match tls {
        Some(tls) => config.connect(tls.clone()),
        None => config.connect(NoTls),
    }
}

/// The connection settings and TLS connector of `url`, with weft's defaults where the URL
/// is silent (see [`PostgresStore::open`]).
fn configure(url: &str) -> StoreResult<(Config, Option<MakeRustlsConnect>)> {
    let (url, tls) = split_tls_params(url);
    let mut config: Config = url
        .parse()
        .map_err(|e| StoreError::Backend(format!("--store: not a PostgreSQL URL: {e}")))?;
    let mode = match tls.mode.as_deref() {
        // Absent from the URL, or the key-value form's own: what `postgres` read.
        None => config.get_ssl_mode(),
        Some("disable" | "allow") => SslMode::Disable,
        Some("prefer") => SslMode::Prefer,
        Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
        Some(other) => {
            return Err(StoreError::Backend(format!(
                "--store: sslmode={other}: expected disable, allow, prefer, require, \
                 verify-ca or verify-full"
            )));
        }
    };
    config.ssl_mode(mode);
    let tls = match mode {
        SslMode::Disable => None,
        _ => Some(connector(
            root_store(tls.root_cert.as_deref())?,
            client_identity(&tls)?,
        )?),
    };
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("weft-control");
    }
    // A database that stops answering must fail the call, not hang it: a hung call holds
    // its connection, and the calls after it soon wait too. The kernel gives up on unacknowledged data after
    // `tcp_user_timeout`, and keepalives find a dead idle connection (libpq's defaults
    // leave both to the system: minutes to hours).
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(DEAD_PEER_TIMEOUT);
    }
    if config.get_keepalives_idle() > DEAD_PEER_TIMEOUT {
        config.keepalives_idle(DEAD_PEER_TIMEOUT);
    }
    Ok((config, tls))
}

impl PostgresStore {
    /// Connects to the database that `url` names (`postgres://user:password@host:port/db`
    /// with optional `?sslmode=…&sslrootcert=PATH&sslcert=PATH&sslkey=PATH`, or the key-value form
    /// `host=… user=… dbname=…`) and creates the tables if they are missing. A bad URL is an
    /// error naming what is wrong, without echoing the password.
    pub fn open(url: &str) -> StoreResult<Self> {
        let (config, tls) = configure(url)?;
        let mut client = connect(&config, tls.as_ref()).map_err(|e| {
            // The server refused us (its own message), or our side gave up on it.
            let refused_by_server = e.as_db_error().is_some();
            let mut err = backend(e);
            if let StoreError::Backend(m) = &mut err
                && (m.contains("TLS") || m.contains("certificate"))
            {
                m.push_str(if refused_by_server {
                    " (present a client certificate with sslcert=PATH and sslkey=PATH in the \
                     --store URL)"
                } else {
                    " (name the server's CA with sslrootcert=PATH in the --store URL, or use \
                     sslmode=disable)"
                });
            }
            err
        })?;
        let mut tx = client.transaction().map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .map_err(backend)?;
        // Created whole or not at all (one transaction), so the table created last stands
        // for all. When it is there, nothing runs: `CREATE INDEX IF NOT EXISTS` locks its
        // table even when the index exists, and that lock deadlocked with another replica's
        // first writes.
        let exists: bool = tx
            .query_one("SELECT to_regclass('proxy_insights') IS NOT NULL", &[])
            .and_then(|row| row.try_get(0))
            .map_err(backend)?;
        if !exists {
            // Created by the first replica to start, under the advisory lock: two replicas
            // starting at once would otherwise race on `CREATE TABLE IF NOT EXISTS`, which is
            // not atomic in PostgreSQL.
            tx.batch_execute(&super::schema("BYTEA")).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        let mut clients = vec![Mutex::new(Some(client))];
        clients.resize_with(MAX_CONNECTIONS, || Mutex::new(None));
        Ok(PostgresStore {
            config,
            tls,
            clients,
            next_wait: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on a connection of its own: the first idle one, else a new one in a free
    /// slot, else the next to come free. A connection that broke is opened again.
    fn with_client<T>(&self, f: impl FnOnce(&mut Client) -> StoreResult<T>) -> StoreResult<T> {
        // A slot whose holder panicked may hold a connection in any state: start afresh.
        fn fresh(
            poisoned: PoisonError<MutexGuard<'_, Option<Client>>>,
        ) -> MutexGuard<'_, Option<Client>> {
            let mut guard = poisoned.into_inner();
            *guard = None;
            guard
        }
        // Open connections first, so that a store used one call at a time keeps one.
        let idle = || {
            self.clients.iter().find_map(|slot| match slot.try_lock() {
                Ok(guard) if guard.is_some() => Some(guard),
                Ok(_) | Err(TryLockError::WouldBlock) => None,
                Err(TryLockError::Poisoned(p)) => Some(fresh(p)),
            })
        };
        let free = || self.clients.iter().find_map(|slot| slot.try_lock().ok());
        let mut guard = match idle().or_else(free) {
            Some(guard) => guard,
            None => {
                let i = self.next_wait.fetch_add(1, Ordering::Relaxed) % self.clients.len();
                self.clients[i].lock().unwrap_or_else(fresh)
            }
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            *guard = Some(connect(&self.config, self.tls.as_ref()).map_err(backend)?);
        }
        match guard.as_mut() {
            Some(client) => f(client),
            None => Err(StoreError::Backend("postgres: not connected".into())),
        }
    }

    /// Runs `f` in a write transaction that first moves the revision (which serializes
    /// writers, see the module docs). Commits when `f` returns [`Write::Changed`], rolls back
    /// when it returns [`Write::Unchanged`] or an error.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> StoreResult<Write<T>>,
    ) -> StoreResult<T> {
        self.with_client(|client| {
            let mut tx = client.transaction().map_err(backend)?;
            tx.execute(
                "UPDATE store_meta SET value = value + 1 WHERE name = 'revision'",
                &[],
            )
            .map_err(backend)?;
            match f(&mut tx)? {
                Write::Changed(out) => {
                    tx.commit().map_err(backend)?;
                    Ok(out)
                }
                Write::Unchanged(out) => {
                    tx.rollback().map_err(backend)?;
                    Ok(out)
                }
            }
        })
    }
}

/// What a write transaction did: changed the store (commit), or nothing (roll back, and so
/// leave the revision where it was).
enum Write<T> {
    Changed(T),
    Unchanged(T),
}

const SELECT: &str =
    "SELECT type, mesh, name, version, spec, creation_time, modification_time FROM resources";

fn row_to_stored(row: &postgres::Row) -> StoreResult<StoredResource> {
    let get = |i: usize| -> StoreResult<String> { row.try_get(i).map_err(backend) };
    let (ty, mesh, name) = (get(0)?, get(1)?, get(2)?);
    let version: i64 = row.try_get(3).map_err(backend)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        key: format!("{ty}/{mesh}/{name}"),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(&get(4)?).map_err(|e| corrupt(e.to_string()))?;
    let doc = parse::parse_value(value).map_err(|e| corrupt(e.to_string()))?;
    Ok(StoredResource {
        resource: doc.resource,
        meta: ResourceMeta {
            version: version.max(0) as u64,
            creation_time: get(5)?,
            modification_time: get(6)?,
        },
    })
}

fn current_version(
    tx: &mut Transaction<'_>,
    key: &ResourceKey,
) -> StoreResult<Option<(i64, String)>> {
    let row = tx
        .query_opt(
            "SELECT version, creation_time FROM resources WHERE type = $1 AND mesh = $2 AND name = $3",
            &[&key.ty.name(), &key.mesh, &key.name],
        )
        .map_err(backend)?;
    row.map(|r| {
        Ok((
            r.try_get(0).map_err(backend)?,
            r.try_get(1).map_err(backend)?,
        ))
    })
    .transpose()
}

fn mesh_contents(tx: &mut Transaction<'_>, mesh: &str) -> StoreResult<Vec<ResourceKey>> {
    let rows = tx
        .query(
            "SELECT type, name FROM resources WHERE mesh = $1 AND type <> 'Mesh' ORDER BY type, name",
            &[&mesh],
        )
        .map_err(backend)?;
    rows.iter()
        .map(|r| {
            let t: String = r.try_get(0).map_err(backend)?;
            let name: String = r.try_get(1).map_err(backend)?;
            let ty = ResourceType::from_name(&t).ok_or_else(|| StoreError::Corrupt {
                key: format!("{t}/{mesh}/{name}"),
                reason: "unknown type".into(),
            })?;
            Ok(ResourceKey {
                ty,
                mesh: mesh.to_string(),
                name,
            })
        })
        .collect()
}

impl Store for PostgresStore {
    fn get(&self, key: &ResourceKey) -> StoreResult<Option<StoredResource>> {
        self.with_client(|client| {
            let row = client
                .query_opt(
                    &format!("{SELECT} WHERE type = $1 AND mesh = $2 AND name = $3"),
                    &[&key.ty.name(), &key.mesh, &key.name],
                )
                .map_err(backend)?;
            row.as_ref().map(row_to_stored).transpose()
        })
    }

    fn list(&self, ty: ResourceType, mesh: Option<&str>) -> StoreResult<Vec<StoredResource>> {
        self.with_client(|client| {
            let rows = match mesh {
                Some(m) => client.query(
                    &format!("{SELECT} WHERE type = $1 AND mesh = $2 ORDER BY name"),
                    &[&ty.name(), &m],
                ),
                None => client.query(
                    &format!("{SELECT} WHERE type = $1 ORDER BY mesh, name"),
                    &[&ty.name()],
                ),
            }
            .map_err(backend)?;
            super::readable(rows.iter().map(row_to_stored).collect())
        })
    }

    fn snapshot(&self) -> StoreResult<(u64, Vec<StoredResource>)> {
        self.with_client(|client| {
            // REPEATABLE READ: every statement of the transaction sees the snapshot taken at
            // its first, so no write of another replica lands between the two reads.
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(backend)?;
            let row = tx
                .query_one("SELECT value FROM store_meta WHERE name = 'revision'", &[])
                .map_err(backend)?;
            let revision: i64 = row.try_get(0).map_err(backend)?;
            let rows = tx
                .query(&format!("{SELECT} ORDER BY type, mesh, name"), &[])
                .map_err(backend)?;
            let stored = super::readable(rows.iter().map(row_to_stored).collect())?;
            tx.commit().map_err(backend)?;
            Ok((revision.max(0) as u64, stored))
        })
    }

    fn put(
        &self,
        resource: &Resource,
        expected_version: Option<u64>,
    ) -> StoreResult<(StoredResource, bool)> {
        let ty = resource.resource_type();
        let key = ResourceKey {
            ty,
            mesh: resource.mesh_name().to_string(),
            name: resource.name.clone(),
        };
        let spec = resource.to_universal(None).to_string();
        self.write(|tx| {
            if ty.is_mesh_scoped() && current_version(tx, &ResourceKey::mesh(key.mesh.clone()))?.is_none() {
                return Err(StoreError::MeshNotFound(key.mesh.clone()));
            }
            let current = current_version(tx, &key)?;
            let actual = current.as_ref().map_or(0, |(v, _)| *v as u64);
            if let Some(expected) = expected_version
                && expected != actual
            {
                return Err(StoreError::Conflict { key: key.clone(), expected, actual });
            }
            let now = now();
            let (version, created, is_new) = match current {
                Some((v, created)) => {
                    tx.execute(
                        "UPDATE resources SET version = $1, spec = $2, modification_time = $3 WHERE type = $4 AND mesh = $5 AND name = $6",
                        &[&(v + 1), &spec, &now, &ty.name(), &key.mesh, &key.name],
                    )
                    .map_err(backend)?;
                    (v + 1, created, false)
                }
                None => {
                    tx.execute(
                        "INSERT INTO resources (type, mesh, name, version, spec, creation_time, modification_time) VALUES ($1, $2, $3, 1, $4, $5, $5)",
                        &[&ty.name(), &key.mesh, &key.name, &spec, &now],
                    )
                    .map_err(backend)?;
                    (1, now.clone(), true)
                }
            };
            let meta = ResourceMeta {
                version: version as u64,
                creation_time: created,
                modification_time: now,
            };
            Ok(Write::Changed((StoredResource { resource: resource.clone(), meta }, is_new)))
        })
    }

    fn delete(&self, key: &ResourceKey, cascade: bool) -> StoreResult<Vec<ResourceKey>> {
        self.write(|tx| {
            if current_version(tx, key)?.is_none() {
                return Err(StoreError::NotFound(key.clone()));
            }
            let mut deleted = Vec::new();
            if key.ty == ResourceType::Mesh {
                let contents = mesh_contents(tx, &key.name)?;
                if !contents.is_empty() && !cascade {
                    return Err(StoreError::MeshNotEmpty {
                        mesh: key.name.clone(),
                        contents,
                    });
                }
                tx.execute(
                    "DELETE FROM resources WHERE mesh = $1 AND type <> 'Mesh'",
                    &[&key.name],
                )
                .map_err(backend)?;
                for sql in [
                    "DELETE FROM proxy_presence WHERE mesh = $1",
                    "DELETE FROM proxy_insights WHERE mesh = $1",
                ] {
                    tx.execute(sql, &[&key.name]).map_err(backend)?;
                }
                // `starts_with` would do, but LIKE needs escaping and `left` is plain SQL.
                let prefix = mesh_secret_prefix(&key.name);
                let len = i32::try_from(prefix.chars().count()).unwrap_or(i32::MAX);
                tx.execute(
                    "DELETE FROM secrets WHERE left(name, $1) = $2",
                    &[&len, &prefix],
                )
                .map_err(backend)?;
                deleted = contents;
            }
            tx.execute(
                "DELETE FROM resources WHERE type = $1 AND mesh = $2 AND name = $3",
                &[&key.ty.name(), &key.mesh, &key.name],
            )
            .map_err(backend)?;
            if key.ty == ResourceType::Dataplane {
                for sql in [
                    "DELETE FROM proxy_presence WHERE mesh = $1 AND name = $2",
                    "DELETE FROM proxy_insights WHERE mesh = $1 AND name = $2",
                ] {
                    tx.execute(sql, &[&key.mesh, &key.name]).map_err(backend)?;
                }
            }
            deleted.push(key.clone());
            Ok(Write::Changed(deleted))
        })
    }

    fn get_secret(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.with_client(|client| {
            let row = client
                .query_opt("SELECT value FROM secrets WHERE name = $1", &[&key])
                .map_err(backend)?;
            row.map(|r| r.try_get(0).map_err(backend)).transpose()
        })
    }

    fn create_secret_if_absent(&self, key: &str, value: &[u8]) -> StoreResult<Vec<u8>> {
        self.write(|tx| {
            let existing = tx
                .query_opt("SELECT value FROM secrets WHERE name = $1", &[&key])
                .map_err(backend)?;
            if let Some(row) = existing {
                return Ok(Write::Unchanged(row.try_get(0).map_err(backend)?));
            }
            tx.execute(
                "INSERT INTO secrets (name, value) VALUES ($1, $2)",
                &[&key, &value],
            )
            .map_err(backend)?;
            Ok(Write::Changed(value.to_vec()))
        })
    }

    fn put_secret(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO secrets (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&key, &value],
            )
            .map_err(backend)?;
            Ok(Write::Changed(()))
        })
    }

    fn delete_secret(&self, key: &str) -> StoreResult<bool> {
        self.write(|tx| {
            let n = tx
                .execute("DELETE FROM secrets WHERE name = $1", &[&key])
                .map_err(backend)?;
            Ok(if n > 0 {
                Write::Changed(true)
            } else {
                Write::Unchanged(false)
            })
        })
    }

    fn revision(&self) -> StoreResult<u64> {
        self.with_client(|client| {
            let row = client
                .query_one("SELECT value FROM store_meta WHERE name = 'revision'", &[])
                .map_err(backend)?;
            let value: i64 = row.try_get(0).map_err(backend)?;
            Ok(value.max(0) as u64)
        })
    }

    fn initialize_once(&self, init: &dyn Fn(&dyn Store) -> StoreResult<()>) -> StoreResult<bool> {
        // The mark goes in after `init` has succeeded: a start that failed half-way (a crash,
        // a dropped connection) runs `init` again next time, which is safe (replicas starting
        // together may both run it), rather than never.
        let done = self.with_client(|client| {
            client
                .query_opt(
                    "SELECT value FROM store_meta WHERE name = 'initialized'",
                    &[],
                )
                .map(|row| row.is_some())
                .map_err(backend)
        })?;
        if done {
            return Ok(false);
        }
        init(self)?;
        self.with_client(|client| {
            let n = client
                .execute(
                    "INSERT INTO store_meta (name, value) VALUES ('initialized', 1) ON CONFLICT (name) DO NOTHING",
                    &[],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
    }

    fn claim_proxy(
        &self,
        mesh: &str,
        name: &str,
        replica: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Option<String>> {
        self.write(|tx| {
            let holder = tx
                .query_opt(
                    "SELECT replica, online, expires FROM proxy_presence WHERE mesh = $1 AND name = $2",
                    &[&mesh, &name],
                )
                .map_err(backend)?;
            if let Some(row) = holder {
                let other: String = row.try_get(0).map_err(backend)?;
                let online: i64 = row.try_get(1).map_err(backend)?;
                let expires: i64 = row.try_get(2).map_err(backend)?;
                if super::held_elsewhere(&other, online != 0, expires, replica, now_ms) {
                    return Ok(Write::Unchanged(Some(other)));
                }
            }
            tx.execute(
                "INSERT INTO proxy_presence (mesh, name, replica, online, expires) VALUES ($1, $2, $3, 1, $4) \
                 ON CONFLICT (mesh, name) DO UPDATE SET replica = EXCLUDED.replica, online = 1, expires = EXCLUDED.expires",
                &[&mesh, &name, &replica, &until_ms],
            )
            .map_err(backend)?;
            Ok(Write::Changed(None))
        })
    }

    fn renew_proxies(&self, replica: &str, until_ms: i64) -> StoreResult<()> {
        // Outside `write`: a renewal is no change of the contents, so it leaves the revision
        // (and takes no lock but the rows').
        self.with_client(|client| {
            client
                .execute(
                    "UPDATE proxy_presence SET expires = $2 WHERE replica = $1 AND online = 1",
                    &[&replica, &until_ms],
                )
                .map_err(backend)?;
            Ok(())
        })
    }

    fn release_proxy(
        &self,
        mesh: &str,
        name: &str,
        replica: &str,
        graceful: bool,
    ) -> StoreResult<()> {
        self.write(|tx| {
            let sql = if graceful {
                "DELETE FROM proxy_presence WHERE mesh = $1 AND name = $2 AND replica = $3"
            } else {
                "UPDATE proxy_presence SET online = 0 WHERE mesh = $1 AND name = $2 AND replica = $3"
            };
            let n = tx
                .execute(sql, &[&mesh, &name, &replica])
                .map_err(backend)?;
            Ok(if n > 0 {
                Write::Changed(())
            } else {
                Write::Unchanged(())
            })
        })
    }

    fn offline_proxies(&self, now_ms: i64) -> StoreResult<Vec<(String, String)>> {
        self.with_client(|client| {
            let rows = client
                .query(
                    "SELECT mesh, name FROM proxy_presence WHERE online = 0 OR expires <= $1 ORDER BY mesh, name",
                    &[&now_ms],
                )
                .map_err(backend)?;
            rows.iter()
                .map(|r| Ok((r.try_get(0).map_err(backend)?, r.try_get(1).map_err(backend)?)))
                .collect()
        })
    }

    fn publish_insights(
        &self,
        replica: &str,
        now_ms: i64,
        updates: &[InsightUpdate],
    ) -> StoreResult<()> {
        if updates.is_empty() {
            return Ok(());
        }
        // Outside `write`, as a renewal: no change of the contents. One transaction for the
        // batch, so a replica with many proxies costs one commit per period.
        self.with_client(|client| {
            let mut tx = client.transaction().map_err(backend)?;
            let publish = tx.prepare(super::PUBLISH_INSIGHT).map_err(backend)?;
            for u in updates {
                tx.execute(&publish, &[&u.mesh, &u.name, &replica, &u.insight, &now_ms])
                    .map_err(backend)?;
            }
            tx.commit().map_err(backend)
        })
    }

    fn insights(&self, mesh: &str, now_ms: i64) -> StoreResult<Vec<PublishedInsight>> {
        self.with_client(|client| {
            let rows = client
                .query(super::INSIGHTS, &[&mesh, &now_ms])
                .map_err(backend)?;
            rows.iter()
                .map(|r| {
                    Ok(PublishedInsight {
                        name: r.try_get(0).map_err(backend)?,
                        replica: r.try_get(1).map_err(backend)?,
                        insight: r.try_get(2).map_err(backend)?,
                        online: r.try_get::<_, i32>(3).map_err(backend)? != 0,
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let (url, p) = split_tls_params(
            "postgres://u:p@db:5432/weft?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(url, "postgres://u:p@db:5432/weft?application_name=x");
        assert_eq!(p.mode.as_deref(), Some("verify-full"));
        assert_eq!(p.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (url, p) = split_tls_params("postgresql://db/weft?sslmode=disable");
        assert_eq!(
            (url.as_str(), p.mode.as_deref()),
            ("postgresql://db/weft", Some("disable"))
        );
        let (url, p) = split_tls_params("postgres://db/weft?sslcert=%2Fc.pem&sslkey=%2Fk.pem");
        assert_eq!(url, "postgres://db/weft");
        assert_eq!(
            (p.client_cert.as_deref(), p.client_key.as_deref()),
            (Some("/c.pem"), Some("/k.pem"))
        );
    }

    #[test]
    fn postgres_stores_are_told_apart() {
        for store in [
            "postgres://weft@db/weft",
            "postgresql://db/weft",
            "host=db dbname=weft",
        ] {
            assert!(is_postgres_store(store), "{store}");
        }
        for store in [
            "sqlite:///var/lib/weft/weft.db",
            "/var/lib/weft.db",
            "mysql://a=b",
        ] {
            assert!(!is_postgres_store(store), "{store}");
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_of_the_key_value_form() {
        let (rest, p) = split_tls_params(
            "host=db  sslmode = verify-full dbname=weft sslrootcert='/etc/my ca.pem' \
             password='it\\'s' sslcert=/c.pem sslkey=/k\\ key.pem",
        );
        assert_eq!(rest, "host=db dbname=weft password='it\\'s'");
        assert_eq!(
            p,
            TlsParams {
                mode: Some("verify-full".into()),
                root_cert: Some("/etc/my ca.pem".into()),
                client_cert: Some("/c.pem".into()),
                client_key: Some("/k key.pem".into()),
            }
        );
        // Not of the form: left whole for `postgres` to refuse.
        for bad in ["host", "host=db sslmode='verify-full", "=x"] {
            assert_eq!(
                split_tls_params(bad),
                (bad.to_string(), TlsParams::default())
            );
        }
        let config: Config = split_tls_params("host=db user=u dbname=weft sslmode=verify-full")
            .0
            .parse()
            .expect("the rest parses");
        assert_eq!(config.get_dbname(), Some("weft"));
    }

    #[test]
    fn defaults_fill_in_what_the_url_leaves_out() {
        let (config, tls) = configure("postgres://weft@db/weft?sslmode=disable").expect("url");
        assert!(tls.is_none());
        assert_eq!(config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(config.get_tcp_user_timeout(), Some(&DEAD_PEER_TIMEOUT));
        assert_eq!(config.get_keepalives_idle(), DEAD_PEER_TIMEOUT);
        assert_eq!(config.get_application_name(), Some("weft-control"));
        // What the URL says wins.
        let (config, _) = configure(
            "postgres://weft@db/weft?sslmode=disable&connect_timeout=3&tcp_user_timeout=5\
             &keepalives_idle=7&application_name=cp-1",
        )
        .expect("url");
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(config.get_application_name(), Some("cp-1"));
    }

    #[test]
    fn sslmode_decides_whether_tls_is_used() {
        for (mode, expected, tls) in [
            ("disable", SslMode::Disable, false),
            ("allow", SslMode::Disable, false),
            ("prefer", SslMode::Prefer, true),
            ("require", SslMode::Require, true),
            ("verify-ca", SslMode::Require, true),
            ("verify-full", SslMode::Require, true),
        ] {
            let (config, connector) =
                configure(&format!("postgres://weft@db/weft?sslmode={mode}")).expect(mode);
            assert_eq!(config.get_ssl_mode(), expected, "{mode}");
            assert_eq!(connector.is_some(), tls, "{mode}");
        }
        let (config, connector) = configure("postgres://weft@db/weft").expect("no sslmode");
        assert_eq!(config.get_ssl_mode(), SslMode::Prefer);
        assert!(connector.is_some());
    }
}
