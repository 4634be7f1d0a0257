//! The embedded SQLite store: one file under the data directory.
//!
//! Writes run in `BEGIN IMMEDIATE` transactions, so two processes sharing the file serialize
//! instead of interleaving. Resources are stored as their universal JSON; they are parsed and
//! validated again when read, so a row edited by hand cannot smuggle an invalid resource in.

use super::{
    InsightUpdate, PublishedInsight, ResourceKey, Store, StoreError, StoreResult, StoredResource,
    mesh_secret_prefix,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use weft_api::{Resource, ResourceMeta, ResourceType, parse};

/// A [`Store`] on an SQLite file.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`. The file holds every mesh's CA
    /// key and token signing key, so it is made (and an existing one set) readable by its
    /// owner only; SQLite gives its `-wal` and `-shm` files the same mode.
    pub fn open(path: &Path) -> StoreResult<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let private = |e: std::io::Error| {
            StoreError::Backend(format!("making {} private: {e}", path.display()))
        };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(private)?;
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if file.exists() {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(private)?;
            }
        }
        let conn = Connection::open(path).map_err(backend)?;
        Self::init(conn)
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> StoreResult<Self> {
        Self::init(Connection::open_in_memory().map_err(backend)?)
    }

    fn init(conn: Connection) -> StoreResult<Self> {
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(backend)?;
        // WAL lets readers proceed during a write; it is not available in memory (harmless).
        let _ = conn.pragma_update(None, "journal_mode", "WAL");
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(backend)?;
        conn.execute_batch(&super::schema("BLOB"))
            .map_err(backend)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn with_tx<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StoreError::Backend("store lock poisoned".into()))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let out = f(&tx)?;
        tx.commit().map_err(backend)?;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| StoreError::Backend("store lock poisoned".into()))?;
        f(&conn)
    }
}

fn bump_revision(tx: &rusqlite::Transaction<'_>) -> StoreResult<()> {
    tx.execute(
        "UPDATE store_meta SET value = value + 1 WHERE name = 'revision'",
        [],
    )
    .map_err(backend)?;
    Ok(())
}

fn row_to_stored(
    ty: &str,
    mesh: &str,
    name: &str,
    version: i64,
    spec: &str,
    created: String,
    modified: String,
) -> StoreResult<StoredResource> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: format!("{ty}/{mesh}/{name}"),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(spec).map_err(|e| corrupt(e.to_string()))?;
    let doc = parse::parse_value(value).map_err(|e| corrupt(e.to_string()))?;
    Ok(StoredResource {
        resource: doc.resource,
        meta: ResourceMeta {
            version: version.max(0) as u64,
            creation_time: created,
            modification_time: modified,
        },
    })
}

