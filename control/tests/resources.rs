//! The control plane's resource side, end to end: the real `weft-control` process, the real
//! `weftctl`, the embedded store on disk.

mod support;

use serde_json::Value;
use std::sync::{Arc, Barrier};
use std::time::Duration;
use support::{ControlPlane, examples_dir};
use weft_api::parse::parse_documents;
use weft_api::{Resource, ResourceType};
use weft_control::client::ClientError;

fn example_files() -> Vec<std::path::PathBuf> {
    // Meshes first: everything else needs its mesh.
    let mut files: Vec<_> = std::fs::read_dir(examples_dir())
        .expect("examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort_by_key(|p| {
        (
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("mesh")),
            p.clone(),
        )
    });
    files
}

fn read_back(cp: &ControlPlane, r: &Resource) -> Resource {
    let path = weft_control::client::Client::path(r.resource_type(), r.mesh_name(), &r.name);
    let body = cp.client().get(&path).expect("get");
    parse_documents(&body.to_string())
        .expect("stored form parses")
        .remove(0)
        .resource
}

#[test]
fn every_example_applies_and_reads_back_equal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[]);
    for file in example_files() {
        let (code, out, err) = cp.weftctl(&["apply", "-f", &file.to_string_lossy()], None);
        assert_eq!(code, 0, "{}: {out}{err}", file.display());
        let text = std::fs::read_to_string(&file).expect("read");
        for doc in parse_documents(&text).expect("parse") {
            let stored = read_back(&cp, &doc.resource);
            // The default mesh example is empty and equals the mesh created on first start.
            assert_eq!(stored, doc.resource, "{}", file.display());
        }
    }
    // Applying again updates in place.
    let (code, out, _) = cp.weftctl(
        &[
            "apply",
            "-f",
            &examples_dir().join("routes.yaml").to_string_lossy(),
        ],
        None,
    );
    assert_eq!(code, 0);
    assert!(out.contains("updated"), "{out}");
    // get in every format.
    for o in ["table", "json", "yaml"] {
        let (code, out, err) =
            cp.weftctl(&["get", "dataplanes", "--mesh", "payments", "-o", o], None);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("backend-1") && out.contains("web-1"),
            "{o}: {out}"
        );
    }
    let (code, out, _) = cp.weftctl(&["get", "meshes"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("payments") && out.contains("builtin/ca-1"),
        "{out}"
    );
}

/// A script (or a proxy) that waits for the REST API and then reads `cp-ca.pem` must find it:
/// the control plane creates its dataplane CA before the API answers. (It once served the API
/// first, and `weft-bench mesh` found no `cp-ca.pem` on a loaded CI machine.)
#[test]
fn the_rest_api_answers_only_once_the_dataplane_ca_exists() {
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = ControlPlane::spawn(dir.path(), &[]);
        cp.wait_ready(Duration::from_millis(1));
        let ca = dir.path().join("cp-ca.pem");
        let pem = std::fs::read_to_string(&ca)
            .unwrap_or_else(|e| panic!("REST API answered before {} existed: {e}", ca.display()));
        assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");
        cp.stop();
    }
}

