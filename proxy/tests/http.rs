//! L7 through two proxies, in process on 127.0.0.1 (no root): real HTTP/1.1, HTTP/2, gRPC and
//! WebSocket clients and servers on either side of a client proxy and one or two server
//! proxies that share a mesh CA and speak mesh mTLS (STRICT) to each other.

mod grpc_echo;
mod support;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::net::TcpListener;
use weft_api::proto::{self as pb, mtls::Mode};
use weft_proxy::drain::{Drain, DrainOutcome};
use weft_proxy::mesh_tls::MeshTls;
use weft_proxy::telemetry::{Telemetry, TelemetrySettings};
use weft_proxy::{DataPath, DataPathOptions, ProxyConfig};

const MESH: &str = "default";
type AppBody = BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> AppBody {
    Full::new(s.into()).boxed()
}

/// A test app speaking HTTP/1.1 and h2c. It answers:
/// - `/upload`: the number of body bytes it read;
/// - `/download?n=N`: N bytes, streamed in 64 KiB chunks;
/// - `/slow`: after 2 s;
/// - anything else: `<name> <version> <path> x-routed=<header>`.
async fn app(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(app_answer(name, req).await)
                });
                let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // More than the mesh's limit (as nginx's), so the tests see the mesh's limits.
                server.http1().max_headers(200);
                let _ = server
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn app_answer(name: &str, req: Request<Incoming>) -> Response<AppBody> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.map(|f| f.into_data()) {
                    n += d.map(|d| d.len() as u64).unwrap_or(0);
                }
            }
            Response::new(full(n.to_string()))
        }
        "/download" => {
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let chunk = Bytes::from(vec![7u8; 64 * 1024]);
            let stream = futures::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let take = left.min(chunk.len());
                    Some((
                        Ok::<_, Infallible>(Frame::data(chunk.slice(..take))),
                        left - take,
                    ))
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Response::new(full("slow"))
        }
        "/hold" => {
            // A first chunk, then a body that stays open (a long-lived stream).
            let first = futures::stream::once(async {
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"held")))
            });
            let stream = first.chain(futures::stream::pending());
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        _ => {
            let routed = req
                .headers()
                .get("x-routed")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let host = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    req.headers()
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            let forwarded = req
                .headers()
                .keys()
                .any(|k| k.as_str().starts_with("x-forwarded"));
            let internal = req.headers().contains_key("weft-downstream-protocol");
            Response::new(full(format!(
                "{name} {:?} {path} x-routed={routed} host={host} forwarded={forwarded} internal={internal}",
                req.version()
            )))
        }
    }
}

struct Proxy {
    dp: Option<DataPath>,
    drain: Drain,
}

fn start(snap: &pb::Snapshot, tls: Arc<dyn MeshTls>) -> Proxy {
    start_with(snap, tls, Duration::from_millis(500))
}

fn start_with(snap: &pb::Snapshot, tls: Arc<dyn MeshTls>, request_timeout: Duration) -> Proxy {
    start_opts(snap, tls, request_timeout, |_| {})
}

/// [`start_with`], with changes to the data path's options.
fn start_opts(
    snap: &pb::Snapshot,
    tls: Arc<dyn MeshTls>,
    request_timeout: Duration,
    change: impl FnOnce(&mut DataPathOptions),
) -> Proxy {
    let telemetry = Telemetry::new();
    telemetry
        .apply(&TelemetrySettings::from_snapshot(snap))
        .expect("telemetry settings");
    let drain = Drain::new();
    let opts = DataPathOptions {
        transparent_ip: "127.0.0.1".parse().unwrap(),
        transparent_ipv6: false,
        request_timeout,
        // Every client here speaks first, so detection ends as soon as its bytes arrive; the
        // default 100 ms window is for server-speaks-first protocols, and on a loaded CI
        // machine a client can take longer than that to send, which makes its connection
        // opaque TCP (no per-request routing) and skews what these tests measure.
        detect_timeout: Duration::from_secs(5),
        ..DataPathOptions::default()
    };
    let mut opts = opts;
    change(&mut opts);
    let cfg = ProxyConfig::from_snapshot(snap)
        .expect("valid snapshot")
        .with_telemetry(telemetry);
    let dp = DataPath::start(
        cfg,
        tls,
        weft_proxy::datapath_metrics::DataPathMetrics::new(),
        drain.clone(),
        opts,
    )
    .expect("listeners");
    Proxy {
        dp: Some(dp),
        drain,
    }
}

