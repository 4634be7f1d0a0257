//! Tests of [`Telemetry`] itself (the parts have their own).

use super::*;
use http::{HeaderMap, HeaderValue, Method, Uri};

fn settings(services: &[&str]) -> TelemetrySettings {
    TelemetrySettings {
        mesh: "default".into(),
        service: "web".into(),
        services: services.iter().map(|s| s.to_string()).collect(),
        tracing: None,
        logging: None,
    }
}

fn encode(t: &Telemetry) -> String {
    let mut r = Registry::default();
    t.register(&mut r);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
    out
}

#[test]
fn metrics_only_observations_count_and_leave_headers_alone() {
    let t = Telemetry::new();
    t.apply(&settings(&["backend", "web"])).expect("apply");
    let uri = Uri::from_static("/x?secret=1");
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let before = headers.clone();
    let mut o = t.begin(
        Direction::Outbound,
        "backend",
        None,
        &Method::GET,
        &uri,
        &mut headers,
    );
    assert_eq!(headers, before, "tracing off: headers untouched");
    assert_eq!(o.trace_id(), None);
    o.status(200);
    o.finish(1, 2, None);
    let mut o = t.begin(
        Direction::Inbound,
        "web",
        Some(&Arc::from("client")),
        &Method::POST,
        &uri,
        &mut headers,
    );
    o.status(503);
    o.finish(0, 0, None);
    // A transport failure: no status, code 0.
    let o = t.begin(
        Direction::Outbound,
        "backend",
        None,
        &Method::GET,
        &uri,
        &mut headers,
    );
    o.finish(0, 0, Some("connection refused"));
    assert_eq!(t.totals(), (3, 2));
    let text = encode(&t);
    for line in [
        r#"weft_requests_total{direction="outbound",service="backend",code="200"} 1"#,
        r#"weft_requests_total{direction="inbound",service="web",code="503"} 1"#,
        r#"weft_requests_total{direction="outbound",service="backend",code="0"} 1"#,
        "process_open_fds ",
        "weft_trace_spans_dropped_total{reason=\"queue_full\"} 0",
        "weft_access_log_lines_dropped_total{reason=\"queue_full\"} 0",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(!text.contains("secret"), "{text}");
}

#[test]
fn dropping_an_observation_records_it_as_aborted() {
    let t = Telemetry::new();
    t.apply(&settings(&["backend"])).expect("apply");
    let mut headers = HeaderMap::new();
    let uri = Uri::from_static("/");
    {
        let _o = t.begin(
            Direction::Outbound,
            "backend",
            None,
            &Method::GET,
            &uri,
            &mut headers,
        );
    }
    {
        let mut o = t.begin(
            Direction::Outbound,
            "backend",
            None,
            &Method::GET,
            &uri,
            &mut headers,
        );
        o.status(200); // head sent, then the body was cut
    }
    assert_eq!(t.totals(), (2, 2));
    let text = encode(&t);
    assert!(
        text.contains(r#"weft_requests_total{direction="outbound",service="backend",code="0"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"weft_requests_total{direction="outbound",service="backend",code="200"} 1"#
        ),
        "{text}"
    );
}

#[test]
fn observations_are_send_and_static() {
    fn check<T: Send + 'static>() {}
    check::<RequestObservation>();
    check::<Telemetry>();
}

#[tokio::test]
async fn backends_are_applied_and_replaced_live() {
    let t = Telemetry::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings(&["backend"]);
    s.logging = Some(LoggingBackend {
        enabled: true,
        name: "file".into(),
        backend_type: "file".into(),
        destination: dir.path().join("a.log").display().to_string(),
    });
    s.tracing = Some(TracingBackend {
        enabled: true,
        name: "z".into(),
        backend_type: "zipkin".into(),
        endpoint: "http://127.0.0.1:9/api/v2/spans".into(),
        sampling: 100.0,
    });
    t.apply(&s).expect("apply");
    assert!(t.tracing_enabled() && t.access_log_enabled());

    let uri = Uri::from_static("/");
    let mut headers = HeaderMap::new();
    let o = t.begin(
        Direction::Outbound,
        "backend",
        None,
        &Method::GET,
        &uri,
        &mut headers,
    );
    assert!(o.trace_id().is_some());
    // To the peer proxy: `traceparent` only; to an app: B3 as well (zipkin backend).
    assert!(!headers.contains_key("b3") && headers.contains_key("traceparent"));
    let mut headers = HeaderMap::new();
    let i = t.begin(
        Direction::Inbound,
        "web",
        Some(&Arc::from("backend")),
        &Method::GET,
        &uri,
        &mut headers,
    );
    assert!(i.trace_id().is_some());
    assert!(headers.contains_key("b3") && headers.contains_key("traceparent"));

    // A broken backend is turned off and reported; the rest still applies.
    s.tracing.as_mut().expect("set").endpoint = "https://nope/".into();
    s.logging.as_mut().expect("set").backend_type = "syslog".into();
    match t.apply(&s) {
        Err(TelemetryError::Several(e)) => assert_eq!(e.len(), 2),
        other => panic!("expected two errors, got {other:?}"),
    }
    assert!(!t.tracing_enabled() && !t.access_log_enabled());
    // The observation begun before finishes on its old backends.
    drop(o);
    s.tracing = None;
    s.logging = None;
    t.apply(&s).expect("off");
}

#[test]
fn settings_from_a_snapshot() {
    use weft_api::proto as pb;
    let snap = pb::Snapshot {
        dataplane: Some(pb::DataplaneIdentity {
            mesh: "payments".into(),
            name: "web-1".into(),
            ..Default::default()
        }),
        mesh: Some(pb::MeshSettings {
            name: "payments".into(),
            tracing: Some(pb::TracingBackend {
                enabled: true,
                backend_type: "zipkin".into(),
                ..Default::default()
            }),
            logging: Some(pb::LoggingBackend::default()),
            ..Default::default()
        }),
        inbounds: vec![pb::InboundConfig {
            service: "web".into(),
            ..Default::default()
        }],
        outbounds: vec![
            pb::OutboundService {
                service: "backend".into(),
                ..Default::default()
            },
            pb::OutboundService {
                service: "web".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let s = TelemetrySettings::from_snapshot(&snap);
    assert_eq!(s.mesh, "payments");
    assert_eq!(s.service, "web");
    assert_eq!(s.services, ["backend", "web"]);
    assert!(s.tracing.is_some());
    assert!(s.logging.is_none(), "a disabled backend is no backend");
}
