//! Every resource file a user would apply (`shared/examples`, copied to `tests/examples`)
//! parses, validates, and survives a round trip through the universal JSON form.

use weft_api::parse::{Form, parse_documents};

fn examples() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).expect("read"),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 6, "examples missing");
    out
}

#[test]
fn examples_parse_and_round_trip() {
    for (file, text) in examples() {
        let docs = parse_documents(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!docs.is_empty(), "{file}");
        for d in docs {
            let json = d.resource.to_universal(None).to_string();
            let again =
                parse_documents(&json).unwrap_or_else(|e| panic!("{file} round trip: {e}\n{json}"));
            assert_eq!(again[0].resource, d.resource, "{file}");
        }
    }
}

#[test]
fn kubernetes_form_equals_universal_form() {
    let universal = parse_documents(
        "type: MeshTrafficPermission\nmesh: payments\nname: p\nspec:\n  targetRef: {kind: Mesh}\n  from:\n  - targetRef: {kind: Mesh}\n    default: {action: Allow}\n",
    )
    .unwrap();
    let k8s = parse_documents(
        "apiVersion: kuma.io/v1alpha1\nkind: MeshTrafficPermission\nmetadata:\n  name: p\n  namespace: kuma-system\n  labels:\n    kuma.io/mesh: payments\nspec:\n  targetRef: {kind: Mesh}\n  from:\n  - targetRef: {kind: Mesh}\n    default: {action: Allow}\n",
    )
    .unwrap();
    assert_eq!(universal[0].resource, k8s[0].resource);
    assert_eq!(k8s[0].form, Form::Kubernetes);

    let tp_universal = parse_documents(
        "type: TrafficPermission\nmesh: default\nname: all\nsources: [{match: {kuma.io/service: '*'}}]\ndestinations: [{match: {kuma.io/service: '*'}}]\n",
    )
    .unwrap();
    let tp_k8s = parse_documents(
        "apiVersion: kuma.io/v1alpha1\nkind: TrafficPermission\nmesh: default\nmetadata: {name: all}\nspec:\n  sources: [{match: {kuma.io/service: '*'}}]\n  destinations: [{match: {kuma.io/service: '*'}}]\n",
    )
    .unwrap();
    assert_eq!(tp_universal[0].resource, tp_k8s[0].resource);
}

#[test]
fn a_traffic_route_method_may_be_a_name_or_a_kuma_string_match() {
    for method in ["POST", "{exact: POST}"] {
        let doc = format!(
            "type: TrafficRoute\nmesh: default\nname: r\nsources: [{{match: {{kuma.io/service: a}}}}]\n\
             destinations: [{{match: {{kuma.io/service: b}}}}]\nconf:\n  destination: {{kuma.io/service: b}}\n  \
             http:\n  - match:\n      method: {method}\n    destination: {{kuma.io/service: b}}\n"
        );
        let docs =
            weft_api::parse::parse_documents(&doc).unwrap_or_else(|e| panic!("{method}: {e}"));
        let weft_api::Spec::TrafficRoute(r) = &docs[0].resource.spec else {
            panic!("a TrafficRoute")
        };
        let m = r.conf.http[0].matcher.method.as_ref().expect("a method");
        assert_eq!(m.exact(), Some("POST"), "{method}");
    }
}

#[test]
fn tracing_collectors_take_the_forms_the_proxy_exports_to() {
    for (kind, field, address) in [
        (
            "opentelemetry",
            "endpoint",
            "otel-collector.observability:4317",
        ),
        ("opentelemetry", "endpoint", "10.0.0.5:4317"),
        ("opentelemetry", "endpoint", "[fd00::5]:4317"),
        ("opentelemetry", "endpoint", "http://127.0.0.1:4317"),
        ("zipkin", "url", "http://jaeger:9411/api/v2/spans"),
        ("zipkin", "url", "http://[fd00::5]/api/v2/spans"),
        ("zipkin", "url", "http://[fd00::1:2]:9411/api/v2/spans"),
    ] {
        let doc = format!(
            "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: t\n    type: {kind}\n    \
             conf: {{{field}: '{address}'}}\n"
        );
        weft_api::parse::parse_documents(&doc).unwrap_or_else(|e| panic!("{address}: {e}"));
    }
}