/// A server proxy for `api` (one inbound of `protocol`, its app, `permission`) and a client
/// proxy for `web` whose outbound listener for `api` is the returned port; `change` adjusts
/// the client's data-path options (500 ms request timeout otherwise).
async fn one_to_one(
    permission: pb::PermissionRule,
    protocol: &str,
    change: impl FnOnce(&mut DataPathOptions),
) -> (Proxy, Proxy, u16) {
    let ca = TestCa::new(MESH);
    let settings = mesh_settings(MESH, Some(Mode::Strict), true);
    let port = free_port();
    let mut ib = inbound(port, "api", app("one").await, vec![permission]);
    ib.protocol = protocol.into();
    let server = start(
        &snapshot(
            Some(&ca),
            settings.clone(),
            "api-1",
            vec![ib],
            vec![],
            vec![],
        ),
        TestMeshTls::new(&ca, &["api"]),
    );
    let mut svc = service("api", &[port]);
    svc.protocol = protocol.into();
    let out = free_port();
    let client = start_opts(
        &snapshot(
            Some(&ca),
            settings,
            "web-1",
            vec![],
            vec![svc],
            vec![(out, "api")],
        ),
        TestMeshTls::new(&ca, &["web"]),
        Duration::from_millis(500),
        change,
    );
    (server, client, out)
}

/// One endpoint of service `api`: an inbound port with a `version` tag, and its app.
struct Endpoint {
    port: u16,
    version: &'static str,
    app: SocketAddr,
    protocol: &'static str,
}

struct Mesh {
    _ca: TestCa,
    client: Proxy,
    servers: Vec<Proxy>,
    /// The client proxy's outbound listener for `api`.
    outbound: SocketAddr,
    /// The client proxy's snapshot, for a test to change and apply.
    client_snap: pb::Snapshot,
    /// Each server proxy's snapshot, likewise.
    server_snaps: Vec<pb::Snapshot>,
}

/// A client proxy ("web") with an outbound listener for `api`, and one server proxy per
/// endpoint group (each group one proxy with one inbound per endpoint).
fn mesh(groups: Vec<Vec<Endpoint>>, api: impl FnOnce(&mut pb::OutboundService)) -> Mesh {
    mesh_with(Duration::from_millis(500), groups, api)
}

/// [`mesh`] with the client proxy's request timeout.
fn mesh_with(
    request_timeout: Duration,
    groups: Vec<Vec<Endpoint>>,
    api: impl FnOnce(&mut pb::OutboundService),
) -> Mesh {
    mesh_full(request_timeout, |_| {}, groups, api)
}

/// [`mesh`] with the client proxy's request timeout and changes to the mesh's settings (its
/// logging or tracing backend).
fn mesh_full(
    request_timeout: Duration,
    mesh_settings_fn: impl FnOnce(&mut pb::MeshSettings),
    groups: Vec<Vec<Endpoint>>,
    api: impl FnOnce(&mut pb::OutboundService),
) -> Mesh {
    let ca = TestCa::new(MESH);
    let mut settings = mesh_settings(MESH, Some(Mode::Strict), true);
    mesh_settings_fn(&mut settings);
    let mut out = pb::OutboundService {
        service: "api".into(),
        ..Default::default()
    };
    let mut servers = Vec::new();
    let mut server_snaps = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let mut inbounds = Vec::new();
        for e in group {
            let tags: std::collections::BTreeMap<String, String> = [
                ("kuma.io/service".to_string(), "api".to_string()),
                ("version".to_string(), e.version.to_string()),
            ]
            .into();
            out.endpoints.push(pb::Endpoint {
                address: "127.0.0.1".into(),
                port: u32::from(e.port),
                tags: tags.clone(),
                healthy: true,
                dataplane: format!("api-{g}"),
            });
            let mut ib = inbound(e.port, "api", e.app, vec![allow("web")]);
            ib.protocol = e.protocol.into();
            ib.tags = tags;
            inbounds.push(ib);
        }
        let snap = snapshot(
            Some(&ca),
            settings.clone(),
            &format!("api-{g}"),
            inbounds,
            vec![],
            vec![],
        );
        servers.push(start(&snap, TestMeshTls::new(&ca, &["api"])));
        server_snaps.push(snap);
    }
    api(&mut out);
    let outbound_port = free_port();
    let client_snap = snapshot(
        Some(&ca),
        settings,
        "web-1",
        vec![],
        vec![out],
        vec![(outbound_port, "api")],
    );
    let client = start_with(
        &client_snap,
        TestMeshTls::new(&ca, &["web"]),
        request_timeout,
    );
    Mesh {
        _ca: ca,
        client,
        servers,
        outbound: SocketAddr::from(([127, 0, 0, 1], outbound_port)),
        client_snap,
        server_snaps,
    }
}

