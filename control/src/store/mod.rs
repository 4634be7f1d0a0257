//! The resource store: where meshes, dataplanes, policies and secrets live.
//!
//! [`Store`] is the contract every backend keeps: [`sqlite::SqliteStore`] is the embedded
//! default, [`postgres::PostgresStore`] the one several control-plane replicas share. Every
//! write is one transaction, and every resource carries a version so that concurrent writers
//! cannot silently overwrite each other (a stale write is a [`StoreError::Conflict`]). Both
//! keep the same tables and the same SQL, as far as the two dialects allow.

pub mod postgres;
pub mod sqlite;

use weft_api::{Resource, ResourceMeta, ResourceType};

/// A resource as stored, with its version and timestamps.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    /// The resource.
    pub resource: Resource,
    /// Version and timestamps.
    pub meta: ResourceMeta,
}

/// Identifies one resource: type, mesh (the mesh's own name for a `Mesh`) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceKey {
    /// The type.
    pub ty: ResourceType,
    /// The owning mesh.
    pub mesh: String,
    /// The name.
    pub name: String,
}

impl ResourceKey {
    /// The key of mesh `name` (a mesh belongs to itself).
    pub fn mesh(name: impl Into<String>) -> Self {
        let name = name.into();
        ResourceKey {
            ty: ResourceType::Mesh,
            mesh: name.clone(),
            name,
        }
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ty == ResourceType::Mesh {
            write!(f, "Mesh/{}", self.name)
        } else {
            write!(f, "{}/{} (mesh {})", self.ty, self.name, self.mesh)
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The resource does not exist.
    #[error("{0} not found")]
    NotFound(ResourceKey),
    /// The mesh a resource names does not exist.
    #[error("mesh {0:?} does not exist: create it first")]
    MeshNotFound(String),
    /// A versioned write raced with another writer.
    #[error(
        "{key} was changed by another writer: expected version {expected}, found {actual}; read it again and retry"
    )]
    Conflict {
        /// The resource.
        key: ResourceKey,
        /// The version the writer had read.
        expected: u64,
        /// The version in the store (0: it does not exist).
        actual: u64,
    },
    /// A mesh still holds resources and the delete was not a cascade.
    #[error("mesh {mesh:?} still has {} resource(s): {}; delete them first or delete the mesh with cascade", .contents.len(), list(.contents))]
    MeshNotEmpty {
        /// The mesh.
        mesh: String,
        /// What it holds.
        contents: Vec<ResourceKey>,
    },
    /// A stored row could not be read back; the store was written by something else.
    #[error("stored {key} is unreadable: {reason}")]
    Corrupt {
        /// The row.
        key: String,
        /// Why.
        reason: String,
    },
    /// The database failed.
    #[error("store backend error: {0}")]
    Backend(String),
}