#[test]
fn state_survives_a_restart_and_default_mesh_is_created_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[]);
    let (code, _, err) = cp.weftctl(
        &[
            "apply",
            "-f",
            &examples_dir().join("mesh-payments.yaml").to_string_lossy(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cp.weftctl(
        &[
            "apply",
            "-f",
            &examples_dir().join("permissions.yaml").to_string_lossy(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cp.weftctl(&["delete", "mesh", "default"], None);
    assert_eq!(code, 0, "{err}");
    let before = cp
        .client()
        .get("/meshes/payments/traffic-permissions/web-to-backend")
        .expect("get");
    cp.stop();

    let cp = ControlPlane::start(dir.path(), &[]);
    let after = cp
        .client()
        .get("/meshes/payments/traffic-permissions/web-to-backend")
        .expect("get after restart");
    assert_eq!(before, after);
    // The user deleted `default`; a restart must not bring it back.
    assert!(matches!(
        cp.client().get("/meshes/default"),
        Err(ClientError::Refused { status: 404, .. })
    ));
}

#[test]
fn no_default_mesh_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &["--no-default-mesh"]);
    let meshes = cp.client().get("/meshes").expect("list");
    assert_eq!(meshes["total"], 0);
}

#[test]
fn concurrent_writers_never_lose_an_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[]);
    let url = cp.url();
    const WRITERS: usize = 4;
    const EACH: usize = 10;
    let barrier = Arc::new(Barrier::new(WRITERS));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let url = url.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let client = weft_control::client::Client::new(&url, None).expect("client");
                barrier.wait();
                let mut conflicts = 0;
                for i in 0..EACH {
                    // Read-modify-write with the version read; retry on 409.
                    loop {
                        let body = client.get("/meshes/default").expect("get");
                        let version = body["version"].as_u64().expect("version");
                        let mut doc = parse_documents(&body.to_string())
                            .expect("parse")
                            .remove(0)
                            .resource;
                        doc.labels.insert(format!("w{w}-{i}"), "x".into());
                        match client.put(&doc, Some(version)) {
                            Ok(_) => break,
                            Err(ClientError::Refused { status: 409, .. }) => conflicts += 1,
                            Err(e) => panic!("writer {w}: {e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: usize = threads.into_iter().map(|t| t.join().expect("writer")).sum();
    let body = cp.client().get("/meshes/default").expect("get");
    let labels = body["labels"].as_object().expect("labels");
    assert_eq!(
        labels.len(),
        WRITERS * EACH,
        "lost updates; {conflicts} conflicts seen"
    );
    assert_eq!(body["version"].as_u64(), Some((WRITERS * EACH + 1) as u64));
}

#[test]
fn stale_version_is_a_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[]);
    let c = cp.client();
    let body = c.get("/meshes/default").expect("get");
    let v = body["version"].as_u64().expect("version");
    let doc = parse_documents(&body.to_string())
        .expect("parse")
        .remove(0)
        .resource;
    c.put(&doc, Some(v)).expect("first write wins");
    match c.put(&doc, Some(v)) {
        Err(ClientError::Refused {
            status: 409,
            message,
        }) => assert!(message.contains("expected version"), "{message}"),
        other => panic!("expected 409, got {other:?}"),
    }
    // Through weftctl, a file saved with `get -o yaml` says why and how to overwrite.
    let (code, saved, err) = cp.weftctl(&["get", "mesh", "default", "-o", "yaml"], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cp.weftctl(&["apply", "-f", "-"], Some(&saved));
    assert_eq!(code, 0, "the first apply of the saved file: {err}");
    let (code, _, err) = cp.weftctl(&["apply", "-f", "-"], Some(&saved));
    assert_eq!(code, 1);
    assert!(err.contains("remove the line to overwrite"), "{err}");
}

#[test]
fn mesh_delete_refuses_non_empty_mesh_unless_cascade() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[]);
    for f in [
        "mesh-payments.yaml",
        "permissions.yaml",
        "dataplane-backend.yaml",
    ] {
        assert_eq!(
            cp.weftctl(
                &["apply", "-f", &examples_dir().join(f).to_string_lossy()],
                None
            )
            .0,
            0
        );
    }
    let (code, _, err) = cp.weftctl(&["delete", "mesh", "payments"], None);
    assert_eq!(code, 1);
    for name in [
        "Dataplane/backend-1",
        "TrafficPermission/web-to-backend",
        "MeshTrafficPermission/backend-from-web",
    ] {
        assert!(err.contains(name), "{err}");
    }
    let (code, out, err) = cp.weftctl(&["delete", "mesh", "payments", "--cascade"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 resource(s)"), "{out}");
    assert!(matches!(
        cp.client().get("/meshes/payments/dataplanes/backend-1"),
        Err(ClientError::Refused { status: 404, .. })
    ));
}

#[test]
fn references_and_paths_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[]);
    // A resource in a mesh that does not exist.
    let (code, _, err) = cp.weftctl(
        &[
            "apply",
            "-f",
            &examples_dir().join("permissions.yaml").to_string_lossy(),
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("mesh \"payments\" does not exist"), "{err}");
    // An API URL without its scheme is bad input (exit 1), not an unreachable control plane.
    for url in ["127.0.0.1:5681", "https://127.0.0.1:5681"] {
        let (code, _, err) = support::weftctl(url, &["get", "meshes"], None);
        assert_eq!(code, 1, "{url}: {err}");
        assert!(err.contains("--api-url"), "{url}: {err}");
    }
    // A name is one path segment: `?` in it adds no query (this deleted `default` and all in
    // it, cascading, before names were escaped).
    let (code, out, err) = cp.weftctl(&["delete", "mesh", "default?cascade=true"], None);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        cp.client().get("/meshes/default").is_ok(),
        "default is still there"
    );
    // `..` would be read as the parent path by the URL, not as a name.
    let (code, _, err) = cp.weftctl(&["delete", "dataplane", "..", "--mesh", "default"], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not a name"), "{err}");
    // A revocation in a mesh that does not exist would revoke nothing: refused, not "revoked".
    let (code, out, err) = cp.weftctl(
        &[
            "revoke",
            "dataplane-token",
            "--mesh",
            "nowhere",
            "--id",
            "abc",
        ],
        None,
    );
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("mesh \"nowhere\" does not exist"), "{err}");
    // Invalid input names the file, document, line and field, and never reaches the store.
    let (code, _, err) = cp.weftctl(
        &["apply", "-f", "-"],
        Some("type: Mesh\nname: ok\n---\ntype: Mesh\nname: bad\nmtls:\n  enabledBackend: nope\n"),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("<stdin>: document 2 (Mesh/bad), line 7, field `mtls.enabledBackend`"),
        "{err}"
    );
    assert!(
        matches!(
            cp.client().get("/meshes/ok"),
            Err(ClientError::Refused { status: 404, .. })
        ),
        "nothing applied"
    );
    // The REST API validates on its own too, and checks the body against the path.
    let http = reqwest::blocking::Client::new();
    let put = |path: &str, body: &str| {
        let r = http
            .put(format!("{}{path}", cp.url()))
            .body(body.to_string())
            .send()
            .expect("put");
        let status = r.status().as_u16();
        (status, r.json::<Value>().expect("json error body"))
    };
    let (status, body) = put("/meshes/a", r#"{"type":"Mesh","name":"b"}"#);
    assert_eq!(status, 400, "{body}");
    let (status, body) = put(
        "/meshes/default/dataplanes/d",
        r#"{"type":"Dataplane","mesh":"default","name":"d","networking":{"address":"1.2.3.4","inbound":[{"port":0,"tags":{"kuma.io/service":"a"}}]}}"#,
    );
    assert_eq!(status, 400);
    assert_eq!(
        body["invalid_parameters"][0]["field"], "networking.inbound[0].port",
        "{body}"
    );
    let (status, _) = put("/meshes/default/widgets/w", "{}");
    assert_eq!(status, 404);
    // kumactl's token request (every field present, `tags: null`, `type: ""`) is taken; a
    // tag scope, which weft's tokens do not have, is refused by name.
    let token = |body: &str| {
        let r = http
            .post(format!("{}/tokens/dataplane", cp.url()))
            .body(body.to_string())
            .send()
            .expect("post");
        (r.status().as_u16(), r.text().expect("a body"))
    };
    let (status, text) =
        token(r#"{"name":"d-1","mesh":"default","tags":null,"type":"","validFor":"24h0m0s"}"#);
    assert_eq!(status, 200, "{text}");
    assert_eq!(text.matches('.').count(), 2, "a JWT: {text}");
    let (status, text) =
        token(r#"{"name":"d-1","mesh":"default","tags":{"kuma.io/service":["web"]}}"#);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("tags"), "{text}");
    // Paths and methods the API does not have are JSON errors too.
    for (method, path, want) in [
        (reqwest::Method::GET, "/foo", 404),
        (reqwest::Method::POST, "/meshes/x", 405),
    ] {
        let r = http
            .request(method.clone(), format!("{}{path}", cp.url()))
            .send()
            .expect("request");
        assert_eq!(r.status().as_u16(), want, "{method} {path}");
        let body = r.json::<Value>().expect("a JSON error body");
        assert!(
            body["detail"].as_str().is_some_and(|d| d.contains(path)),
            "{body}"
        );
    }
    // So are the errors axum answers by itself: a path that is not valid percent-encoding,
    // a body over the size limit.
    let too_big = format!(
        r#"{{"type":"Mesh","name":"big","x":"{}"}}"#,
        // Just over axum's 2 MiB limit: a body much longer would still be arriving when the
        // server answers and closes, and the client could see a reset instead of the answer.
        "a".repeat((2 << 20) + 1024)
    );
    for (method, path, body, want) in [
        (reqwest::Method::GET, "/meshes/%FF", String::new(), 400),
        (reqwest::Method::PUT, "/meshes/big", too_big, 413),
    ] {
        let r = http
            .request(method.clone(), format!("{}{path}", cp.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("request");
        assert_eq!(r.status().as_u16(), want, "{method} {path}");
        let body = r.json::<Value>().expect("a JSON error body");
        assert_eq!(body["status"], want, "{body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
    // A provided CA is checked when it is written, as in Kuma, not when proxies need it.
    let (status, body) = put(
        "/meshes/p",
        r#"{"type":"Mesh","name":"p","mtls":{"enabledBackend":"ca-1","backends":[{"name":"ca-1","type":"provided","conf":{"cert":{"inlineString":"not a certificate"},"key":{"inlineString":"not a key"}}}]}}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("mtls.backends[0]"), "{body}");
    assert!(
        matches!(
            cp.client().get("/meshes/p"),
            Err(ClientError::Refused { status: 404, .. })
        ),
        "the bad CA was stored"
    );
    // Unknown types on the CLI, and an unreachable control plane.
    assert_eq!(cp.weftctl(&["get", "widgets"], None).0, 1);
    // Usage errors are invalid input too (1): 2 is kept for an unreachable control plane.
    assert_eq!(cp.weftctl(&["get", "meshes", "-o", "xml"], None).0, 1);
    assert_eq!(cp.weftctl(&["apply"], None).0, 1);
    assert_eq!(cp.weftctl(&["--help"], None).0, 0);
    let (code, _, err) = support::weftctl(
        &format!("http://127.0.0.1:{}", support::free_port()),
        &["get", "meshes"],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot reach the control plane"), "{err}");
    let _ = ResourceType::ALL;
}

/// Listings page as Kuma's do: `size` items from `offset`, `total` over all, `next` the URL of
/// the following page; without `size`, everything.
#[test]
fn listings_page_by_size_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[]);
    let http = reqwest::blocking::Client::new();
    for name in ["m1", "m2", "m3", "m4"] {
        let r = http
            .put(format!("{}/meshes/{name}", cp.url()))
            .body(format!(r#"{{"type":"Mesh","name":"{name}"}}"#))
            .send()
            .expect("put");
        assert!(r.status().is_success(), "{name}: {}", r.status());
    }
    let get = |url: &str| -> (u16, Value) {
        let r = http.get(url).send().expect("get");
        (r.status().as_u16(), r.json::<Value>().expect("json"))
    };
    let names = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    // default, m1..m4: five meshes, in name order.
    let (_, all) = get(&format!("{}/meshes", cp.url()));
    assert_eq!(all["total"], 5, "{all}");
    assert_eq!(names(&all), ["default", "m1", "m2", "m3", "m4"]);
    assert!(all["next"].is_null());
    let mut url = format!("{}/meshes?size=2", cp.url());
    let mut pages = Vec::new();
    loop {
        let (status, page) = get(&url);
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], 5, "{page}");
        pages.push(names(&page));
        match page["next"].as_str() {
            Some(next) => url = next.to_string(),
            None => break,
        }
    }
    assert_eq!(
        pages,
        [vec!["default", "m1"], vec!["m2", "m3"], vec!["m4"]],
        "following next walks every item once"
    );
    let (_, past) = get(&format!("{}/meshes?offset=9&size=2", cp.url()));
    assert_eq!(names(&past), Vec::<String>::new());
    assert!(past["next"].is_null());
    let (_, dps) = get(&format!("{}/meshes/m1/dataplanes?size=1", cp.url()));
    assert_eq!(dps["total"], 0, "{dps}");
    for bad in ["size=0", "size=x", "offset=-1"] {
        let (status, body) = get(&format!("{}/meshes?{bad}", cp.url()));
        assert_eq!(status, 400, "{bad}: {body}");
        let param = bad.split('=').next().unwrap_or_default();
        assert!(
            body["detail"].as_str().is_some_and(|d| d.contains(param)),
            "{bad}: {body}"
        );
    }
}

/// Two `weft-control` processes on one PostgreSQL store, driven through REST and `weftctl`:
/// what is applied through one is read, updated and deleted through the other, a stale write
/// through either is a 409, and either issues dataplane tokens.
#[test]
fn two_replicas_on_one_postgres_store_serve_the_same_resources() {
    let pg = weft_tests::postgres::PgServer::start().expect("start PostgreSQL");
    pg.create_database("weft").expect("createdb");
    let url = pg.url("weft");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    // Started together: both create the schema and race for the default mesh.
    let a = ControlPlane::spawn(dir_a.path(), &["--store", &url]);
    let b = ControlPlane::spawn(dir_b.path(), &["--store", &url]);
    a.wait_ready(Duration::from_millis(50));
    b.wait_ready(Duration::from_millis(50));
    for cp in [&a, &b] {
        let meshes = cp.client().get("/meshes").expect("meshes");
        let names: Vec<_> = meshes["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|m| m["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, ["default"]);
    }
    // No SQLite file: the store is the database.
    assert!(!dir_a.path().join("weft.db").exists());
    // One control-plane CA for both, so proxies trust either with one --ca-cert-file.
    let ca =
        |dir: &std::path::Path| std::fs::read_to_string(dir.join("cp-ca.pem")).expect("cp-ca.pem");
    assert_eq!(ca(dir_a.path()), ca(dir_b.path()));
    // A replica whose data directory holds another CA refuses to start.
    let dir_c = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir_c.path().join("cp-ca.pem"), "another CA").expect("write");
    std::fs::write(dir_c.path().join("cp-ca-key.pem"), "its key").expect("write");
    let mut c = std::process::Command::new(support::WEFT_CONTROL)
        .args(["run", "--data-dir"])
        .arg(dir_c.path())
        .args(["--store", &url, "--api-address", "127.0.0.1:0"])
        .args(["--dp-server-address", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn a third replica");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = c.kill();
            panic!("a replica with another CA started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = c.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("other than the one the replicas of this store share"),
        "{err}"
    );

    for f in ["mesh-payments.yaml", "permissions.yaml"] {
        let path = examples_dir().join(f);
        let (code, _, err) = a.weftctl(&["apply", "-f", &path.to_string_lossy()], None);
        assert_eq!(code, 0, "{err}");
    }
    let (code, out, err) = b.weftctl(&["get", "traffic-permissions", "--mesh", "payments"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("web-to-backend"), "{out}");

    // Read through B, write through A, then B's stale write is refused.
    let body = b.client().get("/meshes/payments").expect("get");
    let version = body["version"].as_u64().expect("version");
    let doc = parse_documents(&body.to_string())
        .expect("parse")
        .remove(0)
        .resource;
    a.client()
        .put(&doc, Some(version))
        .expect("write through A");
    match b.client().put(&doc, Some(version)) {
        Err(ClientError::Refused { status: 409, .. }) => {}
        other => panic!("stale write through B: {other:?}"),
    }

    // Either replica issues tokens (tests/discovery.rs checks that a token from one replica
    // registers a proxy at the other).
    for cp in [&a, &b] {
        let (code, out, err) = cp.weftctl(
            &[
                "generate",
                "dataplane-token",
                "--mesh",
                "payments",
                "--name",
                "web-1",
            ],
            None,
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim().split('.').count(), 3, "a JWT: {out}");
    }

    let (code, out, err) = b.weftctl(&["delete", "mesh", "payments", "--cascade"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 resource(s)"), "{out}");
    assert!(matches!(
        a.client().get("/meshes/payments"),
        Err(ClientError::Refused { status: 404, .. })
    ));
}