/// Ten concurrent requests through the client proxy: their answers, and how long all took.
async fn ten_at_once(m: &Mesh) -> (Vec<(StatusCode, String)>, Duration) {
    let c = http1_client();
    let url = format!("http://{}/x", m.outbound);
    let began = std::time::Instant::now();
    let answers = futures::future::join_all((0..10).map(|_| get(&c, &url, &[]))).await;
    (answers, began.elapsed())
}

/// Moves the client's one endpoint of `api` to `port` on 127.0.0.1.
fn point_client_at(m: &Mesh, port: u16) {
    let mut snap = m.client_snap.clone();
    snap.outbounds[0].endpoints[0].port = u32::from(port);
    let dp = m.client.dp.as_ref().unwrap();
    let config = ProxyConfig::from_snapshot(&snap)
        .expect("valid snapshot")
        .with_telemetry(dp.config().telemetry.clone());
    dp.apply(config).expect("applied");
}

fn endpoint(version: &'static str, app: SocketAddr) -> Endpoint {
    Endpoint {
        port: free_port(),
        version,
        app,
        protocol: "",
    }
}

fn dest(weight: u32, version: &str) -> pb::WeightedDestination {
    pb::WeightedDestination {
        weight,
        tags: [
            ("kuma.io/service".to_string(), "api".to_string()),
            ("version".to_string(), version.to_string()),
        ]
        .into(),
    }
}

fn http1_client() -> Client<HttpConnector, AppBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c_client() -> Client<HttpConnector, AppBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

