//! The PostgreSQL store against a real PostgreSQL server (started by the test, see
//! `weft_tests::postgres`): the same contract as the SQLite store, checked on both; two
//! stores on one database (two control-plane replicas) that never lose each other's writes;
//! a broken connection opened again; TLS used and verified; bad URLs refused with clear
//! errors.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use weft_api::parse::parse_documents;
use weft_api::{Resource, ResourceType};
use weft_control::store::postgres::PostgresStore;
use weft_control::store::sqlite::SqliteStore;
use weft_control::store::{InsightUpdate, ResourceKey, Store, StoreError};
use weft_tests::postgres::PgServer;

fn resource(yaml: &str) -> Resource {
    parse_documents(yaml)
        .expect("test resource")
        .remove(0)
        .resource
}

fn mesh(name: &str) -> Resource {
    resource(&format!("type: Mesh\nname: {name}\n"))
}

fn permission(mesh: &str, name: &str) -> Resource {
    resource(&format!(
        "type: TrafficPermission\nmesh: {mesh}\nname: {name}\n\
         sources:\n  - match:\n      kuma.io/service: web\n\
         destinations:\n  - match:\n      kuma.io/service: backend\n"
    ))
}

fn key(r: &Resource) -> ResourceKey {
    ResourceKey {
        ty: r.resource_type(),
        mesh: r.mesh_name().to_string(),
        name: r.name.clone(),
    }
}

/// A server and a fresh database on it.
fn database(name: &str) -> (PgServer, String) {
    let pg = PgServer::start().expect("start PostgreSQL");
    pg.create_database(name).expect("createdb");
    let url = pg.url(name);
    (pg, url)
}