fn list(keys: &[ResourceKey]) -> String {
    const SHOWN: usize = 20;
    let mut s: Vec<String> = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("{}/{}", k.ty, k.name))
        .collect();
    if keys.len() > SHOWN {
        s.push(format!("and {} more", keys.len() - SHOWN));
    }
    s.join(", ")
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// The contract of a resource store. Methods block; async callers use `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    /// Reads one resource.
    fn get(&self, key: &ResourceKey) -> StoreResult<Option<StoredResource>>;

    /// Lists the resources of a type, in one mesh or (for `None`) in all meshes, by name.
    fn list(&self, ty: ResourceType, mesh: Option<&str>) -> StoreResult<Vec<StoredResource>>;

    /// Every resource of every type with the store's [`Store::revision`], all read at one
    /// moment: a reader building configuration from several types sees no resource without
    /// the Mesh it was written under. By type, then mesh and name.
    fn snapshot(&self) -> StoreResult<(u64, Vec<StoredResource>)>;

    /// Creates or updates a resource. With `expected_version`, the write happens only if the
    /// stored version equals it (0 = must not exist yet). Mesh-scoped resources need their
    /// mesh to exist, checked in the same transaction. Returns the stored resource and
    /// whether it was created.
    fn put(
        &self,
        resource: &Resource,
        expected_version: Option<u64>,
    ) -> StoreResult<(StoredResource, bool)>;

    /// Deletes a resource. Deleting a mesh that still holds resources fails with
    /// [`StoreError::MeshNotEmpty`] unless `cascade`, which deletes them and the mesh's
    /// secrets too. Returns every key deleted.
    fn delete(&self, key: &ResourceKey, cascade: bool) -> StoreResult<Vec<ResourceKey>>;

    /// Reads a secret (CA keys, token signing keys, revocations).
    fn get_secret(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Stores a secret unless one exists; returns the stored value (the winner of a race).
    fn create_secret_if_absent(&self, key: &str, value: &[u8]) -> StoreResult<Vec<u8>>;

    /// Stores a secret, replacing any previous value.
    fn put_secret(&self, key: &str, value: &[u8]) -> StoreResult<()>;

    /// Deletes a secret; returns whether it existed.
    fn delete_secret(&self, key: &str) -> StoreResult<bool>;

    /// A counter that grows with every committed write, for change detection.
    fn revision(&self) -> StoreResult<u64>;

    /// Runs `init` once in the life of the store (the first start with an empty store);
    /// returns whether it ran.
    fn initialize_once(&self, init: &dyn Fn(&dyn Store) -> StoreResult<()>) -> StoreResult<bool>;

    /// Marks dataplane `(mesh, name)` online at control-plane replica `replica`, leased until
    /// `until_ms` (Unix milliseconds), unless another replica holds it online on a lease that
    /// has not expired at `now_ms`: then nothing changes and that replica's id comes back.
    fn claim_proxy(
        &self,
        mesh: &str,
        name: &str,
        replica: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Option<String>>;

    /// Extends to `until_ms` the lease of every dataplane online at `replica`. Not a change
    /// of the store's contents: the revision stays.
    fn renew_proxies(&self, replica: &str, until_ms: i64) -> StoreResult<()>;

    /// The stream of `(mesh, name)` at `replica` ended: a graceful end forgets the dataplane's
    /// presence, an abrupt one leaves it known as offline. Does nothing if another replica
    /// holds it by now.
    fn release_proxy(
        &self,
        mesh: &str,
        name: &str,
        replica: &str,
        graceful: bool,
    ) -> StoreResult<()>;

    /// The dataplanes known to be offline at `now_ms`: their stream broke, or the replica
    /// that held them stopped renewing their lease (it is gone). `(mesh, name)` pairs.
    fn offline_proxies(&self, now_ms: i64) -> StoreResult<Vec<(String, String)>>;

    /// Publishes what replica `replica` knows of its proxies, one [`InsightUpdate`] each, so
    /// that every replica can show it. An update is skipped when another replica holds the
    /// proxy online on a lease unexpired at `now_ms` (the [`held_elsewhere`] rule: that
    /// replica's word is the fresher one), and when the dataplane no longer exists. Not a
    /// change of the store's contents: the revision stays.
    fn publish_insights(
        &self,
        replica: &str,
        now_ms: i64,
        updates: &[InsightUpdate],
    ) -> StoreResult<()>;

    /// The published insights of the dataplanes of `mesh`, by name, each with whether its
    /// proxy is online at `now_ms` by its presence record.
    fn insights(&self, mesh: &str, now_ms: i64) -> StoreResult<Vec<PublishedInsight>>;
}

/// One proxy's insight, as its replica publishes it ([`Store::publish_insights`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsightUpdate {
    /// The dataplane's mesh.
    pub mesh: String,
    /// The dataplane's name.
    pub name: String,
    /// The insight, as the JSON of the REST API's `dataplaneInsight`.
    pub insight: String,
}

/// A published insight, as [`Store::insights`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedInsight {
    /// The dataplane's name.
    pub name: String,
    /// The replica that published it: the one the proxy is, or last was, connected to.
    pub replica: String,
    /// The insight, as published (JSON).
    pub insight: String,
    /// Whether the proxy is online now, by its presence record (the published insight may
    /// be up to a renewal period old, or come from a replica that is gone).
    pub online: bool,
}

/// Whether a presence record of `holder` (`online`, leased until `expires`) keeps `replica`
/// from claiming the proxy at `now_ms`: only another replica's unexpired online record does.
pub(crate) fn held_elsewhere(
    holder: &str,
    online: bool,
    expires: i64,
    replica: &str,
    now_ms: i64,
) -> bool {
    holder != replica && online && expires > now_ms
}