async fn get(
    client: &Client<HttpConnector, AppBody>,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(b.body(full("")).unwrap()),
    )
    .await
    .expect("response in time")
    .expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_over_2000_requests_lands_within_3_points() {
    let m = mesh(
        vec![vec![
            endpoint("v1", app("one").await),
            endpoint("v2", app("two").await),
        ]],
        |out| out.default_route = vec![dest(90, "v1"), dest(10, "v2")],
    );
    let client = http1_client();
    let url = format!("http://{}/split", m.outbound);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..2000 {
        let (status, body) = get(&client, &url, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let who = body.split(' ').next().unwrap_or_default().to_string();
        *counts.entry(who).or_default() += 1;
    }
    let two = counts.get("two").copied().unwrap_or(0) as f64 / 2000.0;
    assert!((0.07..=0.13).contains(&two), "v2 share {two}: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 2000);
}

/// A route change reaches the next request of a connection that is already open (a
/// keep-alive or gRPC connection lives long): it is not held to the config the connection was
/// accepted under.
#[tokio::test]
async fn a_route_change_reaches_an_open_connection() {
    let m = mesh(
        vec![vec![
            endpoint("v1", app("one").await),
            endpoint("v2", app("two").await),
        ]],
        |out| out.default_route = vec![dest(1, "v1")],
    );
    let c = http1_client();
    let url = format!("http://{}/x", m.outbound);
    let (_, body) = get(&c, &url, &[]).await;
    assert!(body.starts_with("one "), "{body}");

    let mut snap = m.client_snap.clone();
    snap.outbounds[0].default_route = vec![dest(1, "v2")];
    let dp = m.client.dp.as_ref().unwrap();
    let config = ProxyConfig::from_snapshot(&snap)
        .expect("valid snapshot")
        .with_telemetry(dp.config().telemetry.clone());
    dp.apply(config).expect("applied");
    // The same pooled keep-alive connection from the client.
    let (_, body) = get(&c, &url, &[]).await;
    assert!(body.starts_with("two "), "{body}");
}

/// A plaintext caller let in under PERMISSIVE is refused on its open connection once the
/// mesh's mTLS is STRICT: it is not held to the rules its connection was accepted under.
#[tokio::test]
async fn a_plaintext_connection_is_refused_once_mtls_is_strict() {
    let app_addr = app("one").await;
    let server = endpoint("v1", app_addr);
    let inbound_port = server.port;
    let m = mesh_full(
        Duration::from_secs(5),
        |s| {
            if let Some(mtls) = s.mtls.as_mut() {
                mtls.mode = Mode::Permissive as i32;
            }
        },
        vec![vec![server]],
        |_| {},
    );
    // Plaintext straight to the server proxy's inbound, as a caller without a sidecar.
    let c = http1_client();
    let url = format!("http://127.0.0.1:{inbound_port}/x");
    let (status, body) = get(&c, &url, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Without a proxy of its own, a plaintext caller's request is bounded by the inbound's
    // request timeout (500 ms in these tests; the app takes 2 s).
    let (status, body) = get(&c, &format!("http://127.0.0.1:{inbound_port}/slow"), &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    // The request target's authority wins over a `Host` that says otherwise (RFC 9112 §3.2.2).
    let answer = raw_http1(
        SocketAddr::from(([127, 0, 0, 1], inbound_port)),
        "GET http://a.example:81/x HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("host=a.example:81"), "{answer}");

    let mut snap = m.server_snaps[0].clone();
    if let Some(mtls) = snap.mesh.as_mut().and_then(|mesh| mesh.mtls.as_mut()) {
        mtls.mode = Mode::Strict as i32;
    }
    let dp = m.servers[0].dp.as_ref().unwrap();
    let config = ProxyConfig::from_snapshot(&snap)
        .expect("valid snapshot")
        .with_telemetry(dp.config().telemetry.clone());
    dp.apply(config).expect("applied");
    let (status, body) = get(&c, &url, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

#[tokio::test]
async fn path_and_header_matches_pick_the_right_subset() {
    let m = mesh(
        vec![vec![
            endpoint("v1", app("one").await),
            endpoint("v2", app("two").await),
        ]],
        |out| {
            use pb::string_match::Kind;
            out.default_route = vec![dest(1, "v1")];
            out.http_rules = vec![
                pb::HttpRule {
                    r#match: Some(pb::HttpMatch {
                        path: Some(pb::StringMatch {
                            kind: Some(Kind::Prefix("/beta".into())),
                        }),
                        ..Default::default()
                    }),
                    destinations: vec![dest(1, "v2")],
                    request_headers: Some(pb::HeaderModifier {
                        set: vec![pb::HeaderValue {
                            name: "x-routed".into(),
                            value: "beta".into(),
                        }],
                        ..Default::default()
                    }),
                    response_headers: Some(pb::HeaderModifier {
                        add: vec![pb::HeaderValue {
                            name: "x-route".into(),
                            value: "beta".into(),
                        }],
                        ..Default::default()
                    }),
                    origin: "MeshHTTPRoute/beta".into(),
                },
                pb::HttpRule {
                    r#match: Some(pb::HttpMatch {
                        headers: vec![pb::HeaderMatch {
                            name: "x-canary".into(),
                            value: Some(pb::StringMatch {
                                kind: Some(Kind::Exact("yes".into())),
                            }),
                            present: false,
                            absent: false,
                        }],
                        method: "GET".into(),
                        ..Default::default()
                    }),
                    destinations: vec![dest(1, "v2")],
                    origin: "TrafficRoute/canary".into(),
                    ..Default::default()
                },
            ];
        },
    );
    let c = http1_client();
    let base = format!("http://{}", m.outbound);
    for _ in 0..5 {
        let (_, body) = get(&c, &format!("{base}/beta/x"), &[]).await;
        assert!(
            body.starts_with("two ") && body.contains("x-routed=beta"),
            "{body}"
        );
        let (_, body) = get(&c, &format!("{base}/other"), &[("x-canary", "yes")]).await;
        assert!(
            body.starts_with("two ") && body.contains("x-routed=-"),
            "{body}"
        );
        let (_, body) = get(&c, &format!("{base}/other"), &[("x-canary", "no")]).await;
        assert!(body.starts_with("one "), "{body}");
        let (_, body) = get(&c, &format!("{base}/alpha"), &[]).await;
        assert!(body.starts_with("one "), "{body}");
    }
    let resp = c
        .request(Request::get(format!("{base}/beta")).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-route"], "beta");
}

#[tokio::test]
async fn http1_reaches_h2c_and_h2_reaches_http1_with_the_host_kept() {
    let mut h2_app = endpoint("v1", app("h2app").await);
    h2_app.protocol = "http2";
    let m = mesh(vec![vec![h2_app]], |_| {});
    let (status, body) = get(&http1_client(), &format!("http://{}/a", m.outbound), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("h2app HTTP/2.0 /a"), "{body}");
    assert!(body.contains(&format!("host={}", m.outbound)), "{body}");
    assert!(body.contains("forwarded=false internal=false"), "{body}");

    let mut h1_app = endpoint("v1", app("h1app").await);
    h1_app.protocol = "http";
    let m = mesh(vec![vec![h1_app]], |_| {});
    let (status, body) = get(&h2c_client(), &format!("http://{}/b", m.outbound), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("h1app HTTP/1.1 /b"), "{body}");
    assert!(body.contains(&format!("host={}", m.outbound)), "{body}");

    // Without kuma.io/protocol the app is spoken to as the caller spoke.
    let m = mesh(vec![vec![endpoint("v1", app("auto").await)]], |_| {});
    let (_, body) = get(&http1_client(), &format!("http://{}/c", m.outbound), &[]).await;
    assert!(body.starts_with("auto HTTP/1.1 /c"), "{body}");
    let (_, body) = get(&h2c_client(), &format!("http://{}/c", m.outbound), &[]).await;
    assert!(body.starts_with("auto HTTP/2.0 /c"), "{body}");
}

/// The header-field limit is the app's: a request with as many fields as it allows passes
/// both proxies, though the outbound adds `weft-downstream-protocol` and `traceparent` on the
/// way, and one more field gets 431 from the outbound.
#[tokio::test]
async fn the_header_limit_counts_the_apps_fields_not_the_meshs() {
    let m = mesh_full(
        Duration::from_secs(5),
        |s| {
            // Sampled, towards a collector that is not there: the headers are what matters.
            s.tracing = Some(pb::TracingBackend {
                enabled: true,
                name: "zipkin".into(),
                backend_type: "zipkin".into(),
                endpoint: "http://127.0.0.1:9/api/v2/spans".into(),
                sampling: 100.0,
            });
        },
        vec![vec![endpoint("v1", app("one").await)]],
        |_| {},
    );
    let c = http1_client();
    let url = format!("http://{}/x", m.outbound);
    // The client adds `host`: 99 of these make MAX_HEADERS.
    let fields: Vec<(String, String)> = (0..100).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let fields: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (status, body) = get(&c, &url, &fields[..99]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        get(&c, &url, &fields).await.0,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
}

#[tokio::test]
async fn limits_timeouts_and_permissions_answer_with_their_status() {
    let m = mesh(vec![vec![endpoint("v1", app("one").await)]], |_| {});
    let c = http1_client();
    let url = format!("http://{}/x", m.outbound);
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        get(&c, &url, &many).await.0,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let big = "x".repeat(70 * 1024);
    assert_eq!(
        get(&c, &url, &[("x-big", big.as_str())]).await.0,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    // The request timeout (500 ms in these tests) covers the wait for the response head.
    let (status, _) = get(&c, &format!("http://{}/slow", m.outbound), &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(get(&c, &url, &[]).await.0, StatusCode::OK);

    // A denied source gets 403 per request.
    let (server, client, out) = one_to_one(deny("web"), "http", |_| {}).await;
    let (status, body) = get(&c, &format!("http://127.0.0.1:{out}/"), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    drop((server, client));
}

/// The request timeout runs from the end of the request, as Envoy's route timeout: an upload
/// (or a gRPC client stream) that takes longer than it to send is not cut while it is still
/// sending. From HTTP/1.1 and h2 clients; with mTLS on, and off (the default mesh's), where
/// the inbound proxy sees a plaintext caller and bounds the request to its HTTP/1.1 app
/// itself.
#[tokio::test]
async fn an_upload_longer_than_the_request_timeout_is_not_cut() {
    for mtls_off in [false, true] {
        let m = mesh_full(
            Duration::from_millis(500),
            |s| {
                if mtls_off {
                    s.mtls = Some(pb::Mtls::default());
                }
            },
            vec![vec![endpoint("v1", app("one").await)]],
            |_| {},
        );
        upload_slowly(&m, mtls_off).await;
    }
}

/// Posts 6 KiB to `/upload` through `m` in 1.2 s from an HTTP/1.1 and an h2 client, and wants
/// the app's count back.
async fn upload_slowly(m: &Mesh, mtls_off: bool) {
    let url = format!("http://{}/upload", m.outbound);
    for client in [http1_client(), h2c_client()] {
        // Six chunks of 1 KiB, 200 ms apart: 1.2 s of sending against a 500 ms timeout.
        let chunks = futures::stream::unfold(0u32, |i| async move {
            if i == 6 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'u'; 1024]))),
                i + 1,
            ))
        });
        let req = Request::post(&url)
            .body(BodyExt::boxed(StreamBody::new(chunks)))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .expect("a response in time")
            .expect("a response");
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"6144"[..]),
            "mTLS off: {mtls_off}"
        );
    }
}