/// What every store must do, whatever its backend.
fn contract(store: &dyn Store) {
    let rev0 = store.revision().expect("revision");

    // A mesh-scoped resource needs its mesh.
    let tp = permission("m1", "web-to-backend");
    assert!(matches!(
        store.put(&tp, None),
        Err(StoreError::MeshNotFound(m)) if m == "m1"
    ));
    assert_eq!(
        store.revision().expect("revision"),
        rev0,
        "a refused write moved the revision"
    );

    let (stored, created) = store.put(&mesh("m1"), None).expect("put mesh");
    assert!(created);
    assert_eq!(stored.meta.version, 1);
    let (stored, created) = store.put(&tp, Some(0)).expect("create with version 0");
    assert!(created);
    assert_eq!(stored.meta.version, 1);
    let rev1 = store.revision().expect("revision");
    assert!(rev1 >= rev0 + 2, "two writes, revision {rev0} -> {rev1}");

    // A snapshot holds every resource of every type, with the revision they are at.
    let (rev, all) = store.snapshot().expect("snapshot");
    assert_eq!(rev, rev1);
    let keys: Vec<ResourceKey> = all
        .iter()
        .map(|r| key(&r.resource))
        .filter(|k| k.mesh == "m1")
        .collect();
    assert_eq!(keys, [key(&mesh("m1")), key(&tp)]);

    // Versions: a stale write is a conflict naming both versions.
    let (stored, created) = store.put(&tp, Some(1)).expect("update with version 1");
    assert!(!created);
    assert_eq!(stored.meta.version, 2);
    match store.put(&tp, Some(1)) {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (1, 2)),
        other => panic!("stale write: {other:?}"),
    }
    match store.put(&tp, Some(0)) {
        Err(StoreError::Conflict { actual: 2, .. }) => {}
        other => panic!("create over an existing resource: {other:?}"),
    }

    // Reads.
    let got = store.get(&key(&tp)).expect("get").expect("exists");
    assert_eq!(got.resource, tp);
    assert_eq!(got.meta.version, 2);
    assert!(!got.meta.creation_time.is_empty());
    store
        .put(&permission("m1", "a-first"), None)
        .expect("second permission");
    store.put(&mesh("m2"), None).expect("second mesh");
    store
        .put(&permission("m2", "other"), None)
        .expect("permission in m2");
    let names = |mesh: Option<&str>| -> Vec<(String, String)> {
        store
            .list(tp.resource_type(), mesh)
            .expect("list")
            .into_iter()
            .map(|s| (s.resource.mesh_name().to_string(), s.resource.name))
            .collect()
    };
    assert_eq!(
        names(Some("m1")),
        [
            ("m1".into(), "a-first".into()),
            ("m1".into(), "web-to-backend".into())
        ]
    );
    assert_eq!(names(None).len(), 3);
    assert!(
        store
            .get(&key(&permission("m1", "absent")))
            .expect("get")
            .is_none()
    );

    // Secrets.
    assert_eq!(store.get_secret("m1.ca").expect("get secret"), None);
    let won = store
        .create_secret_if_absent("m1.ca", b"first")
        .expect("create secret");
    assert_eq!(won, b"first");
    let rev = store.revision().expect("revision");
    let kept = store
        .create_secret_if_absent("m1.ca", b"second")
        .expect("create existing secret");
    assert_eq!(kept, b"first", "the first value wins");
    assert_eq!(
        store.revision().expect("revision"),
        rev,
        "no change, no new revision"
    );
    store.put_secret("m1.ca", &[0, 255, 1]).expect("replace");
    assert_eq!(
        store.get_secret("m1.ca").expect("get"),
        Some(vec![0, 255, 1])
    );
    store.put_secret("m2.key", b"m2").expect("secret of m2");
    store.put_secret("m10.key", b"m10").expect("secret of m10");
    assert!(!store.delete_secret("absent").expect("delete absent"));
    assert!(store.delete_secret("m2.key").expect("delete"));
    store
        .put_secret("m2.key", b"m2")
        .expect("secret of m2 again");

    // Presence: a dataplane is online at one replica at a time, while its lease runs.
    let offline = |now: i64| store.offline_proxies(now).expect("offline proxies");
    let dp = |n: &str| ("m1".to_string(), n.to_string());
    assert_eq!(
        store
            .claim_proxy("m1", "dp-1", "r1", 1_000, 31_000)
            .expect("claim"),
        None
    );
    assert_eq!(
        store
            .claim_proxy("m1", "dp-1", "r2", 2_000, 32_000)
            .expect("claim"),
        Some("r1".into()),
        "online at another replica"
    );
    assert_eq!(
        store
            .claim_proxy("m1", "dp-1", "r1", 2_000, 32_000)
            .expect("claim"),
        None
    );
    assert!(offline(2_000).is_empty());
    let rev = store.revision().expect("revision");
    store.renew_proxies("r1", 62_000).expect("renew");
    assert_eq!(
        store.revision().expect("revision"),
        rev,
        "a renewal changes no content"
    );
    assert_eq!(
        store
            .claim_proxy("m1", "dp-1", "r2", 40_000, 70_000)
            .expect("claim"),
        Some("r1".into()),
        "the renewed lease still holds"
    );
    assert_eq!(offline(62_000), [dp("dp-1")], "the lease ran out");
    assert_eq!(
        store
            .claim_proxy("m1", "dp-1", "r2", 62_001, 92_000)
            .expect("claim"),
        None
    );
    store
        .release_proxy("m1", "dp-1", "r1", false)
        .expect("release");
    assert!(offline(62_001).is_empty(), "r1 no longer held it");
    store
        .release_proxy("m1", "dp-1", "r2", false)
        .expect("release");
    assert_eq!(offline(62_001), [dp("dp-1")], "its stream broke");
    assert_eq!(
        store
            .claim_proxy("m1", "dp-1", "r1", 62_002, 92_000)
            .expect("claim"),
        None
    );
    store
        .release_proxy("m1", "dp-1", "r1", true)
        .expect("graceful");
    assert!(offline(i64::MAX).is_empty(), "a graceful end forgets it");
    store.claim_proxy("m1", "dp-2", "r1", 0, 1).expect("claim");
    store
        .release_proxy("m1", "dp-2", "r1", false)
        .expect("release");

    insights(store);

    // A mesh with contents is kept unless the delete cascades; a cascade takes the mesh's
    // resources and secrets, and nothing of another mesh, even one whose name it prefixes.
    match store.delete(&ResourceKey::mesh("m1"), false) {
        Err(StoreError::MeshNotEmpty { mesh, contents }) => {
            assert_eq!(mesh, "m1");
            assert_eq!(contents.len(), 2);
        }
        other => panic!("non-cascade delete of a non-empty mesh: {other:?}"),
    }
    let deleted = store
        .delete(&ResourceKey::mesh("m1"), true)
        .expect("cascade");
    assert_eq!(deleted.len(), 3, "{deleted:?}");
    assert_eq!(store.get_secret("m1.ca").expect("get"), None);
    assert_eq!(
        store.get_secret("m2.key").expect("get"),
        Some(b"m2".to_vec())
    );
    assert_eq!(
        store.get_secret("m10.key").expect("get"),
        Some(b"m10".to_vec())
    );
    assert_eq!(names(None), [("m2".into(), "other".into())]);
    assert!(
        offline(i64::MAX).is_empty(),
        "the mesh's presence went with it"
    );
    assert!(matches!(
        store.delete(&ResourceKey::mesh("m1"), true),
        Err(StoreError::NotFound(_))
    ));

    // Initialization runs once in the life of the store.
    let runs = AtomicUsize::new(0);
    let init = |_: &dyn Store| {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    };
    assert!(store.initialize_once(&init).expect("first init"));
    assert!(!store.initialize_once(&init).expect("second init"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Published insights: one row per dataplane, from the replica that holds the proxy, with
/// `online` from the presence record; a replica cannot overwrite the insight of a proxy that
/// another replica holds online; publishing changes no content; deletes take the rows along.
fn insights(store: &dyn Store) {
    store.put(&mesh("m3"), None).expect("mesh m3");
    let web = resource(
        "type: Dataplane\nmesh: m3\nname: web-1\nnetworking:\n  address: 10.0.0.1\n  \
         inbound:\n  - port: 8080\n    tags: {kuma.io/service: web}\n",
    );
    store.put(&web, None).expect("dataplane");
    let update = |name: &str, insight: &str| InsightUpdate {
        mesh: "m3".into(),
        name: name.into(),
        insight: insight.into(),
    };
    let read = |now: i64| {
        store
            .insights("m3", now)
            .expect("insights")
            .into_iter()
            .map(|p| (p.name, p.replica, p.insight, p.online))
            .collect::<Vec<_>>()
    };
    let row = |replica: &str, insight: &str, online: bool| {
        (
            "web-1".to_string(),
            replica.to_string(),
            insight.to_string(),
            online,
        )
    };
    assert_eq!(read(0), []);

    store
        .claim_proxy("m3", "web-1", "r1", 1_000, 31_000)
        .expect("claim");
    let rev = store.revision().expect("revision");
    store
        .publish_insights(
            "r1",
            1_000,
            &[update("web-1", r#"{"n":1}"#), update("gone", "{}")],
        )
        .expect("publish");
    assert_eq!(
        store.revision().expect("revision"),
        rev,
        "publishing changes no content"
    );
    assert_eq!(
        read(2_000),
        [row("r1", r#"{"n":1}"#, true)],
        "no row for a dataplane that does not exist"
    );
    assert_eq!(
        read(31_000),
        [row("r1", r#"{"n":1}"#, false)],
        "lease ran out"
    );

    store
        .publish_insights("r2", 2_000, &[update("web-1", r#"{"stale":true}"#)])
        .expect("publish");
    assert_eq!(
        read(2_000),
        [row("r1", r#"{"n":1}"#, true)],
        "r1 holds web-1 online: r2's word does not count"
    );
    store
        .publish_insights("r1", 3_000, &[update("web-1", r#"{"n":2}"#)])
        .expect("publish");
    assert_eq!(read(3_000), [row("r1", r#"{"n":2}"#, true)]);

    store
        .release_proxy("m3", "web-1", "r1", false)
        .expect("release");
    assert_eq!(
        read(3_000),
        [row("r1", r#"{"n":2}"#, false)],
        "its stream broke"
    );
    store
        .claim_proxy("m3", "web-1", "r2", 4_000, 34_000)
        .expect("claim");
    store
        .publish_insights("r2", 4_000, &[update("web-1", r#"{"n":3}"#)])
        .expect("publish");
    assert_eq!(
        read(4_000),
        [row("r2", r#"{"n":3}"#, true)],
        "it moved to r2"
    );

    store.delete(&key(&web), false).expect("delete dataplane");
    assert_eq!(read(4_000), [], "the dataplane's row went with it");
    store.put(&web, None).expect("dataplane again");
    store
        .publish_insights("r2", 4_000, &[update("web-1", r#"{"n":4}"#)])
        .expect("publish");
    store
        .delete(&ResourceKey::mesh("m3"), true)
        .expect("cascade");
    assert_eq!(read(4_000), [], "the mesh's rows went with it");
}

#[test]
fn the_sqlite_store_keeps_the_contract() {
    contract(&SqliteStore::in_memory().expect("sqlite"));
}

#[test]
fn the_postgres_store_keeps_the_contract() {
    let (_pg, url) = database("contract");
    contract(&PostgresStore::open(&url).expect("open"));
    // Opening the same database again (a restart, or a second replica) keeps what is there.
    let again = PostgresStore::open(&url).expect("open again");
    assert!(again.get(&ResourceKey::mesh("m2")).expect("get").is_some());
}

#[test]
fn two_replicas_on_one_database_never_lose_a_write() {
    let (_pg, url) = database("replicas");
    let stores: Vec<Arc<dyn Store>> = (0..2)
        .map(|_| Arc::new(PostgresStore::open(&url).expect("open")) as Arc<dyn Store>)
        .collect();
    stores[0].put(&mesh("shared"), None).expect("mesh");
    const WRITERS: usize = 4;
    const EACH: usize = 10;
    let barrier = Arc::new(Barrier::new(WRITERS));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&stores[w % 2]);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                // Read, modify, write with the version read; retry on a conflict.
                for i in 0..EACH {
                    loop {
                        let current = store
                            .get(&ResourceKey::mesh("shared"))
                            .expect("get")
                            .expect("mesh");
                        let mut m = current.resource;
                        m.labels.insert(format!("w{w}-{i}"), "x".into());
                        match store.put(&m, Some(current.meta.version)) {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => {}
                            Err(e) => panic!("writer {w}: {e}"),
                        }
                    }
                }
                // Every writer races for the same secret: all see the one value that won.
                store
                    .create_secret_if_absent("shared.ca", format!("writer {w}").as_bytes())
                    .expect("secret")
            })
        })
        .collect();
    let winners: Vec<Vec<u8>> = threads
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    let m = stores[1]
        .get(&ResourceKey::mesh("shared"))
        .expect("get")
        .expect("mesh");
    assert_eq!(m.resource.labels.len(), WRITERS * EACH, "lost updates");
    assert_eq!(m.meta.version, (WRITERS * EACH + 1) as u64);
    assert!(winners.iter().all(|w| w == &winners[0]), "{winners:?}");
    assert_eq!(
        stores[0].get_secret("shared.ca").expect("get"),
        Some(winners[0].clone())
    );
    // The replicas see one revision.
    assert_eq!(
        stores[0].revision().expect("revision"),
        stores[1].revision().expect("revision")
    );

    // Initialization runs once across the replicas.
    let runs = Arc::new(AtomicUsize::new(0));
    let firsts: usize = stores
        .iter()
        .map(|s| {
            let runs = Arc::clone(&runs);
            let init = move |_: &dyn Store| {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            };
            usize::from(s.initialize_once(&init).expect("init"))
        })
        .sum();
    assert_eq!((firsts, runs.load(Ordering::SeqCst)), (1, 1));
}

#[test]
fn a_broken_connection_is_opened_again() {
    let (pg, url) = database("reconnect");
    let store = PostgresStore::open(&url).expect("open");
    store.put(&mesh("m"), None).expect("mesh");
    let killed = pg
        .psql(
            "reconnect",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'weft-control'",
        )
        .expect("terminate");
    assert_eq!(killed.trim(), "1", "the store's one connection");
    // pg_terminate_backend only signals the backend: wait until it is gone, or the next call
    // can still succeed on it and the one after find it dead.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = pg
            .psql(
                "reconnect",
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weft-control'",
            )
            .expect("count the store's connections");
        if left.trim() == "0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the terminated backend did not go"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The first call may find the connection dead (and say so); the next one reconnects.
    if let Err(e) = store.get(&ResourceKey::mesh("m")) {
        assert!(
            matches!(&e, StoreError::Backend(m) if m.starts_with("postgres:")),
            "{e}"
        );
    }
    let m = store.get(&ResourceKey::mesh("m")).expect("after reconnect");
    assert!(m.is_some());
}

/// A call that waits in the database (here on a table lock another session holds) leaves
/// the store's other calls going, on another connection.
#[test]
fn a_waiting_call_does_not_hold_up_the_others() {
    let (pg, url) = database("pool");
    let store = Arc::new(PostgresStore::open(&url).expect("open"));
    store.put(&mesh("m"), None).expect("mesh");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            pg.psql(
                "pool",
                "BEGIN; LOCK TABLE resources IN ACCESS EXCLUSIVE MODE; \
                 SELECT pg_sleep(4); COMMIT;",
            )
            .expect("lock resources for 4 s")
        });
        let locked = || {
            pg.psql(
                "pool",
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON l.relation = c.oid \
                 WHERE c.relname = 'resources' AND l.mode = 'AccessExclusiveLock' AND l.granted",
            )
            .expect("pg_locks")
            .trim()
                == "1"
        };
        while !locked() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let listed = Arc::new(AtomicUsize::new(0));
        let waiting = {
            let (store, listed) = (store.clone(), listed.clone());
            scope.spawn(move || {
                let meshes = store.list(ResourceType::Mesh, None).expect("list");
                listed.store(1, Ordering::SeqCst);
                meshes.len()
            })
        };
        // The list waits on the lock; meanwhile a secret is written and read.
        std::thread::sleep(std::time::Duration::from_millis(300));
        store.put_secret("k", b"v").expect("put secret");
        assert_eq!(store.get_secret("k").expect("get"), Some(b"v".to_vec()));
        assert_eq!(
            listed.load(Ordering::SeqCst),
            0,
            "the list was still waiting on the lock: the secret went through another connection"
        );
        assert_eq!(waiting.join().expect("list thread"), 1);
    });
}

#[test]
fn bad_urls_are_refused_with_a_clear_error() {
    let err = |url: &str| match PostgresStore::open(url) {
        Ok(_) => panic!("{url}: opened"),
        Err(e) => e.to_string(),
    };
    let e = err("postgres://weft@127.0.0.1:1/db?sslmode=sometimes");
    assert!(e.contains("sslmode=sometimes: expected disable"), "{e}");
    let e = err("postgres://weft@127.0.0.1:1/db?connect_timeout=soon");
    assert!(e.contains("not a PostgreSQL URL"), "{e}");
    let e = err("postgres://weft@127.0.0.1:1/db?sslmode=require&sslrootcert=/nonexistent/ca.pem");
    assert!(e.contains("sslrootcert=/nonexistent/ca.pem"), "{e}");
    // Nothing listens on port 1; the password is not repeated back.
    let e = err("postgres://weft:s3cret@127.0.0.1:1/db?sslmode=disable");
    assert!(e.starts_with("store backend error: postgres:"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
}

/// A CA (PEM) and a server certificate it signed for 127.0.0.1 and localhost: (CA, chain,
/// key).
fn server_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "weft test database CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// A CA and a client certificate of it for user `cn`: (CA, certificate, key) as PEM.
fn client_pki(cn: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "weft test client CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("client key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, &issuer).expect("client certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Whether the store's connection (`application_name` weft-control) uses TLS, as the server
/// sees it.
fn store_connection_tls(pg: &PgServer, db: &str) -> String {
    pg.psql(
        db,
        "SELECT string_agg(s.ssl::text, ',') FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'weft-control'",
    )
    .expect("pg_stat_ssl")
    .trim()
    .to_string()
}

#[test]
fn tls_to_postgres_is_used_and_verified() {
    let (ca, chain, key) = server_pki();
    let (other_ca, _, _) = server_pki();
    let pg = PgServer::start_with_tls(&chain, &key).expect("start PostgreSQL with TLS");
    pg.create_database("tls").expect("createdb");
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_file, other_file) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&ca_file, ca).expect("write CA");
    std::fs::write(&other_file, other_ca).expect("write CA");
    let url = |query: &str| format!("{}?{query}", pg.url("tls"));
    let root = format!("sslrootcert={}", ca_file.display());

    for query in [
        format!("sslmode=verify-full&{root}"),
        format!("sslmode=require&{root}"),
        root.clone(),
    ] {
        let store = PostgresStore::open(&url(&query)).expect(&query);
        store.revision().expect("a query over TLS");
        assert_eq!(store_connection_tls(&pg, "tls"), "true", "{query}");
    }
    let store = PostgresStore::open(&url("sslmode=disable")).expect("plaintext");
    store.revision().expect("a query in plaintext");
    assert_eq!(store_connection_tls(&pg, "tls"), "false");
    drop(store);

    // A server certificate the roots do not vouch for is refused, whatever the mode that
    // would use TLS.
    let wrong = format!("sslrootcert={}", other_file.display());
    for query in [format!("sslmode=require&{wrong}"), wrong.clone()] {
        let e = PostgresStore::open(&url(&query))
            .expect_err(&query)
            .to_string();
        assert!(
            e.contains("certificate") && e.contains("sslrootcert=PATH"),
            "{query}: {e}"
        );
    }
    // A server without TLS is refused when TLS is required, and used in plaintext when it
    // is only preferred.
    let (plain, plain_url) = database("plain");
    let e = PostgresStore::open(&format!("{plain_url}?sslmode=require&{root}"))
        .expect_err("TLS required")
        .to_string();
    assert!(e.contains("TLS"), "{e}");
    let store = PostgresStore::open(&format!("{plain_url}?{root}")).expect("preferred");
    store.revision().expect("a query in plaintext");
    assert_eq!(store_connection_tls(&plain, "plain"), "false");
}

/// `cert` authentication: the store presents the client certificate that `sslcert` and
/// `sslkey` name, in the URL and in the key-value form; without one the server refuses it,
/// and a key file others can read is refused before any connection is made.
#[test]
fn a_client_certificate_logs_in() {
    use std::os::unix::fs::PermissionsExt as _;
    let (ca, chain, key) = server_pki();
    let (client_ca, client_cert, client_key) = client_pki("weft_cert");
    let pg = PgServer::start_with_client_certs(&chain, &key, &client_ca, "weft_cert")
        .expect("start PostgreSQL with client certificates");
    pg.psql("postgres", "CREATE ROLE weft_cert LOGIN")
        .expect("create role");
    pg.psql("postgres", "CREATE DATABASE certs OWNER weft_cert")
        .expect("create database");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = |name: &str, pem: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write PEM");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.display().to_string()
    };
    let root = file("ca.pem", &ca, 0o644);
    let cert = file("client.pem", &client_cert, 0o644);
    let key = file("client.key", &client_key, 0o600);
    let open_key = file("open.key", &client_key, 0o644);
    let base = format!("postgres://weft_cert@127.0.0.1:{}/certs", pg.port());
    let verified = format!("sslmode=verify-full&sslrootcert={root}");

    let store = PostgresStore::open(&format!("{base}?{verified}&sslcert={cert}&sslkey={key}"))
        .expect("logs in with its certificate");
    store.put(&mesh("m"), None).expect("write as weft_cert");
    drop(store);
    let key_value = format!(
        "host=127.0.0.1 port={} user=weft_cert dbname=certs sslmode=verify-full \
         sslrootcert={root} sslcert={cert} sslkey={key}",
        pg.port()
    );
    let store = PostgresStore::open(&key_value).expect("the key-value form");
    assert!(store.get(&ResourceKey::mesh("m")).expect("read").is_some());
    drop(store);

    let e = PostgresStore::open(&format!("{base}?{verified}"))
        .expect_err("no client certificate")
        .to_string();
    assert!(
        e.contains("client certificate") && e.contains("sslcert=PATH"),
        "the server's refusal, with what to do: {e}"
    );
    let e = PostgresStore::open(&format!(
        "{base}?{verified}&sslcert={cert}&sslkey={open_key}"
    ))
    .expect_err("a key others can read")
    .to_string();
    assert!(e.contains("sslkey=") && e.contains("0600"), "{e}");
    let e = PostgresStore::open(&format!("{base}?{verified}&sslcert={cert}"))
        .expect_err("a certificate without its key")
        .to_string();
    assert!(e.contains("sslkey=PATH"), "{e}");
}

#[test]
fn a_replica_starts_while_another_writes() {
    // Opening the store while another replica writes must neither wait for nor deadlock with
    // those writes (it once ran `CREATE INDEX IF NOT EXISTS`, which locks the table).
    let (_pg, url) = database("startup");
    let writer = Arc::new(PostgresStore::open(&url).expect("open"));
    writer.put(&mesh("busy"), None).expect("mesh");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = {
        let (writer, stop) = (Arc::clone(&writer), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                writer
                    .put(&permission("busy", &format!("p{n}")), None)
                    .expect("write during start-ups");
                n += 1;
            }
            n
        })
    };
    for _ in 0..20 {
        PostgresStore::open(&url).expect("a replica starts during writes");
    }
    stop.store(true, Ordering::Relaxed);
    let n = writes.join().expect("writer");
    assert!(n > 0);
}