/// The tables every backend keeps, in SQL both dialects take; `bytes` is the dialect's name for
/// a byte string (`BLOB` in SQLite, `BYTEA` in PostgreSQL). `proxy_insights`, created last,
/// stands for the whole schema where a backend checks whether it exists.
pub(crate) fn schema(bytes: &str) -> String {
    format!(
        "
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    mesh TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    spec TEXT NOT NULL,
    creation_time TEXT NOT NULL,
    modification_time TEXT NOT NULL,
    PRIMARY KEY (type, mesh, name)
);
CREATE INDEX IF NOT EXISTS resources_by_mesh ON resources (mesh);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    value {bytes} NOT NULL
);
CREATE TABLE IF NOT EXISTS store_meta (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO store_meta (name, value) VALUES ('revision', 0) ON CONFLICT (name) DO NOTHING;
CREATE TABLE IF NOT EXISTS proxy_presence (
    mesh TEXT NOT NULL,
    name TEXT NOT NULL,
    replica TEXT NOT NULL,
    online BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    PRIMARY KEY (mesh, name)
);
CREATE TABLE IF NOT EXISTS proxy_insights (
    mesh TEXT NOT NULL,
    name TEXT NOT NULL,
    replica TEXT NOT NULL,
    insight TEXT NOT NULL,
    PRIMARY KEY (mesh, name)
);
"
    )
}

/// Upserts one proxy's insight (`$1` mesh, `$2` name, `$3` replica, `$4` the insight's JSON)
/// unless another replica holds the proxy online on a lease unexpired at `$5` (Unix ms; the
/// rule of [`held_elsewhere`]) or the dataplane is gone. In SQL both backends take (SQLite
/// binds `$N` by name, and reads `ON CONFLICT` after `INSERT … SELECT` only when the `SELECT`
/// has a `WHERE`).
pub(crate) const PUBLISH_INSIGHT: &str = "\
INSERT INTO proxy_insights (mesh, name, replica, insight) \
SELECT CAST($1 AS TEXT), CAST($2 AS TEXT), CAST($3 AS TEXT), CAST($4 AS TEXT) \
WHERE EXISTS (SELECT 1 FROM resources WHERE type = 'Dataplane' AND mesh = $1 AND name = $2) \
AND NOT EXISTS (SELECT 1 FROM proxy_presence WHERE mesh = $1 AND name = $2 \
    AND replica <> $3 AND online = 1 AND expires > CAST($5 AS BIGINT)) \
ON CONFLICT (mesh, name) DO UPDATE SET replica = EXCLUDED.replica, insight = EXCLUDED.insight";

/// The published insights of mesh `$1`, by name, each with whether its proxy's presence
/// record says online at `$2` (Unix ms): 1 or 0, in SQL both backends take (SQLite binds
/// `$N` by name: here `$2` comes first).
pub(crate) const INSIGHTS: &str = "\
SELECT i.name, i.replica, i.insight, \
CASE WHEN p.online = 1 AND p.expires > $2 THEN 1 ELSE 0 END \
FROM proxy_insights i LEFT JOIN proxy_presence p ON p.mesh = i.mesh AND p.name = i.name \
WHERE i.mesh = $1 ORDER BY i.name";

/// The readable rows of a listing: a row that no longer parses or validates (written by an
/// older weft, before a rule it breaks) is left out and logged, rather than failing the whole
/// listing. Listings feed every mesh's configuration; one bad row must not stop updates for
/// all of them. Fetching that one resource still reports it.
pub(crate) fn readable(rows: Vec<StoreResult<StoredResource>>) -> StoreResult<Vec<StoredResource>> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            Ok(r) => out.push(r),
            Err(StoreError::Corrupt { key, reason }) => {
                tracing::error!(resource = %key, %reason, "stored resource unreadable; left out");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The secret-key prefix of everything a mesh owns; a cascade delete removes these too.
/// Mesh names are DNS labels (no dots), so `<mesh>.` belongs to exactly one mesh.
pub fn mesh_secret_prefix(mesh: &str) -> String {
    format!("{mesh}.")
}
