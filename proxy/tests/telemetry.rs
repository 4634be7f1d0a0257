//! Telemetry end to end, in process: an outbound `Telemetry` (the client's sidecar) and an
//! inbound one (the server's) observe the same request, with the headers the outbound side
//! rewrote handed to the inbound side as the forwarded request would carry them. Spans go to
//! an in-test OTLP/gRPC collector (opentelemetry-proto's `TraceService` on tonic) or to an
//! in-test Zipkin endpoint (axum); access logs go to a file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Uri};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue as PbKeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use tokio::sync::mpsc;
use weft_api::proto::{LoggingBackend, TracingBackend};
use weft_proxy::telemetry::{Direction, Telemetry, TelemetryOptions, TelemetrySettings};

/// A span as the collector got it, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    resource_service: String,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

fn attr(attrs: &[PbKeyValue], key: &str) -> Option<AnyValue> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn string_attr(attrs: &[PbKeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        AnyValue::StringValue(s) => Some(s),
        _ => None,
    }
}

struct Collector(mpsc::UnboundedSender<Received>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let resource_service = rs
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let _ = self.0.send(Received {
                        resource_service: resource_service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector on 127.0.0.1.
async fn otlp_collector() -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("collector");
    });
    (addr, rx)
}

/// A Zipkin v2 endpoint on 127.0.0.1: every span of every POSTed array.
async fn zipkin_collector() -> (SocketAddr, mpsc::UnboundedReceiver<serde_json::Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/api/v2/spans",
        axum::routing::post(move |body: axum::Json<Vec<serde_json::Value>>| {
            let tx = tx.clone();
            async move {
                for span in body.0 {
                    let _ = tx.send(span);
                }
                http::StatusCode::ACCEPTED
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.expect("zipkin") });
    (addr, rx)
}

async fn take<T>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize) -> Vec<T> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(v)) => out.push(v),
            _ => panic!("got {} of {n} spans in 15 s", out.len()),
        }
    }
    out
}

fn options() -> TelemetryOptions {
    TelemetryOptions {
        export_interval: Duration::from_millis(50),
        ..TelemetryOptions::default()
    }
}

fn tracing_backend(kind: &str, endpoint: String, sampling: f64) -> TracingBackend {
    TracingBackend {
        enabled: true,
        name: kind.into(),
        backend_type: kind.into(),
        endpoint,
        sampling,
    }
}

/// A proxy of `service` in mesh `default`, knowing services web and backend.
fn sidecar(
    service: &str,
    tracing: Option<TracingBackend>,
    log: Option<LoggingBackend>,
) -> Telemetry {
    let t = Telemetry::with_options(options());
    t.apply(&TelemetrySettings {
        mesh: "default".into(),
        service: service.into(),
        services: vec!["backend".into(), "web".into()],
        tracing,
        logging: log,
    })
    .expect("apply");
    t
}