/// A response body that stalls after its head (`/hold`: a first chunk, then nothing) has its
/// stream reset after the stream idle timeout (Kuma's 30 min; 400 ms here): the client's
/// body ends in an error instead of waiting forever, and the endpoint's stream is freed.
#[tokio::test]
async fn a_stalled_response_body_is_cut_after_the_stream_idle_timeout() {
    let (server, client, out) = one_to_one(allow("web"), "http", |o| {
        o.request_timeout = Duration::from_secs(5);
        o.stream_idle_timeout = Duration::from_millis(400);
    })
    .await;
    for c in [http1_client(), h2c_client()] {
        let started = std::time::Instant::now();
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            c.request(
                Request::get(format!("http://127.0.0.1:{out}/hold"))
                    .body(full(""))
                    .unwrap(),
            ),
        )
        .await
        .expect("a response head in time")
        .expect("a response head");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = body
            .frame()
            .await
            .expect("a frame")
            .expect("the first chunk");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"held"[..]));
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the stalled body ends within the timeout, not never");
        assert!(
            matches!(end, Some(Err(_))),
            "the stalled body ends in an error, not a frame or a clean end"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(350),
            "not before the timeout"
        );
    }
    // An upload that stops mid-body: the wait for the response head ends after the same
    // timeout (504), instead of holding the stream for as long as the client stays.
    let stalled = futures::stream::once(async {
        Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'u'; 32 * 1024])))
    })
    .chain(futures::stream::pending());
    let req = Request::post(format!("http://127.0.0.1:{out}/upload"))
        .body(BodyExt::boxed(StreamBody::new(stalled)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), h2c_client().request(req))
        .await
        .expect("an answer within the timeout, not never")
        .expect("a response");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    drop((server, client));
}