/// The revision counter, read on `conn`.
fn revision_of(conn: &Connection) -> StoreResult<u64> {
    conn.query_row(
        "SELECT value FROM store_meta WHERE name = 'revision'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v.max(0) as u64)
    .map_err(backend)
}

const SELECT: &str =
    "SELECT type, mesh, name, version, spec, creation_time, modification_time FROM resources";

/// The rows `sql` selects, each parsed on its own (a bad row does not hide the others).
fn query(
    conn: &Connection,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> StoreResult<Vec<StoreResult<StoredResource>>> {
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (t, m, n, v, s, c, md) = row.map_err(backend)?;
        out.push(row_to_stored(&t, &m, &n, v, &s, c, md));
    }
    Ok(out)
}

fn current_version(tx: &Connection, key: &ResourceKey) -> StoreResult<Option<(i64, String)>> {
    tx.query_row(
        "SELECT version, creation_time FROM resources WHERE type = ?1 AND mesh = ?2 AND name = ?3",
        params![key.ty.name(), key.mesh, key.name],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map_err(backend)
}

fn mesh_contents(conn: &Connection, mesh: &str) -> StoreResult<Vec<ResourceKey>> {
    let mut stmt = conn
        .prepare_cached("SELECT type, name FROM resources WHERE mesh = ?1 AND type <> 'Mesh' ORDER BY type, name")
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![mesh], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (t, n) = row.map_err(backend)?;
        let ty = ResourceType::from_name(&t).ok_or_else(|| StoreError::Corrupt {
            key: format!("{t}/{mesh}/{n}"),
            reason: "unknown type".into(),
        })?;
        out.push(ResourceKey {
            ty,
            mesh: mesh.to_string(),
            name: n,
        });
    }
    Ok(out)
}

impl Store for SqliteStore {
    fn get(&self, key: &ResourceKey) -> StoreResult<Option<StoredResource>> {
        self.read(|c| {
            let sql = format!("{SELECT} WHERE type = ?1 AND mesh = ?2 AND name = ?3");
            query(c, &sql, &[&key.ty.name(), &key.mesh, &key.name])?
                .into_iter()
                .next()
                .transpose()
        })
    }

    fn list(&self, ty: ResourceType, mesh: Option<&str>) -> StoreResult<Vec<StoredResource>> {
        self.read(|c| {
            super::readable(match mesh {
                Some(m) => query(
                    c,
                    &format!("{SELECT} WHERE type = ?1 AND mesh = ?2 ORDER BY name"),
                    &[&ty.name(), &m],
                )?,
                None => query(
                    c,
                    &format!("{SELECT} WHERE type = ?1 ORDER BY mesh, name"),
                    &[&ty.name()],
                )?,
            })
        })
    }

    fn snapshot(&self) -> StoreResult<(u64, Vec<StoredResource>)> {
        self.read(|c| {
            // One read transaction: both statements see the same committed state, also when
            // another process writes the file.
            let tx = c.unchecked_transaction().map_err(backend)?;
            let revision = revision_of(&tx)?;
            let rows = super::readable(query(
                &tx,
                &format!("{SELECT} ORDER BY type, mesh, name"),
                &[],
            )?)?;
            tx.commit().map_err(backend)?;
            Ok((revision, rows))
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
        self.with_tx(|tx| {
            if ty.is_mesh_scoped() {
                let mesh_key = ResourceKey::mesh(key.mesh.clone());
                if current_version(tx, &mesh_key)?.is_none() {
                    return Err(StoreError::MeshNotFound(key.mesh.clone()));
                }
            }
            let current = current_version(tx, &key)?;
            let actual = current.as_ref().map(|(v, _)| *v as u64).unwrap_or(0);
            if let Some(expected) = expected_version
                && expected != actual {
                    return Err(StoreError::Conflict { key: key.clone(), expected, actual });
                }
            let now = now();
            let (version, created, is_new) = match current {
                Some((v, created)) => {
                    tx.execute(
                        "UPDATE resources SET version = ?1, spec = ?2, modification_time = ?3 WHERE type = ?4 AND mesh = ?5 AND name = ?6 AND version = ?7",
                        params![v + 1, spec, now, ty.name(), key.mesh, key.name, v],
                    )
                    .map_err(backend)?;
                    (v + 1, created, false)
                }
                None => {
                    tx.execute(
                        "INSERT INTO resources (type, mesh, name, version, spec, creation_time, modification_time) VALUES (?1, ?2, ?3, 1, ?4, ?5, ?5)",
                        params![ty.name(), key.mesh, key.name, spec, now],
                    )
                    .map_err(backend)?;
                    (1, now.clone(), true)
                }
            };
            bump_revision(tx)?;
            let meta = ResourceMeta { version: version as u64, creation_time: created, modification_time: now };
            Ok((StoredResource { resource: resource.clone(), meta }, is_new))
        })
    }

    fn delete(&self, key: &ResourceKey, cascade: bool) -> StoreResult<Vec<ResourceKey>> {
        self.with_tx(|tx| {
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
                    "DELETE FROM resources WHERE mesh = ?1 AND type <> 'Mesh'",
                    params![key.name],
                )
                .map_err(backend)?;
                for sql in [
                    "DELETE FROM proxy_presence WHERE mesh = ?1",
                    "DELETE FROM proxy_insights WHERE mesh = ?1",
                ] {
                    tx.execute(sql, params![key.name]).map_err(backend)?;
                }
                let prefix = mesh_secret_prefix(&key.name);
                tx.execute(
                    "DELETE FROM secrets WHERE substr(name, 1, ?1) = ?2",
                    params![prefix.len() as i64, prefix],
                )
                .map_err(backend)?;
                deleted = contents;
            }
            tx.execute(
                "DELETE FROM resources WHERE type = ?1 AND mesh = ?2 AND name = ?3",
                params![key.ty.name(), key.mesh, key.name],
            )
            .map_err(backend)?;
            if key.ty == ResourceType::Dataplane {
                for sql in [
                    "DELETE FROM proxy_presence WHERE mesh = ?1 AND name = ?2",
                    "DELETE FROM proxy_insights WHERE mesh = ?1 AND name = ?2",
                ] {
                    tx.execute(sql, params![key.mesh, key.name])
                        .map_err(backend)?;
                }
            }
            deleted.push(key.clone());
            bump_revision(tx)?;
            Ok(deleted)
        })
    }

    fn get_secret(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.read(|c| {
            c.query_row(
                "SELECT value FROM secrets WHERE name = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
    }

    fn create_secret_if_absent(&self, key: &str, value: &[u8]) -> StoreResult<Vec<u8>> {
        self.with_tx(|tx| {
            let existing: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT value FROM secrets WHERE name = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            if let Some(v) = existing {
                return Ok(v);
            }
            tx.execute(
                "INSERT INTO secrets (name, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(backend)?;
            bump_revision(tx)?;
            Ok(value.to_vec())
        })
    }

    fn put_secret(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.with_tx(|tx| {
            tx.execute("DELETE FROM secrets WHERE name = ?1", params![key])
                .map_err(backend)?;
            tx.execute(
                "INSERT INTO secrets (name, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(backend)?;
            bump_revision(tx)
        })
    }

    fn delete_secret(&self, key: &str) -> StoreResult<bool> {
        self.with_tx(|tx| {
            let n = tx
                .execute("DELETE FROM secrets WHERE name = ?1", params![key])
                .map_err(backend)?;
            if n > 0 {
                bump_revision(tx)?;
            }
            Ok(n > 0)
        })
    }

    fn revision(&self) -> StoreResult<u64> {
        self.read(revision_of)
    }

    fn initialize_once(&self, init: &dyn Fn(&dyn Store) -> StoreResult<()>) -> StoreResult<bool> {
        // The mark goes in after `init` has succeeded: a start that failed half-way (a crash,
        // a busy store) runs `init` again next time, which is safe, rather than never.
        let done = self.read(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM store_meta WHERE name = 'initialized'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(backend)
        })?;
        if done > 0 {
            return Ok(false);
        }
        init(self)?;
        self.with_tx(|tx| {
            let n = tx.execute("INSERT INTO store_meta (name, value) VALUES ('initialized', 1) ON CONFLICT (name) DO NOTHING", []).map_err(backend)?;
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
        self.with_tx(|tx| {
            let holder: Option<(String, i64, i64)> = tx
                .query_row(
                    "SELECT replica, online, expires FROM proxy_presence WHERE mesh = ?1 AND name = ?2",
                    params![mesh, name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(backend)?;
            if let Some((other, online, expires)) = holder
                && super::held_elsewhere(&other, online != 0, expires, replica, now_ms)
            {
                return Ok(Some(other));
            }
            tx.execute(
                "INSERT INTO proxy_presence (mesh, name, replica, online, expires) VALUES (?1, ?2, ?3, 1, ?4) \
                 ON CONFLICT (mesh, name) DO UPDATE SET replica = excluded.replica, online = 1, expires = excluded.expires",
                params![mesh, name, replica, until_ms],
            )
            .map_err(backend)?;
            bump_revision(tx)?;
            Ok(None)
        })
    }

    fn renew_proxies(&self, replica: &str, until_ms: i64) -> StoreResult<()> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE proxy_presence SET expires = ?2 WHERE replica = ?1 AND online = 1",
                params![replica, until_ms],
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
        self.with_tx(|tx| {
            let sql = if graceful {
                "DELETE FROM proxy_presence WHERE mesh = ?1 AND name = ?2 AND replica = ?3"
            } else {
                "UPDATE proxy_presence SET online = 0 WHERE mesh = ?1 AND name = ?2 AND replica = ?3"
            };
            let n = tx
                .execute(sql, params![mesh, name, replica])
                .map_err(backend)?;
            if n > 0 {
                bump_revision(tx)?;
            }
            Ok(())
        })
    }

    fn offline_proxies(&self, now_ms: i64) -> StoreResult<Vec<(String, String)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT mesh, name FROM proxy_presence WHERE online = 0 OR expires <= ?1 ORDER BY mesh, name",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![now_ms], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
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
        // No `bump_revision`: not a change of the contents.
        self.with_tx(|tx| {
            let mut publish = tx.prepare_cached(super::PUBLISH_INSIGHT).map_err(backend)?;
            for u in updates {
                publish
                    .execute(rusqlite::named_params! {
                        "$1": u.mesh, "$2": u.name, "$3": replica, "$4": u.insight, "$5": now_ms,
                    })
                    .map_err(backend)?;
            }
            Ok(())
        })
    }

    fn insights(&self, mesh: &str, now_ms: i64) -> StoreResult<Vec<PublishedInsight>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(super::INSIGHTS).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::named_params! { "$1": mesh, "$2": now_ms }, |r| {
                    Ok(PublishedInsight {
                        name: r.get(0)?,
                        replica: r.get(1)?,
                        insight: r.get(2)?,
                        online: r.get::<_, i64>(3)? != 0,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A row that no longer reads (written before a rule it breaks) is left out of listings,
    /// which feed every mesh's configuration, and reported when fetched alone.
    #[test]
    fn a_bad_row_is_left_out_of_listings_not_fatal_to_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weft.db");
        let store = SqliteStore::open(&path).expect("opens");
        crate::run::initialize_store(&store, false).expect("default mesh");
        for name in ["a", "b"] {
            let yaml = format!(
                "type: TrafficPermission\nmesh: default\nname: {name}\nsources: [{{match: {{kuma.io/service: web}}}}]\ndestinations: [{{match: {{kuma.io/service: api}}}}]\n"
            );
            let doc = weft_api::parse::parse_documents(&yaml)
                .expect("valid")
                .remove(0);
            store.put(&doc.resource, None).expect("stored");
        }
        let raw = Connection::open(&path).expect("raw connection");
        raw.execute(
            "UPDATE resources SET spec = '{\"type\":\"TrafficPermission\",\"mesh\":\"default\",\"name\":\"a\",\"sources\":\"not a list\"}' WHERE name = 'a'",
            [],
        )
        .expect("corrupted");
        let listed = store
            .list(ResourceType::TrafficPermission, None)
            .expect("the listing still works");
        let names: Vec<&str> = listed.iter().map(|r| r.resource.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        let key = ResourceKey {
            ty: ResourceType::TrafficPermission,
            mesh: "default".into(),
            name: "a".into(),
        };
        assert!(matches!(store.get(&key), Err(StoreError::Corrupt { .. })));
    }

    /// A row stored before a rule only new writes are held to (here: a TrafficPermission
    /// source narrowed by a tag other than the service) reads back as it was, instead of
    /// being left out of the configuration, which could widen what the mesh allows.
    #[test]
    fn a_row_from_before_an_admission_rule_still_reads() {
        let store = SqliteStore::in_memory().expect("store");
        crate::run::initialize_store(&store, false).expect("default mesh");
        let yaml = "type: TrafficPermission\nmesh: default\nname: old\nsources: [{match: {kuma.io/service: web, version: v1}}]\ndestinations: [{match: {kuma.io/service: api}}]\n";
        let err = weft_api::parse::parse_documents(yaml).expect_err("refused as a new write");
        assert_eq!(err.field.as_deref(), Some("sources[0].match.version"));
        let value = serde_json::json!({
            "type": "TrafficPermission", "mesh": "default", "name": "old",
            "sources": [{"match": {"kuma.io/service": "web", "version": "v1"}}],
            "destinations": [{"match": {"kuma.io/service": "api"}}],
        });
        let doc = weft_api::parse::parse_value(value).expect("read back as stored");
        store.put(&doc.resource, None).expect("stored");
        let listed = store
            .list(ResourceType::TrafficPermission, None)
            .expect("listing");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].resource.name, "old");
    }

    /// A first start whose initialization failed is not marked done: the next start runs it
    /// again (and only until it succeeds once).
    #[test]
    fn a_failed_first_start_is_initialized_again() {
        let store = SqliteStore::in_memory().expect("store");
        let runs = std::cell::Cell::new(0);
        let failing = |_: &dyn Store| {
            runs.set(runs.get() + 1);
            Err(StoreError::Backend("interrupted".into()))
        };
        assert!(store.initialize_once(&failing).is_err());
        let succeeding = |_: &dyn Store| {
            runs.set(runs.get() + 1);
            Ok(())
        };
        assert!(store.initialize_once(&succeeding).expect("initialized"));
        assert!(!store.initialize_once(&succeeding).expect("already"));
        assert_eq!(runs.get(), 2);
    }

    /// The store holds CA keys: its files are the owner's alone, also when the file was there
    /// before with a wider mode.
    #[test]
    fn the_store_files_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weft.db");
        std::fs::write(&path, b"").expect("a file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let store = SqliteStore::open(&path).expect("opens");
        crate::run::initialize_store(&store, false).expect("a write");
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if let Ok(meta) = std::fs::metadata(&file) {
                assert_eq!(
                    meta.permissions().mode() & 0o777,
                    0o600,
                    "{}",
                    file.display()
                );
            }
        }
    }
}