/// One request from web to backend through both sidecars; returns the headers the backend
/// app would see.
fn exchange(
    web: &Telemetry,
    backend: &Telemetry,
    app_headers: HeaderMap,
    status: u16,
) -> HeaderMap {
    let uri = Uri::from_static("http://backend:8080/api/items?page=2");
    let mut headers = app_headers;
    let mut client = web.begin(
        Direction::Outbound,
        "backend",
        Some(&Arc::from("backend")),
        &Method::GET,
        &uri,
        &mut headers,
    );
    client.peer_address("127.0.0.1:20001".parse().expect("addr"));
    // Forwarded: the inbound sidecar sees the rewritten headers.
    let inbound_uri = Uri::from_static("/api/items?page=2");
    let mut server = backend.begin(
        Direction::Inbound,
        "backend",
        Some(&Arc::from("web")),
        &Method::GET,
        &inbound_uri,
        &mut headers,
    );
    server.peer_address("127.0.0.1:40000".parse().expect("addr"));
    server.status(status);
    server.finish(10, 200, None);
    client.status(status);
    client.finish(10, 200, None);
    headers
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn otlp_gets_the_client_and_the_server_span_of_one_trace() {
    let (addr, mut rx) = otlp_collector().await;
    let backend_cfg = tracing_backend("opentelemetry", addr.to_string(), 100.0);
    let web = sidecar("web", Some(backend_cfg.clone()), None);
    let backend = sidecar("backend", Some(backend_cfg), None);

    let app_headers = exchange(&web, &backend, HeaderMap::new(), 200);
    let spans = take(&mut rx, 2).await;
    let client = spans
        .iter()
        .find(|s| s.span.kind == 3)
        .expect("a client span");
    let server = spans
        .iter()
        .find(|s| s.span.kind == 2)
        .expect("a server span");
    assert_eq!(client.resource_service, "web");
    assert_eq!(server.resource_service, "backend");
    assert_eq!(client.span.trace_id, server.span.trace_id);
    assert_eq!(server.span.parent_span_id, client.span.span_id);
    assert!(
        client.span.parent_span_id.is_empty(),
        "the client span is the root"
    );
    // The app behind the inbound sidecar sees the server span as its parent.
    let tp = app_headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .expect("traceparent");
    assert_eq!(
        tp,
        format!(
            "00-{}-{}-01",
            hex(&server.span.trace_id),
            hex(&server.span.span_id)
        )
    );
    let a = &client.span.attributes;
    assert_eq!(client.span.name, "GET");
    assert_eq!(
        string_attr(a, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(string_attr(a, "url.path").as_deref(), Some("/api/items"));
    assert_eq!(string_attr(a, "server.address").as_deref(), Some("backend"));
    assert_eq!(attr(a, "server.port"), Some(AnyValue::IntValue(8080)));
    assert_eq!(
        attr(a, "http.response.status_code"),
        Some(AnyValue::IntValue(200))
    );
    assert_eq!(
        string_attr(a, "network.peer.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(string_attr(a, "weft.mesh").as_deref(), Some("default"));
    assert_eq!(
        string_attr(a, "weft.direction").as_deref(),
        Some("outbound")
    );
    assert_eq!(string_attr(a, "weft.service").as_deref(), Some("backend"));
    assert_eq!(string_attr(a, "peer.service").as_deref(), Some("backend"));
    let a = &server.span.attributes;
    assert_eq!(string_attr(a, "peer.service").as_deref(), Some("web"));
    assert_eq!(string_attr(a, "weft.direction").as_deref(), Some("inbound"));
    // The counters follow the collector's answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while web.trace_metrics().exported.get() + backend.trace_metrics().exported.get() < 2
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(web.trace_metrics().exported.get(), 1);
    assert_eq!(backend.trace_metrics().exported.get(), 1);
}

#[tokio::test]
async fn sampling_zero_exports_nothing() {
    let (addr, mut rx) = otlp_collector().await;
    let off = tracing_backend("opentelemetry", addr.to_string(), 0.0);
    let web = sidecar("web", Some(off.clone()), None);
    let backend = sidecar("backend", Some(off), None);
    for _ in 0..20 {
        let h = exchange(&web, &backend, HeaderMap::new(), 200);
        // Still propagated, marked not sampled.
        assert!(
            h.get("traceparent")
                .is_some_and(|v| v.as_bytes().ends_with(b"-00"))
        );
    }
    // Positive control on the same collector: a 100 % sidecar's span arrives...
    let on = sidecar(
        "web",
        Some(tracing_backend("opentelemetry", addr.to_string(), 100.0)),
        None,
    );
    let uri = Uri::from_static("/");
    let o = on.begin(
        Direction::Outbound,
        "backend",
        None,
        &Method::GET,
        &uri,
        &mut HeaderMap::new(),
    );
    o.finish(0, 0, None);
    let got = take(&mut rx, 1).await;
    assert_eq!(got[0].span.kind, 3);
    // ...and after ten more export intervals, nothing else has.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "a span sampled at 0 % was exported");
    assert_eq!(web.trace_metrics().exported.get(), 0);
    assert_eq!(backend.trace_metrics().exported.get(), 0);
    assert_eq!(
        web.totals(),
        (20, 0),
        "metrics are kept whatever the sampling"
    );
}

#[tokio::test]
async fn zipkin_gets_v2_json_and_b3_is_read_and_written() {
    let (addr, mut rx) = zipkin_collector().await;
    let url = format!("http://{addr}/api/v2/spans");
    let web = sidecar(
        "web",
        Some(tracing_backend("zipkin", url.clone(), 100.0)),
        None,
    );
    let backend = sidecar("backend", Some(tracing_backend("zipkin", url, 100.0)), None);

    // The app's request continues a B3 trace from further upstream.
    let mut app = HeaderMap::new();
    app.insert(
        "b3",
        HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
    );
    let seen = exchange(&web, &backend, app, 503);
    let spans = take(&mut rx, 2).await;
    let by_kind = |k: &str| {
        spans
            .iter()
            .find(|s| s["kind"] == k)
            .unwrap_or_else(|| panic!("no {k} span in {spans:?}"))
    };
    let (client, server) = (by_kind("CLIENT"), by_kind("SERVER"));
    for s in [client, server] {
        assert_eq!(s["traceId"], "80f198ee56343ba864fe8b2a57d3eff7");
        assert!(
            s["timestamp"]
                .as_u64()
                .is_some_and(|t| t > 1_600_000_000_000_000)
        );
        assert!(s["duration"].as_u64().is_some_and(|d| d >= 1));
        assert_eq!(s["name"], "GET");
        assert_eq!(s["tags"]["http.response.status_code"], "503");
        assert_eq!(s["tags"]["error.type"], "503");
        assert!(s["tags"]["error"].is_string());
    }
    assert_eq!(client["parentId"], "e457b5a2e4d86bd1");
    assert_eq!(server["parentId"], client["id"]);
    assert_eq!(client["localEndpoint"]["serviceName"], "web");
    assert_eq!(client["remoteEndpoint"]["serviceName"], "backend");
    assert_eq!(client["remoteEndpoint"]["ipv4"], "127.0.0.1");
    assert_eq!(client["remoteEndpoint"]["port"], 20001);
    assert_eq!(server["localEndpoint"]["serviceName"], "backend");
    assert_eq!(server["remoteEndpoint"]["serviceName"], "web");

    // The backend app sees the server span in B3 single, multi and W3C form.
    let server_id = server["id"].as_str().expect("id");
    let get = |k: &str| {
        seen.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        get("b3"),
        format!(
            "80f198ee56343ba864fe8b2a57d3eff7-{server_id}-1-{}",
            client["id"].as_str().expect("id")
        )
    );
    assert_eq!(get("x-b3-traceid"), "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(get("x-b3-spanid"), server_id);
    assert_eq!(get("x-b3-sampled"), "1");
    assert_eq!(
        get("traceparent"),
        format!("00-80f198ee56343ba864fe8b2a57d3eff7-{server_id}-01")
    );
}

#[tokio::test]
async fn access_log_lines_match_observations_one_to_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = LoggingBackend {
        enabled: true,
        name: "file".into(),
        backend_type: "file".into(),
        destination: path.display().to_string(),
    };
    // Tracing on (to a dead zipkin: export fails and is counted) so lines carry trace ids.
    let dead = tracing_backend("zipkin", "http://127.0.0.1:9/api/v2/spans".into(), 100.0);
    let web = sidecar("web", Some(dead), Some(log.clone()));
    let backend = sidecar("backend", None, Some(log));

    let paths = ["/a", "/b/c", "/d"];
    let mut expected = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let uri: Uri = p.parse().expect("uri");
        let mut h = HeaderMap::new();
        let mut o = web.begin(
            Direction::Outbound,
            "backend",
            None,
            &Method::POST,
            &uri,
            &mut h,
        );
        let trace = o.trace_id().expect("traced").to_string();
        let status = 200 + i as u16;
        o.status(status);
        o.finish(i as u64, 100 + i as u64, None);
        expected.push(("outbound", Some(*p), Some(status), Some(trace), i as u64));
    }
    let uri = Uri::from_static("/fail");
    let o = web.begin(
        Direction::Outbound,
        "backend",
        None,
        &Method::GET,
        &uri,
        &mut HeaderMap::new(),
    );
    o.finish(0, 0, Some("connection refused"));
    let start = SystemTime::now();
    backend.connection(
        Direction::Inbound,
        "backend",
        Some(&Arc::from("web")),
        start,
        Duration::from_millis(1500),
        42,
        4242,
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        if lines.len() >= 5 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let http: Vec<_> = lines.iter().filter(|l| l["protocol"] == "http").collect();
    let tcp: Vec<_> = lines.iter().filter(|l| l["protocol"] == "tcp").collect();
    assert_eq!((http.len(), tcp.len()), (4, 1));
    for (line, (direction, path, status, trace, n)) in http.iter().zip(&expected) {
        assert_eq!(line["direction"], *direction);
        assert_eq!(line["path"], path.expect("path"));
        assert_eq!(line["status"], status.expect("status"));
        assert_eq!(line["trace_id"], trace.as_deref().expect("trace"));
        assert_eq!(line["method"], "POST");
        assert_eq!(line["mesh"], "default");
        assert_eq!(line["source_service"], "web");
        assert_eq!(line["destination_service"], "backend");
        assert_eq!(line["bytes_sent"], *n);
        assert_eq!(line["bytes_received"], 100 + *n);
        assert!(line["duration_ms"].as_f64().is_some());
        assert!(
            line["start_time"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
    }
    let failed = http[3];
    assert_eq!(failed["path"], "/fail");
    assert!(failed.get("status").is_none());
    assert_eq!(failed["error"], "connection refused");
    let conn = tcp[0];
    assert_eq!(conn["direction"], "inbound");
    assert_eq!(conn["source_service"], "web");
    assert_eq!(conn["destination_service"], "backend");
    assert_eq!(conn["duration_ms"], 1500.0);
    assert_eq!(
        (conn["bytes_sent"].as_u64(), conn["bytes_received"].as_u64()),
        (Some(42), Some(4242))
    );
    assert!(conn.get("method").is_none());
    // The counter follows the write.
    while web.access_log_metrics().written.get() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(web.access_log_metrics().written.get(), 4);
    assert_eq!(web.access_log_metrics().dropped_queue_full(), 0);
}

#[tokio::test]
async fn a_tracing_backend_change_applies_to_the_next_request() {
    let (first_addr, mut first) = otlp_collector().await;
    let (second_addr, mut second) = zipkin_collector().await;
    let t = Arc::new(sidecar(
        "web",
        Some(tracing_backend(
            "opentelemetry",
            first_addr.to_string(),
            100.0,
        )),
        None,
    ));
    let uri = Uri::from_static("/");
    // Begun on the first backend, finished after the switch: stays on the first.
    let in_flight = t.begin(
        Direction::Outbound,
        "backend",
        None,
        &Method::GET,
        &uri,
        &mut HeaderMap::new(),
    );
    t.apply(&TelemetrySettings {
        mesh: "default".into(),
        service: "web".into(),
        services: vec!["backend".into()],
        tracing: Some(tracing_backend(
            "zipkin",
            format!("http://{second_addr}/api/v2/spans"),
            100.0,
        )),
        logging: None,
    })
    .expect("switch");
    let o = t.begin(
        Direction::Outbound,
        "backend",
        None,
        &Method::GET,
        &uri,
        &mut HeaderMap::new(),
    );
    o.finish(0, 0, None);
    in_flight.finish(0, 0, None);
    assert_eq!(take(&mut first, 1).await.len(), 1);
    assert_eq!(take(&mut second, 1).await.len(), 1);
}