/// A gRPC call (h2c, `content-type: application/grpc`, one empty message) to `url`: the HTTP
/// status, and the `grpc-status` and `grpc-message` of the response head (trailers-only).
async fn grpc_call(url: &str) -> (StatusCode, String, String) {
    let req = Request::post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), h2c_client().request(req))
        .await
        .expect("a response in time")
        .expect("a response");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    (resp.status(), header("grpc-status"), header("grpc-message"))
}

/// The proxies' own answers to a gRPC call are trailers-only gRPC responses, as Envoy's: the
/// outbound's timeout is UNAVAILABLE (14), the inbound's refusal of a denied source
/// PERMISSION_DENIED (7), each with its reason.
#[tokio::test]
async fn local_answers_to_grpc_calls_carry_a_grpc_status() {
    let m = mesh(vec![vec![endpoint("v1", app("one").await)]], |_| {});
    let (status, code, message) = grpc_call(&format!("http://{}/slow", m.outbound)).await;
    assert_eq!(
        (status, code.as_str(), message.as_str()),
        (StatusCode::OK, "14", "upstream request timeout")
    );

    let (server, client, out) = one_to_one(deny("web"), "grpc", |_| {}).await;
    let (status, code, _) = grpc_call(&format!("http://127.0.0.1:{out}/pkg.Svc/Call")).await;
    assert_eq!((status, code.as_str()), (StatusCode::OK, "7"));
    drop((server, client));
}

/// An endpoint that takes TCP connections and never answers the TLS handshake costs each
/// request at most the request timeout (500 ms here), connecting included: the requests that
/// queued behind the one attempt to connect fail with it, not one handshake timeout (10 s)
/// after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_endpoint_costs_a_request_at_most_the_request_timeout() {
    let m = mesh(vec![vec![endpoint("v1", app("one").await)]], |_| {});
    let stall = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stall_port = stall.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stall.accept().await {
            held.push(s);
        }
    });
    point_client_at(&m, stall_port);

    let (answers, took) = ten_at_once(&m).await;
    for (status, body) in &answers {
        assert!(
            *status == StatusCode::GATEWAY_TIMEOUT || *status == StatusCode::SERVICE_UNAVAILABLE,
            "{status} {body}"
        );
    }
    assert!(took < Duration::from_secs(4), "10 requests took {took:?}");
    held.abort();
}

/// Requests that queued behind one attempt to connect fail with it when it fails, and do not
/// each try again in turn: an endpoint that drops every connection 300 ms into its TLS
/// handshake answers ten concurrent requests in about 300 ms, not ten times that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_behind_a_failed_connect_fail_with_it() {
    let m = mesh_full(
        Duration::from_secs(10),
        |_| {},
        vec![vec![endpoint("v1", app("one").await)]],
        |_| {},
    );
    let flaky = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky_port = flaky.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = flaky.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(s);
            });
        }
    });
    point_client_at(&m, flaky_port);

    let (answers, took) = ten_at_once(&m).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    assert!(
        took < Duration::from_millis(1500),
        "10 requests took {took:?}"
    );
    // One attempt for all that arrived while it ran (a request that came after it failed
    // may try once more).
    let attempts = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        attempts <= 2,
        "{attempts} attempts to connect for 10 requests"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_is_ejected_and_no_request_fails_after() {
    let shared_app = app("one").await;
    let mut m = mesh(
        vec![
            vec![endpoint("v1", shared_app)],
            vec![endpoint("v1", shared_app)],
        ],
        |out| {
            out.load_balancer = Some(pb::LoadBalancer {
                kind: pb::load_balancer::Kind::RoundRobin as i32,
                choice_count: 0,
            });
        },
    );
    let c = http1_client();
    let url = format!("http://{}/x", m.outbound);
    for _ in 0..100 {
        assert_eq!(get(&c, &url, &[]).await.0, StatusCode::OK);
    }
    // Kill the second server proxy: no more listener, established connections cut.
    let victim = m.servers.remove(1);
    drop(victim.dp);
    victim.drain.drain(Duration::ZERO).await;
    let mut failures = 0;
    for i in 0..300 {
        let (status, body) = get(&c, &url, &[]).await;
        if status != StatusCode::OK {
            failures += 1;
            assert!(i < 2, "request {i} after the kill failed: {status} {body}");
        }
    }
    assert!(failures <= 1, "{failures} failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_without_growing_memory() {
    const SIZE: usize = 100 * 1024 * 1024;
    // The response head comes once the app has read the whole upload: allow for that.
    let m = mesh_with(
        Duration::from_secs(60),
        vec![vec![endpoint("v1", app("one").await)]],
        |_| {},
    );
    let c = http1_client();
    // Warm the pools first so their buffers are not counted as growth.
    assert_eq!(
        get(&c, &format!("http://{}/warm", m.outbound), &[]).await.0,
        StatusCode::OK
    );
    let before = rss_kib();
    let chunk = Bytes::from(vec![1u8; 64 * 1024]);
    let upload = futures::stream::iter(
        (0..SIZE / chunk.len()).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
    );
    let req = Request::post(format!("http://{}/upload", m.outbound))
        .body(BodyExt::boxed(StreamBody::new(upload)))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, SIZE.to_string());

    let resp = c
        .request(
            Request::get(format!("http://{}/download?n={SIZE}", m.outbound))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut n = 0usize;
    while let Some(f) = body.frame().await {
        n += f.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(n, SIZE);
    let grown = rss_kib().saturating_sub(before);
    // Both sidecars, both apps and the client share this process: all of them stream.
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB moving 2 × 100 MiB"
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// An HTTP/1.1 request without a `Host`, or with one that is not an authority, is a 400 (RFC
/// 9112 §3.2); an HTTP/1.0 one goes to the service by its name.
#[tokio::test]
async fn an_http11_request_must_name_its_host() {
    let m = mesh(vec![vec![endpoint("v1", app("one").await)]], |_| {});
    for request in [
        "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw_http1(m.outbound, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{request:?}: {answer}");
    }
    let answer = raw_http1(m.outbound, "GET /x HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    assert!(answer.contains("host=api"), "{answer}");
}

/// Long-lived streams (here 300 response bodies that stay open, more than the peer's 256
/// streams per connection) do not starve other requests to the endpoint: the pool opens
/// another connection rather than queue requests behind the peer's stream limit.
#[tokio::test]
async fn long_lived_streams_do_not_starve_requests_to_their_endpoint() {
    let m = mesh(vec![vec![endpoint("v1", app("one").await)]], |_| {});
    let c = http1_client();
    let mut held = Vec::new();
    for _ in 0..300 {
        let resp = c
            .request(
                Request::get(format!("http://{}/hold", m.outbound))
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .expect("a held stream opens");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the first chunk in time")
            .expect("a frame")
            .expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"held"[..]));
        held.push(body);
    }
    let (status, body) = get(&c, &format!("http://{}/x", m.outbound), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(held);
}

/// One HTTP/1.1 request written raw to `addr`; the whole response (the connection closes).
async fn raw_http1(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .expect("the response in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// An Upgrade the app does not take is an ordinary exchange: a `GET` it answers `200` comes
/// back as that `200` with its body (not a `101`), and a `POST` offering an Upgrade reaches
/// the app as a `POST`, body and all.
#[tokio::test]
async fn an_upgrade_the_app_declines_is_an_ordinary_request() {
    let m = mesh(vec![vec![endpoint("v1", app("one").await)]], |_| {});
    let declined = raw_http1(
        m.outbound,
        &format!(
            "GET /plain HTTP/1.1\r\nHost: {}\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n",
            m.outbound
        ),
    )
    .await;
    assert!(declined.starts_with("HTTP/1.1 200"), "{declined}");
    assert!(declined.contains("one HTTP/1.1 /plain"), "{declined}");
    assert!(
        !declined
            .to_ascii_lowercase()
            .contains("weft-upgrade-declined"),
        "{declined}"
    );

    let posted = raw_http1(
        m.outbound,
        &format!(
            "POST /upload HTTP/1.1\r\nHost: {}\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
            m.outbound
        ),
    )
    .await;
    assert!(posted.starts_with("HTTP/1.1 200"), "{posted}");
    assert!(
        posted.ends_with("\r\n\r\n5"),
        "the app counted the body: {posted}"
    );
}

#[tokio::test]
async fn websocket_echo_works_through_the_mesh() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_app = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() || ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let m = mesh(vec![vec![endpoint("v1", ws_app)]], |_| {});
    let tcp = tokio::net::TcpStream::connect(m.outbound).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/chat", m.outbound), tcp)
        .await
        .expect("websocket handshake through the mesh");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .unwrap()
            .unwrap();
        assert_eq!(back, Message::text(format!("hello {i}")));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back, Message::binary(vec![0u8, 1, 2, 255]));
    // An open WebSocket is in flight for the drain: it gets the window, then is cut.
    let outcome = m.client.drain.drain(Duration::from_millis(300)).await;
    assert!(
        matches!(outcome, DrainOutcome::TimedOut { cut } if cut >= 1),
        "{outcome:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the cut WebSocket ends");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
}

mod grpc {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_unary_and_bidirectional_streaming_work_through_the_mesh() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_app = l.local_addr().unwrap();
        tokio::spawn(crate::grpc_echo::serve(l));
        let mut ep = endpoint("v1", grpc_app);
        ep.protocol = "grpc";
        let m = mesh(vec![vec![ep]], |_| {});
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", m.outbound))
            .unwrap()
            .connect()
            .await
            .unwrap();

        let mut id = pb::identity_client::IdentityClient::new(channel.clone());
        let r = id
            .certify(pb::CertifyRequest {
                csr: vec![1, 2, 3],
                mesh: "default".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().cert_chain_pem, "mesh=default csr=3");
        // A gRPC error status travels in trailers.
        let e = id
            .certify(pb::CertifyRequest {
                csr: vec![],
                mesh: "fail".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(e.message(), "told to fail");

        let mut disco = pb::discovery_client::DiscoveryClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut replies = disco
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for i in 0..20 {
            tx.send(pb::DiscoveryRequest {
                kind: Some(pb::discovery_request::Kind::Ack(pb::Ack {
                    version: i.to_string(),
                    nonce: String::new(),
                })),
            })
            .await
            .unwrap();
            let snap = tokio::time::timeout(Duration::from_secs(5), replies.next())
                .await
                .expect("reply in time")
                .unwrap()
                .unwrap();
            assert_eq!(snap.version, format!("echo-{i}"));
        }
        drop(tx);
        assert!(
            replies.next().await.is_none(),
            "the stream ends when the client's does"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sidecars_count_and_log_each_request_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let logging = pb::LoggingBackend {
        enabled: true,
        name: "file".into(),
        backend_type: "file".into(),
        destination: log.display().to_string(),
    };
    let m = mesh_full(
        Duration::from_secs(5),
        |s| s.logging = Some(logging),
        vec![vec![endpoint("v1", app("one").await)]],
        |_| {},
    );
    let c = http1_client();
    for i in 0..20 {
        let (status, _) = get(&c, &format!("http://{}/item/{i}?q=secret", m.outbound), &[]).await;
        assert_eq!(status, StatusCode::OK);
    }
    let client_totals = m.client.dp.as_ref().unwrap().config().telemetry.totals();
    let server_totals = m.servers[0]
        .dp
        .as_ref()
        .unwrap()
        .config()
        .telemetry
        .totals();
    assert_eq!(client_totals, (20, 0));
    assert_eq!(server_totals, (20, 0));
    // Both sidecars write to the same file here: 20 outbound and 20 inbound lines.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        if lines.len() >= 40 || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 40, "{lines:?}");
    for direction in ["outbound", "inbound"] {
        let mut paths: Vec<String> = lines
            .iter()
            .filter(|l| l["direction"] == direction)
            .map(|l| {
                assert_eq!(l["status"], 200, "{l}");
                l["path"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        paths.sort();
        let mut want: Vec<String> = (0..20).map(|i| format!("/item/{i}")).collect();
        want.sort();
        assert_eq!(paths, want, "{direction}");
    }
}
